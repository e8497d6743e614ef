"""What a policy costs away from its calibrated setting, on both bundled models through their pipelines.

The image model runs as a FluxPipeline whose scheduler uses FLUX's resolution-dependent
("dynamic") shift, scaled to this model's token counts (mu from 0.5 at 64 tokens to
1.15 at 256, FLUX's range), so another resolution also means another grid. The video
model runs as a WanPipeline (Wan's fixed shift 5). Policies are calibrated (target 2x,
true CFG; image: 20 samples, video: 10 clips) at one setting and run, by step index
(resolution) or through ``policy.for_steps`` (step count), at another; each is compared
with a policy calibrated at that setting and with uniform caching at the same NFE.
PSNR (dB) against the uncached pipeline on held-out seeds (image 20, video 10).

    python scripts/travel.py [--out docs/travel.md] [--models digits,moving-digits]
"""

from __future__ import annotations

import argparse
import warnings

import torch

from ertacache import Policy, apply_ertacache, calibrate_pipeline
from ertacache.bench.metrics import psnr
from ertacache.integrations.diffusers.families import FAMILIES, pipeline_fingerprint
from ertacache.models.digits import NULL_CLASS, digits_flux_pipeline, load_digits_model, pack, unpack


class Image:
    """The bundled image model as a FluxPipeline with FLUX's dynamic shift (scaled to its token counts)."""

    name, steps = "digits", (30, 50)
    sizes = (16, 24)  # pixels per side

    def __init__(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.model = load_digits_model()
        self.pipe = digits_flux_pipeline(self.model)
        self.pipe.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5,
                                                              max_shift=1.15, base_image_seq_len=64,
                                                              max_image_seq_len=256)
        self.pipe.set_progress_bar_config(disable=True)

    def kwargs(self, labels, size):
        model = self.model
        tokens, pooled = model.prompt_embeds(labels)
        null_tokens, null_pooled = model.prompt_embeds(torch.full_like(labels, NULL_CLASS))
        return dict(prompt_embeds=tokens, pooled_prompt_embeds=pooled, negative_prompt_embeds=null_tokens,
                    negative_pooled_prompt_embeds=null_pooled, true_cfg_scale=3.0, height=size, width=size)

    def generate(self, labels, seeds, size, steps):
        noise = torch.stack([torch.randn(1, size, size, generator=torch.Generator().manual_seed(s)) for s in seeds])
        out = self.pipe(latents=pack(noise), num_inference_steps=steps, output_type="latent",
                        **self.kwargs(labels, size)).images
        return unpack(out, size, size)

    def label(self, size):
        return f"{size}x{size}"


class Video:
    """The bundled video model as a WanPipeline (Wan's fixed shift 5: another size keeps the grid)."""

    name, steps = "moving-digits", (50, 30)
    sizes = (32, 48)  # canvas pixels per side, 8 frames

    def __init__(self):
        from ertacache.models.moving_digits import load_moving_digits_model, moving_digits_wan_pipeline

        self.model = load_moving_digits_model()
        self.pipe = moving_digits_wan_pipeline(self.model, 5.0)
        self.pipe.set_progress_bar_config(disable=True)

    def kwargs(self, labels, size):
        from ertacache.models.moving_digits import FRAMES

        null = torch.full_like(labels, NULL_CLASS)
        return dict(prompt_embeds=self.model.prompt_embeds(labels), negative_prompt_embeds=self.model.prompt_embeds(
            null), guidance_scale=4.0, height=size * 8, width=size * 8, num_frames=(FRAMES - 1) * 4 + 1)

    def generate(self, labels, seeds, size, steps):
        from ertacache.models.moving_digits import FRAMES

        noise = torch.stack([torch.randn(1, FRAMES, size, size, generator=torch.Generator().manual_seed(s))
                             for s in seeds])
        return torch.as_tensor(self.pipe(latents=noise, num_inference_steps=steps, output_type="latent",
                                         **self.kwargs(labels, size)).frames)

    def label(self, size):
        return f"8x{size}x{size}"


STEP_COUNTS = ((30, 20), (30, 50), (50, 30))
"""The step counts ``for_steps`` maps between (calibrated, run)."""


def measure(bench, n_cal, n_held):
    pipe = bench.pipe
    cal_labels = torch.arange(n_cal) % 10
    held_labels, held_seeds = torch.arange(n_held) % 10, list(range(1000, 1000 + n_held))
    policies: dict[tuple[int, int], Policy] = {}

    def calibrated(size, steps):
        if (size, steps) not in policies:
            policies[(size, steps)] = calibrate_pipeline(pipe, None, num_inference_steps=steps, target_speedup=2.0,
                                                         seeds=range(n_cal), **bench.kwargs(cal_labels, size))
        return policies[(size, steps)]

    refs: dict[tuple[int, int], torch.Tensor] = {}

    def score(policy, size, steps):
        if (size, steps) not in refs:
            refs[(size, steps)] = bench.generate(held_labels, held_seeds, size, steps)
        with warnings.catch_warnings(), apply_ertacache(pipe, policy) as handle:
            warnings.simplefilter("ignore")
            out = bench.generate(held_labels, held_seeds, size, steps)
            nfe = handle.forwards()["cond"]
        return psnr(out, refs[(size, steps)]), nfe

    fingerprint = pipeline_fingerprint(pipe, FAMILIES["flux" if bench.name == "digits" else "wan"])
    (s0, s1), t0 = bench.sizes, bench.steps[0]
    cases = [((s0, t0), (s1, t0), "another resolution (step index, the pipeline's grid)")]
    if bench.name == "digits":
        cases += [((s1, t0), (s0, t0), "another resolution (step index, the pipeline's grid)")]
    cases += [((s0, a), (s0, b), "another step count (for_steps)") for a, b in STEP_COUNTS]
    rows = []
    for (size0, steps0), (size1, steps1), how in cases:
        travelled = calibrated(size0, steps0).for_steps(steps1)
        p_travel, n_travel = score(travelled, size1, steps1)
        p_native, n_native = score(calibrated(size1, steps1), size1, steps1)
        uniform = Policy.uniform(steps1, n_travel, branches=("cond", "uncond"), model_fingerprint=fingerprint)
        p_uniform, _ = score(uniform, size1, steps1)
        rows.append(dict(model=bench.name, calibrated=f"{bench.label(size0)}, T={steps0}",
                         run=f"{bench.label(size1)}, T={steps1}", how=how, travelled=(round(p_travel, 2), n_travel),
                         native=(round(p_native, 2), n_native), uniform_same_nfe=round(p_uniform, 2)))
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="docs/travel.md")
    parser.add_argument("--models", default="digits,moving-digits")
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        if name == "digits":
            rows += measure(Image(), 20, 20)
        else:
            rows += measure(Video(), 10, 10)
    lines = ["| model | calibrated at | run at | how | travelled policy: PSNR (NFE) | calibrated there: PSNR (NFE) | "
             "uniform at the travelled NFE |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['calibrated']} | {r['run']} | {r['how']} | {r['travelled'][0]} "
                     f"({r['travelled'][1]}) | {r['native'][0]} ({r['native'][1]}) | {r['uniform_same_nfe']} |")
    from results import write_results

    print(write_results(args.out, lines, rows, f"python scripts/travel.py --models {args.models}"))


if __name__ == "__main__":
    main()

"""What a policy costs away from its calibrated setting, on the bundled model as a FluxPipeline.

The scheduler uses FLUX's resolution-dependent ("dynamic") shift, scaled to this model's
token counts (mu from 0.5 at 64 tokens to 1.15 at 256, FLUX's range), so another
resolution also means another grid. Policies are calibrated (target 2x, 20 samples,
true CFG 3) at one setting and run, by step index (resolution) or through
``policy.for_steps`` (step count), at another; each is compared with a policy calibrated
at that setting and with uniform caching at the same NFE. PSNR (dB) against the uncached
pipeline on 20 held-out seeds.

    python scripts/travel.py [--out docs/travel.md]
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch

from ertacache import Policy, apply_ertacache, calibrate_pipeline
from ertacache.integrations.diffusers.families import FAMILIES, pipeline_fingerprint
from ertacache.metrics import psnr
from ertacache.models.digits import NULL_CLASS, digits_flux_pipeline, load_digits_model, pack, unpack


def make_pipe():
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = load_digits_model()
    pipe = digits_flux_pipeline(model)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                     base_image_seq_len=64, max_image_seq_len=256)
    pipe.set_progress_bar_config(disable=True)
    return model, pipe


def call_kwargs(model, labels, size):
    tokens, pooled = model.prompt_embeds(labels)
    null_tokens, null_pooled = model.prompt_embeds(torch.full_like(labels, NULL_CLASS))
    return dict(prompt_embeds=tokens, pooled_prompt_embeds=pooled, negative_prompt_embeds=null_tokens,
                negative_pooled_prompt_embeds=null_pooled, true_cfg_scale=3.0, height=size, width=size)


def generate(pipe, model, labels, seeds, size, steps):
    noise = torch.stack([torch.randn(1, size, size, generator=torch.Generator().manual_seed(s)) for s in seeds])
    out = pipe(latents=pack(noise), num_inference_steps=steps, output_type="latent",
               **call_kwargs(model, labels, size)).images
    return unpack(out, size, size)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="docs/travel.md")
    args = parser.parse_args()
    model, pipe = make_pipe()
    cal_labels = torch.arange(20) % 10
    held_labels, held_seeds = torch.arange(20) % 10, list(range(1000, 1020))

    policies: dict[tuple[int, int], Policy] = {}

    def calibrated(size, steps):
        if (size, steps) not in policies:
            policies[(size, steps)] = calibrate_pipeline(
                pipe, None, num_inference_steps=steps, target_speedup=2.0, seeds=range(20),
                **call_kwargs(model, cal_labels, size))
        return policies[(size, steps)]

    refs: dict[tuple[int, int], torch.Tensor] = {}

    def score(policy, size, steps):
        if (size, steps) not in refs:
            refs[(size, steps)] = generate(pipe, model, held_labels, held_seeds, size, steps)
        with warnings.catch_warnings(), apply_ertacache(pipe, policy) as handle:
            warnings.simplefilter("ignore")
            out = generate(pipe, model, held_labels, held_seeds, size, steps)
            nfe = handle.forwards()["cond"]
        return psnr(out, refs[(size, steps)]), nfe

    def uniform(size, steps, nfe):
        fingerprint = pipeline_fingerprint(pipe, FAMILIES["flux"])
        return Policy.uniform(steps, nfe, branches=("cond", "uncond"), model_fingerprint=fingerprint)

    rows = []
    cases = [  # (calibrated at, run at, how)
        ((16, 30), (24, 30), "another resolution (step index, pipeline's grid)"),
        ((24, 30), (16, 30), "another resolution (step index, pipeline's grid)"),
        ((16, 30), (16, 50), "another step count (for_steps)"),
        ((16, 50), (16, 30), "another step count (for_steps)"),
    ]
    for (size0, steps0), (size1, steps1), how in cases:
        travelled = calibrated(size0, steps0).for_steps(steps1)
        native = calibrated(size1, steps1)
        p_travel, n_travel = score(travelled, size1, steps1)
        p_native, n_native = score(native, size1, steps1)
        p_uniform, _ = score(uniform(size1, steps1, n_travel), size1, steps1)
        rows.append(dict(calibrated=f"{size0}x{size0}, T={steps0}", run=f"{size1}x{size1}, T={steps1}", how=how,
                         travelled=(round(p_travel, 2), n_travel), native=(round(p_native, 2), n_native),
                         uniform_same_nfe=round(p_uniform, 2)))
        print(rows[-1], flush=True)
    lines = ["| calibrated at | run at | how | travelled policy: PSNR (NFE) | calibrated there: PSNR (NFE) | "
             "uniform at the travelled NFE |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['calibrated']} | {r['run']} | {r['how']} | {r['travelled'][0]} ({r['travelled'][1]}) | "
                     f"{r['native'][0]} ({r['native'][1]}) | {r['uniform_same_nfe']} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()

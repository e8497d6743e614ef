"""The one-line mode's quality and cost: a policy calibrated on the first call's own rows, against offline calibration.

On the four bundled models through their pipelines, each at its own sampler: digits as a FluxPipeline (FLUX's
dynamic shift scaled to its token counts, T = 30, true CFG 3), photos as a FluxPipeline (shift 3, T = 30, true
CFG 3.5), moving-digits and moving-photos as WanPipelines (shift 5, T = 50, CFG 4). For each target: the policy
``apply_ertacache(pipe, target_speedup=s)`` calibrates on a first call of one row and of four rows (classes 0 or
0-3, seeds 0..), the offline default (``calibrate_pipeline`` on the model's default calibration size, one row
per class, ``BundledModel.calibration_size``), evenly spaced caching at the one-row policy's NFE, and the best
diffusers peer (FirstBlockCache, TaylorSeer, MagCache, PAB, FasterCache over their full sweeps) whose NFE per
branch is at most the one-row policy's. PSNR (dB) against the uncached pipeline on held-out seeds (20 images,
10 clips). ``first_call_x``: the first call's wall time (calibration and the cached call) over one uncached
call of the same rows.

    python scripts/one_line.py [--models digits,photos,moving-digits,moving-photos] [--targets 1.5,2,3]
        [--out docs/one_line.md] [--seeds K]

``--seeds K``: only the one-row first call, calibrated on its row with K seeds (``calibration_rows=K``), with its
first-call cost and evenly spaced caching at its NFE (``docs/one_line_seeds.md``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from typing import Any

import torch
from results import write_results
from travel import Image, Video

from ertacache import Policy, apply_ertacache, calibrate_pipeline
from ertacache.bench.metrics import psnr
from ertacache.models.bundled import bundled_model
from ertacache.peers.diffusers_hooks import calibrate_magcache, peer_config, peer_settings, setting_label


class Bench:
    """A bundled model through its pipeline at one size: ``generate(labels, seeds)`` and ``kwargs(labels)``."""

    def __init__(self, name: str):
        self.name, self.bundled = name, bundled_model(name)
        self.steps, self.default_n = self.bundled.num_inference_steps, self.bundled.calibration_size
        self.held, self.num_classes = (10 if self.bundled.video else 20), self.bundled.num_classes
        if name in ("digits", "moving-digits"):  # the sampler of scripts/travel.py (digits: dynamic shift)
            self.inner: Any = Image() if name == "digits" else Video()
            size = self.inner.sizes[0]
            self.pipe = self.inner.pipe
            self.generate = lambda labels, seeds: self.inner.generate(labels, seeds, size, self.steps)
            self.kwargs = lambda labels: self.inner.kwargs(labels, size)
            return
        b = self.bundled
        self.model = b.load(None)
        self.pipe = b.pipeline(self.model, b.shift)
        self.generate = lambda labels, seeds: b.pipeline_sample(self.pipe, self.model, self.noise(seeds), labels,
                                                                self.steps, b.guidance_scale)

    def noise(self, seeds: list[int]) -> torch.Tensor:
        shape = self.bundled.latent_shape
        return torch.stack([torch.randn(*shape, generator=torch.Generator().manual_seed(s)) for s in seeds])

    def kwargs(self, labels: torch.Tensor) -> dict[str, Any]:
        b, m, null = self.bundled, self.model, torch.full_like(labels, self.bundled.null_class)
        if b.video:
            c, f, h, w = b.latent_shape
            return dict(prompt_embeds=m.prompt_embeds(labels), negative_prompt_embeds=m.prompt_embeds(null),
                        guidance_scale=b.guidance_scale, height=h * 8, width=w * 8, num_frames=(f - 1) * 4 + 1)
        tokens, pooled = m.prompt_embeds(labels)
        null_tokens, null_pooled = m.prompt_embeds(null)
        return dict(prompt_embeds=tokens, pooled_prompt_embeds=pooled, negative_prompt_embeds=null_tokens,
                    negative_pooled_prompt_embeds=null_pooled, true_cfg_scale=b.guidance_scale,
                    height=b.latent_shape[-2], width=b.latent_shape[-1])


def peer_rows(bench: Bench, held_labels: torch.Tensor, held_seeds: list[int], ref: torch.Tensor) -> list[dict]:
    """Every diffusers peer setting on the held-out rows: PSNR and NFE per branch (two branches: true CFG)."""
    pipe, steps = bench.pipe, bench.steps
    counter = {"n": 0}
    tf = pipe.transformer
    last = [m for m in tf.modules() if type(m).__name__.endswith("Block")][-1]
    linear = next(m for m in last.modules() if isinstance(m, torch.nn.Linear))
    handle = linear.register_forward_hook(lambda *a: counter.__setitem__("n", counter["n"] + 1))
    cal_labels = torch.arange(bench.default_n) % bench.num_classes
    try:
        ratios = calibrate_magcache(tf, steps, lambda: bench.generate(cal_labels, list(range(bench.default_n))))
    except RuntimeError as exc:
        print(f"MagCache not run: {exc}", flush=True)
        ratios = None

    def timestep() -> float:
        return float(pipe.current_timestep) if pipe.current_timestep is not None else 0.0

    rows = []
    for name, setting in peer_settings(False, ratios, where="pipeline"):
        tf.enable_cache(peer_config(name, setting, timestep, steps, packed_tokens=not bench.bundled.video))
        counter["n"] = 0
        try:
            out = bench.generate(held_labels, held_seeds)
        finally:
            tf.disable_cache()
        rows.append({"peer": name, "setting": setting_label(setting), "psnr": round(psnr(out, ref), 2),
                     "nfe": counter["n"] // 2})
    handle.remove()
    return rows


def measure(bench: Bench, targets: list[float], seeds_of_one_row: int | None = None) -> list[dict]:
    held_labels = torch.arange(bench.held) % bench.num_classes
    held_seeds = list(range(1000, 1000 + bench.held))
    ref = bench.generate(held_labels, held_seeds)
    peers = [] if seeds_of_one_row else peer_rows(bench, held_labels, held_seeds, ref)

    def score(policy: Policy) -> float:
        with warnings.catch_warnings(), apply_ertacache(bench.pipe, policy):
            warnings.simplefilter("ignore")
            return round(psnr(bench.generate(held_labels, held_seeds), ref), 2)

    def first_call(rows: int, target: float, calibration_rows: int | None = None) -> tuple[Policy, float]:
        labels = torch.arange(rows)
        tic = time.perf_counter()
        bench.generate(labels, list(range(rows)))
        uncached = time.perf_counter() - tic
        with tempfile.TemporaryDirectory() as cache, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            handle = apply_ertacache(bench.pipe, target_speedup=target, cache_dir=cache,
                                     calibration_rows=calibration_rows)
            tic = time.perf_counter()
            bench.generate(labels, list(range(rows)))
            first = time.perf_counter() - tic
            policy = handle.policy
            handle.remove()
        return policy, round(first / uncached, 2)

    rows = []
    for target in targets:
        if seeds_of_one_row:  # only the one-row call calibrated on that row with more seeds
            more, x = first_call(1, target, seeds_of_one_row)
            rows.append({"model": bench.name, "T": bench.steps, "target": target, "seeds": seeds_of_one_row,
                         "one_row_more_seeds": (score(more), more.nfe), "first_call_x": x,
                         "uniform_same_nfe": score(Policy.uniform(bench.steps, more.nfe, like=more))})
            print(json.dumps(rows[-1]), flush=True)
            continue
        one, x1 = first_call(1, target)
        four, x4 = first_call(4, target)
        labels = torch.arange(bench.default_n) % bench.num_classes
        offline = calibrate_pipeline(bench.pipe, None, num_inference_steps=bench.steps, target_speedup=target,
                                     seeds=range(bench.default_n), **bench.kwargs(labels))
        fits = [p for p in peers if p["nfe"] <= one.nfe]
        best = max(fits, key=lambda p: p["psnr"]) if fits else None
        rows.append({"model": bench.name, "T": bench.steps, "target": target,
                     "one_row": (score(one), one.nfe), "first_call_x_one_row": x1,
                     "four_rows": (score(four), four.nfe), "first_call_x_four_rows": x4,
                     "offline_default": (score(offline), offline.nfe, bench.default_n),
                     "uniform_same_nfe": score(Policy.uniform(bench.steps, one.nfe, like=one)),
                     "best_peer": best, "peers": peers})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "peers"}), flush=True)
    return rows


def peer_cell(best: dict | None) -> str:
    return f"{best['psnr']} ({best['peer']}, NFE {best['nfe']})" if best else "none at this NFE"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="digits,photos,moving-digits,moving-photos")
    p.add_argument("--targets", default="1.5,2,3")
    p.add_argument("--out", default=None, help="default docs/one_line.md (docs/one_line_seeds.md with --seeds)")
    p.add_argument("--seeds", type=int, default=None,
                   help="only the one-row call, calibrated on its row with this many seeds (calibration_rows)")
    args = p.parse_args()
    targets = [float(t) for t in args.targets.split(",")]
    rows = []
    for name in args.models.split(","):
        rows += measure(Bench(name), targets, args.seeds)
    if args.seeds:
        lines = [f"| model | target | one row on {args.seeds} seeds: PSNR (NFE) | first call / uncached | "
                 "evenly spaced at its NFE |", "|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['target']:g}x | {r['one_row_more_seeds'][0]} ({r['one_row_more_seeds'][1]}) | "
                  f"{r['first_call_x']} | {r['uniform_same_nfe']} |" for r in rows]
        print(write_results(args.out or "docs/one_line_seeds.md", lines, rows,
                            f"python scripts/one_line.py --models {args.models} --targets {args.targets} "
                            f"--seeds {args.seeds}"))
        return
    lines = ["| model | target | one row: PSNR (NFE) | first call / uncached | four rows: PSNR (NFE) | first call / "
             "uncached | offline default: PSNR (NFE, rows) | evenly spaced at the one-row NFE | best peer at that NFE "
             "or lower |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o = r["offline_default"]
        lines.append(f"| {r['model']} | {r['target']:g}x | {r['one_row'][0]} ({r['one_row'][1]}) | "
                     f"{r['first_call_x_one_row']} | {r['four_rows'][0]} ({r['four_rows'][1]}) | "
                     f"{r['first_call_x_four_rows']} | {o[0]} ({o[1]}, {o[2]}) | {r['uniform_same_nfe']} | "
                     f"{peer_cell(r['best_peer'])} |")
    print(write_results(args.out or "docs/one_line.md", lines, rows,
                        f"python scripts/one_line.py --models {args.models} --targets {args.targets}"))


if __name__ == "__main__":
    main()

"""The one-line mode's quality and cost: a policy calibrated on the first call's own rows, against offline calibration.

On both bundled pipelines (digits as a FluxPipeline, FLUX's dynamic shift scaled to its token counts, T = 30,
true CFG 3; moving-digits as a WanPipeline, shift 5, T = 50, CFG 4), for each target: the policy
``apply_ertacache(pipe, target_speedup=s)`` calibrates on a first call of one row and of four rows (classes 0
or 0-3, seed 0..), the offline default (``calibrate_pipeline`` on the model's default calibration size, one
row per class), and evenly spaced caching at the one-row policy's NFE; PSNR (dB) against the uncached pipeline
on held-out seeds (20 images, 10 clips). ``first_call_x``: the first call's wall time (calibration and the
cached call) over one uncached call of the same rows.

    python scripts/one_line.py [--models digits,moving-digits] [--targets 1.5,2,3] [--out docs/one_line.md]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings

import torch
from results import write_results
from travel import Image, Video

from ertacache import Policy, apply_ertacache, calibrate_pipeline
from ertacache.bench.metrics import psnr


def measure(bench, steps: int, size: int, default_n: int, held: int, targets: list[float]) -> list[dict]:
    held_labels, held_seeds = torch.arange(held) % 10, list(range(1000, 1000 + held))
    ref = bench.generate(held_labels, held_seeds, size, steps)

    def score(policy: Policy) -> float:
        with warnings.catch_warnings(), apply_ertacache(bench.pipe, policy):
            warnings.simplefilter("ignore")
            return round(psnr(bench.generate(held_labels, held_seeds, size, steps), ref), 2)

    def first_call(rows: int, target: float) -> tuple[Policy, float]:
        labels = torch.arange(rows)
        tic = time.perf_counter()
        bench.generate(labels, list(range(rows)), size, steps)
        uncached = time.perf_counter() - tic
        with tempfile.TemporaryDirectory() as cache, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            handle = apply_ertacache(bench.pipe, target_speedup=target, cache_dir=cache)
            tic = time.perf_counter()
            bench.generate(labels, list(range(rows)), size, steps)
            first = time.perf_counter() - tic
            policy = handle.policy
            handle.remove()
        return policy, round(first / uncached, 2)

    rows = []
    for target in targets:
        one, x1 = first_call(1, target)
        four, x4 = first_call(4, target)
        labels = torch.arange(default_n) % 10
        offline = calibrate_pipeline(bench.pipe, None, num_inference_steps=steps, target_speedup=target,
                                     seeds=range(default_n), **bench.kwargs(labels, size))
        rows.append({"model": bench.name, "T": steps, "target": target,
                     "one_row": (score(one), one.nfe), "first_call_x_one_row": x1,
                     "four_rows": (score(four), four.nfe), "first_call_x_four_rows": x4,
                     "offline_default": (score(offline), offline.nfe, default_n),
                     "uniform_same_nfe": score(Policy.uniform(steps, one.nfe, like=one))})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="digits,moving-digits")
    p.add_argument("--targets", default="1.5,2,3")
    p.add_argument("--out", default="docs/one_line.md")
    args = p.parse_args()
    targets = [float(t) for t in args.targets.split(",")]
    rows = []
    for name in args.models.split(","):
        if name == "digits":
            rows += measure(Image(), 30, 16, 10, 20, targets)
        else:
            rows += measure(Video(), 50, 32, 10, 10, targets)
    lines = ["| model | target | one row: PSNR (NFE) | first call / uncached | four rows: PSNR (NFE) | first call / "
             "uncached | offline default: PSNR (NFE, rows) | evenly spaced at the one-row NFE |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o = r["offline_default"]
        lines.append(f"| {r['model']} | {r['target']:g}x | {r['one_row'][0]} ({r['one_row'][1]}) | "
                     f"{r['first_call_x_one_row']} | {r['four_rows'][0]} ({r['four_rows'][1]}) | "
                     f"{r['first_call_x_four_rows']} | {o[0]} ({o[1]}, {o[2]}) | {r['uniform_same_nfe']} |")
    print(write_results(args.out, lines, rows,
                        f"python scripts/one_line.py --models {args.models} --targets {args.targets}"))


if __name__ == "__main__":
    main()

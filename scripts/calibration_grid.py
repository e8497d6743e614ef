"""Held-out quality and cost of calibration over shifts, targets and calibration sizes, on a bundled model.

    python scripts/calibration_grid.py --model digits --config default --out docs/calibration/grid_digits_default.json

For each grid shift, the uncached samples of the held-out seeds (10000..) are the
reference. For each calibration size N (the first N of classes 0..9 repeated, seeds
F..F+N-1 with F = ``--first-seed``, 0 by default: another F draws another calibration
set), one :func:`ertacache.calibrate_many` over the targets (ground truth shared) gives
a policy per target; each policy, and evenly spaced computation at its NFE with the
same reuse mode, is sampled on the held-out seeds and scored (mean PSNR, dB).
Rows: model, shift, N, target, NFE, PSNR, uniform PSNR at that NFE, calibration
model calls and their count in uncached generations of the set.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from heldout import Reference

from ertacache import CalibrationConfig, Policy, calibrate_many
from ertacache.io import atomic_write_text

CONFIGS = {
    "default": lambda: CalibrationConfig(),
    "thorough": lambda: CalibrationConfig.thorough(),  # type: ignore[attr-defined]
    "propagation": lambda: CalibrationConfig(propagation_candidate=True),
    "search": lambda: CalibrationConfig(candidates=("search",), search_candidates=1, component_check=False,
                                        timestep_adjustment=False, step_reuse_choice=False),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="digits")
    p.add_argument("--config", default="default", choices=sorted(CONFIGS))
    p.add_argument("--shifts", default="1,3,5")
    p.add_argument("--targets", default="1.5,2,3,4")
    p.add_argument("--sizes", default="20", help="calibration sizes N, comma-separated")
    p.add_argument("--heldout-per-class", type=int, default=4)
    p.add_argument("--first-seed", type=int, default=0, help="the calibration set's first noise seed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--policies", default=None, help="also save each policy in this folder (to compare two commits)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rows: list[dict[str, Any]] = []
    targets = [float(s) for s in args.targets.split(",")]
    held: Reference | None = None
    for shift in [float(s) for s in args.shifts.split(",")]:
        held = Reference(args.model, shift=shift, per_class=args.heldout_per_class, threads=args.threads,
                         model=None if held is None else held.model)
        uniform: dict[tuple[str, int], float] = {}
        for n in [int(s) for s in args.sizes.split(",")]:
            cal_labels = torch.arange(n) % 10
            start = time.perf_counter()
            cal_seeds = list(range(args.first_seed, args.first_seed + n))
            policies = calibrate_many(held.model, cal_labels, cal_seeds, target_speedups=targets,
                                      latent_shape=held.bundled.latent_shape, **held.sampler(cal_labels),
                                      config=CONFIGS[args.config]())
            seconds = time.perf_counter() - start
            for target, pol in zip(targets, policies):
                if args.policies:
                    Path(args.policies).mkdir(parents=True, exist_ok=True)
                    name = f"{args.model}_shift{shift:g}_N{n}_seed{args.first_seed}_{target:g}x.safetensors"
                    pol.save(Path(args.policies) / name)
                key = (pol.reuse, pol.nfe)
                if key not in uniform:
                    uniform[key] = held.score(Policy.uniform(held.T, pol.nfe, like=pol))
                cost = pol.provenance.get("cost", {})
                row = {"model": args.model, "config": args.config, "shift": shift, "N": n,
                       "first_seed": args.first_seed, "target": target,
                       "nfe": pol.nfe, "psnr": held.score(pol), "uniform_psnr": uniform[key],
                       "selected": pol.provenance.get("selected"), "variant": pol.provenance.get("variant"),
                       "model_calls": cost.get("target", cost).get("model_calls"),
                       "generations": cost.get("target", cost).get("uncached_generations"),
                       "calibrate_many_seconds": round(seconds, 1)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    meta = {"command": "python scripts/calibration_grid.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                if k not in ("threads",) and v is not None),
            "T": held.T, "guidance_scale": held.guidance_scale, "held_out": len(held.seeds),
            "date": time.strftime("%Y-%m-%d")}
    atomic_write_text(args.out, json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

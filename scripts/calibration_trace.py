"""Every decision of one default ``calibrate_many``, beside what held-out seeds say of each candidate.

    python scripts/calibration_trace.py --model digits --shift 3 --calibration 20 --heldout-per-class 4 \
        --targets 1.5,2,3,4 --out docs/calibration/trace_digits_shift3.json

Calibrates on the first ``--calibration`` samples (classes repeated, seeds 0..) for all
targets at once (nested, ground truth shared), then samples each target's policy and
every candidate set it judged (plain: no rectification) on the held-out seeds (10000..)
against their uncached outputs. Per target: the choice, each candidate's calibration
error (as ``-10 log10`` of the geometric-mean MSE, dB) and held-out PSNR, and the
paired comparisons calibration made (``provenance["decisions"]``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace

import torch
from heldout import Reference

from ertacache import CalibrationConfig, calibrate_many
from ertacache.io import atomic_write_text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="digits")
    p.add_argument("--shift", type=float, default=None, help="default: the model's sampler")
    p.add_argument("--calibration", type=int, default=20)
    p.add_argument("--heldout-per-class", type=int, default=4)
    p.add_argument("--targets", default="1.5,2,3,4")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    held = Reference(args.model, shift=args.shift, per_class=args.heldout_per_class, threads=args.threads)
    cal = torch.arange(args.calibration) % held.bundled.num_classes
    targets = [float(s) for s in args.targets.split(",")]
    policies = calibrate_many(held.model, cal, list(range(args.calibration)), target_speedups=targets,
                              latent_shape=held.bundled.latent_shape, **held.sampler(cal), config=CalibrationConfig())
    rows = []
    for target, policy in zip(targets, policies):
        pv = policy.provenance
        row = {"target": target, "nfe": policy.nfe, "selected": pv["selected"], "variant": pv["variant"],
               "heldout_psnr": held.score(policy), "candidates": [], "decisions": pv["decisions"]}
        print(f"== {target}x (NFE {policy.nfe}): {pv['selected']}, {pv['variant']}: {row['heldout_psnr']} dB held out")
        for c in pv["candidates"]:
            plain = replace(policy.ablate(timestep_adjustment=False, rectification=False),
                            cached_steps=tuple(c["cached_steps"]),
                            step_reuse={int(k): v for k, v in c.get("step_reuse", {}).items()})
            entry = {"candidate": c["source"] + (f" ({c['rule']})" if c.get("rule") else ""), "nfe": c["nfe"],
                     "calibration_db": {k: round(-10 * math.log10(v), 2) for k, v in c["errors"].items()},
                     "heldout_plain_psnr": held.score(plain)}
            row["candidates"].append(entry)
            print(f"   {entry['candidate']}: calibration {entry['calibration_db']}, held out (plain) "
                  f"{entry['heldout_plain_psnr']}")
        for d in pv["decisions"]:
            print(f"   decision: {d}")
        rows.append(row)
    if args.out:
        meta = {"command": "python scripts/calibration_trace.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "threads"),
            "T": held.T, "shift": held.shift, "held_out": len(held.seeds), "date": time.strftime("%Y-%m-%d")}
        atomic_write_text(args.out, json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

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

from ertacache import CalibrationConfig, Policy, calibrate_many, sample, seeded_noise
from ertacache.io import atomic_write_text
from ertacache.metrics import psnr
from ertacache.models.bundled import bundled_model, labels_and_seeds


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
    torch.set_num_threads(args.threads)
    b = bundled_model(args.model)
    model = b.load(None)
    T, cfg = b.num_inference_steps, b.guidance_scale
    shift = b.shift if args.shift is None else args.shift
    labels, seeds = labels_and_seeds(args.heldout_per_class, 10_000, b.num_classes)
    noise = seeded_noise(seeds, b.latent_shape)
    kw = dict(num_inference_steps=T, shift=shift, guidance_scale=cfg, null_cond=torch.full_like(labels, b.null_class))

    def run(policy: Policy | None) -> torch.Tensor:
        with torch.no_grad():
            return sample(model, noise, labels, policy=policy, **kw).x

    ref = run(None)
    cal = torch.arange(args.calibration) % b.num_classes
    targets = [float(s) for s in args.targets.split(",")]
    policies = calibrate_many(model, cal, list(range(args.calibration)), target_speedups=targets,
                              latent_shape=b.latent_shape, num_inference_steps=T, shift=shift, guidance_scale=cfg,
                              null_cond=torch.full_like(cal, b.null_class), config=CalibrationConfig())
    rows = []
    for target, policy in zip(targets, policies):
        pv = policy.provenance
        row = {"target": target, "nfe": policy.nfe, "selected": pv["selected"], "variant": pv["variant"],
               "heldout_psnr": round(psnr(run(policy), ref), 2), "candidates": [], "decisions": pv["decisions"]}
        print(f"== {target}x (NFE {policy.nfe}): {pv['selected']}, {pv['variant']}: {row['heldout_psnr']} dB held out")
        for c in pv["candidates"]:
            plain = replace(policy.ablate(timestep_adjustment=False, rectification=False),
                            cached_steps=tuple(c["cached_steps"]),
                            step_reuse={int(k): v for k, v in c.get("step_reuse", {}).items()})
            entry = {"candidate": c["source"] + (f" ({c['rule']})" if c.get("rule") else ""), "nfe": c["nfe"],
                     "calibration_db": {k: round(-10 * math.log10(v), 2) for k, v in c["errors"].items()},
                     "heldout_plain_psnr": round(psnr(run(plain), ref), 2)}
            row["candidates"].append(entry)
            print(f"   {entry['candidate']}: calibration {entry['calibration_db']}, held out (plain) "
                  f"{entry['heldout_plain_psnr']}")
        for d in pv["decisions"]:
            print(f"   decision: {d}")
        rows.append(row)
    if args.out:
        meta = {"command": "python scripts/calibration_trace.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "threads"),
            "T": T, "shift": shift, "held_out": len(seeds), "date": time.strftime("%Y-%m-%d")}
        atomic_write_text(args.out, json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

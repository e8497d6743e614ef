"""Reuse modes compared under the schedule search, on a bundled model at its realistic settings.

    python scripts/reuse_modes.py --model digits --out docs/reuse_modes_digits.json

For each reuse mode, one calibration (candidates: the schedule search and the uniform
set, every component judged) gives a policy per target; each is sampled on the
held-out seeds (10000..) and compared with the uncached samples (PSNR). Used to decide
whether ``extrapolate`` (first-order extrapolation, rectified on top) earns a place.
"""

from __future__ import annotations

import argparse
import json

import torch

from ertacache import CalibrationConfig, sample, seeded_noise
from ertacache.bench.methods import BenchSettings, Context
from ertacache.calibration import core_session
from ertacache.demo import labels_and_seeds
from ertacache.io import atomic_write_text
from ertacache.metrics import psnr
from ertacache.models.bundled import bundled_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="digits")
    p.add_argument("--modes", default="velocity,extrapolate,latent_residual")
    p.add_argument("--targets", default="2,3")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(2)
    settings = BenchSettings.for_model(args.model)
    bundled = bundled_model(args.model)
    model = bundled.load(None)
    ctx = Context(model, settings, None, bundled)
    labels, seeds = labels_and_seeds(settings.heldout_per_class, 10_000)
    noise = seeded_noise(seeds, bundled.latent_shape)
    with torch.no_grad():
        ref = sample(model, noise, labels, **ctx.kwargs(labels)).x
    rows = []
    for mode in args.modes.split(","):
        config = CalibrationConfig(reuse=mode, candidates=("search", "uniform"))
        session = core_session(model, ctx.cal_labels, ctx.cal_seeds, config=config, **ctx.cal_kwargs())
        for target in [float(s) for s in args.targets.split(",")]:
            pol = session.policy(target_speedup=target)
            with torch.no_grad():
                out = sample(model, noise, labels, policy=pol, **ctx.kwargs(labels)).x
            row = {"model": args.model, "reuse": mode, "target": target, "nfe": pol.nfe,
                   "selected": pol.provenance["selected"], "variant": pol.provenance["variant"],
                   "psnr": round(psnr(out, ref), 2)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    meta = {"command": f"python scripts/reuse_modes.py --model {args.model} --modes {args.modes} "
                       f"--targets {args.targets} --out {args.out}",
            "settings": {"T": settings.num_inference_steps, "shift": settings.shift,
                         "guidance_scale": settings.guidance_scale, "calibration": len(ctx.cal_seeds),
                         "held_out": len(seeds)}}
    atomic_write_text(args.out, json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

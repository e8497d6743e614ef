"""Probe: held-out calibration error (MSE x 1e6) of every candidate and component variant.

    python scripts/probe_options.py --steps 30 --guidance 3 --shift 1 --target 2 [--config '{"reuse": "velocity"}']

Used to choose the library's defaults; prints one line per candidate.
"""

import argparse
import json

import torch

import ertacache
from ertacache import CalibrationConfig
from ertacache.models.bundled import labels_and_seeds
from ertacache.models.digits import NULL_CLASS, load_digits_model

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=30)
p.add_argument("--guidance", type=float, default=3.0)
p.add_argument("--shift", type=float, default=1.0)
p.add_argument("--target", type=float, default=2.0)
p.add_argument("--per-class", type=int, default=2)
p.add_argument("--config", action="append", default=[])
args = p.parse_args()
model = load_digits_model()
labels, seeds = labels_and_seeds(args.per_class, 0)
for raw in args.config or ["{}"]:
    cfg = CalibrationConfig(**json.loads(raw))
    pol = ertacache.calibrate(model, labels, seeds, latent_shape=(1, 16, 16), num_inference_steps=args.steps,
                              guidance_scale=args.guidance, shift=args.shift,
                              null_cond=torch.full_like(labels, NULL_CLASS), target_speedup=args.target, config=cfg)
    for c in pol.provenance["candidates"]:
        errs = " ".join(f"{k}={v * 1e6:8.1f}" for k, v in c["errors"].items())
        print(f"T={args.steps} g={args.guidance} shift={args.shift} {raw:40s} {c['source']:9s} "
              f"nfe={c['nfe']:2d} {errs}", flush=True)

"""How much caching hurts a bundled model: evenly spaced computation at NFE = T/2 and T/3 against uncached.

    python scripts/regime.py --model photos --out docs/photos/regime_photos.json

The held-out seeds (10000..) of every class, sampled at the model's family settings
(T, shift, CFG) uncached and with ``Policy.uniform`` (``extrapolate`` and ``velocity``
reuse) at NFE = T/2 and T/3; mean PSNR (dB) against the uncached samples. Also runs on
weights being trained (``--weights``), to follow the regime during training.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ertacache import Policy, sample, seeded_noise
from ertacache.bench.metrics import psnr
from ertacache.io import atomic_write_text
from ertacache.models.bundled import bundled_model, labels_and_seeds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="photos")
    p.add_argument("--weights", default=None)
    p.add_argument("--per-class", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    b = bundled_model(args.model)
    model = b.load(args.weights)
    T = b.num_inference_steps
    labels, seeds = labels_and_seeds(args.per_class, 10_000, b.num_classes)
    noise = seeded_noise(seeds, b.latent_shape)
    kw = dict(num_inference_steps=T, shift=b.shift, guidance_scale=b.guidance_scale,
              null_cond=torch.full_like(labels, b.null_class))
    start = time.perf_counter()
    with torch.no_grad():
        ref = sample(model, noise, labels, **kw).x
        rows = []
        for nfe in (T // 2, T // 3):
            for reuse in ("extrapolate", "velocity"):
                policy = Policy.uniform(T, nfe, shift=b.shift, reuse=reuse)
                x = sample(model, noise, labels, policy=policy, **kw).x
                rows.append({"nfe": nfe, "reuse": reuse, "psnr": round(float(psnr(x, ref)), 2)})
                print(json.dumps(rows[-1]), flush=True)
    result = {"model": args.model, "weights": args.weights or "bundled", "T": T, "shift": b.shift,
              "guidance_scale": b.guidance_scale, "samples": len(seeds), "rows": rows,
              "seconds": round(time.perf_counter() - start, 1),
              "command": "python scripts/regime.py --model " + args.model
              + (f" --weights {args.weights}" if args.weights else "") + f" --per-class {args.per_class}",
              "date": time.strftime("%Y-%m-%d")}
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

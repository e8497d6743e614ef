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

from heldout import HeldOut

from ertacache import CalibrationConfig
from ertacache.calibration import core_session
from ertacache.io import atomic_write_text


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="digits")
    p.add_argument("--modes", default="velocity,extrapolate,latent_residual")
    p.add_argument("--targets", default="2,3")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    held = HeldOut(args.model)
    ctx, settings = held.ctx, held.settings
    rows = []
    for mode in args.modes.split(","):
        config = CalibrationConfig(reuse=mode, candidates=("search", "uniform"))
        session = core_session(held.model, ctx.cal_labels, ctx.cal_seeds, config=config, **ctx.cal_kwargs())
        for target in [float(s) for s in args.targets.split(",")]:
            pol = session.policy(target_speedup=target)
            row = {"model": args.model, "reuse": mode, "target": target, "nfe": pol.nfe,
                   "selected": pol.provenance["selected"], "variant": pol.provenance["variant"],
                   "psnr": held.score(pol)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    meta = {"command": f"python scripts/reuse_modes.py --model {args.model} --modes {args.modes} "
                       f"--targets {args.targets} --out {args.out}",
            "settings": {"T": settings.num_inference_steps, "shift": settings.shift,
                         "guidance_scale": settings.guidance_scale, "calibration": len(ctx.cal_seeds),
                         "held_out": len(held.seeds)}}
    atomic_write_text(args.out, json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

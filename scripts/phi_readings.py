"""Timestep adjustment (Eq. 13-14) under each reading of phi's denominator, on a bundled model.

    python scripts/phi_readings.py --model digits --out docs/phi_readings_digits.json

One calibration at 2x with the defaults gives the cached set S. On S, for each
reading (v1: ``||v_j - v_{j-1}||_1`` on the cached trajectory; v2: ``||v_j||_1``; gt:
``||v_j - v_{j-1}||_1`` along the uncached trajectory), the adjustment pass estimates
phi, and the held-out PSNR (seeds 10000..) of S plain, S adjusted, and S adjusted +
rectified (fitted on the adjusted grid) is measured against the uncached samples.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from heldout import HeldOut

from ertacache import CalibrationConfig
from ertacache.calibration import AdjustTimesteps, core_session
from ertacache.io import atomic_write_text

READINGS = {"v1 (velocity_change)": "velocity_change", "v2 (velocity)": "velocity",
            "gt (gt_velocity_change)": "gt_velocity_change"}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="digits")
    p.add_argument("--out", required=True)
    p.add_argument("--reuse", default=None, help="reuse mode (default: the library's)")
    args = p.parse_args()
    held = HeldOut(args.model)
    ctx, settings, score = held.ctx, held.settings, held.score
    config = CalibrationConfig() if args.reuse is None else CalibrationConfig(reuse=args.reuse)
    session = core_session(held.model, ctx.cal_labels, ctx.cal_seeds, config=config, **ctx.cal_kwargs())
    chosen = session.policy(target_speedup=2.0)
    plain = session.variants["plain"]
    rows = [{"model": args.model, "reading": "none (S plain)", "psnr": score(plain)}]
    print(json.dumps({"S": list(plain.cached_steps), "selected": chosen.provenance["selected"]}), flush=True)
    print(json.dumps(rows[0]), flush=True)
    base = session.config
    for name, reading in READINGS.items():
        session.config = replace(base, phi_denominator=reading)
        adj = AdjustTimesteps(plain.cached_steps, reading, session.truth.changes)
        session.runner.run("timestep adjustment", adj, session.proposer.fit, session.grid)
        adjusted = replace(plain, adjusted_grid=tuple(adj.grid))
        a, b, enabled = session.components.rectify(plain.cached_steps, adj.grid, plain.branches)
        full = replace(adjusted, rect_a=a, rect_b=b, rect_enabled=enabled, rect_form=base.rectification)
        phis = list(adj.phis.values())
        row = {"model": args.model, "reading": name, "phi_min": round(min(phis), 3), "phi_mean":
               round(sum(phis) / len(phis), 3), "phi_max": round(max(phis), 3), "psnr_adjusted": score(adjusted),
               "psnr_adjusted_rectified": score(full)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    rect = session.variants.get("rectified")
    if rect is not None:
        rows.append({"model": args.model, "reading": "none, rectified", "psnr": score(rect)})
        print(json.dumps(rows[-1]), flush=True)
    reuse = f" --reuse {args.reuse}" if args.reuse else ""
    meta = {"command": f"python scripts/phi_readings.py --model {args.model}{reuse} --out {args.out}",
            "reuse": config.reuse,
            "S": list(plain.cached_steps), "nfe": plain.nfe, "selected": chosen.provenance["selected"],
            "settings": {"T": settings.num_inference_steps, "shift": settings.shift,
                         "guidance_scale": settings.guidance_scale, "calibration": len(ctx.cal_seeds),
                         "held_out": len(held.seeds)}}
    atomic_write_text(args.out, json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

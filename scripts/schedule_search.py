"""Which candidate source wins, and what each calibration costs: Algorithm 2, uniform, the schedule search.

    python scripts/schedule_search.py --model digits --out docs/schedule_search_digits.json
    python scripts/schedule_search.py --model moving-digits --out docs/schedule_search_moving-digits.json

On a bundled model at its realistic settings (the benchmark's calibration set and
held-out seeds 10000..), one calibration session (ground truth with the error model,
Algorithm 2's sweep, every candidate's variants) is asked for a policy with each set
of sources allowed (and, for ``extrapolate`` reuse, the search with the velocity error
model it used before, and the per-step reuse choice on and off); every policy is
sampled on the held-out seeds and compared with the uncached samples (PSNR). Then fresh
calibrations at 2x are timed: the sources of ertacache 0.1 (threshold + uniform, every
component judged) and the search alone in its fewest passes (one proposed set, no
component check), without and with the per-step reuse choice.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace

import torch
from heldout import HeldOut

from ertacache import CalibrationConfig
from ertacache.calibration import core_session
from ertacache.io import atomic_write_text

ALL = ("threshold", "uniform", "search")
SOURCES = {
    "Algorithm 2 (paper)": dict(candidates=("threshold",), step_reuse_choice=False),
    "uniform": dict(candidates=("uniform",), step_reuse_choice=False),
    "search, velocity error model": dict(candidates=("search",), step_reuse_choice=False),
    "search": dict(candidates=("search",), step_reuse_choice=False),
    "all three, no per-step reuse": dict(candidates=ALL, step_reuse_choice=False),
    "all three + per-step reuse (default)": dict(candidates=ALL, step_reuse_choice=True),
}
FAST = {"search, fewest passes": dict(candidates=("search",), search_candidates=1, component_check=False,
                                      timestep_adjustment=False, step_reuse_choice=False),
        "search + per-step reuse, fewest passes": dict(candidates=("search",), search_candidates=1,
                                                       component_check=False, timestep_adjustment=False),
        "threshold + uniform (0.1 default)": dict(candidates=("threshold", "uniform"), step_reuse_choice=False)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="digits")
    p.add_argument("--targets", default="2,3")
    p.add_argument("--reuse", default=None, help="reuse mode (default: the library's)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    held = HeldOut(args.model)
    model, ctx, settings = held.model, held.ctx, held.settings
    rows = []
    base = CalibrationConfig() if args.reuse is None else CalibrationConfig(reuse=args.reuse)
    with tempfile.TemporaryDirectory() as tmp:
        session = core_session(model, ctx.cal_labels, ctx.cal_seeds, config=base, checkpoint_dir=tmp,
                               **ctx.cal_kwargs())
        for target in [float(s) for s in args.targets.split(",")]:
            for name, change in SOURCES.items():
                if name.startswith("search") and base.reuse != "extrapolate" and name != "search":
                    continue
                config = replace(base, **change)  # the same session (its passes shared) under each source
                for room in (session, session.proposer, session.components):
                    room.config = config
                session.runner.max_passes = config.max_passes
                if name == "search, velocity error model":  # as before the extrapolation model: velocity's costs
                    session.proposer._triples = {None: {}}
                pol = session.policy(target_speedup=target)
                session.proposer._triples.clear()
                chosen = pol.provenance["candidates"][pol.provenance["chosen"]]
                row = {"model": args.model, "target": target, "sources": name, "nfe": pol.nfe,
                       "selected": pol.provenance["selected"], "variant": pol.provenance["variant"],
                       "rule": chosen.get("rule"), "step_reuse": chosen.get("step_reuse", {}),
                       "psnr": held.score(pol)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    timing = []
    for name, change in FAST.items():
        start = time.perf_counter()
        pol = core_session(model, ctx.cal_labels, ctx.cal_seeds, config=replace(base, **change),
                           **ctx.cal_kwargs()).policy(target_speedup=2.0)
        seconds = time.perf_counter() - start
        cost = pol.provenance["cost"]
        row = {"model": args.model, "calibration": name, "passes": sum(v["passes"] for v in cost["by_pass"].values()),
               "model_calls": cost["model_calls"], "seconds": round(seconds, 1), "nfe": pol.nfe,
               "selected": pol.provenance["selected"], "variant": pol.provenance["variant"],
               "step_reuse": pol.step_reuse, "psnr": held.score(pol)}
        print(json.dumps(row), flush=True)
        timing.append(row)
    reuse = f" --reuse {args.reuse}" if args.reuse else ""
    meta = {"command": f"python scripts/schedule_search.py --model {args.model} --targets {args.targets}{reuse} "
                       f"--out {args.out}", "reuse": base.reuse,
            "settings": {"T": settings.num_inference_steps, "shift": settings.shift,
                         "guidance_scale": settings.guidance_scale, "calibration": len(ctx.cal_seeds),
                         "held_out": len(held.seeds)},
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    atomic_write_text(args.out, json.dumps({"meta": meta, "sources": rows, "calibration": timing}, indent=2) + "\n")


if __name__ == "__main__":
    main()

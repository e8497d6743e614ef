"""How often calibration chooses well, over many draws of the calibration set: error rates, not one draw.

    python scripts/calibration_draws.py --model digits --shift 3 --out docs/calibration/draws/digits_shift3.json

For each calibration size N (``--sizes``), ``--draws`` calibration sets are drawn (classes and noise seeds at
random, seeded by model, shift, N and draw; seeds below 10000, the held-out seeds' start), and at the model's
default calibration size ``--default-draws`` more, with ``--thorough`` beside the default. Each draw is one
:func:`ertacache.calibrate_many` over ``--targets``. On the held-out seeds (10000.., ``--heldout-per-class`` of each
class) every policy is scored, and so is every plain candidate set the calibration judged for its target (NFE within
the target's budget) and evenly spaced caching at the policy's NFE with the same reuse mode:

- ``psnr``, ``uniform_psnr``: mean PSNR (dB) of the policy and of evenly spaced caching;
- ``best_psnr``, ``gap_db``: the best of the policy and the candidates, and how far the policy is below it;
- ``heldout_gain_db``: the mean over held-out seeds of ``10 log10(MSE_uniform / MSE_policy)``, and ``covered``:
  whether the policy's stated gain over evenly spaced caching (``provenance["decision"]``: its interval) holds it
  (draws that keep a set other than the evenly spaced one; else None).

Rows are written after each draw (atomically); run the same command again to resume, ``--minutes`` bounds a run.
``--restate`` recalibrates the draws already written and rewrites only what their policies state (for a change of the
statement, not of the decision).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import torch
from heldout import Reference
from results import commit

from ertacache import CalibrationConfig, Policy, calibrate_many
from ertacache.bench.metrics import psnr as metrics_psnr
from ertacache.io import atomic_write_text


def draw_set(model: str, shift: float, n: int, draw: int, classes: int) -> tuple[torch.Tensor, list[int]]:
    """A calibration set: ``n`` classes and noise seeds (below 10000) drawn at random, seeded by its identity."""
    rng = random.Random(f"{model}/{shift:g}/{n}/{draw}")
    return torch.tensor([rng.randrange(classes) for _ in range(n)]), [rng.randrange(10_000) for _ in range(n)]


def other_classes(model: str, shift: float, n: int, draw: int, classes: int, labels: torch.Tensor,
                  k: int) -> torch.Tensor | None:
    """``k`` classes not among the draw's ``labels`` (as many as there are, cycled), drawn reproducibly per draw;
    None for ``k = 0``."""
    if k == 0:
        return None
    rng = random.Random(f"{model}/{shift:g}/{n}/{draw}/check")
    others = [c for c in range(classes) if c not in set(labels.tolist())] or list(range(classes))
    rng.shuffle(others)
    return torch.tensor([others[i % len(others)] for i in range(k)])


def per_sample_mse(held: Reference, x: torch.Tensor) -> torch.Tensor:
    return (x - held.ref).double().square().flatten(1).mean(1).clamp_min(1e-30)


def stated(policy: Policy) -> dict[str, Any] | None:
    """The policy's stated gain over evenly spaced caching at its NFE, with its interval (dB), if it states one."""
    d = policy.provenance.get("decision")
    if isinstance(d, dict) and "interval_db" in d:  # about the policy where it kept a set, else about the best other
        checks = [r["fresh_check"] for r in policy.provenance.get("decisions", []) if isinstance(r.get("fresh_check"),
                                                                                                dict)]
        return {"gain_db": d["gain_db"], "interval_db": d["interval_db"], "kept": d["kept"], "option": d["option"],
                **({"fresh_checks": [{k: c[k] for k in ("gain_db", "unconditional", "other", "other_prompts")
                                      if k in c} for c in checks]}
                   if checks else {})}
    for row in policy.provenance.get("decisions", []):  # a rule that states a margin: the gain +- its error
        if "uniform set" in row["decision"].split(" over ")[-1] and row.get("kept"):
            return {"gain_db": row["gain_db"], "interval_db": [row["gain_db"] - row["se_db"],
                                                               row["gain_db"] + row["se_db"]]}
    return None


SAMPLES: dict[tuple[Any, ...], torch.Tensor] = {}
"""Held-out samples of plain sets (no coefficients of a draw's own): the same set samples alike in every draw,
so it is sampled once."""


def covered(claim: dict[str, Any] | None, gain: float) -> bool | None:
    """Whether a kept set's stated interval holds its held-out gain (None where no set was kept)."""
    if claim is None or not claim.get("kept", True):
        return None
    return bool(claim["interval_db"][0] <= gain <= claim["interval_db"][1])


def restate(args: argparse.Namespace, doc: dict[str, Any], out: Path) -> None:
    """Recalibrate every draw in ``doc`` with the current code and rewrite what its policies state (interval,
    coverage, cost), the held-out scores kept: for a change of the statement alone. Stops where a policy is not
    the one scored (another NFE, source, variant or stated option)."""
    held = Reference(args.model, shift=args.shift, labels=torch.tensor([0]), seeds=[10_000], threads=args.threads)
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in doc["rows"]:
        groups.setdefault((r["N"], r["draw"], r["config"]), []).append(r)
    for (n, draw, config), rows in groups.items():
        labels = torch.tensor(rows[0]["labels"])
        config_ = CalibrationConfig.thorough() if config.startswith("thorough") else CalibrationConfig()
        check = torch.tensor(rows[0]["check_classes"]) if "check_classes" in rows[0] else None
        policies = calibrate_many(held.model, labels, rows[0]["seeds"], target_speedups=[r["target"] for r in rows],
                                  latent_shape=held.bundled.latent_shape, config=config_, check_cond=check,
                                  **held.sampler(labels))
        for r, pol in zip(rows, policies):
            claim = stated(pol)
            same = (pol.nfe, pol.provenance.get("selected"), pol.provenance.get("variant")) == (
                r["nfe"], r["selected"], r["variant"]) and (claim or {}).get("option") == (r["stated"] or {}).get(
                "option")
            if not same:
                raise SystemExit(f"N={n} draw {draw} {config} {r['target']}x: the current code calibrates another "
                                 "policy than the one scored; run the draws again instead of --restate")
            r.update(stated=claim, covered=covered(claim, r["heldout_gain_db"]),
                     generations=pol.provenance.get("cost", {}).get("target", {}).get("uncached_generations"))
        print(f"restated N={n} draw {draw} {config}", flush=True)
    doc["meta"]["restated"] = {"commit": commit(), "date": time.strftime("%Y-%m-%d")}
    atomic_write_text(out, json.dumps(doc, indent=1) + "\n")


def plain_sample(held: Reference, policy: Policy) -> torch.Tensor:
    key = (policy.cached_steps, tuple(sorted(policy.step_reuse.items())), policy.rect_form, policy.adjusted_grid)
    if key not in SAMPLES:
        SAMPLES[key] = held.sample(policy)
    return SAMPLES[key]


def score_plain(held: Reference, policy: Policy) -> float:
    return round(metrics_psnr(plain_sample(held, policy), held.ref), 2)


def score_draw(held: Reference, policies: list[Policy], targets: list[float]) -> list[dict[str, Any]]:
    rows = []
    fields = ("num_inference_steps", "grid", "reuse", "branches", "shift", "guidance_scale", "latent_shape", "config")
    for target, pol in zip(targets, policies):
        max_nfe = int(held.T / target + 1e-9)
        uniform = Policy.uniform(held.T, pol.nfe, like=pol)
        x_policy = held.sample(pol)
        mse_u, mse_p = per_sample_mse(held, plain_sample(held, uniform)), per_sample_mse(held, x_policy)
        cands = {}
        for c in pol.provenance.get("candidates", []):
            if c["nfe"] <= max_nfe:
                cand = Policy(cached_steps=tuple(c["cached_steps"]), **{k: getattr(pol, k) for k in fields},
                              step_reuse={int(k): v for k, v in c.get("step_reuse", {}).items()})
                key = (tuple(c["cached_steps"]), tuple(sorted(c.get("step_reuse", {}).items())))
                if key not in cands:
                    cands[key] = (c.get("rule") or c["source"], c["nfe"], score_plain(held, cand))
        psnr = round(metrics_psnr(x_policy, held.ref), 2)
        best = max([psnr] + [s for _, _, s in cands.values()])
        gain = float((10 * torch.log10(mse_u / mse_p)).mean())
        claim = stated(pol)
        rows.append({"target": target, "nfe": pol.nfe, "selected": pol.provenance.get("selected"),
                     "variant": pol.provenance.get("variant"), "psnr": psnr,
                     "uniform_psnr": score_plain(held, uniform),
                     "best_psnr": best, "gap_db": round(best - psnr, 2), "chose_best": psnr >= best - 0.005,
                     "candidates": [{"rule": r, "nfe": n, "psnr": s} for r, n, s in cands.values()],
                     "heldout_gain_db": round(gain, 3), "stated": claim, "covered": covered(claim, gain),
                     "generations": pol.provenance.get("cost", {}).get("target", {}).get("uncached_generations")})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="digits")
    p.add_argument("--shift", type=float, required=True)
    p.add_argument("--targets", default="1.5,2,3")
    p.add_argument("--sizes", default="1,2,4,8")
    p.add_argument("--draws", type=int, default=8)
    p.add_argument("--default-draws", type=int, default=3, help="draws at the model's default calibration size")
    p.add_argument("--thorough", action="store_true", help="also --thorough at the default calibration size")
    p.add_argument("--heldout-per-class", type=int, default=4)
    p.add_argument("--check-classes", type=int, default=0,
                   help="give calibration this many other classes (not among the draw's, drawn with it) as "
                        "check_cond: a fitted set must also gain on them")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--minutes", type=float, default=None, help="stop after this many minutes (resume later)")
    p.add_argument("--out", required=True)
    p.add_argument("--restate", action="store_true",
                   help="recalibrate the draws already in --out with the current code and rewrite what each policy "
                        "states (interval, coverage, cost), keeping the held-out scores; the policies must be the "
                        "ones scored")
    args = p.parse_args()
    start = time.perf_counter()
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    if args.restate:
        restate(args, doc, out)
        return
    done = {(r["N"], r["draw"], r["config"].split(",")[0]) for r in doc["rows"]}  # "default, 4 check classes"
    held = Reference(args.model, shift=args.shift, per_class=args.heldout_per_class, threads=args.threads)
    targets = [float(s) for s in args.targets.split(",")]
    default_n = held.bundled.calibration_size
    plan = [(n, d, "default") for n in [int(s) for s in args.sizes.split(",")] for d in range(args.draws)]
    plan += [(default_n, 100 + d, c) for d in range(args.default_draws)
             for c in (("default", "thorough") if args.thorough else ("default",))]
    for n, draw, config in plan:
        if (n, draw, config) in done:
            continue
        if args.minutes is not None and time.perf_counter() - start > 60 * args.minutes:
            print(f"stopping: the {args.minutes}-minute budget is spent; run again to resume", flush=True)
            break
        labels, seeds = draw_set(args.model, args.shift, n, draw, held.bundled.num_classes)
        config_ = CalibrationConfig.thorough() if config == "thorough" else CalibrationConfig()
        check = other_classes(args.model, args.shift, n, draw, held.bundled.num_classes, labels, args.check_classes)
        tic = time.perf_counter()
        policies = calibrate_many(held.model, labels, seeds, target_speedups=targets,
                                  latent_shape=held.bundled.latent_shape, config=config_, check_cond=check,
                                  **held.sampler(labels))
        seconds = time.perf_counter() - tic
        for row in score_draw(held, policies, targets):
            label = config + (f", {args.check_classes} check classes" if args.check_classes else "")
            doc["rows"].append({"model": args.model, "shift": args.shift, "N": n, "draw": draw, "config": label,
                                "labels": labels.tolist(), "seeds": seeds,
                                **({} if check is None else {"check_classes": check.tolist()}), **row,
                                "calibrate_many_seconds": round(seconds, 1)})
            print(json.dumps({k: v for k, v in doc["rows"][-1].items() if k != "candidates"}), flush=True)
        doc["meta"] = {"command": "python scripts/calibration_draws.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if k not in ("threads", "minutes") and v is not None and v is not False).replace(" True", ""),
            "commit": commit(), "T": held.T, "guidance_scale": held.guidance_scale,
            "held_out": len(held.seeds), "default_size": default_n, "date": time.strftime("%Y-%m-%d")}
        atomic_write_text(out, json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()

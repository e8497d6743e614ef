"""Does the schedule search's error model rank cached sets as their measured error does? And with propagation?

    python scripts/error_model.py --model photos --out docs/photos/error_model_photos.json

On a bundled model at its sampler (``extrapolate`` reuse, the default), one calibration
session (its calibration set: one sample per class, seeds 0..) logs the error model. For
each target (NFE = T / target) a pool of cached sets is built: the search's sets under
each reading of the model (the sets calibration judges), the evenly spaced set, random
sets, and one-step moves of the search's first set. Every set is run as the cached
sampler on the calibration samples (the statistic calibration judges by: the geometric
mean over samples of the MSE at t = 0 against uncached), and its modelled error is the
search's path cost. Spearman's rank correlation between the two, per target and
reading.

**Propagation.** The model counts a segment's drift once, as it is made. A drift that
arrives in the state at step k is then carried by the flow to t = 0, amplified or damped.
The script measures that gain per step: caching step j alone (a drift arriving at
state j + 1) on the calibration samples, measured MSE / modelled cost, relative to the
median probe (steps 1-3, T - 2 and ``--probes`` more, evenly spaced; log-linear between
them). The propagated reading multiplies each segment's cost by the gain of the state it
arrives at, is ranked the same way, and its own
shortest-path sets are sampled on held-out seeds (10000..) beside the search's sets:
the effect on held-out PSNR.

**Fitted propagation** (no probe): gains ``exp(beta t_k)`` with the slope ``beta`` fitted
(least squares in log, a free scale) to the sets calibration itself judges for this
target and the smaller ones before it (the search's once-counted sets and the evenly
spaced set), as ``calibrate_many`` would have them; its shortest-path set joins the pool
and the held-out comparison. ``--probes 0`` skips the probes and their readings.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from typing import Any

import torch
from scipy.stats import spearmanr

from ertacache import CalibrationConfig, Policy, sample, seeded_noise
from ertacache.bench.methods import BenchSettings, Context
from ertacache.bench.metrics import psnr
from ertacache.calibration import core_session
from ertacache.calibration.schedule import fit_propagation, path_cost, shortest_schedule
from ertacache.io import atomic_write_text
from ertacache.models.bundled import bundled_model, labels_and_seeds
from ertacache.policy import uniform_cached_steps


def modelled(cost: torch.Tensor, cached: tuple[int, ...], norms: bool) -> float:
    """A reading's cost of a cached set: the search's path cost, each segment's sqrt under ``norms``."""
    return path_cost(cost.clamp_min(0).sqrt() if norms else cost, cached)


def pool(T: int, nfe: int, forced: list[int], proposals: dict[str, tuple[int, ...]], rng: random.Random,
         n_random: int, n_moves: int) -> dict[str, tuple[int, ...]]:
    """Named cached sets of ``nfe`` computed steps: proposals, evenly spaced, random, moves of the first proposal."""
    out: dict[str, tuple[int, ...]] = {}
    seen: set[tuple[int, ...]] = set()

    def add(name: str, cached: tuple[int, ...]) -> None:
        if cached not in seen:
            seen.add(cached)
            out[name] = cached

    for name, cached in proposals.items():
        add(name, cached)
    add("evenly spaced", uniform_cached_steps(T, nfe))
    need = sorted({0, T - 1, *forced})
    free = [i for i in range(T) if i not in need]
    tries = 0
    while sum(n.startswith("random") for n in out) < n_random and tries < 1000:
        tries += 1
        computed = set(need) | set(rng.sample(free, nfe - len(need)))
        add(f"random {tries}", tuple(i for i in range(T) if i not in computed))
    first = next(iter(proposals.values()))
    computed = sorted(set(range(T)) - set(first))
    tries = 0
    while sum(n.startswith("move") for n in out) < n_moves and tries < 1000:
        tries += 1
        m = rng.choice([c for c in computed if c not in need])
        to = m + rng.choice([-2, -1, 1, 2])
        if 0 < to < T - 1 and to not in computed:
            moved = (set(computed) - {m}) | {to}
            add(f"move {m}->{to}", tuple(i for i in range(T) if i not in moved))
    return out


def probe_readings(q: torch.Tensor, T: int, session: Any, measured: Any, n_probes: int,
                   probes: list[dict[str, Any]]) -> dict[str, tuple[torch.Tensor, bool]]:
    """The propagated readings: each segment's cost times the measured gain of the state it arrives at (caching
    step j alone: measured MSE over modelled cost, relative to the median probe; log-linear between probes)."""
    probe_steps = sorted({*range(1, 4), *range(4, T - 1, max(1, (T - 5) // n_probes))} | {T - 2})
    for j in probe_steps:
        cached = (j,)
        cost = path_cost(q, cached) - path_cost(q, ())
        got = measured(cached)
        probes.append({"cached_step": j, "t": round(float(session.grid[j]), 4), "modelled": cost,
                       "measured": got, "gain": got / cost if cost > 0 else None})
    typical = sorted(r["gain"] for r in probes if r["gain"])[len(probes) // 2]
    for r in probes:  # relative to the median probe: the model's units (summed over rows) are not the MSE's
        r["gain"] = r["gain"] / typical if r["gain"] else None
    # the gain of the state a drift arrives at (k = j + 1), log-linear between the probes
    at = torch.tensor([r["cached_step"] + 1.0 for r in probes], dtype=torch.float64)
    log_gain = torch.tensor([math.log(r["gain"] or 1.0) for r in probes], dtype=torch.float64)
    k = torch.arange(T, dtype=torch.float64).clamp(float(at[0]), float(at[-1]))
    idx = torch.searchsorted(at, k).clamp(1, len(at) - 1)
    w = (k - at[idx - 1]) / (at[idx] - at[idx - 1])
    scale = torch.exp(log_gain[idx - 1] * (1 - w) + log_gain[idx] * w)
    print(json.dumps({"gain": [(r["cached_step"], round(r["gain"] or 0, 2)) for r in probes]}), flush=True)
    return {"propagated, squared norms add": (q * scale[None, None, :], False),
            "propagated, norms add": (q * scale[None, None, :], True)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="photos")
    p.add_argument("--targets", default="1.5,2,3,4")
    p.add_argument("--calibration-per-class", type=int, default=1)
    p.add_argument("--heldout-per-class", type=int, default=2)
    p.add_argument("--random", type=int, default=6, help="random sets per target")
    p.add_argument("--moves", type=int, default=6, help="one-step moves of the search's first set per target")
    p.add_argument("--probes", type=int, default=8,
                   help="single-step probes beyond steps 1-3 and T-2 (0: no probes, no probe-weighted readings)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    b = bundled_model(args.model)
    model = b.load(None)
    settings = BenchSettings.for_model(args.model)
    settings = BenchSettings(**{**settings.__dict__, "calibration_per_class": args.calibration_per_class})
    ctx = Context(model, settings, None, b)
    T = settings.num_inference_steps
    session = core_session(model, ctx.cal_labels, ctx.cal_seeds, config=CalibrationConfig(max_passes=None),
                           **ctx.cal_kwargs())
    triple = session.proposer.extrapolation_costs()
    q = triple["raw"]
    forced = list(session.truth.switch_steps)

    def measured(cached: tuple[int, ...]) -> float:
        return session.judge.error(Policy(cached_steps=cached, **session.base))

    readings = {"once, squared norms add": (q, False), "once, norms add": (q, True)}
    probes: list[dict[str, Any]] = []
    if args.probes > 0:
        readings.update(probe_readings(q, T, session, measured, args.probes, probes))

    held_labels, held_seeds = labels_and_seeds(args.heldout_per_class, 10_000, b.num_classes)
    held_noise = seeded_noise(held_seeds, b.latent_shape)
    kw = ctx.kwargs(held_labels)
    with torch.no_grad():
        ref = sample(model, held_noise, held_labels, **kw).x

    def held_psnr(cached: tuple[int, ...]) -> float:
        with torch.no_grad():
            x = sample(model, held_noise, held_labels, policy=Policy(cached_steps=cached, **session.base), **kw).x
        return round(float(psnr(x, ref)), 2)

    rng = random.Random(0)
    targets = []
    judged: list[dict[str, Any]] = []
    for target in [float(s) for s in args.targets.split(",")]:
        nfe = max(2, int(T / target))
        proposals: dict[str, tuple[int, ...]] = {}
        for name, (cost, norms) in readings.items():
            cached = shortest_schedule(cost.clamp_min(0).sqrt() if norms else cost, nfe, forced)
            if cached is not None and cached not in proposals.values():
                proposals[f"search, {name}"] = cached
        # what calibration judges for this target (the search's sets under the once-counted readings and the evenly
        # spaced set) and what it judged for the smaller budgets before it, as calibrate_many does
        judged += [{"cached_steps": list(c), "measured": measured(c)} for name, c in proposals.items()
                   if name.startswith("search, once")] + [{"cached_steps": list(uniform_cached_steps(T, nfe)),
                                                           "measured": measured(uniform_cached_steps(T, nfe))}]
        fit = fit_propagation(q, session.grid, [(r["cached_steps"], r["measured"]) for r in judged])
        beta = None if fit is None else fit[0]
        if fit is not None:  # the library's fit (calibration's propagation-weighted candidate)
            readings["fitted propagation"] = (fit[1], False)
            cached = shortest_schedule(fit[1], nfe, forced)
            if cached is not None and cached not in proposals.values():
                proposals["search, fitted propagation"] = cached
        sets = pool(T, nfe, forced, proposals, rng, args.random, args.moves)
        rows = [{"set": name, "cached_steps": list(cached), "measured": measured(cached),
                 **{f"modelled, {r}": modelled(cost, cached, norms) for r, (cost, norms) in readings.items()}}
                for name, cached in sets.items()]
        rho = {r: float(spearmanr([row[f"modelled, {r}"] for row in rows], [row["measured"] for row in rows])[0])
               for r in readings}
        heldout = {name: held_psnr(cached) for name, cached in proposals.items()}
        heldout["evenly spaced"] = held_psnr(uniform_cached_steps(T, nfe))
        entry = {"target": target, "nfe": nfe, "sets": len(rows), "fitted_beta": beta, "spearman": rho,
                 "heldout_psnr": heldout,
                 "rows": rows}
        print(json.dumps({k: entry[k] for k in ("target", "nfe", "sets", "fitted_beta", "spearman", "heldout_psnr")}),
              flush=True)
        targets.append(entry)
    result: dict[str, Any] = {
        "command": f"python scripts/error_model.py --model {args.model} --targets {args.targets} "
                   f"--calibration-per-class {args.calibration_per_class} --heldout-per-class "
                   f"{args.heldout_per_class} --random {args.random} --moves {args.moves} --probes {args.probes} "
                   f"--out {args.out}",
        "date": time.strftime("%Y-%m-%d"), "model": args.model, "T": T, "shift": settings.shift,
        "guidance_scale": settings.guidance_scale, "calibration_samples": len(ctx.cal_seeds),
        "heldout_samples": len(held_seeds), "probes": probes, "targets": targets,
        "seconds": round(time.perf_counter() - start, 1)}
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

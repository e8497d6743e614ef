"""One calibration session: ground truth, Algorithm 2's candidates, their variants, the held-out choice.

The session is the method, once; a driver walks the trajectories (the core Euler
loop, :class:`~ertacache.calibration.drive.CoreDriver`, or a diffusers pipeline's own
``__call__``). Stages (NOTES.md sections 2-4): ground-truth logging and the threshold
search of Algorithm 2 give candidate cached-step sets S; for each candidate the
timestep adjustment (Eq. 13-14) and the rectification fit (Eq. 15-21) are estimated,
and the candidate whose whole cached sampler has the least final-output error on the
held-out part of the set wins.

Every pass is counted (model calls, wall time) into the policy's provenance, and, with
a checkpoint folder, kept as it finishes so that a killed calibration resumes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import __version__
from ..config import CalibrationConfig
from ..core.engine import Pass, StopPass
from ..errors import ErtaCacheError
from ..policy import Policy, provenance
from .checkpoint import Checkpoint, digest
from .distributed import check_shards
from .drive import Driver
from .passes import AdjustTimesteps, FitRectification, GroundTruth, ThresholdSearch
from .schedule import MAX_TRIPLE_STEPS, ErrorSketch, choose_step_reuse, extrapolation_costs, propose
from .select import Candidate, SearchResult, check_goal, select_candidates, sweep

PassCallback = Callable[[str], None]
"""Called with a pass' name after it has finished (and been kept, with a checkpoint folder)."""
MSE_FLOOR = 1e-30
"""A sample's MSE below this counts as this (an exact match, e.g. a policy that caches nothing)."""


class CalibrationSession:
    """One calibration set on one model: its fit/held-out split, ground truth and lambda sweep.

    Build it once, then ask for policies at several targets; ground truth and every
    threshold search already run are reused.

    Args:
        driver: walks trajectories of the calibration set.
        config: the calibration options.
        log: progress messages (``print``-like) or None.
        progress: one tqdm bar over the passes, naming the current one.
        checkpoint_dir: keep each finished pass there and reuse what is already there.
        callback: called after each pass (tests stop a calibration with it).

    Attributes:
        variants: the component variants of the cached set chosen by the latest
            :meth:`policy` call (see :func:`~ertacache.calibration.calibrate_with_variants`).
        grid: the ``T + 1`` times the driver's trajectories follow.
        cost: per pass kind, ``{"passes", "model_calls", "seconds"}``; model calls are
            transformer forwards per sample and branch (summed over processes in the policy).

    Raises:
        ErtaCacheError: a split of the set the processes cannot share, a checkpoint of
            another calibration, or a sampler that ran another step count.
    """

    def __init__(self, driver: Driver, config: CalibrationConfig | None = None,
                 log: Callable[[str], None] | None = None, *, progress: bool = False,
                 checkpoint_dir: str | Path | None = None, callback: PassCallback | None = None) -> None:
        self.driver, self.config = driver, config or CalibrationConfig()
        self.T, n = driver.num_inference_steps, driver.size
        self.n_hold = round(n * self.config.holdout_fraction) if n >= 2 else 0
        self.n_fit = n - self.n_hold
        self.all, self.fit = slice(0, n), slice(0, self.n_fit)
        self.hold = slice(self.n_fit, n) if self.n_hold else self.all
        world = getattr(driver, "world_size", 1)
        check_shards([range(n)[self.fit], range(n)[self.hold]], world)
        self.log = log or (lambda msg: None)
        self.callback = callback
        self.cost: dict[str, dict[str, float]] = {}
        self.errors: dict[str, float] = {}
        self.resumed = 0
        self.checkpoint = None if checkpoint_dir is None else Checkpoint(
            checkpoint_dir, {**driver.identity(), "config": self.config.to_dict(), "library": __version__,
                             "world_size": world}, getattr(driver, "rank", 0), world)
        self.bar: Any = None
        if progress:
            from tqdm.auto import tqdm

            c = self.config
            sweep_passes = len(c.thresholds) + 6 if "threshold" in c.candidates else 0
            sets = (c.max_candidates if "threshold" in c.candidates else 0) + ("uniform" in c.candidates) \
                + (c.search_candidates if "search" in c.candidates else 0)
            estimate = 1 + sweep_passes + sets * (7 if c.component_check else 3) + 3 * c.step_reuse_choice
            self.bar = tqdm(total=estimate, unit="pass", desc="calibration")
        self._ground_truth()
        self.searched: list[SearchResult] = []
        self.variants: dict[str, Policy] = {}

    # ----- passes, each kept and counted -----------------------------------------
    def _run(self, kind: str, key: str, pass_: Pass, rows: slice, grid: Sequence[float] | None) -> Tensor:
        if self.bar is not None:
            self.bar.set_description(f"calibration: {key}")
        start = time.perf_counter()
        self.driver.last_model_calls = 0
        try:
            return self.driver.run(pass_, rows, self.n_fit, grid)
        finally:  # a pass that stops early (StopPass) is counted too
            c = self.cost.setdefault(kind, {"passes": 0, "model_calls": 0, "seconds": 0.0})
            c["passes"] += 1
            c["model_calls"] += self.driver.last_model_calls
            c["seconds"] += time.perf_counter() - start

    def _done(self, key: str, result: dict[str, Any], tensors: dict[str, Tensor] | None = None) -> None:
        if self.checkpoint is not None:
            self.checkpoint.put(key, result, tensors)
        if self.bar is not None:
            self.bar.update(1)
            done = sum(c["model_calls"] for c in self.cost.values())
            runs = max(1, sum(c["passes"] for c in self.cost.values()))
            left = max(0, self.bar.total - self.bar.n) * done / runs  # passes left x model calls a pass so far
            self.bar.set_postfix(model_calls=int(done), left_about=int(left))
        if self.callback is not None:
            self.callback(key)

    def _kept(self, key: str) -> tuple[dict[str, Any], dict[str, Tensor]] | None:
        hit = None if self.checkpoint is None else self.checkpoint.get(key)
        if hit is not None:
            self.resumed += 1
            if self.bar is not None:
                self.bar.update(1)
        return hit

    def _ground_truth(self) -> None:
        key = "ground truth"
        hit = self._kept(key)
        if hit is not None:
            result, tensors = hit
            self.gt_final = tensors["x"]
            self.grid, self.gt_norms = list(result["grid"]), tuple(result["norms"])
            self.gt_changes = tuple(result["changes"])
            self.switch_steps = list(result["switch_steps"])
            self.search_costs = {k[7:]: v for k, v in tensors.items() if k.startswith("search.")}
            self.driver.restore(result["driver"])
        else:
            self.log(f"ground truth on {self.n_fit} fitting and {self.n_hold} held-out samples")
            gt = GroundTruth(ErrorSketch() if "search" in self.config.candidates else None)
            self.gt_final = self._run("ground truth", key, gt, self.all, None)
            if len(gt.times) != self.T:
                raise ErtaCacheError(f"the sampler ran {len(gt.times)} steps, not num_inference_steps={self.T}")
            self.grid, self.gt_norms, self.switch_steps = gt.grid(), gt.norms(), gt.switch_steps()
            self.gt_changes = gt.velocity_changes()
            branches = self.driver.policy_fields(self.grid)["branches"]
            self.search_costs = {} if gt.sketch is None else {
                **gt.sketch.costs(self.grid, self.config.reuse, self.driver.reduce,
                                  self.config.rectification != "off", branches),
                "gram": gt.sketch.gram(self.T, branches, self.driver.reduce)}
            self._done(key, {"grid": self.grid, "norms": list(self.gt_norms), "changes": list(self.gt_changes),
                             "switch_steps": self.switch_steps, "driver": self.driver.recorded()},
                       {"x": self.gt_final, **{f"search.{k}": v for k, v in self.search_costs.items()}})
        self.base: dict[str, Any] = dict(self.driver.policy_fields(self.grid), config=self.config)

    def search(self, threshold: float, max_nfe: int | None = None) -> SearchResult:
        """Algorithm 2's search for one lambda on the fitting rows; with ``max_nfe`` it stops once over it."""
        key = f"policy search lambda={threshold!r}"
        hit = self._kept(key)
        result: dict[str, Any]
        if hit is not None and not hit[0]["complete"] and (
                max_nfe is None or self.T - len(hit[0]["cached_steps"]) <= max_nfe):
            hit = None  # stopped over a smaller budget than this one
        if hit is None:
            self.log(f"policy search at lambda={threshold:g}")
            p = ThresholdSearch(threshold, self.gt_norms, self.config.l1_denominator,
                                max_nfe if self.config.sweep_early_stop else None)
            try:
                self._run("policy search", key, p, self.fit, self.grid)
            except StopPass:
                pass
            result = {"cached_steps": list(p.cached_steps), "l1_rel": [p.l1_rel.get(i, 0.0) for i in range(self.T)],
                      "complete": p.complete}
            self._done(key, result)
        else:
            result = hit[0]
        return SearchResult(threshold, tuple(result["cached_steps"]), tuple(result["l1_rel"]), result["complete"])

    def adjust(self, cached_steps: tuple[int, ...], step_reuse: dict[int, str] | None = None) -> list[float]:
        """Eq. 13-14's adjusted grid of a cached set (with per-step reuse modes), on the fitting rows."""
        key = f"timestep adjustment S={list(cached_steps)}" + (f" reuse={step_reuse}" if step_reuse else "")
        hit = self._kept(key)
        if hit is not None:
            return list(hit[0]["grid"])
        p = AdjustTimesteps(cached_steps, self.config.phi_denominator, self.gt_changes, step_reuse)
        self._run("timestep adjustment", key, p, self.fit, self.grid)
        self._done(key, {"grid": p.grid, "phis": {str(k): v for k, v in p.phis.items()}})
        return p.grid

    def rectify(self, cached_steps: tuple[int, ...], grid: Sequence[float], branches: Sequence[str],
                step_reuse: dict[int, str] | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        """Eq. 15-21's fit along a cached set's trajectory on ``grid``: ``(rect_a, rect_b, enabled)``."""
        key = f"rectification fit S={list(cached_steps)} grid={digest(list(grid))}" + (
            f" reuse={step_reuse}" if step_reuse else "")
        hit = self._kept(key)
        if hit is not None:
            t = hit[1]
            return ({b: t[f"a.{b}"] for b in branches}, {b: t[f"b.{b}"] for b in branches}, t["enabled"].bool())
        c = self.config
        p = FitRectification(cached_steps, c.rectification, c.granularity, has_holdout=self.n_hold > 0,
                             layout=self.driver.layout, step_reuse=step_reuse)
        self._run("rectification fit", key, p, self.all, grid)
        a, b, enabled = p.tensors(branches, self.T)
        self._done(key, {}, {**{f"a.{k}": v for k, v in a.items()}, **{f"b.{k}": v for k, v in b.items()},
                             "enabled": enabled.to(torch.uint8)})
        return a, b, enabled

    def error(self, policy: Policy) -> float:
        """Held-out error of ``policy``: the geometric mean over held-out samples of each one's MSE at t = 0.

        Each sample's MSE is against its uncached run (NOTES.md section 2.5). The geometric
        mean ranks policies as the mean PSNR over samples does (the figure the benchmark
        and the paper report); the pooled MSE it replaced let one hard sample decide
        (measured, moving digits at 3x: pooled MSE chose a set 6.6 dB worse on held-out
        seeds than the one the geometric mean chooses). Policies that sample alike share
        one evaluation (a variant whose rectification fits all failed the held-out check
        is its base policy).
        """
        on = policy.rect_form != "off" and policy.rect_enabled is not None and bool(policy.rect_enabled.any())
        tensors = [policy.rect_a[b] for b in policy.rect_a] + [policy.rect_b[b] for b in policy.rect_b] if on else []
        key = "evaluation (geometric mean) " + digest(
            list(policy.cached_steps), list(policy.sampling_grid), policy.rect_form if on else "off",
            policy.rect_enabled.int() if on else None, *tensors,  # type: ignore[union-attr]
            *([policy.step_reuse] if policy.step_reuse else []))
        if key in self.errors:
            return self.errors[key]
        hit = self._kept(key)
        if hit is not None:
            self.errors[key] = float(hit[0]["error"])
            return self.errors[key]
        final = self._run("evaluation", key, policy.follower(self.driver.layout), self.hold, policy.sampling_grid)
        where = {i: k for k, i in enumerate(self.driver.local(self.all))}
        ref: Tensor = self.gt_final[[where[i] for i in self.driver.local(self.hold)]]
        per_sample = (final - ref).double().square().flatten(1).mean(1).clamp_min(MSE_FLOOR)
        sums = torch.stack([per_sample.log().sum(), torch.tensor(float(per_sample.numel()), dtype=torch.float64)])
        total = self.driver.reduce(sums)
        err = math.exp(float(total[0] / total[1]))
        self._done(key, {"error": err})
        self.errors[key] = err
        return err

    # ----- the method --------------------------------------------------------------
    @torch.no_grad()
    def policy(self, target_speedup: float | None = None, threshold: float | None = None) -> Policy:
        """The policy for a target speedup or a threshold (exactly one); see :func:`~ertacache.calibrate`."""
        max_nfe = check_goal(target_speedup, threshold, self.T)
        candidates = self._candidates(threshold, max_nfe)
        best: tuple[float, Policy, Candidate] | None = None
        for cand in candidates:
            self.log(f"evaluating {cand.source} candidate, NFE {self.T - len(cand.cached_steps)}")
            variants = self._variants(cand)
            judged = variants if self.config.component_check else dict([list(variants.items())[-1]])
            cand.errors = {name: self.error(p) for name, p in judged.items()}
            cand.variant = min(cand.errors, key=cand.errors.__getitem__)
            if best is None or cand.errors[cand.variant] < best[0]:
                best = (cand.errors[cand.variant], variants[cand.variant], cand)
                self.variants = variants
        if best is None:  # pragma: no cover - _candidates never returns an empty list
            raise ErtaCacheError("calibration produced no candidate policy")
        refined = self._per_step_reuse(best[2])
        if refined is not None:
            candidates.append(refined[2])
            if refined[0] < best[0]:
                best = refined
        if self.bar is not None:
            self.bar.close()
        chosen = best[2]
        info = provenance(
            calibration_size=self.driver.size, holdout_size=self.n_hold, target_speedup=target_speedup,
            threshold=chosen.threshold, selected=chosen.source, variant=chosen.variant,
            candidates=[c.as_dict(self.T) for c in candidates], chosen=candidates.index(chosen),
            timestep_adjustment=("on" if self.config.timestep_adjustment else "off (config)")
            if self.driver.adjustment_off is None else f"off: {self.driver.adjustment_off}",
            cost=self.cost_summary(), **self.driver.provenance(),
        )
        return replace(best[1], provenance=info)

    def cost_summary(self) -> dict[str, Any]:
        """Model calls (summed over processes) and wall time by pass kind, and in uncached generations of the set."""
        kinds = sorted(self.cost)
        calls = self.driver.reduce(torch.tensor([self.cost[k]["model_calls"] for k in kinds] or [0.0],
                                                dtype=torch.float64))
        per_generation = self.driver.size * len(self.base["branches"]) * self.T
        by_pass = {k: {"passes": int(self.cost[k]["passes"]), "model_calls": int(calls[i]),
                       "seconds": round(self.cost[k]["seconds"], 2)} for i, k in enumerate(kinds)}
        total = int(sum(v["model_calls"] for v in by_pass.values()))
        seconds = round(sum(self.cost[k]["seconds"] for k in kinds), 2)
        return {"by_pass": by_pass, "model_calls": total, "seconds": seconds,
                "uncached_generations": round(total / per_generation, 2), "resumed_passes": self.resumed}

    def _candidates(self, threshold: float | None, max_nfe: int) -> list[Candidate]:
        if threshold is not None:
            return [Candidate("threshold", threshold, self.search(threshold).cached_steps)]
        if max_nfe >= self.T:
            return [Candidate("all_compute", None, ())]
        if "threshold" in self.config.candidates:
            self.log(f"policy search over {len(self.config.thresholds)} thresholds (target NFE <= {max_nfe})")
            enough = self.config.max_candidates if self.config.sweep_early_stop else None
            self.searched = sweep(lambda lam: self.search(lam, max_nfe), self.T, self.config.thresholds,
                                  max_nfe=max_nfe, known=self.searched, enough=enough)
        out = select_candidates(self.searched if "threshold" in self.config.candidates else [], self.T, max_nfe,
                                self.config, self.switch_steps)
        if "search" in self.config.candidates:
            known = {c.cached_steps for c in out}
            limit = self.config.search_candidates
            proposed = [(f"extrapolation, {rule}", cached) for rule, cached in
                        propose(self._extrapolation_costs(), max_nfe, self.switch_steps, limit)]
            proposed += propose(self.search_costs, max_nfe, self.switch_steps, limit)
            for rule, cached in proposed:
                if cached not in known and sum(c.source == "search" for c in out) < limit:
                    known.add(cached)
                    out.append(Candidate("search", None, cached, rule=rule))
        if not out:  # the search found no set beside the forced steps: the evenly spaced one competes alone
            out = select_candidates([], self.T, max_nfe, replace(self.config, candidates=("uniform",)),
                                    self.switch_steps)
        return out

    def _extrapolation_costs(self) -> dict[str, Tensor]:
        """The schedule search's segment costs ``(T, T, T)`` for ``extrapolate`` reuse (empty for other modes,
        without the ground truth's Gram matrix, or above :data:`~.schedule.MAX_TRIPLE_STEPS` steps)."""
        gram = self.search_costs.get("gram")
        if self.config.reuse != "extrapolate" or gram is None or self.T > MAX_TRIPLE_STEPS:
            return {}
        if not hasattr(self, "_triple_costs"):
            kinds = ("raw", "rectified") if self.config.rectification != "off" else ("raw",)
            self._triple_costs = {k: extrapolation_costs(gram, self.grid, k == "rectified") for k in kinds}
        return self._triple_costs

    def _per_step_reuse(self, winner: Candidate) -> tuple[float, Policy, Candidate] | None:
        """The winning set with each cached step's reuse mode chosen by the error model, judged on held-out error.

        Only the winner's variant is built (at most an adjustment pass, a rectification
        fit and an evaluation); None when the config does not ask for it, the
        ground truth logged no error model (``search`` not among the sources), the
        reuse mode has no alternative, or every step keeps the policy's mode.
        """
        config = self.config
        gram = self.search_costs.get("gram")
        modes = [m for m in (config.reuse, "velocity", "extrapolate") if config.reuse in ("velocity", "extrapolate")]
        if not config.step_reuse_choice or gram is None or not modes or not winner.cached_steps:
            return None
        modes = list(dict.fromkeys(modes))
        chosen = choose_step_reuse(gram, self.grid, winner.cached_steps, modes, config.rectification != "off")
        step_reuse = {j: m for j, m in chosen.items() if m != config.reuse}
        if not step_reuse:
            return None
        cand = Candidate(winner.source, winner.threshold, winner.cached_steps, rule=winner.rule, step_reuse=step_reuse)
        self.log(f"evaluating per-step reuse on the {winner.source} set: {step_reuse}")
        variants = self._variants(cand, only=winner.variant)
        cand.variant = winner.variant
        cand.errors = {winner.variant: self.error(variants[winner.variant])}
        return cand.errors[winner.variant], variants[winner.variant], cand

    def _variants(self, cand: Candidate, only: str | None = None) -> dict[str, Policy]:
        """The candidate's policies, from fewest components to all that the config asks for (or ``only`` one)."""
        config = self.config
        plain = Policy(cached_steps=cand.cached_steps, step_reuse=cand.step_reuse, **self.base)  # type: ignore[arg-type]
        out = {"plain": plain}
        if not cand.cached_steps:
            return out

        def wanted(name: str) -> bool:
            return only is None or name == only or (name == "adjusted" and only == "full")

        adjusted: list[float] | None = None
        if config.timestep_adjustment and self.driver.adjustment_off is None and wanted("adjusted"):
            adjusted = self.adjust(cand.cached_steps, cand.step_reuse)
            out["adjusted"] = replace(plain, adjusted_grid=tuple(adjusted))
        if config.rectification != "off":
            grids: list[tuple[str, list[float]]] = [("rectified", self.grid)]
            if adjusted is not None:
                grids = (grids if config.component_check else []) + [("full", adjusted)]
            for name, g in grids:
                if not wanted(name):
                    continue
                a, b, enabled = self.rectify(cand.cached_steps, g, plain.branches, cand.step_reuse)
                out[name] = replace(out["adjusted"] if name == "full" else plain, rect_a=a, rect_b=b,
                                    rect_enabled=enabled, rect_form=config.rectification)
        return out


def logger(enabled: bool, prefix: str = "calibrate") -> Callable[[str], None] | None:
    """A ``print`` logger for progress messages, or None."""
    if not enabled:
        return None

    def log(msg: str) -> None:
        print(f"[{prefix}] {msg}", flush=True)

    return log

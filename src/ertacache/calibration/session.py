"""One calibration session: ground truth, Algorithm 2's candidates, their variants, the held-out choice.

The session is the method, once; a driver walks the trajectories (the core Euler
loop, :class:`~ertacache.calibration.drive.CoreDriver`, or a diffusers pipeline's own
``__call__``). Stages (docs/method.md section 2-4): ground-truth logging and the threshold
search of Algorithm 2 give candidate cached-step sets S; for each candidate the
timestep adjustment (Eq. 13-14) and the rectification fit (Eq. 15-21) are estimated,
and a policy replaces the evenly spaced set only on a paired win over the calibration
samples by more than its standard error. Every sample fits and judges: rectification is
judged leave-one-out, and a set the schedule search fitted to the samples is judged
k-fold (each sample scored by the set the search makes without that sample's fold).

Every pass is counted (model calls, wall time) into the policy's provenance, and, with
a checkpoint folder, kept as it finishes so that a killed calibration resumes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._version import __version__
from ..config import CalibrationConfig
from ..core.engine import Pass, StopPass
from ..core.reuse import REUSE_MODES, get_reuse
from ..errors import ErtaCacheError
from ..policy import Policy, provenance
from .checkpoint import Checkpoint, digest
from .distributed import check_shards, fold_slices
from .drive import Driver
from .passes import AdjustTimesteps, FitRectification, GroundTruth, ThresholdSearch
from .plan import variant_passes
from .schedule import (
    MAX_TRIPLE_STEPS,
    ErrorSketch,
    choose_step_reuse,
    extrapolation_costs,
    fit_propagation,
    propose,
    schedule_for,
    shortest_schedule,
)
from .select import Candidate, SearchResult, check_goal, select_candidates, sweep

PassCallback = Callable[[str], None]
"""Called with a pass' name after it has finished (and been kept, with a checkpoint folder)."""
DB = 10.0 / math.log(10.0)
"""dB per unit of natural-log MSE."""
MSE_FLOOR = 1e-30
"""A sample's MSE below this counts as this (an exact match, e.g. a policy that caches nothing)."""


@dataclass(frozen=True)
class Margin:
    """A paired comparison of two policies over the calibration samples.

    ``gain_db`` is the mean over samples of ``10 log10(MSE_old / MSE_new)`` (each sample's
    MSE at t = 0 against its uncached run), ``se_db`` its standard error
    (``std / sqrt(n)``; 0 for one sample), ``n`` the samples.
    """

    gain_db: float
    se_db: float
    n: int

    @property
    def significant(self) -> bool:
        """The new policy wins by more than the standard error (with one sample: wins at all)."""
        return self.gain_db > self.se_db if self.n >= 2 else self.gain_db > 0

    def as_dict(self) -> dict[str, Any]:
        return {"gain_db": round(self.gain_db, 3), "se_db": round(self.se_db, 3), "n": self.n,
                "kept": self.significant}


class _NoRoom(Exception):
    """A k-fold check does not fit in ``max_passes``: the fitted set's win is not kept."""


class CalibrationSession:
    """One calibration set on one model: its ground truth, its candidates' evaluations, and the choices.

    Build it once, then ask for policies at several targets; ground truth, every pass and
    every evaluation already run are reused. Targets asked for in increasing NFE budget
    are *nested*: the best set of a smaller budget, and the schedule search's set that
    adds steps to it, compete for a larger one, so a larger budget never gets a policy
    the calibration samples rate below a smaller budget's.

    Args:
        driver: walks trajectories of the calibration set.
        config: the calibration options.
        log: progress messages (``print``-like) or None.
        progress: one tqdm bar (in model calls) over the ground truth and every target of ``targets``.
        checkpoint_dir: keep each finished pass there and reuse what is already there.
        callback: called after each pass (tests stop a calibration with it).
        targets: the target speedups that will be asked for (sizes the progress bar; None: one target).

    Attributes:
        variants: the component variants of the cached set chosen by the latest
            :meth:`policy` call (see :func:`~ertacache.calibration.calibrate_with_variants`).
        grid: the ``T + 1`` times the driver's trajectories follow.
        cost: per pass kind, ``{"passes", "model_calls", "seconds"}``; model calls are
            transformer forwards per sample and branch (summed over processes in the policy),
            passes kept by a checkpoint included.

    Raises:
        ErtaCacheError: a set the processes cannot share, a checkpoint of another
            calibration, or a sampler that ran another step count.
    """

    def __init__(self, driver: Driver, config: CalibrationConfig | None = None,
                 log: Callable[[str], None] | None = None, *, progress: bool = False,
                 checkpoint_dir: str | Path | None = None, callback: PassCallback | None = None,
                 targets: Sequence[float] | None = None) -> None:
        self.driver, self.config = driver, config or CalibrationConfig()
        self.T, n = driver.num_inference_steps, driver.size
        self.n_hold = round(n * self.config.holdout_fraction) if n >= 2 else 0
        self.n_fit = n - self.n_hold
        self.all, self.fit = slice(0, n), slice(0, self.n_fit)
        self.hold = slice(self.n_fit, n) if self.n_hold else self.all
        world = getattr(driver, "world_size", 1)
        check_shards([range(n)[self.fit], range(n)[self.hold]], world)
        self.folds = [] if self.n_hold else fold_slices(n, world, self.config.folds)
        self.fold_costs: list[dict[str, Tensor]] = []  # the search's error model without each fold's samples
        self._triples: dict[int | None, dict[str, Tensor]] = {}
        self.log = log or (lambda msg: None)
        self.callback = callback
        self.cost: dict[str, dict[str, float]] = {}
        self.errors: dict[str, float] = {}
        self.scores: dict[str, Tensor] = {}  # per held-out sample (this process' rows): log MSE at t = 0
        self.resumed = 0
        self._last: dict[str, Any] = {"kind": "", "model_calls": 0, "seconds": 0.0}  # the latest pass' cost
        self.winners: list[Candidate] = []  # the chosen set of each target so far
        self.checkpoint = None if checkpoint_dir is None else Checkpoint(
            checkpoint_dir, {**driver.identity(), "config": self.config.to_dict(), "library": __version__,
                             "world_size": world}, getattr(driver, "rank", 0), world)
        self.bar: Any = None
        self.targets_left = max(1, len(targets or ()))
        if progress:
            from tqdm.auto import tqdm

            from .plan import plan

            self.targets = list(targets or [2.0])
            branches = len(getattr(driver, "names", ("cond", "uncond")))  # a pipeline's are known after ground truth
            estimate = plan(self.config, self.T, self.targets, self.driver.size * branches).model_calls
            self.bar = tqdm(total=estimate, unit="call", unit_scale=True, desc="calibration", mininterval=1.0)
        self._ground_truth()
        if self.bar is not None:
            self.bar.total = plan(self.config, self.T, self.targets,
                                  self.driver.size * len(self.base["branches"])).model_calls
            self.bar.refresh()
        self.searched: list[SearchResult] = []
        self.variants: dict[str, Policy] = {}
        self._charged: set[str] = set()  # passes charged to a target's budget (each once per session)
        self._spent = 0.0  # whole-set passes the current target has spent (config.max_passes)
        self._rect: dict[str, tuple[dict[str, Tensor], dict[str, Tensor], Tensor, Tensor | None]] = {}
        self._adjusted: dict[str, list[float]] = {}
        self._adjusted_k_fold: dict[str, Tensor] = {}
        self._judged_sets: dict[tuple[int, ...], float] = {}  # plain sets judged so far: their calibration error
        self._judged_keys: dict[tuple[int, ...], str] = {}  # and their evaluations' keys (per-sample scores)
        self._refits: dict[int, list[tuple[int, Policy]]] = {}  # per candidate: folds whose refitted set differs
        self._shifts: dict[int, Tensor] = {}  # per candidate: its k-fold shift of each sample's log MSE
        self._fold_scores: dict[str, Tensor] = {}  # k-fold evaluations: log MSE of a fold's rows
        self.propagation: list[dict[str, Any]] = []  # each propagation fit (propagation_candidate)

    # ----- passes, each kept and counted -----------------------------------------
    def _tick(self, calls: int) -> None:
        if self.bar is not None and calls:
            self.bar.update(min(calls, max(0, self.bar.total - self.bar.n)))

    def _run(self, kind: str, key: str, pass_: Pass, rows: slice, grid: Sequence[float] | None) -> Tensor:
        if self.bar is not None:
            self.bar.set_description(f"calibration: {kind}")
            pass_.progress = self._tick
        start = time.perf_counter()
        self.driver.last_model_calls = 0
        try:
            return self.driver.run(pass_, rows, self.n_fit, grid)
        finally:  # a pass that stops early (StopPass) is counted too
            self._last = {"kind": kind, "model_calls": self.driver.last_model_calls,
                          "seconds": time.perf_counter() - start}
            self._count(self._last)

    def _count(self, spent: dict[str, Any]) -> None:
        """Add one pass' ``{"kind", "model_calls", "seconds"}`` to :attr:`cost`."""
        c = self.cost.setdefault(spent["kind"], {"passes": 0, "model_calls": 0, "seconds": 0.0})
        c["passes"] += 1
        c["model_calls"] += spent["model_calls"]
        c["seconds"] += spent["seconds"]

    def _done(self, key: str, result: dict[str, Any], tensors: dict[str, Tensor] | None = None) -> None:
        if self.checkpoint is not None:  # with the cost of the pass just run (_run), for a resumed calibration
            self.checkpoint.put(key, {**result, "_cost": self._last}, tensors)
        if self.callback is not None:
            self.callback(key)

    def _charge(self, key: str, passes: float) -> None:
        """Count ``passes`` against the current target's budget, once per key in the session.

        The count depends only on what is asked for, not on what a checkpoint already holds,
        so that a resumed calibration takes the same decisions on every process."""
        if key not in self._charged:
            self._charged.add(key)
            self._spent += passes

    def _affords(self, passes: float) -> bool:
        """Whether ``passes`` more fit in the current target's :attr:`CalibrationConfig.max_passes`."""
        budget = self.config.max_passes
        return budget is None or self._spent + passes <= budget + 1e-9

    def _kept(self, key: str) -> tuple[dict[str, Any], dict[str, Tensor]] | None:
        hit = None if self.checkpoint is None else self.checkpoint.get(key)
        if hit is not None:
            self.resumed += 1
            spent = hit[0].get("_cost")
            if spent:  # the calls made before the interrupt are part of this calibration's cost
                self._count(spent)
                self._tick(int(spent["model_calls"]))
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
            self.fold_costs = [{k[len(f"fold{f}."):]: v for k, v in tensors.items() if k.startswith(f"fold{f}.")}
                               for f in range(int(result.get("folds", 0)))]
            self.driver.restore(result["driver"])
        else:
            self.log(f"ground truth on {self.driver.size} samples" + (
                f" ({self.n_hold} of them held out)" if self.n_hold else ""))
            gt = GroundTruth(ErrorSketch() if "search" in self.config.candidates else None)
            self.gt_final = self._run("ground truth", key, gt, self.all, None)
            if len(gt.times) != self.T:
                raise ErtaCacheError(f"the sampler ran {len(gt.times)} steps, not num_inference_steps={self.T}")
            self.grid, self.gt_norms, self.switch_steps = gt.grid(), gt.norms(), gt.switch_steps()
            self.gt_changes = gt.velocity_changes()
            branches = self.driver.policy_fields(self.grid)["branches"]
            self.search_costs = {} if gt.sketch is None else self._sketch_costs(gt.sketch, branches)
            if gt.sketch is not None and gt.sketch.knows_samples:
                self.fold_costs = [self._sketch_costs(gt.sketch.without(range(self.driver.size)[f]), branches)
                                   for f in self.folds]
            folded = {f"fold{f}.{k}": v for f, costs in enumerate(self.fold_costs) for k, v in costs.items()}
            self._done(key, {"grid": self.grid, "norms": list(self.gt_norms), "changes": list(self.gt_changes),
                             "switch_steps": self.switch_steps, "driver": self.driver.recorded(),
                             "folds": len(self.fold_costs)},
                       {"x": self.gt_final, **{f"search.{k}": v for k, v in self.search_costs.items()}, **folded})
        self.base: dict[str, Any] = dict(self.driver.policy_fields(self.grid), config=self.config)
        self.gt_cost = {k: dict(v) for k, v in self.cost.items()}
        if len(self.fold_costs) != len(self.folds):  # a driver that does not say which sample a row is
            self.folds, self.fold_costs = [], []

    def _sketch_costs(self, sketch: ErrorSketch, branches: Sequence[str]) -> dict[str, Tensor]:
        """The schedule search's error model from a ground-truth sketch: segment costs and the Gram matrix."""
        return {**sketch.costs(self.grid, self.config.reuse, self.driver.reduce, self.config.rectification != "off",
                               branches),
                "gram": sketch.gram(self.T, branches, self.driver.reduce)}

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
        key = self._adjust_key(cached_steps, step_reuse)
        self._charge(key, 1.0)
        if key in self._adjusted:
            return list(self._adjusted[key])
        hit = self._kept(key)
        if hit is not None:
            self._adjusted[key] = list(hit[0]["grid"])
            return list(hit[0]["grid"])
        p = AdjustTimesteps(cached_steps, self.config.phi_denominator, self.gt_changes, step_reuse)
        self._run("timestep adjustment", key, p, self.fit, self.grid)
        self._done(key, {"grid": p.grid, "phis": {str(k): v for k, v in p.phis.items()}})
        self._adjusted[key] = list(p.grid)
        return p.grid

    def adjust_k_fold(self, cached_steps: tuple[int, ...], step_reuse: dict[int, str] | None = None) -> Tensor:
        """Each sample's log MSE at t = 0 on the adjusted grid fitted without its fold (this process' rows, the order
        of :attr:`scores`): Eq. 13-14 judged on samples it was not fitted to.

        One pass per fold over every sample: the other folds' rows estimate the grid that
        all rows follow (:class:`~.passes.AdjustTimesteps` ``exclude``), the fold's rows are
        judged at t = 0. Needs :attr:`folds` (every sample judging, two or more folds).
        """
        base = self._adjust_key(cached_steps, step_reuse)
        if base in self._adjusted_k_fold:
            return self._adjusted_k_fold[base]
        out = torch.zeros(len(self.driver.local(self.all)), dtype=torch.float64)
        for rows in self.folds:
            key = f"{base} without rows {rows.start}:{rows.stop}"
            self._charge(key, 1.0)
            at = self._positions(rows)
            hit = self._kept(key)
            if hit is not None:
                out[at] = hit[1]["log_mse"]
                continue
            p = AdjustTimesteps(cached_steps, self.config.phi_denominator, self.gt_changes, step_reuse,
                                exclude=range(rows.start, rows.stop))
            final = self._run("timestep adjustment, k-fold", key, p, self.all, self.grid)
            out[at] = self._log_mse(final, self.all)[at]
            self._done(key, {"grid": p.grid}, {"log_mse": out[at].clone()})
        self._adjusted_k_fold[base] = out
        return out

    def rectify(self, cached_steps: tuple[int, ...], grid: Sequence[float], branches: Sequence[str],
                step_reuse: dict[int, str] | None = None
                ) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor, Tensor | None]:
        """Eq. 15-21's fit along a cached set's trajectory on ``grid``: ``(rect_a, rect_b, enabled, log_mse)``.

        ``log_mse``: with every sample judging (``holdout_fraction=0``), each sample's log MSE at t = 0 of
        its leave-one-out rectified trajectory (this process' rows), the fit's own honest evaluation; else None.
        """
        key = self._rect_key(cached_steps, grid, step_reuse)
        self._charge(key, 1.0)
        if key in self._rect:
            a_, b_, enabled_, log_mse_ = self._rect[key]
            return {b: a_[b] for b in branches}, {b: b_[b] for b in branches}, enabled_, log_mse_
        hit = self._kept(key)
        if hit is not None:
            t = hit[1]
            self._rect[key] = ({b: t[f"a.{b}"] for b in branches}, {b: t[f"b.{b}"] for b in branches},
                               t["enabled"].bool(), t.get("log_mse"))
            return self._rect[key]
        c = self.config
        p = FitRectification(cached_steps, c.rectification, c.granularity, has_holdout=self.n_hold > 0,
                             layout=self.driver.layout, step_reuse=step_reuse)
        final = self._run("rectification fit", key, p, self.all, grid)
        a, b, enabled = p.tensors(branches, self.T)
        log_mse = None if self.n_hold else self._log_mse(final, self.all)
        self._done(key, {}, {**{f"a.{k}": v for k, v in a.items()}, **{f"b.{k}": v for k, v in b.items()},
                             "enabled": enabled.to(torch.uint8), **({"log_mse": log_mse} if log_mse is not None
                                                                     else {})})
        self._rect[key] = (a, b, enabled, log_mse)
        return a, b, enabled, log_mse

    @staticmethod
    def _adjust_key(cached_steps: tuple[int, ...], step_reuse: dict[int, str] | None) -> str:
        return f"timestep adjustment S={list(cached_steps)}" + (f" reuse={step_reuse}" if step_reuse else "")

    @staticmethod
    def _rect_key(cached_steps: tuple[int, ...], grid: Sequence[float], step_reuse: dict[int, str] | None) -> str:
        return f"rectification fit S={list(cached_steps)} grid={digest(list(grid))}" + (
            f" reuse={step_reuse}" if step_reuse else "")

    def _log_mse(self, final: Tensor, rows: slice) -> Tensor:
        """Each sample's log MSE at t = 0 against its uncached run (this process' part of ``rows``, float64)."""
        ref: Tensor = self.gt_final[self._positions(rows)]
        return (final.to(ref) - ref).double().square().flatten(1).mean(1).clamp_min(MSE_FLOOR).log().cpu()

    def _key(self, policy: Policy) -> str:
        on = policy.rect_form != "off" and policy.rect_enabled is not None and bool(policy.rect_enabled.any())
        tensors = [policy.rect_a[b] for b in policy.rect_a] + [policy.rect_b[b] for b in policy.rect_b] if on else []
        return "evaluation (per sample) " + digest(
            list(policy.cached_steps), list(policy.sampling_grid), policy.rect_form if on else "off",
            policy.rect_enabled.int() if on else None, *tensors,  # type: ignore[union-attr]
            *([policy.step_reuse] if policy.step_reuse else []))

    def _score(self, key: str, log_mse: Tensor) -> float:
        self.scores[key] = log_mse
        self.errors[key] = self._geometric(log_mse)
        return self.errors[key]

    def error(self, policy: Policy, log_mse: Tensor | None = None) -> float:
        """The calibration error of ``policy``: the geometric mean over the judging samples of each one's MSE at t = 0.

        Each sample's MSE is against its uncached run; the judging samples are every
        calibration sample (``holdout_fraction=0``) or the held-out part. The geometric mean
        ranks policies as the mean PSNR over samples does (the figure the benchmark and
        the paper report); a pooled MSE lets one hard sample decide. Policies that sample
        alike share one evaluation. ``log_mse`` (each sample's, e.g. the rectification
        fit's leave-one-out run) is recorded instead of running the policy.
        """
        key = self._key(policy)
        if key in self.errors:
            return self.errors[key]
        if log_mse is not None:
            return self._score(key, log_mse)
        self._charge(key, self._evaluation_passes(policy))
        hit = self._kept(key)
        if hit is not None:
            return self._score(key, hit[1]["log_mse"])
        final = self._run("evaluation", key, policy.follower(self.driver.layout), self.hold, policy.sampling_grid)
        log_mse = self._log_mse(final, self.hold)
        self._done(key, {}, {"log_mse": log_mse})
        return self._score(key, log_mse)

    def _evaluation_passes(self, policy: Policy) -> float:
        """What judging ``policy`` costs in whole-set passes: its NFE / T, on the judging part of the set."""
        share = self.n_hold / self.driver.size if self.n_hold else 1.0
        return (self.T - len(policy.cached_steps)) / self.T * share

    def margin(self, old: Policy, new: Policy, old_shift: Tensor | None = None,
               new_shift: Tensor | None = None) -> Margin:
        """The paired comparison of ``new`` against ``old`` over the judging samples (both evaluated); a shift
        (:meth:`_shift`) replaces each sample's score of a fitted set by its fold's refitted set's."""
        self.error(old), self.error(new)
        a, b = self.scores[self._key(old)], self.scores[self._key(new)]
        d = ((a if old_shift is None else a + old_shift) - (b if new_shift is None else b + new_shift)) * DB
        sums = self.driver.reduce(torch.stack([d.sum(), d.square().sum(), torch.tensor(float(d.numel()),
                                                                                      dtype=torch.float64)]))
        n = int(sums[2])
        mean = float(sums[0]) / n
        var = max(0.0, (float(sums[1]) - n * mean * mean) / (n - 1)) if n > 1 else 0.0
        return Margin(mean, math.sqrt(var / n), n)

    # ----- the k-fold check of fitted sets ------------------------------------------
    def _positions(self, rows: slice) -> list[int]:
        """Where this process' part of ``rows`` sits among its rows of the whole set (the order of :attr:`scores`)."""
        where = {i: k for k, i in enumerate(self.driver.local(self.all))}
        return [where[i] for i in self.driver.local(rows)]

    def _error_without(self, key: str, fold: int) -> float:
        """An evaluation's calibration error (geometric mean of MSE) over every sample but fold ``fold``'s."""
        scores = self.scores[key]
        keep = torch.ones(scores.numel(), dtype=torch.bool)
        keep[self._positions(self.folds[fold])] = False
        return self._geometric(scores[keep])

    def _refitted(self, cand: Candidate) -> list[tuple[int, Policy]]:
        """``(fold, plain policy)`` of each fold whose refitted set differs from the candidate's own (none for a
        set not fitted to the samples, without folds, or where the recipe gives no set)."""
        if id(cand) not in self._refits:
            out: list[tuple[int, Policy]] = []
            if cand.refit is not None and self.folds:
                for f in range(len(self.folds)):
                    got = cand.refit(f)
                    if got is not None and (got[0], tuple(sorted(got[1].items()))) != cand.identity:
                        out.append((f, Policy(cached_steps=got[0], step_reuse=got[1], **self.base)))
            self._refits[id(cand)] = out
        return self._refits[id(cand)]

    def _fold_key(self, policy: Policy, fold: int) -> str:
        rows = self.folds[fold]
        return f"{self._key(policy)} rows {rows.start}:{rows.stop}"

    def _check_cost(self, cand: Candidate) -> float:
        """Whole-set passes the candidate's k-fold check still costs: its refitted sets on their folds."""
        cost = 0.0
        for f, policy in self._refitted(cand):
            key = self._fold_key(policy, f)
            if self._key(policy) not in self.scores and key not in self._charged:
                rows = self.folds[f]
                cost += self._evaluation_passes(policy) * (rows.stop - rows.start) / self.driver.size
        return cost

    def _fold_score(self, policy: Policy, fold: int) -> Tensor:
        """Each sample's log MSE at t = 0 of ``policy`` on fold ``fold`` (this process' rows): from its evaluation
        on every sample where there is one, else from an evaluation on the fold alone (kept, counted)."""
        rows = self.folds[fold]
        key = self._key(policy)
        if key in self.scores:
            return self.scores[key][self._positions(rows)]
        fkey = self._fold_key(policy, fold)
        if fkey not in self._fold_scores:
            self._charge(fkey, self._evaluation_passes(policy) * (rows.stop - rows.start) / self.driver.size)
            hit = self._kept(fkey)
            if hit is not None:
                self._fold_scores[fkey] = hit[1]["log_mse"]
            else:
                final = self._run("k-fold evaluation", fkey, policy.follower(self.driver.layout), rows,
                                  policy.sampling_grid)
                self._fold_scores[fkey] = self._log_mse(final, rows)
                self._done(fkey, {}, {"log_mse": self._fold_scores[fkey]})
        return self._fold_scores[fkey]

    def _shift(self, cand: Candidate, variants: dict[str, Policy]) -> Tensor | None:
        """The k-fold check of a set fitted to the samples: per sample (this process' rows), its refitted set's
        log MSE minus the set's own (0 where the fold refits the same set); None for a set not fitted.

        Each sample is then scored by the set that the recipe makes without the sample's fold: a
        ranking the set earns only on the samples it was fitted to does not survive. The same shift
        applies to the set's variants (its components are judged against the set itself). Records
        the corrected errors in ``cand.cross_validated`` and ``cand.errors``.

        Raises:
            _NoRoom: the check's evaluations do not fit in ``max_passes``.
        """
        if cand.refit is None or not self.folds:
            return None
        if id(cand) not in self._shifts:
            if not self._affords(self._check_cost(cand)):
                raise _NoRoom
            own = self.scores[self._key(self._plain(cand))]
            shift = torch.zeros_like(own)
            refitted = self._refitted(cand)
            for f, policy in refitted:
                rows = self._positions(self.folds[f])
                shift[rows] = self._fold_score(policy, f) - own[rows]
            self._shifts[id(cand)] = shift
            in_sample = dict(cand.errors)
            for name in cand.errors:
                policy = variants.get(name, self._plain(cand))
                cand.errors[name] = self._geometric(self.scores[self._key(policy)] + shift)
            cand.cross_validated = {"folds": len(self.folds), "refit_differs": len(refitted),
                                    "in_sample_errors": in_sample}
        return self._shifts[id(cand)]

    def _geometric(self, log_mse: Tensor) -> float:
        """The geometric mean over processes of the MSEs whose logs are ``log_mse`` (this process' rows)."""
        total = self.driver.reduce(torch.stack([log_mse.sum(), torch.tensor(float(log_mse.numel()),
                                                                            dtype=torch.float64)]))
        return math.exp(float(total[0] / total[1]))

    def _compare(self, old: tuple[Candidate, str], new: tuple[Candidate, str],
                 variants: dict[int, dict[str, Policy]]) -> tuple[Margin, dict[str, Any]]:
        """The paired comparison of two options (candidate, variant); a win of a set fitted to the samples is
        checked k-fold (:meth:`_shift`). Returns the margin and what the decision records beside it."""
        def policy_of(option: tuple[Candidate, str]) -> Policy:
            cand, name = option
            return variants[id(cand)][name] if name != "plain" else self._plain(cand)

        m = self.margin(policy_of(old), policy_of(new))
        fitted = [c for c in (old[0], new[0]) if c.refit is not None]
        if not m.significant or not self.folds or not fitted or old[0] is new[0]:
            return m, {}
        try:
            shifts = [self._shift(c, variants.get(id(c), {})) for c in (old[0], new[0])]
        except _NoRoom:
            return m, {"kept": False, "k_fold": f"not run: over max_passes={self.config.max_passes}"}
        checked = self.margin(policy_of(old), policy_of(new), *shifts)
        return checked, {"in_sample_gain_db": round(m.gain_db, 3), "k_fold": {
            "folds": len(self.folds), "refit_differs": sum(len(self._refitted(c)) for c in fitted)}}

    # ----- the method --------------------------------------------------------------
    @torch.no_grad()
    def policy(self, target_speedup: float | None = None, threshold: float | None = None) -> Policy:
        """The policy for a target speedup or a threshold (exactly one); see :func:`~ertacache.calibrate`.

        The sets are judged plain (budget permitting, :attr:`CalibrationConfig.max_passes`); the
        best and the runner-up (the evenly spaced set when it is not the best) also with their
        components (rectification, adjustment); from the evenly spaced set without components,
        a policy replaces the one kept so far only when it wins the paired comparison over
        the calibration samples by more than its standard error; a searched set's win is
        checked k-fold (:attr:`CalibrationConfig.folds`) before it is kept.
        """
        max_nfe = check_goal(target_speedup, threshold, self.T)
        before = {k: dict(v) for k, v in self.cost.items()}
        self._spent = 0.0
        candidates = self._judge_sets(self._candidates(threshold, max_nfe), threshold, max_nfe)
        base = next((c for c in candidates if c.source == "uniform" and c.rule is None), candidates[0])
        decisions: list[dict[str, Any]] = []
        variants: dict[int, dict[str, Policy]] = {}
        start = (base, "plain")
        inherited = next((c for c in candidates if c.inherited is not None), None)
        if inherited is not None and self.config.component_check:
            # a larger budget starts from the smaller budget's policy where it is the better one: more compute never
            # gets a policy the calibration samples rate below a smaller budget's (its fits are already paid)
            name = inherited.inherited or "plain"
            if name != "plain":
                variants[id(inherited)] = self._variants(inherited)
                for n, p in variants[id(inherited)].items():
                    inherited.errors[n] = self.error(p)
            if name in inherited.errors and inherited.errors[name] < base.errors["plain"]:
                start = (inherited, name)
        if not self.config.component_check:
            chosen = self._choose_set(candidates, base, decisions)
            variants[id(chosen)] = self._variants(chosen)
            names = list(variants[id(chosen)])
            chosen.variant = names[-1]
            if chosen.variant != "plain":
                chosen.errors[chosen.variant] = self.error(variants[id(chosen)][chosen.variant])
            policy = variants[id(chosen)][chosen.variant]
        else:
            checks = max([self._check_cost(c) for c in candidates], default=0.0)  # room for one k-fold check
            for cand in self._shortlist(candidates, base):
                if id(cand) in variants:
                    continue
                if self._affords(self._variant_cost(cand) + checks):
                    variants[id(cand)] = self._variants(cand)
                    for name, p in variants[id(cand)].items():
                        cand.errors[name] = self.error(p)
                else:
                    self.log(f"{cand.label(self.T)}: no room for its components in max_passes="
                             f"{self.config.max_passes}")
            chosen, name = self._choose(candidates, start, variants, decisions)
            chosen.variant = name
            policy = variants[id(chosen)][name] if name != "plain" else self._plain(chosen)
        self.variants = variants.get(id(chosen), {"plain": self._plain(chosen)})
        if threshold is None and max_nfe < self.T:
            self.winners.append(chosen)
        self.targets_left -= 1
        if self.bar is not None and self.targets_left <= 0:
            self.bar.total = self.bar.n  # the plan is an upper bound: end at 100 %
            self.bar.refresh()
            self.bar.close()
        info = provenance(
            calibration_size=self.driver.size, judged_on=self._judged_on(),
            holdout_size=self.n_hold, target_speedup=target_speedup,
            threshold=chosen.threshold, selected=chosen.source, variant=chosen.variant,
            candidates=[c.as_dict(self.T) for c in candidates], chosen=candidates.index(chosen),
            decisions=decisions,
            timestep_adjustment=("on" if self.config.timestep_adjustment else "off (config)")
            if self.driver.adjustment_off is None else f"off: {self.driver.adjustment_off}",
            cost=self.cost_summary(before), **self.driver.provenance(),
            **({"propagation": next((p for p in reversed(self.propagation) if p["max_nfe"] == max_nfe), None)}
               if self.config.propagation_candidate else {}),
        )
        return replace(policy, provenance=info)

    def _judged_on(self) -> str:
        if self.n_hold:
            return f"{self.n_hold} held-out samples"
        check = f", searched sets checked {len(self.folds)}-fold" if self.folds else ""
        if self.folds and self.config.timestep_adjustment and self.driver.adjustment_off is None:
            check += f", timestep adjustment checked {len(self.folds)}-fold where it helps"
        return f"every sample (rectification leave-one-out{check})"

    def _judge_sets(self, candidates: list[Candidate], threshold: float | None, max_nfe: int) -> list[Candidate]:
        """Each candidate set's plain evaluation, in priority order, while the budget leaves room for the best
        set's components; the first (the evenly spaced set where it competes) is judged in any case.

        Priority: the evenly spaced set, the smaller budget's set (already judged), the schedule search's first
        set, its per-step-reuse version, the nested set, the search's other sets, the propagation-weighted set
        (fitted on all of those); without a budget (``max_passes=None``, :meth:`CalibrationConfig.thorough`), the
        per-step-reuse versions of the other searched sets. Returns the judged ones in that order."""
        fit = variant_passes(self.config, min(max_nfe, self.T) / self.T)
        judged: list[Candidate] = []

        def judge(cand: Candidate) -> None:
            plain = self._plain(cand)
            cost = 0.0 if self._key(plain) in self._charged else self._evaluation_passes(plain)
            checks = max([self._check_cost(c) for c in judged + [cand]], default=0.0)  # one k-fold check kept free
            if judged and not self._affords(cost + fit + checks):
                self.log(f"{cand.label(self.T)} not judged: over max_passes={self.config.max_passes}")
                return
            self.log(f"evaluating {cand.source} set, NFE {self.T - len(cand.cached_steps)}")
            cand.errors = {"plain": self.error(plain)}
            judged.append(cand)
            if not cand.step_reuse:
                self._judged_sets[cand.cached_steps] = cand.errors["plain"]
                self._judged_keys[cand.cached_steps] = self._key(plain)

        base = [c for c in candidates if c.source == "uniform" and c.rule is None][:1]
        per_step = self.config.step_reuse_choice and threshold is None
        for cand in base + [c for c in candidates if c not in base]:
            judge(cand)
            if per_step and cand in judged and cand.source == "search" and cand.inherited is None:
                per_step = False  # once, on the best search set judged so far
                searched = [c for c in judged if c.source == "search" and not c.step_reuse and c.inherited is None]
                extra = self._per_step_candidate(min(searched, key=lambda c: c.errors["plain"]))
                if extra is not None and extra.identity not in {c.identity for c in candidates + judged}:
                    judge(extra)
        if self.config.propagation_candidate and threshold is None and "search" in self.config.candidates:
            extra = self._propagation_candidate(max_nfe)
            if extra is not None and extra.identity not in {c.identity for c in candidates + judged}:
                judge(extra)
        if self.config.step_reuse_choice and threshold is None and self.config.max_passes is None:
            for cand in [c for c in judged if c.source == "search" and not c.step_reuse and c.inherited is None]:
                extra = self._per_step_candidate(cand)  # the other searched sets' per-step versions, unbudgeted
                if extra is not None and extra.identity not in {c.identity for c in candidates + judged}:
                    judge(extra)
        return judged

    def _propagation_candidate(self, max_nfe: int) -> Candidate | None:
        """The schedule search's set under segment costs weighted by a fitted propagation
        (:func:`~.schedule.fit_propagation`, on every plain set judged so far in the session); None without the
        error model or with fewer than 3 judged sets. Recorded in :attr:`propagation`."""
        triple = self._extrapolation_costs()
        cost = triple.get("raw") if triple else self.search_costs.get("raw")
        if cost is None:
            return None
        fit = fit_propagation(cost, self.grid, list(self._judged_sets.items()))
        if fit is None:
            self.propagation.append({"max_nfe": max_nfe, "judged_sets": len(self._judged_sets), "beta": None})
            return None
        beta, weighted = fit
        cached = shortest_schedule(weighted, max_nfe, self.switch_steps)
        self.propagation.append({"max_nfe": max_nfe, "judged_sets": len(self._judged_sets), "beta": beta,
                                 "cached_steps": None if cached is None else list(cached)})
        if cached is None:
            return None
        judged = dict(self._judged_keys)

        def refit(fold: int) -> tuple[tuple[int, ...], dict[int, str]] | None:
            triple_f = self._extrapolation_costs(fold)
            cost_f = triple_f.get("raw") if triple_f else self._costs(fold).get("raw")
            fit_f = None if cost_f is None else fit_propagation(
                cost_f, self.grid, [(c, self._error_without(key, fold)) for c, key in judged.items()])
            got = None if fit_f is None else shortest_schedule(fit_f[1], max_nfe, self.switch_steps)
            return None if got is None else (got, {})

        rule = f"{'extrapolation, ' if triple else ''}propagation-weighted (beta={beta:g})"
        return Candidate("search", None, cached, rule=rule, refit=refit)

    def _plain(self, cand: Candidate) -> Policy:
        """The candidate's set alone: no adjustment, no rectification."""
        return Policy(cached_steps=cand.cached_steps, step_reuse=cand.step_reuse, **self.base)  # type: ignore[arg-type]

    def _shortlist(self, candidates: list[Candidate], base: Candidate) -> list[Candidate]:
        """The sets whose components are fitted: the best by plain evaluation, then the evenly spaced set (or, when
        that is the best, the next best)."""
        ranked = sorted(candidates, key=lambda c: c.errors["plain"])
        second = base if ranked[0] is not base else next((c for c in ranked if c is not base), None)
        return [ranked[0]] + ([second] if second is not None else [])

    def _variant_cost(self, cand: Candidate) -> float:
        """Passes the set's components still cost (a rectification fit an earlier target ran is free)."""
        frac = (self.T - len(cand.cached_steps)) / self.T
        cost = variant_passes(self.config, frac)
        if self.config.rectification != "off" and self._rect_key(cand.cached_steps, self.grid,
                                                                  cand.step_reuse) in self._charged:
            cost -= 1.0
        return max(cost, 0.0)

    def _choose_set(self, candidates: list[Candidate], base: Candidate,
                    decisions: list[dict[str, Any]]) -> Candidate:
        """The evenly spaced set (or the first candidate), unless another wins the paired comparison against it."""
        for cand in sorted(candidates, key=lambda c: c.errors["plain"]):
            if cand is base or cand.errors["plain"] >= base.errors["plain"]:
                break
            m, note = self._compare((base, "plain"), (cand, "plain"), {})
            decisions.append({"decision": f"{cand.label(self.T)} over {base.label(self.T)}", **m.as_dict(), **note})
            if m.significant and note.get("kept", True):
                return cand
        return base

    def _choose(self, candidates: list[Candidate], start: tuple[Candidate, str],
                variants: dict[int, dict[str, Policy]], decisions: list[dict[str, Any]]) -> tuple[Candidate, str]:
        """From ``start`` (the evenly spaced set without components, or a smaller budget's policy where that is
        the better), move to a judged policy of smaller error only on a paired win by more than its standard
        error, until none wins: every policy kept beat the one it replaced, and a set's component
        (rectification, adjustment) also beat the set without it."""
        def policy_of(option: tuple[Candidate, str]) -> Policy:
            cand, name = option
            return variants[id(cand)][name] if name != "plain" else self._plain(cand)

        def label(option: tuple[Candidate, str]) -> str:
            cand, name = option
            return cand.label(self.T) + ("" if name == "plain" else f", {name}")

        options = [(c, "plain") for c in candidates] + [(c, n) for c in candidates for n in variants.get(id(c), {})
                                                       if n != "plain"]
        current = start
        while True:
            better = sorted((o for o in options if o[0].errors[o[1]] < current[0].errors[current[1]]),
                            key=lambda o: o[0].errors[o[1]])
            for option in better:
                m, note = self._compare(current, option, variants)
                decisions.append({"decision": f"{label(option)} over {label(current)}", **m.as_dict(), **note})
                if not note.get("kept", True):
                    continue
                if m.significant and option[1] != "plain" and option[0] is not current[0]:
                    own = (option[0], "plain")  # a component is kept only where it wins on its own set too
                    m = self.margin(policy_of(own), policy_of(option))
                    decisions.append({"decision": f"{label(option)} over {label(own)}", **m.as_dict()})
                if m.significant:
                    current = option
                    break
            else:
                return current

    def policies(self, target_speedups: Sequence[float]) -> list[Policy]:
        """One policy per target (in the order given), calibrated from the smallest NFE budget up (nested)."""
        order = sorted(range(len(target_speedups)), key=lambda k: -float(target_speedups[k]))
        out: dict[int, Policy] = {}
        for k in order:
            out[k] = self.policy(target_speedups[k], None)
        return [out[k] for k in range(len(target_speedups))]

    def cost_summary(self, before: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
        """This policy's cost: the ground truth (shared by every target of the session) and the passes run for its
        own target since ``before``; model calls summed over processes, also in uncached generations of the set."""
        per_generation = self.driver.size * len(self.base["branches"]) * self.T
        before = self.gt_cost if before is None else before

        def part(costs: dict[str, dict[str, float]]) -> dict[str, Any]:
            kinds = sorted(k for k in costs if costs[k]["passes"])
            calls = self.driver.reduce(torch.tensor([costs[k]["model_calls"] for k in kinds] or [0.0],
                                                    dtype=torch.float64))
            by_pass = {k: {"passes": int(costs[k]["passes"]), "model_calls": int(calls[i]),
                           "seconds": round(costs[k]["seconds"], 2)} for i, k in enumerate(kinds)}
            total = int(sum(v["model_calls"] for v in by_pass.values()))
            return {"by_pass": by_pass, "passes": sum(v["passes"] for v in by_pass.values()), "model_calls": total,
                    "seconds": round(sum(costs[k]["seconds"] for k in kinds), 2),
                    "uncached_generations": round(total / per_generation, 2)}

        own = {k: {m: v[m] - before.get(k, {}).get(m, 0) for m in ("passes", "model_calls", "seconds")}
               for k, v in self.cost.items() if k != "ground truth"}
        gt, target = part(self.gt_cost), part(own)
        both = {k: dict(v) for k, v in own.items()}
        for k, v in self.gt_cost.items():
            both[k] = {m: both.get(k, {}).get(m, 0) + v[m] for m in ("passes", "model_calls", "seconds")}
        return {**part(both), "ground_truth": {k: gt[k] for k in ("passes", "model_calls", "uncached_generations")},
                "target": {k: target[k] for k in ("passes", "model_calls", "seconds", "uncached_generations")},
                "resumed_passes": self.resumed}

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
        known = {c.identity for c in out}

        def add(cand: Candidate) -> None:
            if cand.identity not in known:
                known.add(cand.identity)
                out.append(cand)

        smaller = [w for w in self.winners if self.T - len(w.cached_steps) <= max_nfe]
        previous = max(smaller, key=lambda w: self.T - len(w.cached_steps)) if smaller else None
        if previous is not None:  # a smaller budget's choice fits this one (already judged: free)
            add(Candidate(previous.source, previous.threshold, previous.cached_steps,
                          rule=f"the NFE-{self.T - len(previous.cached_steps)} target's set",
                          step_reuse=dict(previous.step_reuse), inherited=previous.variant))
        if "search" in self.config.candidates:
            limit = self.config.search_candidates
            proposed = [(f"extrapolation, {rule}", cached) for rule, cached in
                        propose(self._extrapolation_costs(), max_nfe, self.switch_steps, limit)]
            proposed += propose(self.search_costs, max_nfe, self.switch_steps, limit)
            nested: list[Candidate] = []
            if previous is not None and self.T - len(previous.cached_steps) < max_nfe:
                computed = [i for i in range(self.T) if i not in previous.cached_steps]
                forced = sorted({*self.switch_steps, *computed})
                triple = self._extrapolation_costs()
                for rule, cached in propose(triple or self.search_costs, max_nfe, forced, 1):
                    rule = f"extrapolation, {rule}" if triple else rule
                    nested.append(Candidate("search", None, cached,
                                            rule=f"{rule}, adding steps to the NFE-{len(computed)} set",
                                            refit=self._refit_rule(rule, max_nfe, forced)))
            # priority (what a budget keeps): the search's first set, the nested set, the search's others
            ordered = [Candidate("search", None, cached, rule=rule,
                                 refit=self._refit_rule(rule, max_nfe, self.switch_steps))
                       for rule, cached in proposed[:limit]]
            for cand in ordered[:1] + nested + ordered[1:]:
                add(cand)
        if not out:  # the search found no set beside the forced steps: the evenly spaced one competes alone
            out = select_candidates([], self.T, max_nfe, replace(self.config, candidates=("uniform",)),
                                    self.switch_steps)
        return out

    def _costs(self, fold: int | None) -> dict[str, Tensor]:
        """The search's ``(T, T)`` segment costs and Gram matrix: of every sample (``fold`` None), or without
        fold k's samples."""
        return self.search_costs if fold is None else self.fold_costs[fold]

    def _extrapolation_costs(self, fold: int | None = None) -> dict[str, Tensor]:
        """The schedule search's segment costs ``(T, T, T)`` for ``extrapolate`` reuse (empty for other modes,
        without the ground truth's Gram matrix, or above :data:`~.schedule.MAX_TRIPLE_STEPS` steps); ``fold``:
        from the ground truth without that fold's samples."""
        gram = self._costs(fold).get("gram")
        if not get_reuse(self.config.reuse).needs_history or gram is None or self.T > MAX_TRIPLE_STEPS:
            return {}
        if fold not in self._triples:
            kinds = ("raw", "rectified") if self.config.rectification != "off" else ("raw",)
            self._triples[fold] = {k: extrapolation_costs(gram, self.grid, k == "rectified", self.config.reuse)
                                   for k in kinds}
        return self._triples[fold]

    def _schedule(self, rule: str, max_nfe: int, forced: Sequence[int], fold: int | None) -> tuple[int, ...] | None:
        """The set one reading of the error model gives (``rule`` as :meth:`_candidates` names it: a
        :data:`~.schedule.RULES` entry, prefixed ``extrapolation, `` for the ``(T, T, T)`` costs)."""
        prefix = "extrapolation, "
        if rule.startswith(prefix):
            return schedule_for(self._extrapolation_costs(fold), rule[len(prefix):], max_nfe, forced)
        return schedule_for(self._costs(fold), rule, max_nfe, forced)

    def _refit_rule(self, rule: str, max_nfe: int, forced: Sequence[int]
                    ) -> Callable[[int], tuple[tuple[int, ...], dict[int, str]] | None]:
        """A searched set's recipe, for the k-fold check: the same reading of the error model without fold k."""
        def refit(fold: int) -> tuple[tuple[int, ...], dict[int, str]] | None:
            cached = self._schedule(rule, max_nfe, forced, fold)
            return None if cached is None else (cached, {})
        return refit

    def _per_step_candidate(self, base: Candidate) -> Candidate | None:
        """``base``'s set with each cached step's reuse mode chosen by the error model
        (:func:`~.schedule.choose_step_reuse`), as a candidate of its own; None when the ground truth logged no
        error model (``search`` not among the sources), the reuse mode has no alternative, or every step keeps the
        policy's mode."""
        config = self.config
        gram = self.search_costs.get("gram")
        own = get_reuse(config.reuse)  # the modes one cache can serve beside it: those that keep the same thing
        modes = [config.reuse] + [n for n, m in REUSE_MODES.items() if n != config.reuse and m.keeps == own.keeps]
        if gram is None or own.keeps != "v" or len(modes) < 2 or not base.cached_steps or base.step_reuse:
            return None

        def per_step(cached: tuple[int, ...], fold: int | None) -> dict[int, str]:
            chosen = choose_step_reuse(self._costs(fold)["gram"], self.grid, cached, modes,
                                       config.rectification != "off")
            return {j: m for j, m in chosen.items() if m != config.reuse}

        step_reuse = per_step(base.cached_steps, None)
        if not step_reuse:
            return None
        refit: Callable[[int], tuple[tuple[int, ...], dict[int, str]] | None] | None = None
        if base.refit is not None:  # the base set's recipe, then the per-step choice on what it gives
            base_refit = base.refit

            def refit_fold(fold: int) -> tuple[tuple[int, ...], dict[int, str]] | None:
                got = base_refit(fold)
                return None if got is None else (got[0], per_step(got[0], fold))

            refit = refit_fold
        return Candidate(base.source, base.threshold, base.cached_steps, rule=f"{base.rule}, per-step reuse"
                         if base.rule else "per-step reuse", step_reuse=step_reuse, refit=refit)

    def _variants(self, cand: Candidate) -> dict[str, Policy]:
        """The candidate's policies, from fewest components to all that the config asks for.

        A rectified variant fitted leave-one-out is evaluated by its fitting run (no further pass). With
        :attr:`folds`, an adjusted grid that helps on the samples it was fitted to (the adjusted variant beats
        the plain set, or the full variant the rectified one) is judged k-fold (:meth:`adjust_k_fold`): the
        adjusted variant by its k-fold scores, the full variant (rectification leave-one-out on the grid fitted
        to every sample) by its leave-one-out run plus, per sample, the grid's k-fold minus in-sample log MSE.
        A grid that does not help in-sample, where the judgement is optimistic, is not checked further."""
        config = self.config
        plain = self._plain(cand)
        out = {"plain": plain}
        if not cand.cached_steps:
            return out
        adjusted: list[float] | None = None
        if config.timestep_adjustment and self.driver.adjustment_off is None:
            adjusted = self.adjust(cand.cached_steps, cand.step_reuse)
            out["adjusted"] = replace(plain, adjusted_grid=tuple(adjusted))
        full: Tensor | None = None  # the full variant's leave-one-out log MSE, recorded once judged
        if config.rectification != "off":
            grids: list[tuple[str, list[float]]] = [("rectified", self.grid)]
            if adjusted is not None:
                grids = (grids if config.component_check else []) + [("full", adjusted)]
            for name, g in grids:
                a, b, enabled, log_mse = self.rectify(cand.cached_steps, g, plain.branches, cand.step_reuse)
                out[name] = replace(out["adjusted"] if name == "full" else plain, rect_a=a, rect_b=b,
                                    rect_enabled=enabled, rect_form=config.rectification)
                if log_mse is not None and bool(enabled.any()):
                    if name == "full":
                        full = log_mse
                    else:
                        self.error(out[name], log_mse)  # the leave-one-out run is the variant's evaluation
        if adjusted is not None and self.folds and tuple(adjusted) != tuple(self.grid):
            key = self._key(out["adjusted"])
            helps = self.error(out["adjusted"]) < self.error(plain) or (
                full is not None and self._geometric(full) < self.error(out.get("rectified", plain)))
            if helps:  # judged on samples the grid was not fitted to
                k_fold = self.adjust_k_fold(cand.cached_steps, cand.step_reuse)
                if full is not None:  # the rectified grid's judgement carries the same optimism
                    full = full + (k_fold - self.scores[key])
                self._score(key, k_fold)
        if full is not None:
            self.error(out["full"], full)
        return out


def logger(enabled: bool, prefix: str = "calibrate") -> Callable[[str], None] | None:
    """A ``print`` logger for progress messages, or None."""
    if not enabled:
        return None

    def log(msg: str) -> None:
        print(f"[{prefix}] {msg}", flush=True)

    return log

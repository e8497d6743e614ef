"""One calibration session: ground truth, Algorithm 2's candidates, their variants, the held-out choice.

The session is the method, once; a driver walks the trajectories (the core Euler
loop, :class:`~ertacache.calibration.drive.CoreDriver`, or a diffusers pipeline's own
``__call__``). Stages (docs/method.md section 2-4): ground-truth logging and the threshold
search of Algorithm 2 give candidate cached-step sets S; for each candidate the
timestep adjustment (Eq. 13-14) and the rectification fit (Eq. 15-21) are estimated,
and a policy replaces the evenly spaced set only on a paired win over the calibration
samples beyond its uncertainty (:mod:`.evidence`). Every sample fits and judges: rectification is
judged leave-one-out, and a set the schedule search fitted to the samples is judged
k-fold (each sample scored by the set the search makes without that sample's fold).

The work is done in rooms with one job each: :class:`~.runner.PassRunner` (running,
checkpoint, cost, budget, progress), :class:`~.judge.Judge` (errors, margins, k-fold),
:class:`~.proposals.Proposer` (candidate sets) and :class:`~.components.Components`
(adjustment and rectification); the session holds them and makes the choice.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..core.config import CalibrationConfig
from ..policy import Policy, provenance
from .checkpoint import Checkpoint
from .components import Components
from .distributed import check_shards, fold_slices
from .drive import Driver
from .evidence import ErrorModelPrior, Margin
from .fresh import FreshCheck, twin_of
from .judge import Judge, Option, evaluation_key, option_label
from .plan import fresh_checked, plan, variant_passes
from .proposals import Proposer
from .runner import PassCallback, PassRunner
from .sets import Candidate, check_goal
from .truth import record_truth

__all__ = ["CalibrationSession", "Margin", "PassCallback"]
logger = logging.getLogger(__name__)


def _refines(current: Option, option: Option) -> bool:
    """Whether ``option`` computes every step ``current`` computes, and more, with the same components and reuse:
    a larger budget's refinement of a smaller budget's set (the nested candidate), whose estimated gain need not be
    significant (more computation of the same set is the expected direction; "a larger budget left unused" else)."""
    (a, va), (b, vb) = current, option
    return va == vb and a.step_reuse == b.step_reuse and set(b.cached_steps) < set(a.cached_steps)


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
        progress: one tqdm bar (in model calls) over the ground truth and every target of ``targets``.
        checkpoint_dir: keep each finished pass there and reuse what is already there.
        callback: called after each pass (tests stop a calibration with it).
        targets: the target speedups that will be asked for (sizes the progress bar; None: one target).

    Attributes:
        runner, judge, proposer, components: the rooms.
        variants: the component variants of the cached set chosen by the latest
            :meth:`policy` call (see :func:`~ertacache.calibration.calibrate_with_variants`).
        grid: the ``T + 1`` times the driver's trajectories follow.
        base: the :class:`~ertacache.policy.Policy` fields every candidate shares.

    Raises:
        ErtaCacheError: a set the processes cannot share, a checkpoint of another
            calibration, or a sampler that ran another step count.
    """

    def __init__(self, driver: Driver, config: CalibrationConfig | None = None, *, progress: bool = False,
                 checkpoint_dir: str | Path | None = None, callback: PassCallback | None = None,
                 targets: Sequence[float] | None = None) -> None:
        self.driver, self.config = driver, config or CalibrationConfig()
        self.T, n = driver.num_inference_steps, driver.size
        n_hold = round(n * self.config.holdout_fraction) if n >= 2 else 0
        n_fit = n - n_hold
        world = getattr(driver, "world_size", 1)
        check_shards([range(n)[:n_fit], range(n)[n_fit:] if n_hold else range(n)], world)
        folds = [] if n_hold else fold_slices(n, world, self.config.folds)
        checkpoint = None if checkpoint_dir is None else Checkpoint(
            checkpoint_dir, {**driver.identity(), "config": self.config.to_dict(), "library": __version__,
                             "world_size": world}, getattr(driver, "rank", 0), world)
        self.runner = PassRunner(driver, n_fit, checkpoint, callback, self.config.max_passes)
        self.targets = list(targets or [2.0])
        self.targets_left = max(1, len(targets or ()))
        other = int(getattr(driver, "check_rows", 0))  # rows of other conditions for the fresh check
        if progress:
            branches = len(getattr(driver, "names", ("cond", "uncond")))  # a pipeline's are known after ground truth
            self.runner.open_bar(plan(self.config, self.T, self.targets, n * branches, n // world, other).model_calls)
        logger.info("ground truth on %d samples%s", n, f" ({n_hold} of them held out)" if n_hold else "")
        truth = record_truth(self.runner, driver, self.config, folds)
        if len(truth.fold_costs) != len(folds):  # a driver that does not say which sample a row is
            folds, truth.fold_costs = [], []
        self.truth, self.grid = truth, truth.grid
        self.base: dict[str, Any] = dict(driver.policy_fields(self.grid), config=self.config)
        self.runner.resize_bar(plan(self.config, self.T, self.targets, n * len(self.base["branches"]),
                                    n // world, other).model_calls)
        self.gt_cost = self.runner.snapshot()
        self.proposer = Proposer(self.runner, self.config, truth, n_fit)
        self.judge = Judge(self.runner, driver, truth.final, n_hold, folds, self.base)
        if self.config.error_model_prior:
            self.judge.evidence = ErrorModelPrior(lambda: self.proposer.extrapolation_costs() or truth.search_costs,
                                                  self.judge.errors)
        if fresh_checked(self.config, n // world, other) and not n_hold:  # a fitted set's win: checked on fresh rows
            twin, self.judge.fresh_off = twin_of(driver)
            self.judge.fresh = None if twin is None else FreshCheck(self.runner, twin)
        self.components = Components(self.runner, self.judge, driver, self.config, truth, n_fit)
        self.winners: list[Candidate] = []  # the chosen set of each target so far
        self.variants: dict[str, Policy] = {}

    @property
    def cost(self) -> dict[str, dict[str, float]]:
        """Per pass kind, ``{"passes", "model_calls", "seconds"}``; model calls are transformer forwards per sample
        and branch (summed over processes in the policy), passes kept by a checkpoint included."""
        return self.runner.cost

    @property
    def folds(self) -> list[slice]:
        """The k-fold partition of the calibration rows (empty: no k-fold check)."""
        return self.judge.folds

    # ----- the method --------------------------------------------------------------
    @torch.no_grad()
    def policy(self, target_speedup: float | None = None, threshold: float | None = None) -> Policy:
        """The policy for a target speedup or a threshold (exactly one); see :func:`~ertacache.calibrate`.

        The sets are judged plain (budget permitting, :attr:`CalibrationConfig.max_passes`); the
        best and the runner-up (the evenly spaced set when it is not the best) also with their
        components (rectification, adjustment); from the evenly spaced set without components,
        a policy replaces the one kept so far only when it wins the paired comparison over
        the calibration samples beyond its posterior standard deviation (:mod:`.evidence`); a searched set's win is
        checked k-fold (:attr:`CalibrationConfig.folds`) before it is kept.
        """
        max_nfe = check_goal(target_speedup, threshold, self.T)
        before = self.runner.snapshot()
        self.runner.new_target()
        candidates = self._judge_sets(self.proposer.candidates(threshold, max_nfe, self.winners), threshold, max_nfe)
        base = next((c for c in candidates if c.source == "uniform" and c.rule is None), candidates[0])
        decisions: list[dict[str, Any]] = []
        variants: dict[int, dict[str, Policy]] = {}
        if self.config.component_check:
            chosen, name = self._choose(candidates, self._start(candidates, base, variants), variants, decisions)
        else:
            chosen = self._choose_set(candidates, base, decisions)
            variants[id(chosen)] = self.components.variants(chosen)
            name = list(variants[id(chosen)])[-1]
            if name != "plain":
                chosen.errors[name] = self.judge.error(variants[id(chosen)][name])
        chosen.variant = name
        policy = variants[id(chosen)][name] if name != "plain" else self.judge.plain(chosen)
        self.variants = variants.get(id(chosen), {"plain": self.judge.plain(chosen)})
        if threshold is None and max_nfe < self.T:
            self.winners.append(chosen)
        self.targets_left -= 1
        if self.targets_left <= 0:
            self.runner.close_bar()
        info = self._provenance(target_speedup, max_nfe, candidates, chosen, decisions, before)
        info["decision"] = self._decision(candidates, base, (chosen, name), variants)
        return replace(policy, provenance=info)

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
        return self.runner.summary(self.gt_cost if before is None else before, self.gt_cost, per_generation)

    # ----- the steps of :meth:`policy` ---------------------------------------------------
    def _judge_sets(self, candidates: list[Candidate], threshold: float | None, max_nfe: int) -> list[Candidate]:
        """Each candidate set's plain evaluation, in priority order, while the budget leaves room for the best
        set's components; the first (the evenly spaced set where it competes) is judged in any case.

        Priority: the evenly spaced set, the smaller budget's set (already judged), the schedule search's first
        set, its per-step-reuse version, the nested set, the search's other sets, the propagation-weighted set
        (fitted on all of those); without a budget (``max_passes=None``, :meth:`CalibrationConfig.thorough`), the
        per-step-reuse versions of the other searched sets. Returns the judged ones in that order."""
        config, judge, proposer = self.config, self.judge, self.proposer
        fit = variant_passes(config, min(max_nfe, self.T) / self.T)
        judged: list[Candidate] = []

        def judge_set(cand: Candidate) -> None:
            plain = judge.plain(cand)
            cost = 0.0 if self.runner.charged(evaluation_key(plain)) else judge.evaluation_passes(plain)
            checks = max([judge.check_cost(c) for c in judged + [cand]], default=0.0)  # one k-fold check kept free
            if judged and not self.runner.affords(cost + fit + checks):
                logger.info("%s not judged: over max_passes=%s", cand.label(self.T), config.max_passes)
                return
            logger.info("evaluating %s set, NFE %d", cand.source, self.T - len(cand.cached_steps))
            cand.errors = {"plain": judge.error(plain)}
            judged.append(cand)
            proposer.record_judged(cand, cand.errors["plain"], evaluation_key(plain))

        def judge_new(cand: Candidate | None) -> None:  # a derived set, unless it samples as one already there
            if cand is not None and cand.identity not in {c.identity for c in candidates + judged}:
                judge_set(cand)

        first = [c for c in candidates if c.source == "uniform" and c.rule is None][:1]
        per_step = config.step_reuse_choice and threshold is None
        for cand in first + [c for c in candidates if c not in first]:
            judge_set(cand)
            if per_step and cand in judged and cand.source == "search" and cand.inherited is None:
                per_step = False  # once, on the best search set judged so far
                judge_new(proposer.per_step_candidate(min(self._searched(judged), key=lambda c: c.errors["plain"])))
        if config.propagation_candidate and threshold is None and "search" in config.candidates:
            judge_new(proposer.propagation_candidate(max_nfe, judge.error_without))
        if config.step_reuse_choice and threshold is None and config.max_passes is None:
            for cand in self._searched(judged):  # the other searched sets' per-step versions, unbudgeted
                judge_new(proposer.per_step_candidate(cand))
        return judged

    @staticmethod
    def _searched(judged: list[Candidate]) -> list[Candidate]:
        return [c for c in judged if c.source == "search" and not c.step_reuse and c.inherited is None]

    def _start(self, candidates: list[Candidate], base: Candidate, variants: dict[int, dict[str, Policy]]) -> Option:
        """Where the choice starts: the evenly spaced set without components, or a smaller budget's policy where
        that is the better one (more compute never gets a policy the samples rate below a smaller budget's), and
        the sets whose components are fitted (the shortlist, budget permitting), recorded in ``variants``."""
        start: Option = (base, "plain")
        inherited = next((c for c in candidates if c.inherited is not None), None)
        if inherited is not None:  # its fits are already paid
            name = inherited.inherited or "plain"
            if name != "plain":
                self._fit_components(inherited, variants)
            if name in inherited.errors and inherited.errors[name] < base.errors["plain"]:
                start = (inherited, name)
        checks = max([self.judge.check_cost(c) for c in candidates], default=0.0)  # room for one k-fold check
        for cand in self._shortlist(candidates, base):
            if id(cand) in variants:
                continue
            if self.runner.affords(self.components.cost(cand) + checks):
                self._fit_components(cand, variants)
            else:
                logger.info("%s: no room for its components in max_passes=%s", cand.label(self.T),
                            self.config.max_passes)
        return start

    def _fit_components(self, cand: Candidate, variants: dict[int, dict[str, Policy]]) -> None:
        variants[id(cand)] = self.components.variants(cand)
        for name, p in variants[id(cand)].items():
            cand.errors[name] = self.judge.error(p)

    @staticmethod
    def _shortlist(candidates: list[Candidate], base: Candidate) -> list[Candidate]:
        """The sets whose components are fitted: the best by plain evaluation, then the evenly spaced set (or, when
        that is the best, the next best)."""
        ranked = sorted(candidates, key=lambda c: c.errors["plain"])
        second = base if ranked[0] is not base else next((c for c in ranked if c is not base), None)
        return [ranked[0]] + ([second] if second is not None else [])

    def _choose_set(self, candidates: list[Candidate], base: Candidate,
                    decisions: list[dict[str, Any]]) -> Candidate:
        """The evenly spaced set (or the first candidate), unless another wins the paired comparison against it."""
        refuted = False
        for cand in sorted(candidates, key=lambda c: c.errors["plain"]):
            if cand is base or cand.errors["plain"] >= base.errors["plain"]:
                break
            if refuted and cand.refit is not None:
                decisions.append(_not_tried(cand.label(self.T), base.label(self.T)))
                continue
            m, note = self.judge.compare((base, "plain"), (cand, "plain"), {})
            decisions.append({"decision": f"{cand.label(self.T)} over {base.label(self.T)}", **m.as_dict(), **note})
            if m.significant and note.get("kept", True):
                return cand
            refuted = refuted or "fresh_check" in note and not note.get("kept", True)
        return base

    def _choose(self, candidates: list[Candidate], start: Option, variants: dict[int, dict[str, Policy]],
                decisions: list[dict[str, Any]]) -> Option:
        """From ``start``, move to the judged policy of the largest estimated gain that wins by more than its
        posterior standard deviation (:mod:`.evidence`; a fitted set's win checked k-fold), until none wins:
        every policy kept beat the one it replaced, and a set's component
        (rectification, adjustment) also beat the set without it."""
        def policy_of(option: Option) -> Policy:
            return self.judge.policy_of(option, variants)

        def label(option: Option) -> str:
            return option_label(option, self.T)

        options = [(c, "plain") for c in candidates] + [(c, n) for c in candidates for n in variants.get(id(c), {})
                                                       if n != "plain"]
        current = start
        visited = [start]  # never back to a policy left behind (a posterior need not order the options in a line)
        refuted = False  # a fitted set was refused on fresh rows: no other set fitted to these samples is tried
        while True:  # the options ranked by their estimated gain over the current one (no check run yet)
            gains = [(self.judge.margin(policy_of(current), policy_of(o)).gain_db, k) for k, o in enumerate(options)
                     if not any(o[0] is v[0] and o[1] == v[1] for v in visited)]
            better = [options[k] for g, k in sorted(gains, key=lambda gk: (-gk[0], gk[1])) if g > 0]
            for option in better:
                if _refines(current, option):  # more computed steps of the same set: kept on any estimated gain
                    decisions.append({"decision": f"{label(option)} over {label(current)}",
                                      **self.judge.margin(policy_of(current), policy_of(option)).as_dict(),
                                      "kept": True, "refines": True})
                    current = option
                    visited.append(option)
                    break
                if refuted and option[0].refit is not None:
                    decisions.append(_not_tried(label(option), label(current)))
                    visited.append(option)
                    continue
                m, note = self.judge.compare(current, option, variants)
                decisions.append({"decision": f"{label(option)} over {label(current)}", **m.as_dict(), **note})
                if not note.get("kept", True):
                    refuted = refuted or "fresh_check" in note
                    continue
                if m.significant and option[1] != "plain" and option[0] is not current[0]:
                    own = (option[0], "plain")  # a component is kept only where it wins on its own set too
                    m = self.judge.margin(policy_of(own), policy_of(option))
                    decisions.append({"decision": f"{label(option)} over {label(own)}", **m.as_dict()})
                if m.significant:
                    current = option
                    visited.append(option)
                    break
            else:
                return current

    def _decision(self, candidates: list[Candidate], base: Candidate, chosen: Option,
                  variants: dict[int, dict[str, Policy]]) -> dict[str, Any]:
        """The choice stated against the evenly spaced set without components (the start): the chosen policy's
        estimated gain over it, or, where that set was kept, the best alternative's (the one it did not keep), with
        the 80 % interval and the evidence behind it (:mod:`.evidence`). Uses the k-fold checks already made, and
        the fresh-noise samples where both policies were scored there (no pass is run for the statement)."""
        def margin(option: Option) -> Margin:
            return self.judge.margin(self.judge.plain(base), self.judge.policy_of(option, variants),
                                     self.judge.known_shift(base), self.judge.known_shift(option[0]), with_fresh=True)

        kept = not (chosen[0] is base and chosen[1] == "plain")
        options = [chosen] if kept else [(c, n) for c in candidates for n in dict.fromkeys(["plain", *variants.get(
            id(c), {})]) if not (c is base and n == "plain")]
        if not options:
            return {"option": None, "over": base.label(self.T), "kept": False}
        scored = [(margin(o), o) for o in options]
        m, option = max(scored, key=lambda s: s[0].gain_db)
        label = option_label(option, self.T)
        fit = self.judge.evidence.fit() if self.judge.evidence is not None else None
        fresh = self.judge.known_fresh_gain(self.judge.plain(base), self.judge.policy_of(option, variants))
        return {"option": label, "over": base.label(self.T), **m.as_dict(), "kept": kept,
                "interval_db": [round(v, 3) for v in m.interval_db],
                "evidence": {"samples": m.n, "predicted_policies": len(self.judge.evidence.predicted)
                             if self.judge.evidence is not None else 0, "error_model_slope": None if fit is None
                             else round(fit[0], 4), **({} if fresh is None else {"fresh_check": fresh})}}

    def _provenance(self, target_speedup: float | None, max_nfe: int, candidates: list[Candidate],
                    chosen: Candidate, decisions: list[dict[str, Any]], before: dict[str, dict[str, float]]
                    ) -> dict[str, Any]:
        adjustment = ("on" if self.config.timestep_adjustment else "off (config)") \
            if self.driver.adjustment_off is None else f"off: {self.driver.adjustment_off}"
        fits = [p for p in reversed(self.proposer.propagation) if p["max_nfe"] == max_nfe]
        return provenance(
            calibration_size=self.driver.size, judged_on=self._judged_on(),
            holdout_size=self.judge.n_hold, target_speedup=target_speedup,
            threshold=chosen.threshold, selected=chosen.source, variant=chosen.variant,
            candidates=[c.as_dict(self.T) for c in candidates], chosen=candidates.index(chosen),
            decisions=decisions, timestep_adjustment=adjustment,
            cost=self.cost_summary(before), **self.driver.provenance(),
            **({"propagation": fits[0] if fits else None} if self.config.propagation_candidate else {}),
        )

    def _judged_on(self) -> str:
        if self.judge.n_hold:
            return f"{self.judge.n_hold} held-out samples"
        k = len(self.folds)
        check = f", searched sets checked {k}-fold" if k else (
            ", a searched set's win checked on fresh noise" if self.judge.fresh is not None else "")
        if k and self.components.adjustable:
            check += f", timestep adjustment checked {k}-fold where it helps"
        return f"every sample (rectification leave-one-out{check})"


def _not_tried(option: str, current: str) -> dict[str, Any]:
    """The decision of a fitted set not tried: another set fitted to the same samples failed its fresh check
    (docs/method.md section 2.8; trying fitted sets until one passes would keep the luckiest)."""
    return {"decision": f"{option} over {current}", "kept": False,
            "fresh_check": "not run: a set fitted to these samples failed it"}

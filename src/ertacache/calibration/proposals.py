"""Calibration's candidates room: which cached-step sets compete for a target.

The sources (docs/method.md section 2.5): Algorithm 2's lambda sweep (``threshold``), the
evenly spaced set (``uniform``), the schedule search over the ground truth's error model
(``search``: each reading of the model, and the set that adds steps to a smaller budget's
choice), a searched set's per-step-reuse version, and the propagation-weighted set. A
set fitted to the samples carries its recipe (``refit``) so the judge can check it k-fold.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from torch import Tensor

from ..core.config import CalibrationConfig
from ..core.engine import StopPass
from ..core.reuse import REUSE_MODES, get_reuse
from .passes import ThresholdSearch
from .runner import PassRunner
from .schedule import (
    MAX_TRIPLE_STEPS,
    choose_step_reuse,
    extrapolation_costs,
    fit_propagation,
    propose,
    schedule_for,
    shortest_schedule,
)
from .sets import Candidate, Refit, SearchResult, select_candidates, sweep
from .truth import Truth

logger = logging.getLogger(__name__)
EXTRAPOLATION = "extrapolation, "
"""The prefix of a schedule-search rule read on the ``(T, T, T)`` extrapolation costs."""


class Proposer:
    """Makes the candidate sets of each target from the ground truth and the sets judged so far.

    Args:
        runner: runs Algorithm 2's threshold searches.
        config: the calibration options.
        truth: the ground truth (grid, norms, error model with and without each fold).
        n_fit: the fitting rows (the first ones), on which the threshold search runs.

    Attributes:
        searched: Algorithm 2's results so far, one per lambda.
        judged_sets: every plain set judged so far (no per-step reuse): its calibration error.
        judged_keys: and its evaluation's key.
        propagation: each propagation fit (:meth:`propagation_candidate`).
    """

    def __init__(self, runner: PassRunner, config: CalibrationConfig, truth: Truth, n_fit: int) -> None:
        self.runner, self.config, self.truth = runner, config, truth
        self.T, self.fit = len(truth.grid) - 1, slice(0, n_fit)
        self.searched: list[SearchResult] = []
        self.judged_sets: dict[tuple[int, ...], float] = {}
        self.judged_keys: dict[tuple[int, ...], str] = {}
        self.propagation: list[dict[str, Any]] = []
        self._triples: dict[int | None, dict[str, Tensor]] = {}

    # ----- Algorithm 2 --------------------------------------------------------------
    def search(self, threshold: float, max_nfe: int | None = None) -> SearchResult:
        """Algorithm 2's search for one lambda on the fitting rows; with ``max_nfe`` it stops once over it."""
        key = f"policy search lambda={threshold!r}"
        hit = self.runner.kept(key)
        result: dict[str, Any]
        if hit is not None and not hit[0]["complete"] and (
                max_nfe is None or self.T - len(hit[0]["cached_steps"]) <= max_nfe):
            hit = None  # stopped over a smaller budget than this one
        if hit is None:
            logger.info("policy search at lambda=%g", threshold)
            p = ThresholdSearch(threshold, self.truth.norms, self.config.l1_denominator,
                                max_nfe if self.config.sweep_early_stop else None)
            try:
                self.runner.run("policy search", p, self.fit, self.truth.grid)
            except StopPass:
                pass
            result = {"cached_steps": list(p.cached_steps), "l1_rel": [p.l1_rel.get(i, 0.0) for i in range(self.T)],
                      "complete": p.complete}
            self.runner.done(key, result)
        else:
            result = hit[0]
        return SearchResult(threshold, tuple(result["cached_steps"]), tuple(result["l1_rel"]), result["complete"])

    # ----- the candidates of a target ------------------------------------------------
    def candidates(self, threshold: float | None, max_nfe: int, winners: Sequence[Candidate]) -> list[Candidate]:
        """The sets that compete for ``max_nfe`` (or the threshold's set), in priority order; ``winners``: the
        sets smaller budgets chose (the largest that fits competes, and the search adds steps to it)."""
        if threshold is not None:
            return [Candidate("threshold", threshold, self.search(threshold).cached_steps)]
        if max_nfe >= self.T:
            return [Candidate("all_compute", None, ())]
        config, switch = self.config, self.truth.switch_steps
        if "threshold" in config.candidates:
            logger.info("policy search over %d thresholds (target NFE <= %d)", len(config.thresholds), max_nfe)
            enough = config.max_candidates if config.sweep_early_stop else None
            self.searched = sweep(lambda lam: self.search(lam, max_nfe), self.T, config.thresholds,
                                  max_nfe=max_nfe, known=self.searched, enough=enough)
        out = select_candidates(self.searched if "threshold" in config.candidates else [], self.T, max_nfe,
                                config, switch)
        smaller = [w for w in winners if self.T - len(w.cached_steps) <= max_nfe]
        previous = max(smaller, key=lambda w: self.T - len(w.cached_steps)) if smaller else None
        extra: list[Candidate] = []
        if previous is not None:  # a smaller budget's choice fits this one (already judged: free)
            extra.append(Candidate(previous.source, previous.threshold, previous.cached_steps,
                                   rule=f"the NFE-{self.T - len(previous.cached_steps)} target's set",
                                   step_reuse=dict(previous.step_reuse), inherited=previous.variant))
        if "search" in config.candidates:
            extra += self._searched(max_nfe, previous)
        known = {c.identity for c in out}
        for cand in extra:
            if cand.identity not in known:
                known.add(cand.identity)
                out.append(cand)
        if not out:  # the search found no set beside the forced steps: the evenly spaced one competes alone
            out = select_candidates([], self.T, max_nfe, replace(config, candidates=("uniform",)), switch)
        return out

    def _searched(self, max_nfe: int, previous: Candidate | None) -> list[Candidate]:
        """The schedule search's sets in priority order: its first set, the set adding steps to ``previous`` (a
        smaller budget's choice), its other sets."""
        limit, switch = self.config.search_candidates, self.truth.switch_steps
        proposed = [(f"{EXTRAPOLATION}{rule}", cached) for rule, cached in
                    propose(self.extrapolation_costs(), max_nfe, switch, limit)]
        proposed += propose(self.truth.search_costs, max_nfe, switch, limit)
        nested: list[Candidate] = []
        if previous is not None and self.T - len(previous.cached_steps) < max_nfe:
            computed = [i for i in range(self.T) if i not in previous.cached_steps]
            forced = sorted({*switch, *computed})
            triple = self.extrapolation_costs()
            for rule, cached in propose(triple or self.truth.search_costs, max_nfe, forced, 1):
                rule = f"{EXTRAPOLATION}{rule}" if triple else rule
                nested.append(Candidate("search", None, cached,
                                        rule=f"{rule}, adding steps to the NFE-{len(computed)} set",
                                        refit=self.refit_rule(rule, max_nfe, forced)))
        ordered = [Candidate("search", None, cached, rule=rule, refit=self.refit_rule(rule, max_nfe, switch))
                   for rule, cached in proposed[:limit]]
        return ordered[:1] + nested + ordered[1:]

    # ----- the error model -----------------------------------------------------------
    def costs(self, fold: int | None) -> dict[str, Tensor]:
        """The search's ``(T, T)`` segment costs and Gram matrix: of every sample (``fold`` None), or without
        fold k's samples."""
        return self.truth.search_costs if fold is None else self.truth.fold_costs[fold]

    def extrapolation_costs(self, fold: int | None = None) -> dict[str, Tensor]:
        """The schedule search's segment costs ``(T, T, T)`` for ``extrapolate`` reuse (empty for other modes,
        without the ground truth's Gram matrix, or above :data:`~.schedule.MAX_TRIPLE_STEPS` steps); ``fold``:
        from the ground truth without that fold's samples."""
        gram = self.costs(fold).get("gram")
        if not get_reuse(self.config.reuse).needs_history or gram is None or self.T > MAX_TRIPLE_STEPS:
            return {}
        if fold not in self._triples:
            kinds = ("raw", "rectified") if self.config.rectification != "off" else ("raw",)
            self._triples[fold] = {k: extrapolation_costs(gram, self.truth.grid, k == "rectified", self.config.reuse)
                                   for k in kinds}
        return self._triples[fold]

    def schedule(self, rule: str, max_nfe: int, forced: Sequence[int], fold: int | None) -> tuple[int, ...] | None:
        """The set one reading of the error model gives (``rule``: a :data:`~.schedule.RULES` entry, prefixed
        ``extrapolation, `` for the ``(T, T, T)`` costs)."""
        if rule.startswith(EXTRAPOLATION):
            return schedule_for(self.extrapolation_costs(fold), rule[len(EXTRAPOLATION):], max_nfe, forced)
        return schedule_for(self.costs(fold), rule, max_nfe, forced)

    def refit_rule(self, rule: str, max_nfe: int, forced: Sequence[int]) -> Refit:
        """A searched set's recipe, for the k-fold check: the same reading of the error model without fold k."""
        def refit(fold: int) -> tuple[tuple[int, ...], dict[int, str]] | None:
            cached = self.schedule(rule, max_nfe, forced, fold)
            return None if cached is None else (cached, {})
        return refit

    def record_judged(self, cand: Candidate, error: float, key: str) -> None:
        """Remember a judged plain set (the propagation fit reads them)."""
        if not cand.step_reuse:
            self.judged_sets[cand.cached_steps] = error
            self.judged_keys[cand.cached_steps] = key

    # ----- derived candidates -----------------------------------------------------------
    def per_step_candidate(self, base: Candidate) -> Candidate | None:
        """``base``'s set with each cached step's reuse mode chosen by the error model
        (:func:`~.schedule.choose_step_reuse`), as a candidate of its own; None when the ground truth logged no
        error model (``search`` not among the sources), the reuse mode has no alternative, or every step keeps the
        policy's mode."""
        config = self.config
        gram = self.truth.search_costs.get("gram")
        own = get_reuse(config.reuse)  # the modes one cache can serve beside it: those that keep the same thing
        modes = [config.reuse] + [n for n, m in REUSE_MODES.items() if n != config.reuse and m.keeps == own.keeps]
        if gram is None or own.keeps != "v" or len(modes) < 2 or not base.cached_steps or base.step_reuse:
            return None

        def per_step(cached: tuple[int, ...], fold: int | None) -> dict[int, str]:
            chosen = choose_step_reuse(self.costs(fold)["gram"], self.truth.grid, cached, modes,
                                       config.rectification != "off")
            return {j: m for j, m in chosen.items() if m != config.reuse}

        step_reuse = per_step(base.cached_steps, None)
        if not step_reuse:
            return None
        refit: Refit | None = None
        if base.refit is not None:  # the base set's recipe, then the per-step choice on what it gives
            base_refit = base.refit

            def refit_fold(fold: int) -> tuple[tuple[int, ...], dict[int, str]] | None:
                got = base_refit(fold)
                return None if got is None else (got[0], per_step(got[0], fold))

            refit = refit_fold
        return Candidate(base.source, base.threshold, base.cached_steps, rule=f"{base.rule}, per-step reuse"
                         if base.rule else "per-step reuse", step_reuse=step_reuse, refit=refit)

    def propagation_candidate(self, max_nfe: int, error_without: Callable[[str, int], float]) -> Candidate | None:
        """The schedule search's set under segment costs weighted by a fitted propagation
        (:func:`~.schedule.fit_propagation`, on every plain set judged so far in the session); None without the
        error model or with fewer than 3 judged sets. Recorded in :attr:`propagation`. ``error_without(key,
        fold)``: an evaluation's error without a fold's samples (for the k-fold refit)."""
        triple = self.extrapolation_costs()
        cost = triple.get("raw") if triple else self.truth.search_costs.get("raw")
        if cost is None:
            return None
        switch = self.truth.switch_steps
        fit = fit_propagation(cost, self.truth.grid, list(self.judged_sets.items()))
        if fit is None:
            self.propagation.append({"max_nfe": max_nfe, "judged_sets": len(self.judged_sets), "beta": None})
            return None
        beta, weighted = fit
        cached = shortest_schedule(weighted, max_nfe, switch)
        self.propagation.append({"max_nfe": max_nfe, "judged_sets": len(self.judged_sets), "beta": beta,
                                 "cached_steps": None if cached is None else list(cached)})
        if cached is None:
            return None
        judged = dict(self.judged_keys)

        def refit(fold: int) -> tuple[tuple[int, ...], dict[int, str]] | None:
            triple_f = self.extrapolation_costs(fold)
            cost_f = triple_f.get("raw") if triple_f else self.costs(fold).get("raw")
            fit_f = None if cost_f is None else fit_propagation(
                cost_f, self.truth.grid, [(c, error_without(key, fold)) for c, key in judged.items()])
            got = None if fit_f is None else shortest_schedule(fit_f[1], max_nfe, switch)
            return None if got is None else (got, {})

        rule = f"{EXTRAPOLATION if triple else ''}propagation-weighted (beta={beta:g})"
        return Candidate("search", None, cached, rule=rule, refit=refit)

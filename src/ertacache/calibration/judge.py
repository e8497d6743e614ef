"""Calibration's judgement room: each policy's error on the calibration samples, paired margins, k-fold checks.

A policy is judged by running it over the judging samples (every sample, or the held-out
part) and measuring each sample's MSE at t = 0 against its uncached run; policies are
compared pairwise, sample by sample. A set fitted to the samples (the schedule search's)
is checked k-fold: each sample is scored by the set the same recipe makes without the
sample's fold (docs/method.md section 2.6).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..policy import Policy
from .checkpoint import digest
from .drive import Driver
from .evidence import DB, ErrorModelPrior, Margin, posterior
from .runner import PassRunner
from .sets import Candidate

if TYPE_CHECKING:
    from .fresh import FreshCheck

MSE_FLOOR = 1e-30
"""A sample's MSE below this counts as this (an exact match, e.g. a policy that caches nothing)."""
Option = tuple[Candidate, str]
"""A candidate set and one of its variants (``plain``, ``adjusted``, ``rectified``, ``full``)."""


def sample_log_mse(final: Tensor, reference: Tensor) -> Tensor:
    """Each sample's log MSE at t = 0 of ``final`` against ``reference`` (both ``(n, *latent_shape)``), float64 on
    the CPU, floored at :data:`MSE_FLOOR`."""
    return (final.to(reference) - reference).double().square().flatten(1).mean(1).clamp_min(MSE_FLOOR).log().cpu()


def option_label(option: Option, T: int) -> str:
    """A short name for decisions, e.g. ``search set (NFE 15), rectified``."""
    return option[0].label(T) + ("" if option[1] == "plain" else f", {option[1]}")


class NoRoom(Exception):
    """A k-fold check does not fit in ``max_passes``: the fitted set's win is not kept."""


def evaluation_key(policy: Policy) -> str:
    """What makes two policies sample alike (cached steps, grid, rectification, per-step reuse), as a key."""
    on = policy.rect_form != "off" and policy.rect_enabled is not None and bool(policy.rect_enabled.any())
    tensors = [policy.rect_a[b] for b in policy.rect_a] + [policy.rect_b[b] for b in policy.rect_b] if on else []
    return "evaluation (per sample) " + digest(
        list(policy.cached_steps), list(policy.sampling_grid), policy.rect_form if on else "off",
        policy.rect_enabled.int() if on else None, *tensors,  # type: ignore[union-attr]
        *([policy.step_reuse] if policy.step_reuse else []))


class Judge:
    """Errors and paired margins of policies on the judging samples, with the k-fold check of fitted sets.

    Args:
        runner: runs and charges the evaluations.
        driver: the calibration set's driver (its processes' rows and reductions).
        reference: x at t = 0 of the uncached run, this process' rows.
        n_hold: the held-out rows (the last ones; 0: every row judges).
        folds: the k-fold partition of the rows (empty: no k-fold check).
        base: the :class:`~ertacache.policy.Policy` fields every candidate shares.
        evidence: the error model's predictions, a prior for every margin (:mod:`.evidence`); None: the samples
            alone.

    Attributes:
        scores: per evaluation key, each judging sample's log MSE at t = 0 (this process' rows).
        errors: per evaluation key, the geometric mean over samples of the MSE.
    """

    def __init__(self, runner: PassRunner, driver: Driver, reference: Tensor, n_hold: int,
                 folds: list[slice], base: dict[str, Any], evidence: ErrorModelPrior | None = None) -> None:
        self.runner, self.driver, self.reference = runner, driver, reference
        self.T, n = driver.num_inference_steps, driver.size
        self.all, self.n_hold, self.folds, self.base = slice(0, n), n_hold, folds, base
        self.evidence = evidence
        self.fresh: FreshCheck | None = None  # the fresh-noise check of fitted sets where no fold can be left out
        self.fresh_off: str | None = None  # why there is none where one was asked for
        self.hold = slice(n - n_hold, n) if n_hold else self.all
        self.scores: dict[str, Tensor] = {}
        self.errors: dict[str, float] = {}
        # per candidate (kept alive with its entry, so that its id is never another's): the folds whose refitted set
        # differs, and its k-fold shift of each sample's log MSE
        self._refits: dict[int, tuple[Candidate, list[tuple[int, Policy]]]] = {}
        self._shifts: dict[int, tuple[Candidate, Tensor]] = {}
        self._fold_scores: dict[str, Tensor] = {}  # k-fold evaluations: log MSE of a fold's rows

    def plain(self, cand: Candidate) -> Policy:
        """The candidate's set alone: no adjustment, no rectification."""
        return Policy(cached_steps=cand.cached_steps, step_reuse=cand.step_reuse, **self.base)

    def policy_of(self, option: Option, variants: dict[int, dict[str, Policy]]) -> Policy:
        """An option's policy: its variant from ``variants`` (per candidate id), or the plain set."""
        cand, name = option
        return variants[id(cand)][name] if name != "plain" else self.plain(cand)

    # ----- scores ------------------------------------------------------------------
    def positions(self, rows: slice) -> list[int]:
        """Where this process' part of ``rows`` sits among its rows of the whole set (the order of :attr:`scores`)."""
        where = {i: k for k, i in enumerate(self.driver.local(self.all))}
        return [where[i] for i in self.driver.local(rows)]

    def log_mse(self, final: Tensor, rows: slice) -> Tensor:
        """Each sample's log MSE at t = 0 against its uncached run (this process' part of ``rows``, float64)."""
        return sample_log_mse(final, self.reference[self.positions(rows)])

    def geometric(self, log_mse: Tensor) -> float:
        """The geometric mean over processes of the MSEs whose logs are ``log_mse`` (this process' rows)."""
        total = self.driver.reduce(torch.stack([log_mse.sum(), torch.tensor(float(log_mse.numel()),
                                                                            dtype=torch.float64)]))
        return math.exp(float(total[0] / total[1]))

    def record(self, key: str, log_mse: Tensor) -> float:
        """Record an evaluation's per-sample scores under ``key``; returns its error."""
        self.scores[key] = log_mse
        self.errors[key] = self.geometric(log_mse)
        return self.errors[key]

    def evaluation_passes(self, policy: Policy) -> float:
        """What judging ``policy`` costs in whole-set passes: its NFE / T, on the judging part of the set."""
        share = self.n_hold / self.driver.size if self.n_hold else 1.0
        return (self.T - len(policy.cached_steps)) / self.T * share

    def error(self, policy: Policy, log_mse: Tensor | None = None) -> float:
        """The calibration error of ``policy``: the geometric mean over the judging samples of each one's MSE at t = 0.

        Each sample's MSE is against its uncached run. The geometric mean ranks policies as
        the mean PSNR over samples does (the figure the benchmark and the paper report); a
        pooled MSE lets one hard sample decide. Policies that sample alike share one
        evaluation. ``log_mse`` (each sample's, e.g. the rectification fit's leave-one-out
        run) is recorded instead of running the policy.
        """
        key = evaluation_key(policy)
        if self.evidence is not None:
            self.evidence.predict(key, policy)
        if key in self.errors:
            return self.errors[key]
        if log_mse is not None:
            return self.record(key, log_mse)
        self.runner.charge(key, self.evaluation_passes(policy))
        hit = self.runner.kept(key)
        if hit is not None:
            return self.record(key, hit[1]["log_mse"])
        final = self.runner.run("evaluation", policy.follower(self.driver.layout), self.hold, policy.sampling_grid)
        log_mse = self.log_mse(final, self.hold)
        self.runner.done(key, {}, {"log_mse": log_mse})
        return self.record(key, log_mse)

    def margin(self, old: Policy, new: Policy, old_shift: Tensor | None = None,
               new_shift: Tensor | None = None, with_fresh: bool = False) -> Margin:
        """The paired comparison of ``new`` against ``old`` over the judging samples (both evaluated), with the
        error model's prior where there is one (:func:`~.evidence.posterior`); a shift (:meth:`shift`) replaces each
        sample's score of a fitted set by its fold's refitted set's. ``with_fresh``: the fresh-noise samples
        (:mod:`.fresh`) count as samples too where both policies were scored there."""
        self.error(old), self.error(new)
        k_old, k_new = evaluation_key(old), evaluation_key(new)
        a, b = self.scores[k_old], self.scores[k_new]
        d = ((a if old_shift is None else a + old_shift) - (b if new_shift is None else b + new_shift)) * DB
        if with_fresh and self.fresh is not None and k_old in self.fresh.scores and k_new in self.fresh.scores:
            d = torch.cat([d, (self.fresh.scores[k_old] - self.fresh.scores[k_new]) * DB])
        prior = None if self.evidence is None else self.evidence.prior((k_old, old), (k_new, new))
        return posterior(d, self.driver.reduce, prior)

    def error_without(self, key: str, fold: int) -> float:
        """An evaluation's calibration error (geometric mean of MSE) over every sample but fold ``fold``'s."""
        scores = self.scores[key]
        keep = torch.ones(scores.numel(), dtype=torch.bool)
        keep[self.positions(self.folds[fold])] = False
        return self.geometric(scores[keep])

    # ----- the k-fold check of fitted sets --------------------------------------------
    def refitted(self, cand: Candidate) -> list[tuple[int, Policy]]:
        """``(fold, plain policy)`` of each fold whose refitted set differs from the candidate's own (none for a
        set not fitted to the samples, without folds, or where the recipe gives no set)."""
        if id(cand) not in self._refits:
            out: list[tuple[int, Policy]] = []
            if cand.refit is not None and self.folds:
                for f in range(len(self.folds)):
                    got = cand.refit(f)
                    if got is not None and (got[0], tuple(sorted(got[1].items()))) != cand.identity:
                        out.append((f, Policy(cached_steps=got[0], step_reuse=got[1], **self.base)))
            self._refits[id(cand)] = (cand, out)
        return self._refits[id(cand)][1]

    def _fold_key(self, policy: Policy, fold: int) -> str:
        rows = self.folds[fold]
        return f"{evaluation_key(policy)} rows {rows.start}:{rows.stop}"

    def check_cost(self, cand: Candidate) -> float:
        """Whole-set passes the candidate's k-fold check still costs: its refitted sets on their folds."""
        cost = 0.0
        for f, policy in self.refitted(cand):
            if evaluation_key(policy) not in self.scores and not self.runner.charged(self._fold_key(policy, f)):
                rows = self.folds[f]
                cost += self.evaluation_passes(policy) * (rows.stop - rows.start) / self.driver.size
        return cost

    def _fold_score(self, policy: Policy, fold: int) -> Tensor:
        """Each sample's log MSE at t = 0 of ``policy`` on fold ``fold`` (this process' rows): from its evaluation
        on every sample where there is one, else from an evaluation on the fold alone (kept, counted)."""
        rows = self.folds[fold]
        key = evaluation_key(policy)
        if key in self.scores:
            return self.scores[key][self.positions(rows)]
        fkey = self._fold_key(policy, fold)
        if fkey not in self._fold_scores:
            self.runner.charge(fkey, self.evaluation_passes(policy) * (rows.stop - rows.start) / self.driver.size)
            hit = self.runner.kept(fkey)
            if hit is not None:
                self._fold_scores[fkey] = hit[1]["log_mse"]
            else:
                final = self.runner.run("k-fold evaluation", policy.follower(self.driver.layout), rows,
                                        policy.sampling_grid)
                self._fold_scores[fkey] = self.log_mse(final, rows)
                self.runner.done(fkey, {}, {"log_mse": self._fold_scores[fkey]})
        return self._fold_scores[fkey]

    def shift(self, cand: Candidate, variants: dict[str, Policy]) -> Tensor | None:
        """The k-fold check of a set fitted to the samples: per sample (this process' rows), its refitted set's
        log MSE minus the set's own (0 where the fold refits the same set); None for a set not fitted.

        Each sample is then scored by the set that the recipe makes without the sample's fold: a
        ranking the set earns only on the samples it was fitted to does not survive. The same shift
        applies to the set's variants (its components are judged against the set itself). Records
        the corrected errors in ``cand.cross_validated`` and ``cand.errors``.

        Raises:
            NoRoom: the check's evaluations do not fit in ``max_passes``.
        """
        if cand.refit is None or not self.folds:
            return None
        if id(cand) not in self._shifts:
            if not self.runner.affords(self.check_cost(cand)):
                raise NoRoom
            own = self.scores[evaluation_key(self.plain(cand))]
            shift = torch.zeros_like(own)
            refitted = self.refitted(cand)
            for f, policy in refitted:
                rows = self.positions(self.folds[f])
                shift[rows] = self._fold_score(policy, f) - own[rows]
            self._shifts[id(cand)] = (cand, shift)
            in_sample = dict(cand.errors)
            for name in cand.errors:
                policy = variants.get(name, self.plain(cand))
                cand.errors[name] = self.geometric(self.scores[evaluation_key(policy)] + shift)
            cand.cross_validated = {"folds": len(self.folds), "refit_differs": len(refitted),
                                    "in_sample_errors": in_sample}
        return self._shifts[id(cand)][1]

    def known_shift(self, cand: Candidate) -> Tensor | None:
        """The candidate's k-fold shift where its check was made (:meth:`shift`), else None (nothing is run)."""
        entry = self._shifts.get(id(cand))
        return None if entry is None or entry[0] is not cand else entry[1]

    def compare(self, old: Option, new: Option, variants: dict[int, dict[str, Policy]]
                ) -> tuple[Margin, dict[str, Any]]:
        """The paired comparison of two options (candidate, variant); a win of a set fitted to the samples is
        checked k-fold (:meth:`shift`), or, where no fold can be left out, on fresh noise (:meth:`fresh_check`).
        Returns the margin and what the decision records beside it (``"kept": False`` where a check failed)."""
        m = self.margin(self.policy_of(old, variants), self.policy_of(new, variants))
        fitted = [c for c in (old[0], new[0]) if c.refit is not None]
        if not m.significant or not fitted or old[0] is new[0]:
            return m, {}
        if not self.folds:
            return m, self.fresh_check(old, new, variants) if new[0].refit is not None else {}
        try:
            shifts = [self.shift(c, variants.get(id(c), {})) for c in (old[0], new[0])]
        except NoRoom:
            return m, {"kept": False, "k_fold": f"not run: over max_passes={self.runner.max_passes}"}
        checked = self.margin(self.policy_of(old, variants), self.policy_of(new, variants), shifts[0], shifts[1])
        record = {"in_sample_gain_db": round(m.gain_db, 3), "k_fold": {
            "folds": len(self.folds), "refit_differs": sum(len(self.refitted(c)) for c in fitted)}}
        if checked.significant and new[0].refit is not None and self.fresh is not None:  # folds of one sample
            record.update(self.fresh_check(old, new, variants))
        return checked, record

    def fresh_check(self, old: Option, new: Option, variants: dict[int, dict[str, Policy]]) -> dict[str, Any]:
        """A fitted set's win judged on the samples it was fitted to, checked on fresh noise (:mod:`.fresh`): kept
        only where ``new`` also beats ``old`` there. Nothing is checked where the session made no check (samples held
        out, the config turned it off); where the driver cannot draw other noise, the reason is recorded and the
        in-sample judgement stands."""
        if self.fresh is None:
            return {} if self.fresh_off is None else {"fresh_check": f"not run: {self.fresh_off}"}
        a, b = self.policy_of(old, variants), self.policy_of(new, variants)
        got = self.fresh.gain((evaluation_key(a), a), (evaluation_key(b), b))
        return {"fresh_check": got, "kept": self.fresh.holds(got)}

    def known_fresh_gain(self, old: Policy, new: Policy) -> dict[str, Any] | None:
        """``new``'s gain over ``old`` on fresh noise where both were scored there already, else None (nothing
        is run)."""
        if self.fresh is None:
            return None
        keys = evaluation_key(old), evaluation_key(new)
        if not all(k in self.fresh.scores for k in keys):
            return None
        return self.fresh.gain((keys[0], old), (keys[1], new))

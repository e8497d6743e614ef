"""Calibration's components room: a cached set's timestep adjustment (Eq. 13-14) and rectification (Eq. 15-21).

For one candidate set, :meth:`Components.variants` builds the paper's ablation ladder
(``plain``, ``adjusted``, ``rectified``, ``full``), fitting each component on the
calibration samples and recording each variant's honest evaluation with the judge:
rectification leave-one-out (its fitting run), an adjusted grid k-fold where it helps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from ..core.config import CalibrationConfig
from ..policy import Policy
from .checkpoint import digest
from .drive import Driver
from .judge import Judge, evaluation_key
from .passes import AdjustTimesteps, FitRectification
from .plan import variant_passes
from .runner import PassRunner
from .sets import Candidate
from .truth import Truth

Fit = tuple[dict[str, Tensor], dict[str, Tensor], Tensor, Tensor | None]
"""A rectification fit: ``(rect_a, rect_b, enabled, log_mse)`` (:meth:`Components.rectify`)."""


def adjust_key(cached_steps: tuple[int, ...], step_reuse: dict[int, str] | None) -> str:
    return f"timestep adjustment S={list(cached_steps)}" + (f" reuse={step_reuse}" if step_reuse else "")


def rect_key(cached_steps: tuple[int, ...], grid: Sequence[float], step_reuse: dict[int, str] | None) -> str:
    return f"rectification fit S={list(cached_steps)} grid={digest(list(grid))}" + (
        f" reuse={step_reuse}" if step_reuse else "")


class Components:
    """Fits and judges the components of candidate sets.

    Args:
        runner: runs, keeps and charges the fitting passes.
        judge: records the variants' evaluations.
        driver: the calibration set's driver.
        config: the calibration options.
        truth: the ground truth (grid, velocity changes).
        n_fit: the fitting rows (the first ones).
    """

    def __init__(self, runner: PassRunner, judge: Judge, driver: Driver, config: CalibrationConfig, truth: Truth,
                 n_fit: int) -> None:
        self.runner, self.judge, self.driver, self.config, self.truth = runner, judge, driver, config, truth
        self.T, self.fit = driver.num_inference_steps, slice(0, n_fit)
        self._adjusted: dict[str, list[float]] = {}
        self._adjusted_k_fold: dict[str, Tensor] = {}
        self._rect: dict[str, Fit] = {}

    @property
    def adjustable(self) -> bool:
        """Timestep adjustment is asked for and the driver can honour it."""
        return self.config.timestep_adjustment and self.driver.adjustment_off is None

    def adjust(self, cached_steps: tuple[int, ...], step_reuse: dict[int, str] | None = None) -> list[float]:
        """Eq. 13-14's adjusted grid of a cached set (with per-step reuse modes), on the fitting rows."""
        key = adjust_key(cached_steps, step_reuse)
        self.runner.charge(key, 1.0)
        if key in self._adjusted:
            return list(self._adjusted[key])
        hit = self.runner.kept(key)
        if hit is not None:
            self._adjusted[key] = list(hit[0]["grid"])
            return list(hit[0]["grid"])
        p = AdjustTimesteps(cached_steps, self.config.phi_denominator, self.truth.changes, step_reuse)
        self.runner.run("timestep adjustment", p, self.fit, self.truth.grid)
        self.runner.done(key, {"grid": p.grid, "phis": {str(k): v for k, v in p.phis.items()}})
        self._adjusted[key] = list(p.grid)
        return p.grid

    def adjust_k_fold(self, cached_steps: tuple[int, ...], step_reuse: dict[int, str] | None = None) -> Tensor:
        """Each sample's log MSE at t = 0 on the adjusted grid fitted without its fold (this process' rows, the order
        of :attr:`Judge.scores`): Eq. 13-14 judged on samples it was not fitted to.

        One pass per fold over every sample: the other folds' rows estimate the grid that
        all rows follow (:class:`~.passes.AdjustTimesteps` ``exclude``), the fold's rows are
        judged at t = 0. Needs folds (every sample judging, two or more folds).
        """
        base = adjust_key(cached_steps, step_reuse)
        if base in self._adjusted_k_fold:
            return self._adjusted_k_fold[base]
        judge = self.judge
        out = torch.zeros(len(self.driver.local(judge.all)), dtype=torch.float64)
        for rows in judge.folds:
            key = f"{base} without rows {rows.start}:{rows.stop}"
            self.runner.charge(key, 1.0)
            at = judge.positions(rows)
            hit = self.runner.kept(key)
            if hit is not None:
                out[at] = hit[1]["log_mse"]
                continue
            p = AdjustTimesteps(cached_steps, self.config.phi_denominator, self.truth.changes, step_reuse,
                                exclude=range(rows.start, rows.stop))
            final = self.runner.run("timestep adjustment, k-fold", p, judge.all, self.truth.grid)
            out[at] = judge.log_mse(final, judge.all)[at]
            self.runner.done(key, {"grid": p.grid}, {"log_mse": out[at].clone()})
        self._adjusted_k_fold[base] = out
        return out

    def rectify(self, cached_steps: tuple[int, ...], grid: Sequence[float], branches: Sequence[str],
                step_reuse: dict[int, str] | None = None) -> Fit:
        """Eq. 15-21's fit along a cached set's trajectory on ``grid``: ``(rect_a, rect_b, enabled, log_mse)``.

        ``log_mse``: with every sample judging (``holdout_fraction=0``), each sample's log MSE at t = 0 of
        its leave-one-out rectified trajectory (this process' rows), the fit's own honest evaluation; else None.
        """
        key = rect_key(cached_steps, grid, step_reuse)
        self.runner.charge(key, 1.0)
        if key in self._rect:
            a_, b_, enabled_, log_mse_ = self._rect[key]
            return {b: a_[b] for b in branches}, {b: b_[b] for b in branches}, enabled_, log_mse_
        hit = self.runner.kept(key)
        if hit is not None:
            t = hit[1]
            self._rect[key] = ({b: t[f"a.{b}"] for b in branches}, {b: t[f"b.{b}"] for b in branches},
                               t["enabled"].bool(), t.get("log_mse"))
            return self._rect[key]
        c, n_hold = self.config, self.judge.n_hold
        p = FitRectification(cached_steps, c.rectification, c.granularity, has_holdout=n_hold > 0,
                             layout=self.driver.layout, step_reuse=step_reuse)
        final = self.runner.run("rectification fit", p, self.judge.all, grid)
        a, b, enabled = p.tensors(branches, self.T)
        log_mse = None if n_hold else self.judge.log_mse(final, self.judge.all)
        self.runner.done(key, {}, {**{f"a.{k}": v for k, v in a.items()}, **{f"b.{k}": v for k, v in b.items()},
                                   "enabled": enabled.to(torch.uint8),
                                   **({"log_mse": log_mse} if log_mse is not None else {})})
        self._rect[key] = (a, b, enabled, log_mse)
        return a, b, enabled, log_mse

    def cost(self, cand: Candidate) -> float:
        """Passes the set's components still cost (a rectification fit an earlier target ran is free)."""
        cost = variant_passes(self.config, (self.T - len(cand.cached_steps)) / self.T)
        if self.config.rectification != "off" and self.runner.charged(
                rect_key(cand.cached_steps, self.truth.grid, cand.step_reuse)):
            cost -= 1.0
        return max(cost, 0.0)

    def variants(self, cand: Candidate) -> dict[str, Policy]:
        """The candidate's policies, from fewest components to all that the config asks for.

        A rectified variant fitted leave-one-out is evaluated by its fitting run (no further pass). With
        folds, an adjusted grid that helps on the samples it was fitted to (the adjusted variant beats
        the plain set, or the full variant the rectified one) is judged k-fold (:meth:`adjust_k_fold`): the
        adjusted variant by its k-fold scores, the full variant (rectification leave-one-out on the grid fitted
        to every sample) by its leave-one-out run plus, per sample, the grid's k-fold minus in-sample log MSE.
        A grid that does not help in-sample, where the judgement is optimistic, is not checked further."""
        plain = self.judge.plain(cand)
        out = {"plain": plain}
        if not cand.cached_steps:
            return out
        adjusted = self.adjust(cand.cached_steps, cand.step_reuse) if self.adjustable else None
        if adjusted is not None:
            out["adjusted"] = replace(plain, adjusted_grid=tuple(adjusted))
        full = self._rectified(cand, out, adjusted)
        if adjusted is not None and self.judge.folds and tuple(adjusted) != tuple(self.truth.grid):
            full = self._check_adjustment(cand, out, full)
        if full is not None:
            self.judge.error(out["full"], full)
        return out

    def _rectified(self, cand: Candidate, out: dict[str, Policy], adjusted: list[float] | None) -> Tensor | None:
        """Add the rectified variants to ``out``; returns the full variant's leave-one-out log MSE (None where it
        has none), the others' recorded with the judge."""
        config, plain = self.config, out["plain"]
        if config.rectification == "off":
            return None
        full: Tensor | None = None
        grids: list[tuple[str, list[float]]] = [("rectified", self.truth.grid)]
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
                    self.judge.error(out[name], log_mse)  # the leave-one-out run is the variant's evaluation
        return full

    def _check_adjustment(self, cand: Candidate, out: dict[str, Policy], full: Tensor | None) -> Tensor | None:
        """Judge an adjusted grid k-fold where it helps in-sample; returns the full variant's scores, shifted by
        the grid's k-fold minus in-sample log MSE."""
        judge, plain = self.judge, out["plain"]
        key = evaluation_key(out["adjusted"])
        helps = judge.error(out["adjusted"]) < judge.error(plain) or (
            full is not None and judge.geometric(full) < judge.error(out.get("rectified", plain)))
        if helps:  # judged on samples the grid was not fitted to
            k_fold = self.adjust_k_fold(cand.cached_steps, cand.step_reuse)
            if full is not None:  # the rectified grid's judgement carries the same optimism
                full = full + (k_fold - judge.scores[key])
            judge.record(key, k_fold)
        return full

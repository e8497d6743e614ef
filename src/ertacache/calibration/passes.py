"""The calibration passes, each a per-step observer (:class:`~ertacache.core.engine.Pass`), written once.

Every decision is a function of sums over the step's units (guidance branches,
transformers) and fitting rows, so it is the calibration batch's decision
(Algorithm 2, line 3), and the sums can be added over micro-batches and processes.

- :class:`GroundTruth`: Algorithm 2 lines 4-7, ``||r_gt_i||_1`` per step.
- :class:`ThresholdSearch`: Algorithm 2 lines 8-22 for one lambda (Eq. 12).
- :class:`AdjustTimesteps`: Eq. 13-14 along the cached trajectory (docs/method.md section 3).
- :class:`FitRectification`: Eq. 15-21 with the held-out check (docs/method.md section 4).
- Evaluating a candidate is inference: :class:`~ertacache.core.engine.FollowPolicy`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..core import rectify
from ..core.config import Granularity, L1Denominator, PhiDenominator, Rectification
from ..core.engine import Pass, StopPass, UnitCall, l1, ratio
from ..core.grids import shrink_step
from ..core.rectify import CHANNELS_FIRST, ChannelLayout, RectStats
from ..errors import ErtaCacheError
from .sketch import ErrorSketch


class GroundTruth(Pass):
    """The uncached run; logs ``||r_gt_i||_1`` per step over the fitting rows and every unit, and the times.

    Attributes:
        r_norms: length T after the run.
        times: ``t_i`` of each step as the driver reported it (a pipeline's own grid).
    """

    name = "ground truth"

    def __init__(self, sketch: ErrorSketch | None = None) -> None:
        super().__init__()
        self.r_norms: dict[int, float] = {}
        self.dv_norms: dict[int, float] = {}
        self.times: dict[int, float] = {}
        self.first_step: dict[object, int] = {}
        self.sketch = sketch

    def decide(self, step: int, calls: list[UnitCall], grid: list[float]) -> list[float] | None:
        # added up: a pipeline records micro-batches one after another
        self.r_norms[step] = self.r_norms.get(step, 0.0) + self.sum([l1(c.r[c.fit]) for c in calls if c.r is not None])
        self.dv_norms[step] = self.dv_norms.get(step, 0.0) + self.sum(
            [l1((c.v - c.v_prev)[c.fit]) for c in calls if c.v is not None and c.v_prev is not None])
        if self.sketch is not None:
            self.sketch.observe(step, calls)
        self.times[step] = calls[0].t
        for c in calls:
            self.first_step.setdefault(c.unit, step)
        return super().decide(step, calls, grid)

    def norms(self) -> tuple[float, ...]:
        return tuple(self.r_norms[i] for i in sorted(self.r_norms))

    def velocity_changes(self) -> tuple[float, ...]:
        """``||v_j - v_{j-1}||_1`` along the uncached trajectory (0 at step 0), over fitting rows and units."""
        return tuple(self.dv_norms[i] for i in sorted(self.dv_norms))

    def switch_steps(self) -> list[int]:
        """Steps after step 0 where a unit is first called (Wan 2.2's second transformer): its cache is empty
        there, so the step is always computed and cannot be in a cached set."""
        return sorted({s for s in self.first_step.values() if s > 0})

    def grid(self) -> list[float]:
        """The ``T + 1`` times: the reported ones, then t = 0."""
        return [self.times[i] for i in sorted(self.times)] + [0.0]


class ThresholdSearch(Pass):
    """Algorithm 2's policy search for one lambda.

    The model runs at every step and the trajectory advances as the cached sampler
    would. ``l1_rel_i = ||r~ - r_i||_1 / ||r_gt_i||_1`` (Eq. 12; v2 divides by
    ``||r_i||_1``), ``r`` being what the reuse mode keeps, summed over units and
    fitting rows. Below lambda the step is cached (``v~`` used, the stale ``r~``
    kept); otherwise the cache is refreshed. The first and last steps are computed.
    With ``max_nfe``, the pass stops (:class:`~ertacache.core.engine.StopPass`) as soon
    as more steps than that are sure to be computed: the set is over the budget.

    Attributes:
        cached_steps: the set S, after the run (the steps up to the stop when stopped).
        l1_rel: each step's ratio (0 where not eligible).
        complete: False when the pass stopped over the budget.
    """

    name = "policy search"

    def __init__(self, threshold: float, gt_norms: Sequence[float], denominator: L1Denominator = "gt",
                 max_nfe: int | None = None) -> None:
        super().__init__()
        self.threshold, self.gt_norms, self.denominator = threshold, list(gt_norms), denominator
        self.T = len(self.gt_norms)
        self.max_nfe = max_nfe
        self.cached_steps: list[int] = []
        self.l1_rel: dict[int, float] = {}
        self.complete = True

    def needs_cached(self, step: int) -> bool:
        return 0 < step < self.T - 1

    def decide(self, step: int, calls: list[UnitCall], grid: list[float]) -> list[float] | None:
        eligible = 0 < step < self.T - 1 and all(c.kept is not None and c.v_cached is not None for c in calls)
        rel = 0.0
        if eligible:
            num = self.sum([l1((c.kept - c.r)[c.fit]) for c in calls if c.kept is not None and c.r is not None])
            den = self.gt_norms[step] if self.denominator == "gt" else self.sum(
                [l1(c.r[c.fit]) for c in calls if c.r is not None])
            rel = ratio(num, den)
        cache = eligible and rel < self.threshold
        self.l1_rel[step] = rel
        if cache:
            self.cached_steps.append(step)
        for c in calls:
            c.out = c.v_cached if cache else c.v
            c.refresh = not cache
        computed = step + 1 - len(self.cached_steps) + (1 if step < self.T - 1 else 0)  # the last step computes
        if self.max_nfe is not None and computed > self.max_nfe:
            self.complete = False  # over the budget whatever follows: not a candidate, only a bracket
            raise StopPass(f"lambda={self.threshold:g} computes more than {self.max_nfe} steps")
        return None


class AdjustTimesteps(Pass):
    """Eq. 13-14 along the cached trajectory of a fixed S (Algorithm 1, first loop).

    At a cached step j the true ``v_j`` runs beside ``v~_j``:
    ``phi_j = clip(1 - ||v~_j - v_j||_1 / ||v_j - v_{j-1}||_1, 0, 1)`` (v1; v2 divides
    by ``||v_j||_1``; ``gt_velocity_change`` by the change along the uncached trajectory,
    ``gt_changes[j]``, over every sample: scaled by the share of rows taking part; a zero
    denominator gives 1), norms summed over units and fitting rows, ``v_{j-1}`` the
    unit's true output at the step before. The step shrinks to ``phi_j dt_j``
    (:func:`~ertacache.core.grids.shrink_step`) before the trajectory takes it, so later
    estimates see earlier adjustments.

    Every row follows the one adjusted grid. With ``exclude`` (calibration sample indices)
    those samples' rows take no part in the estimate: their outputs at t = 0 are what the
    grid fitted without them gives (the k-fold evaluation of the adjustment).

    Attributes:
        phis: ``{step: phi}``; grid: the adjusted grid, after the run.

    Raises:
        ErtaCacheError: ``exclude`` is given and a call does not report its rows' samples.
    """

    name = "timestep adjustment"

    def __init__(self, cached_steps: Sequence[int], denominator: PhiDenominator = "velocity_change",
                 gt_changes: Sequence[float] = (), step_reuse: dict[int, str] | None = None,
                 exclude: Sequence[int] = ()) -> None:
        super().__init__(step_reuse)
        self.cached = set(cached_steps)
        self.exclude = torch.tensor(list(exclude), dtype=torch.long) if len(exclude) else None
        self.denominator = denominator
        self.gt_changes = list(gt_changes)
        if denominator == "gt_velocity_change" and not self.gt_changes:
            raise ErtaCacheError("phi_denominator='gt_velocity_change' needs the ground truth's velocity changes")
        self.phis: dict[int, float] = {}
        self.grid: list[float] = []

    def needs_cached(self, step: int) -> bool:
        return step in self.cached

    def provisional(self, call: UnitCall) -> Tensor:
        if call.step in self.cached and call.v_cached is not None and call.v_prev is not None:
            return call.v_cached
        return super().provisional(call)

    def _fit(self, call: UnitCall) -> Tensor:
        """The call's rows that take part in the estimate."""
        if self.exclude is None:
            return call.fit
        if call.samples is None:
            raise ErtaCacheError("a k-fold timestep adjustment needs each row's calibration sample; the driver "
                                 "reported none")
        return call.fit & ~torch.isin(call.samples.to(call.fit.device), self.exclude.to(call.fit.device))

    def decide(self, step: int, calls: list[UnitCall], grid: list[float]) -> list[float] | None:
        adjust = step in self.cached and all(c.v_cached is not None and c.v_prev is not None for c in calls)
        new = None
        if adjust:
            fits = [self._fit(c) for c in calls]
            num = self.sum([l1((c.v_cached - c.v)[f]) for c, f in zip(calls, fits) if c.v_cached is not None
                            and c.v is not None])
            den = self.gt_changes[step] if self.denominator == "gt_velocity_change" else self.sum(
                [l1((c.v - c.v_prev if self.denominator == "velocity_change" else c.v)[f])
                 for c, f in zip(calls, fits) if c.v is not None and c.v_prev is not None])
            if self.exclude is not None and self.denominator == "gt_velocity_change":  # over every sample: its share
                den *= ratio(self.sum([f.sum() for f in fits]), self.sum([c.fit.sum() for c in calls]))
            phi = 1.0 if den == 0 else min(1.0, max(0.0, 1.0 - ratio(num, den)))
            self.phis[step] = phi
            new = shrink_step(grid, step, phi)
        for c in calls:
            c.out = c.v_cached if adjust else c.v
            c.refresh = not adjust
        self.grid = list(new if new is not None else grid)
        return new


class FitRectification(Pass):
    """Eq. 15-21 along the cached trajectory of a fixed S and grid, judged as it is fitted.

    At each cached step the true ``v`` runs beside ``v~``. Per branch, the sufficient
    statistics of ``eps = v~ - v`` on the fitting rows of every unit are summed and
    solved (:meth:`RectStats.solve`): those are the policy's coefficients.

    How the fit is judged (``has_holdout``):

    - False (every row fits and judges): **leave-one-out**. Each row is rectified with
      the coefficients solved from every *other* row's statistics (the sums are additive,
      so this is exact and costs no model call), and advances with that output; a step's
      fit stays on when the rows' leave-one-out ``sum ||v^ - v||^2`` is below
      ``sum ||v~ - v||^2``. Each row's ``x`` at t = 0 is then an honest sample of the
      rectified sampler on a sample it was not fitted on (one sample alone: no fit).
    - True: the fit stays on when ``||v^ - v||^2`` on the held-out rows is below
      ``||v~ - v||^2``, and every row advances with the full fit.

    Attributes:
        coeffs: ``{branch: {step: (a, b, enabled)}}`` after the run; ``a``, ``b`` of shape ``(C,)``.
    """

    name = "rectification fit"

    def __init__(self, cached_steps: Sequence[int], form: Rectification, granularity: Granularity,
                 has_holdout: bool, layout: ChannelLayout = CHANNELS_FIRST,
                 step_reuse: dict[int, str] | None = None) -> None:
        super().__init__(step_reuse)
        self.cached = set(cached_steps)
        self.form, self.granularity, self.layout, self.has_holdout = form, granularity, layout, has_holdout
        self.coeffs: dict[str, dict[int, tuple[Tensor, Tensor, bool]]] = {}

    def needs_cached(self, step: int) -> bool:
        return step in self.cached

    def _row_stats(self, vt: Tensor, v: Tensor, fit: Tensor) -> list[RectStats | None]:
        """Each row's statistics (None for a row that does not fit)."""
        return [RectStats.of(vt[r:r + 1], (vt - v)[r:r + 1], self.granularity, self.layout) if bool(fit[r]) else None
                for r in range(vt.shape[0])]

    def decide(self, step: int, calls: list[UnitCall], grid: list[float]) -> list[float] | None:
        if not (step in self.cached and all(c.v_cached is not None and c.v is not None for c in calls)):
            return super().decide(step, calls, grid)
        for branch in dict.fromkeys(c.branch for c in calls):
            mine = [c for c in calls if c.branch == branch]
            pairs = [(c.v_cached, c.v) for c in mine if c.v_cached is not None and c.v is not None]
            rows = [self._row_stats(vt, v, c.fit) for c, (vt, v) in zip(mine, pairs)]
            local = [s.as_tensor() for per in rows for s in per if s is not None]
            if not local:  # no fitting row here: zero statistics of the right width (the layout's channel count)
                vt0 = pairs[0][0][:0]
                local = [RectStats.of(vt0, vt0, self.granularity, self.layout).as_tensor()]
            summed = torch.stack(local).sum(0)
            total = RectStats.from_tensor(self.reduce(summed))
            a, b = total.solve()
            if self.has_holdout:
                hats = [rectify.apply(vt, a, b, self.form, self.layout) for vt, _ in pairs]
                judged = [c.hold for c in mine]
            else:  # leave-one-out: row r is rectified with the fit of every other row
                hats = []
                for (vt, _), per in zip(pairs, rows):
                    out = []
                    for r, s in enumerate(per):
                        others = None if s is None else RectStats.from_tensor(total.as_tensor() - s.as_tensor())
                        ar, br = (a, b) if others is None else others.solve()
                        out.append(rectify.apply(vt[r:r + 1], ar, br, self.form, self.layout))
                    hats.append(torch.cat(out))
                judged = [c.fit for c in mine]
            err_hat = self.sum([(h - v)[m].double().square().sum() for h, (_, v), m in zip(hats, pairs, judged)])
            err_raw = self.sum([(vt - v)[m].double().square().sum() for (vt, v), m in zip(pairs, judged)])
            better = err_hat < err_raw
            self.coeffs.setdefault(branch, {})[step] = (a, b, better)
            for c, h, (vt, _) in zip(mine, hats, pairs):
                c.out = h if better else vt
                c.refresh = False
        return None

    def tensors(self, branches: Sequence[str], T: int) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        """``(rect_a, rect_b, enabled)`` of a policy: per branch ``(T, C)`` float32, zero where off; ``(nb, T)``."""
        C = max((a.numel() for per in self.coeffs.values() for a, _, _ in per.values()), default=1)
        rect_a = {b: torch.zeros(T, C) for b in branches}
        rect_b = {b: torch.zeros(T, C) for b in branches}
        enabled = torch.zeros(len(branches), T, dtype=torch.bool)
        for k, name in enumerate(branches):
            for step, (a, b, ok) in self.coeffs.get(name, {}).items():
                if ok:
                    rect_a[name][step], rect_b[name][step], enabled[k, step] = a, b, True
        return rect_a, rect_b, enabled

"""The per-step engine every driver shares: units, their caches, and one pass that decides.

A *driver* walks a sampling trajectory: the core Euler loop
(:func:`ertacache.core.euler.euler`), or a diffusers hook inside a pipeline's own
``__call__``. At each step it reports one :class:`UnitCall` per *unit* (a guidance
branch of one transformer: each unit has its own cache, docs/method.md section 1) to the
:class:`Engine`: the step, ``t``, the state ``x``, what the model computed (when it
ran) and what the cache rebuilds. When every unit of the step has reported, the
engine asks its :class:`Pass` to decide the step: what each unit's output is,
whether its cache is refreshed, and (timestep adjustment) a new grid. The pass sees
only sums over units and rows, so the decision is the batch's (Algorithm 2, line 3).

Passes are written once; inference (:class:`FollowPolicy`) and every calibration
pass (:mod:`ertacache.calibration.passes`) run under both drivers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import ErtaCacheError
from . import rectify
from .rectify import CHANNELS_FIRST, ChannelLayout, Rectification
from .reuse import History, Reuse, get_reuse

Reduce = Callable[[Tensor], Tensor]
"""Sums a statistics tensor over everything that shares a decision (identity in one process)."""


def l1(x: Tensor) -> Tensor:
    """``||x||_1`` summed over every entry, as a float64 scalar tensor (no host sync)."""
    return x.detach().double().abs().sum()


def ratio(num: float, den: float) -> float:
    """``num / den`` with ``0 / 0 = 0`` and ``x / 0 = inf``."""
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.inf


class StopPass(Exception):
    """Raised by a pass whose result is known before the trajectory ends (its driver stops walking)."""


@dataclass
class UnitCall:
    """What a driver reports for one unit at one step.

    Attributes:
        step: step index i (0-based; step 0 is at t = 1).
        t: the time of the step, in [0, 1] (t = 1 is noise).
        unit: the unit's key (branch, and transformer where a pipeline has several).
        branch: guidance branch name (``"cond"``, ``"uncond"``, or one for batched CFG).
        x: the sampler's state for this unit, the shape of ``v``.
        fit: ``(B,)`` bool, the rows that fit statistics (the rest are held out).
        v: the model's output ``(B, ...)`` when it ran this step, else None.
        r: what the reuse mode keeps from this run (None when the model did not run).
        kept: the unit's cache before this step (None when empty).
        v_cached: ``v~`` rebuilt from ``kept`` when the pass asked for it, else None.
        v_prev: the unit's true output at its latest computed step, or None.
        out: the output the sampler uses; set by the pass.
        refresh: whether ``r`` becomes the unit's cache after the step; set by the pass.
        samples: ``(B,)`` long, the calibration sample each row belongs to (its global index;
            repeated for batched CFG), or None where the driver does not say (inference).
    """

    step: int
    t: float
    unit: Hashable
    branch: str
    x: Tensor
    fit: Tensor
    v: Tensor | None = None
    r: Tensor | None = None
    kept: Tensor | None = None
    v_cached: Tensor | None = None
    v_prev: Tensor | None = None
    out: Tensor | None = None
    refresh: bool = True
    samples: Tensor | None = None

    @property
    def hold(self) -> Tensor:
        """``(B,)`` bool, the held-out rows."""
        return ~self.fit


@dataclass
class _UnitState:
    kept: Tensor | None = None
    v_prev: Tensor | None = None
    t_kept: float | None = None
    previous: Tensor | None = None  # kept at the computed step before (engines with history only)
    t_previous: float | None = None


class Pass:
    """A per-step observer: one pass over the calibration set, or inference.

    Subclasses override :meth:`needs_model`, :meth:`needs_cached`, :meth:`provisional`
    and :meth:`decide`. ``reduce`` sums statistics over processes (identity here).
    ``step_reuse`` (``{step: reuse mode name}``) rebuilds those steps with another mode
    than the driver's (one that keeps the same thing; :attr:`ertacache.Policy.step_reuse`).
    """

    name = "pass"

    def __init__(self, step_reuse: dict[int, str] | None = None) -> None:
        self.reduce: Reduce = lambda x: x
        self.step_reuse: dict[int, str] = dict(step_reuse or {})
        self.progress: Callable[[int], None] | None = None
        """Called after each model call with the model calls (rows) made since the last report (progress bars)."""

    def reset(self) -> None:
        """A new trajectory starts (a pipeline called again); passes with per-run records clear them."""

    def needs_model(self, step: int) -> bool:
        """Whether the model must run at ``step`` (a unit with an empty cache always runs)."""
        return True

    def needs_cached(self, step: int) -> bool:
        """Whether ``v~`` must be rebuilt at ``step`` (when the unit's cache is not empty)."""
        return False

    def provisional(self, call: UnitCall) -> Tensor:
        """The output known when the call is made (a driver may have to return it before the step is decided)."""
        if call.v is not None:
            return call.v
        if call.v_cached is None:
            raise ErtaCacheError(f"step {call.step}: the model did not run and the cache is empty")
        return call.v_cached

    def decide(self, step: int, calls: list[UnitCall], grid: list[float]) -> list[float] | None:
        """Set ``out`` and ``refresh`` of every call of ``step``; return a new grid, or None to keep it."""
        for c in calls:
            c.out = c.out if c.out is not None else self.provisional(c)
            c.refresh = c.v is not None
        return None

    def sum(self, values: Sequence[Tensor]) -> float:
        """The reduced sum of scalar statistics, as a Python float (the pass's one host sync per decision)."""
        total = torch.stack([v.double().reshape(()) for v in values]).sum() if values else torch.zeros((),
                                                                                                      dtype=torch.float64)
        return float(self.reduce(total))


class Engine:
    """Units' caches and one pass over one trajectory (or one pipeline call).

    Args:
        pass_: the pass that decides each step.
        grid: the ``T + 1`` times the trajectory follows (timestep adjustment may
            change the times after a step), or None while unknown (ground truth on
            a pipeline, which records them).
        history: also keep each unit's cache of the computed step before the latest
            (reuse modes with ``needs_history``; :meth:`history`). It is kept anyway
            when one of the pass's ``step_reuse`` modes needs it.
    """

    def __init__(self, pass_: Pass, grid: Sequence[float] | None, history: bool = False) -> None:
        self.pass_ = pass_
        self.keeps_history = history or any(get_reuse(m).needs_history for m in pass_.step_reuse.values())
        self.grid = None if grid is None else [float(t) for t in grid]
        self.units: dict[Hashable, _UnitState] = {}
        self.pending: dict[int, list[UnitCall]] = {}
        self.model_calls = 0  # rows the model ran on (per sample and branch), over the engine's life
        self._reported = 0

    def reset(self) -> None:
        """Forget every unit's cache (a new trajectory starts)."""
        self.units, self.pending = {}, {}
        self.pass_.reset()

    def state(self, unit: Hashable) -> _UnitState:
        return self.units.setdefault(unit, _UnitState())

    def history(self, unit: Hashable, t: float) -> History | None:
        """The unit's :class:`~ertacache.core.reuse.History` for rebuilding at time ``t`` (None: empty cache)."""
        st = self.state(unit)
        if st.kept is None or st.t_kept is None:
            return None
        return History(t, st.t_kept, st.previous, st.t_previous)

    def reuse(self, step: int, default: Reuse) -> Reuse:
        """The reuse mode that rebuilds ``v~`` at ``step``: the pass's ``step_reuse`` there, else ``default``."""
        name = self.pass_.step_reuse.get(step)
        return default if name is None else get_reuse(name)

    def needs_model(self, step: int, unit: Hashable) -> bool:
        """Whether ``unit`` must run the model at ``step``."""
        return self.pass_.needs_model(step) or self.state(unit).kept is None

    def wants_cached(self, step: int, unit: Hashable) -> bool:
        """Whether the driver should rebuild ``v~`` for ``unit`` at ``step``."""
        return self.state(unit).kept is not None and (self.pass_.needs_cached(step) or
                                                      not self.pass_.needs_model(step))

    def observe(self, call: UnitCall) -> Tensor:
        """Record a unit's call; return its provisional output (the final one unless the step's decision changes it)."""
        st = self.state(call.unit)
        call.kept, call.v_prev = st.kept, st.v_prev
        if call.v is not None:
            self.model_calls += int(call.v.shape[0])
            self._report()
        call.out = self.pass_.provisional(call)
        self.pending.setdefault(call.step, []).append(call)
        return call.out

    def pending_count(self, step: int) -> int:
        return len(self.pending.get(step, []))

    def end_step(self, step: int, write_back: bool = False) -> list[UnitCall]:
        """Let the pass decide ``step``; update the caches (and the grid).

        Args:
            write_back: copy a changed decision into the provisional tensor a driver
                already handed out (a pipeline holds it until it combines branches).

        Returns:
            The step's calls with ``out`` final.
        """
        calls = self.pending.pop(step, [])
        handed = [c.out for c in calls]
        grid = self.pass_.decide(step, calls, self.grid or [])
        for c, given in zip(calls, handed):
            if write_back and c.out is not given and given is not None and c.out is not None:
                if c.v is given or c.r is given:  # keep the true output intact for the cache and v_prev
                    true = given.clone()
                    c.v = true if c.v is given else c.v
                    c.r = true if c.r is given else c.r
                given.copy_(c.out)
                c.out = given
            st = self.state(c.unit)
            if c.refresh and c.r is not None:
                if self.keeps_history:
                    st.previous, st.t_previous = st.kept, st.t_kept
                st.kept, st.t_kept = c.r, c.t
            if c.v is not None:
                st.v_prev = c.v
        if grid is not None:
            self.grid = [float(t) for t in grid]
        return calls

    def _report(self) -> None:
        if self.pass_.progress is not None and self.model_calls > self._reported:
            done, self._reported = self.model_calls - self._reported, self.model_calls
            self.pass_.progress(done)


@dataclass
class RunStats:
    """What one run following a policy did: computed and cached steps per branch, and per unit."""

    computed: dict[str, list[int]] = field(default_factory=dict)
    cached: dict[str, list[int]] = field(default_factory=dict)
    units: dict[Hashable, dict[str, list[int]]] = field(default_factory=dict)

    def add(self, call: UnitCall, computed: bool) -> None:
        kind = "computed" if computed else "cached"
        (self.computed if computed else self.cached).setdefault(call.branch, []).append(call.step)
        self.units.setdefault(call.unit, {"computed": [], "cached": []})[kind].append(call.step)

    def nfe(self) -> dict[str, int]:
        return {b: len(s) for b, s in self.computed.items()}


class FollowPolicy(Pass):
    """Inference (Algorithm 1): compute where the policy computes, else rebuild ``v~`` and rectify it.

    Args:
        compute_mask: ``T`` bools, True where the model runs.
        rectification: ``(branch, step) -> (a, b)`` or None where off.
        form: the rectification form.
        layout: where the output's channels are (per-channel coefficients).
        step_reuse: ``{cached step: reuse mode}`` where it differs from the driver's.
    """

    name = "inference"

    def __init__(self, compute_mask: Sequence[bool],
                 rectification: Callable[[str, int], tuple[Tensor, Tensor] | None] | None = None,
                 form: Rectification = "off", layout: ChannelLayout = CHANNELS_FIRST,
                 step_reuse: dict[int, str] | None = None) -> None:
        super().__init__(step_reuse)
        self.mask = list(compute_mask)
        self.rectification, self.form, self.layout = rectification, form, layout
        self.stats = RunStats()

    def reset(self) -> None:
        self.stats = RunStats()

    def needs_model(self, step: int) -> bool:
        return self.mask[step]

    def provisional(self, call: UnitCall) -> Tensor:
        self.stats.add(call, call.v is not None)
        if call.v is not None:
            return call.v
        v = super().provisional(call)
        coeffs = None if self.rectification is None else self.rectification(call.branch, call.step)
        if coeffs is not None:
            return rectify.apply(v, coeffs[0], coeffs[1], self.form, self.layout)
        return v

"""Reuse modes (docs/method.md section 1, Eq. 5-6): what the cache keeps, and how a cached step rebuilds ``v~``.

Each mode is one small object in a registry. A driver (the core Euler loop or a
diffusers hook) computes the model at a computed step and asks the mode what to
keep; at a cached step it asks the mode to rebuild the output from what was kept.
An unknown name is refused everywhere through :func:`get_reuse`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..errors import ErtaCacheError

Head = Callable[[Tensor], Tensor]
"""Runs the model's cheap parts on ``h_in + r`` (input embedding, then output head) and returns ``v~``."""


@dataclass(frozen=True)
class History:
    """A unit's cache over its last two refreshes, for modes that extrapolate.

    Attributes:
        t: the time of the cached step being rebuilt, in [0, 1] (t = 1 is noise).
        t_kept: the time of the latest computed step (whose output is ``kept``).
        previous: what was kept at the computed step before it, or None.
        t_previous: that step's time, or None.
    """

    t: float
    t_kept: float
    previous: Tensor | None = None
    t_previous: float | None = None


class Reuse:
    """Base class of a reuse mode.

    Attributes:
        name: the registry key, stored in policies.
        needs_blocks: True when the mode caches inside the model (the driver must
            split the model into embedding, block stack and head).
        needs_history: True when rebuilding needs the cache of the computed step before
            the latest (:class:`History`); the engine then keeps it.
        keeps: what :meth:`keep` stores (``"v"``, ``"v - x"``, ``"block residual"``);
            modes that keep the same thing can be mixed step by step in one policy
            (:attr:`ertacache.Policy.step_reuse`).
    """

    name: str = ""
    needs_blocks: bool = False
    needs_history: bool = False
    keeps: str = ""

    def keep(self, v: Tensor, x: Tensor, block_residual: Tensor | None) -> Tensor:
        """What the cache stores after a computed step.

        Args:
            v: the model output ``(B, ...)``.
            x: the sampler's state, same shape as ``v``.
            block_residual: ``h_out - h_in`` of the block stack ``(B, L, D)``, when the
                driver ran the model split; None otherwise.
        """
        raise NotImplementedError

    def rebuild(self, kept: Tensor, x: Tensor, head: Head | None, history: History | None = None) -> Tensor:
        """``v~`` at a cached step from the stored ``kept`` and the current state ``x`` (Eq. 6)."""
        raise NotImplementedError

    def weights(self, t: Any, t_kept: float, t_previous: float | None) -> tuple[Any, Any]:
        """How calibration's error model reads the mode: ``v~`` at time ``t`` as ``a v_kept + b v_previous``,
        the model outputs at the latest computed step and at the one before (``t_previous``; None when there
        is none yet). Times in [0, 1] (t = 1 is noise); ``t`` may be a tensor of times.

        The schedule search (:mod:`ertacache.calibration.schedule`) prices every segment with these weights, so
        a new mode is modelled as soon as it says them. The base reading ``(1, 0)`` is the latest output: exact
        for ``velocity``, and how a mode that keeps something else than ``v`` is modelled.
        """
        return 1.0, 0.0

    def __repr__(self) -> str:
        return f"Reuse({self.name!r})"


class VelocityReuse(Reuse):
    """``v~_j = v_i``: the output itself (TeaCache-style plain reuse)."""

    name = "velocity"
    keeps = "v"

    def keep(self, v: Tensor, x: Tensor, block_residual: Tensor | None) -> Tensor:
        return v

    def rebuild(self, kept: Tensor, x: Tensor, head: Head | None, history: History | None = None) -> Tensor:
        return kept


class ExtrapolateReuse(Reuse):
    """First-order extrapolation from the last two computed outputs (TaylorSeer's order 1, on the velocity).

    ``v~_j = v_i + (v_i - v_h) (t_j - t_i) / (t_i - t_h)``, ``i`` the latest computed
    step and ``h`` the one before; with one computed step so far, ``v~_j = v_i``. Not in
    the paper: a combination measured by this library (docs/guide.md, "Beyond the paper: the schedule search").
    """

    name = "extrapolate"
    needs_history = True
    keeps = "v"

    def keep(self, v: Tensor, x: Tensor, block_residual: Tensor | None) -> Tensor:
        return v

    def rebuild(self, kept: Tensor, x: Tensor, head: Head | None, history: History | None = None) -> Tensor:
        if history is None:
            raise ErtaCacheError("extrapolate reuse needs the cache's history; the driver gave none")
        if history.previous is None or history.t_previous is None or history.t_previous == history.t_kept:
            return kept
        slope = (history.t - history.t_kept) / (history.t_kept - history.t_previous)
        return kept + (kept - history.previous) * slope

    def weights(self, t: Any, t_kept: float, t_previous: float | None) -> tuple[Any, Any]:
        if t_previous is None or t_previous == t_kept:
            return 1.0, 0.0
        slope = (t - t_kept) / (t_kept - t_previous)
        return 1 + slope, -slope


class LatentResidualReuse(Reuse):
    """``r = v_i - x_i``, ``v~_j = x_j + r`` (Eq. 5-6 read literally on the latent)."""

    name = "latent_residual"
    keeps = "v - x"

    def keep(self, v: Tensor, x: Tensor, block_residual: Tensor | None) -> Tensor:
        return v - x

    def rebuild(self, kept: Tensor, x: Tensor, head: Head | None, history: History | None = None) -> Tensor:
        return x + kept


class BlockResidualReuse(Reuse):
    """``r = h_out - h_in`` of the block stack; a cached step runs only the embedding and the head."""

    name = "block_residual"
    needs_blocks = True
    keeps = "block residual"

    def keep(self, v: Tensor, x: Tensor, block_residual: Tensor | None) -> Tensor:
        if block_residual is None:
            raise ErtaCacheError("block_residual reuse needs the block stack's residual; the driver gave none")
        return block_residual

    def rebuild(self, kept: Tensor, x: Tensor, head: Head | None, history: History | None = None) -> Tensor:
        if head is None:
            raise ErtaCacheError("block_residual reuse needs the model's embedding and head; the driver gave none")
        return head(kept)


REUSE_MODES: dict[str, Reuse] = {}

DEFAULT_REUSE = "extrapolate"
"""The reuse mode of calibration, of :meth:`Policy.uniform` and of a :class:`~ertacache.policy.Policy` built
without one (docs/method.md section 1: it measured best on every bundled model)."""


def register_reuse(mode: Reuse) -> Reuse:
    """Add (or replace) a reuse mode under ``mode.name``; returns it."""
    if not mode.name:
        raise ErtaCacheError(f"a reuse mode needs a name, got {mode!r}")
    REUSE_MODES[mode.name] = mode
    return mode


def check_step_reuse(step_reuse: object, base: str, cached_steps: tuple[int, ...] | None = None) -> dict[int, str]:
    """Validate per-step reuse modes ``{cached step: mode name}`` beside the policy's ``base`` mode.

    Entries equal to ``base`` are dropped (they change nothing), so equal choices give
    equal dicts.

    Raises:
        ErtaCacheError: not a dict of int steps to mode names, a step not in
            ``cached_steps``, an unknown mode, or a mode that keeps something other
            than ``base`` does (its :attr:`Reuse.keeps`), which one cache cannot serve.
    """
    if not isinstance(step_reuse, dict):
        raise ErtaCacheError(f"step_reuse must be a dict {{cached step: reuse mode}}, got {step_reuse!r}")
    main = get_reuse(base)
    out: dict[int, str] = {}
    for step, name in step_reuse.items():
        if isinstance(step, bool) or not isinstance(step, int):
            raise ErtaCacheError(f"step_reuse keys must be int step indices, got {step!r}")
        if cached_steps is not None and step not in cached_steps:
            raise ErtaCacheError(f"step_reuse names step {step}, which is not a cached step ({list(cached_steps)})")
        mode = get_reuse(name)
        if mode.keeps != main.keeps:
            raise ErtaCacheError(f"step_reuse: step {step} uses '{mode.name}', which keeps {mode.keeps!r}, but the "
                                 f"policy's reuse '{main.name}' keeps {main.keeps!r}; one cache cannot serve both")
        if mode.name != main.name:
            out[step] = mode.name
    return dict(sorted(out.items()))


def get_reuse(name: object) -> Reuse:
    """The registered reuse mode called ``name``.

    Raises:
        ErtaCacheError: an unknown name, listing the known ones.
    """
    if not isinstance(name, str) or name not in REUSE_MODES:
        raise ErtaCacheError(f"reuse must be one of {sorted(REUSE_MODES)}, got {name!r}")
    return REUSE_MODES[name]


for _mode in (VelocityReuse(), LatentResidualReuse(), BlockResidualReuse(), ExtrapolateReuse()):
    register_reuse(_mode)

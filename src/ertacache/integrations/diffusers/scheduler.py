"""An explicit grid on a pipeline's scheduler: the adjusted grid of a policy (Eq. 13-14), set or updated in place."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from ...errors import ErtaCacheError, PolicyMismatchError


def scheduler_refusal(scheduler: Any) -> str | None:
    """Why ertacache cannot cache steps of ``scheduler``, or None.

    A solver of order 2 is supported where it lists its inner calls in its ``timesteps``, so that the pipeline's
    loop calls the transformer once per entry and ``step_index`` counts calls (FlowMatchHeunDiscreteScheduler:
    ``2T - 1`` calls for ``T`` steps, each a step of the policy: :func:`model_steps`); other solvers of order 2
    or more are refused."""
    order = order_of(scheduler)
    if order > 1 and not repeats_timesteps(scheduler):
        return (f"{type(scheduler).__name__} calls the transformer {order} times per step (a solver of order "
                f"{order}), and ertacache supports one such solver, FlowMatchHeunDiscreteScheduler (each of its "
                "2T - 1 calls a step of the policy): use it, FlowMatchEulerDiscreteScheduler, "
                "UniPCMultistepScheduler or DPMSolverMultistepScheduler (use_flow_sigmas=True), or run this "
                "scheduler uncached")
    return None


def order_of(scheduler: Any) -> int:
    """The solver's order: how many transformer calls one of its steps makes (1 for Euler and multistep solvers)."""
    order = getattr(scheduler, "order", 1)
    return order if isinstance(order, int) and order > 1 else 1


SUPPORTED_HIGHER_ORDER = ("FlowMatchHeunDiscreteScheduler",)
"""Solvers of order 2 whose inner calls the pipeline's loop makes one per ``timesteps`` entry (tested)."""


def repeats_timesteps(scheduler: Any) -> bool:
    """Whether the scheduler lists each inner call of a step in its ``timesteps`` (Heun's ``repeat_interleave``),
    so that the pipeline's loop calls the transformer once per entry and ``step_index`` counts calls."""
    return type(scheduler).__name__ in SUPPORTED_HIGHER_ORDER


def model_steps(scheduler: Any, steps: int) -> int:
    """The transformer calls per branch of a call that runs ``steps`` of ``scheduler``'s steps: ``steps`` for a
    first-order or multistep solver, ``order * (steps - 1) + 1`` for Heun's (the last step is an Euler step to
    t = 0). This is a policy's ``num_inference_steps`` T: its steps are the sampler's model evaluations."""
    order = order_of(scheduler)
    return steps if order == 1 else order * (steps - 1) + 1


_SLICED_START: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
"""Per scheduler: the grid index of the running call's first step, where the pipeline slices the scheduler's
``timesteps`` without ``set_begin_index`` (WanVideoToVideoPipeline's strength); -1 until its first step is taken."""


def begin_index(scheduler: Any) -> int:
    """The scheduler's first step (image-to-image at strength < 1 starts part-way down the grid): its
    ``begin_index``, else where the running call's first step left ``step_index`` (:func:`note_call_start`)."""
    begin = getattr(scheduler, "begin_index", None)
    if begin is not None:
        return int(begin)
    start = _SLICED_START.get(scheduler, 0)
    if start < 0 and getattr(scheduler, "step_index", None) is not None:  # one step taken: it counted from there
        start = _SLICED_START[scheduler] = int(scheduler.step_index) - 1
    return max(start, 0)


def start_pending(scheduler: Any) -> bool:
    """Whether the running call's first step is not known yet (:func:`note_call_start`, no step taken)."""
    return _SLICED_START.get(scheduler, 0) < 0 and getattr(scheduler, "step_index", None) is None


def note_call_start(scheduler: Any) -> None:
    """At a transformer call: before a call's first scheduler step (``step_index`` None) of a scheduler without
    ``begin_index``, its first step is not known yet (the scheduler finds it from the first timestep it is given);
    :func:`begin_index` reads it once that step is taken. Reads no tensor (no host-device sync)."""
    if getattr(scheduler, "step_index", 0) is None and getattr(scheduler, "begin_index", None) is None:
        _SLICED_START[scheduler] = -1


def inverted(scheduler: Any) -> bool:
    """Whether the scheduler keeps ``1 - t`` in its ``sigmas`` and ``timesteps`` (``invert_sigmas``: Mochi)."""
    return bool(getattr(getattr(scheduler, "config", None), "invert_sigmas", False))


def scheduler_grid(scheduler: Any, steps: int, begin: int | None = None) -> list[float] | None:
    """The times ``t`` in [0, 1] the scheduler's running call takes at its ``steps`` steps (from its first step:
    strength may skip some; ``begin``: from that grid entry instead), or None where it keeps no flow-matching
    ``sigmas`` on the host (reading them from a device would wait for it)."""
    sigmas = getattr(scheduler, "sigmas", None)
    begin = begin_index(scheduler) if begin is None else begin
    if not isinstance(sigmas, torch.Tensor) or sigmas.device.type != "cpu" or sigmas.numel() < begin + steps:
        return None
    values = [float(v) for v in sigmas[begin:begin + steps].tolist()]
    if inverted(scheduler):
        values = [1.0 - v for v in values]
    return values if all(-1e-6 <= v <= 1 + 1e-6 for v in values) else None


def possible_grids(scheduler: Any, steps: int) -> list[list[float] | None]:
    """:func:`scheduler_grid` of the running call; before its first step, where the start is not known yet
    (:func:`start_pending`), that of every start the grid allows."""
    if not start_pending(scheduler):
        return [scheduler_grid(scheduler, steps)]
    sigmas = getattr(scheduler, "sigmas", None)
    last = int(sigmas.numel()) - steps if isinstance(sigmas, torch.Tensor) else 0
    return [scheduler_grid(scheduler, steps, begin) for begin in range(max(last, 0) + 1)]


def grid_unsupported(scheduler: Any) -> str | None:
    """Why ``scheduler`` cannot follow an explicit grid of times, or None when it can (flow matching)."""
    if not hasattr(scheduler, "sigmas") or not hasattr(getattr(scheduler, "config", None), "num_train_timesteps") \
            or "FlowMatch" not in type(scheduler).__name__:
        return (f"timestep adjustment needs a flow-matching scheduler; {type(scheduler).__name__} is not one "
                "(docs/method.md section 5): use a policy without an adjusted grid")
    if order_of(scheduler) > 1:
        return (f"timestep adjustment moves the times of first-order steps; {type(scheduler).__name__} is a solver "
                f"of order {order_of(scheduler)} whose inner calls share a time: use a policy without an adjusted grid")
    return None


def set_scheduler_grid(scheduler: Any, grid: Sequence[float]) -> None:
    """Make ``scheduler.set_timesteps`` end with the times ``grid`` (``T + 1`` values, 1 -> 0).

    The scheduler's own ``set_timesteps`` still runs (it sets the step count and its
    state); then its ``sigmas`` become ``grid`` and its ``timesteps`` ``1000 * grid[:-1]`` (``1 - grid`` for a
    scheduler that keeps inverted sigmas).
    This is the one way in that every family shares: FLUX's dynamic shifting would
    re-shift ``sigmas=`` passed to the call, and Wan takes none.

    Raises:
        ErtaCacheError: a scheduler without flow-matching ``sigmas``.
        PolicyMismatchError: (when the pipeline sets its timesteps) another step count than the grid's.
    """
    reason = grid_unsupported(scheduler)
    if reason is not None:
        raise ErtaCacheError(reason)
    restore_scheduler(scheduler)
    original = scheduler.set_timesteps
    values = [1.0 - float(t) if inverted(scheduler) else float(t) for t in grid]  # as the scheduler keeps them

    @functools.wraps(original)  # pipelines inspect its signature for `sigmas` / `timesteps`
    def set_timesteps(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        if len(scheduler.timesteps) != len(values) - 1:
            raise PolicyMismatchError(
                f"num_inference_steps: policy {len(values) - 1}, got {len(scheduler.timesteps)}; call the pipeline "
                "with the policy's num_inference_steps, or recalibrate")
        device = scheduler.timesteps.device
        sigmas = torch.tensor(values, dtype=torch.float32)
        scheduler.sigmas = sigmas
        scheduler.timesteps = (sigmas[:-1] * scheduler.config.num_train_timesteps).to(device)
        return out

    set_timesteps.__ertacache_original__ = original  # type: ignore[attr-defined]
    scheduler.set_timesteps = set_timesteps


def restore_scheduler(scheduler: Any) -> None:
    """Undo :func:`set_scheduler_grid`."""
    patched = scheduler.__dict__.get("set_timesteps")
    if patched is not None and hasattr(patched, "__ertacache_original__"):
        del scheduler.set_timesteps


def write_grid(scheduler: Any, grid: Sequence[float], start: int) -> None:
    """Overwrite times ``start..T-1`` of the running loop in place (timestep adjustment during a call).

    A pipeline iterates views of ``scheduler.timesteps`` and steps with ``scheduler.sigmas``;
    writing into both changes the steps not yet taken.
    """
    values = torch.tensor([1.0 - float(t) if inverted(scheduler) else float(t) for t in grid[start:-1]],
                          dtype=torch.float32)
    scheduler.sigmas[start:-1] = values.to(scheduler.sigmas)
    scheduler.timesteps[start:] = (values * scheduler.config.num_train_timesteps).to(scheduler.timesteps)

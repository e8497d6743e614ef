"""Sampling grids of flow-matching time ``t_0 = 1 > t_1 > ... > t_T = 0``.

t = 1 is pure noise, t = 0 is data (Eq. 1); diffusers calls t ``sigma``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import ErtaCacheError


def time_grid(num_inference_steps: int, shift: float = 1.0) -> list[float]:
    """The ``T + 1`` times of a (shifted) uniform flow-matching grid.

    ``t_i = shift * s_i / (1 + (shift - 1) * s_i)`` with ``s_i = 1 - i / T``: the
    time shift of SD3, Wan (``shift=5`` at 480p) and FLUX (``shift = exp(mu)``, mu
    from the resolution), as in diffusers' ``FlowMatchEulerDiscreteScheduler``.

    Args:
        num_inference_steps: T >= 1.
        shift: > 0; 1 gives the uniform grid.

    Returns:
        ``[t_0 = 1.0, ..., t_T = 0.0]``, strictly decreasing, length ``T + 1``.

    Raises:
        ErtaCacheError: T < 1 or shift not a positive finite number.
    """
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ErtaCacheError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise ErtaCacheError(f"shift must be a positive finite number, got {shift!r}")
    T = num_inference_steps
    grid = []
    for i in range(T + 1):
        s = 1.0 - i / T
        grid.append(shift * s / (1.0 + (shift - 1.0) * s))
    grid[0], grid[-1] = 1.0, 0.0
    return grid


def check_grid(grid: Sequence[float], num_inference_steps: int | None = None) -> list[float]:
    """Validate a grid: ``T + 1`` finite times in [0, 1], non-increasing, from above 0 to 0.

    Time shifting gives strictly decreasing grids; timestep adjustment (Eq. 13) may
    shrink a cached step to zero length (phi = 0), so equal neighbours are allowed.

    Raises:
        ErtaCacheError: naming the first offending entry.
    """
    if isinstance(grid, (str, bytes)) or not hasattr(grid, "__len__"):
        raise ErtaCacheError(f"a grid must be a sequence of times, got {type(grid).__name__}")
    g = [_time(t, i) for i, t in enumerate(grid)]
    if len(g) < 2:
        raise ErtaCacheError(f"a grid needs at least 2 times (T >= 1), got {len(g)}")
    if num_inference_steps is not None and len(g) != num_inference_steps + 1:
        raise ErtaCacheError(
            f"grid has {len(g)} times, but num_inference_steps={num_inference_steps} needs {num_inference_steps + 1}"
        )
    for i, t in enumerate(g):
        if not (math.isfinite(t) and 0.0 <= t <= 1.0):
            raise ErtaCacheError(f"grid time {i} is {t}; times must lie in [0, 1] (t = 1 is noise)")
        if i and t > g[i - 1]:
            raise ErtaCacheError(f"grid must decrease from noise to data; t_{i} = {t} follows t_{i - 1} = {g[i - 1]}")
    if g[0] <= 0.0:
        raise ErtaCacheError(f"a grid must start above t = 0, got t_0 = {g[0]}")
    if g[-1] != 0.0:
        raise ErtaCacheError(f"a grid must end at t = 0 (data), got t_T = {g[-1]}")
    return g


def _time(t: object, i: int) -> float:
    if isinstance(t, (str, bytes, bool)):
        raise ErtaCacheError(f"grid time {i} must be a number, got {t!r}")
    try:
        return float(t)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError) as exc:
        raise ErtaCacheError(f"grid time {i} must be a number, got {type(t).__name__}") from exc


def steps(grid: Sequence[float]) -> list[float]:
    """The step sizes ``dt_i = t_{i+1} - t_i`` (negative), length T."""
    return [grid[i + 1] - grid[i] for i in range(len(grid) - 1)]


def shrink_step(grid: Sequence[float], step: int, phi: float) -> list[float]:
    """Shrink step ``step`` to ``phi * dt`` and spread the time not taken over the later steps (Eq. 14).

    The later steps grow in proportion to their sizes, so the grid still ends at
    exactly t = 0 (Eq. 14 on a uniform grid; the same rule serves shifted grids).

    Args:
        grid: ``T + 1`` decreasing times ending at 0.
        step: ``0 <= step < T - 1`` (a later step must exist to take the time).
        phi: in [0, 1].

    Returns:
        The new grid (a new list); times up to ``t_step`` are unchanged.

    Raises:
        ErtaCacheError: ``step`` or ``phi`` out of range.
    """
    T = len(grid) - 1
    if not 0 <= step < T - 1:
        raise ErtaCacheError(f"only steps 0..T-2={T - 2} can be shrunk, got step {step}")
    if not 0.0 <= phi <= 1.0:
        raise ErtaCacheError(f"phi must be in [0, 1], got {phi}")
    new = list(grid)
    dt = grid[step + 1] - grid[step]
    new[step + 1] = grid[step] + phi * dt
    rest = grid[T] - grid[step + 1]
    scale = (grid[T] - new[step + 1]) / rest
    for k in range(step + 2, T):
        new[k] = new[k - 1] + (grid[k] - grid[k - 1]) * scale
    new[T] = grid[T]
    return new


def uniform_cached_steps(num_inference_steps: int, nfe: int) -> tuple[int, ...]:
    """Cached steps of evenly spaced computation: ``nfe`` computed steps incl. the first and last.

    Raises:
        ErtaCacheError: ``nfe`` outside ``2..T`` (or != 1 for T = 1).
    """
    T = num_inference_steps
    if T == 1 and nfe == 1:
        return ()
    if not 2 <= nfe <= T:
        raise ErtaCacheError(f"nfe must be in 2..T={T} (first and last steps are always computed), got {nfe}")
    computed = {round(k * (T - 1) / (nfe - 1)) for k in range(nfe)}
    return tuple(i for i in range(T) if i not in computed)

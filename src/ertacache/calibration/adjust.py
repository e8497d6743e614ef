"""Trajectory-aware timestep adjustment (Eq. 13-14), estimated offline (NOTES.md section 3)."""

from __future__ import annotations

from torch import Tensor

from ..cache import l1
from ..config import PhiDenominator
from ..errors import ErtaCacheError
from .calibset import CalibSet, ratio


def shrink_step(grid: list[float], step: int, phi: float) -> list[float]:
    """Shrink step ``step`` to ``phi * dt`` and spread the time not taken over the later steps.

    The later steps grow in proportion to their sizes, so the grid still ends at
    exactly t = 0 (Eq. 14 on a uniform grid; the same rule serves shifted grids).

    Args:
        grid: ``T + 1`` decreasing times ending at 0.
        step: ``0 <= step < T - 1`` (a later step must exist to take the time).
        phi: in [0, 1].

    Returns:
        The new grid (a new list); times before ``step + 1`` are unchanged.
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


def adjust_grid(
    cs: CalibSet, grid: list[float], cached_steps: tuple[int, ...], denominator: PhiDenominator = "velocity_change"
) -> tuple[list[float], dict[int, float]]:
    """Estimate the adjusted grid along the cached trajectory (Algorithm 1, first loop).

    At each cached step j the true ``v_j`` is computed alongside the cached ``v~_j``
    (guided velocities), and
    ``phi_j = clip(1 - ||v~_j - v_j||_1 / ||v_j - v_{j-1}||_1, 0, 1)`` (v1; v2 divides
    by ``||v_j||_1``; a zero denominator gives 1), norms summed over the set. The step
    shrinks to ``phi_j * dt_j`` (:func:`shrink_step`) before the trajectory takes it,
    so later estimates see earlier adjustments.

    Returns:
        ``(adjusted grid, {step: phi})``.
    """
    T = len(grid) - 1
    cached = set(cached_steps)
    g = list(grid)
    x = cs.noise
    r_cached: Tensor | None = None
    v_prev: Tensor | None = None
    phis: dict[int, float] = {}
    for i in range(T):
        v, r = cs.compute(x, g[i], i, "timestep adjustment")
        v_true = cs.guide(v)
        if i in cached and r_cached is not None and v_prev is not None:
            v_used = cs.guide(cs.reuse(r_cached, x, g[i]))
            den = l1(v_true - v_prev) if denominator == "velocity_change" else l1(v_true)
            phi = 1.0 if den == 0 else min(1.0, max(0.0, 1.0 - ratio(l1(v_used - v_true), den)))
            phis[i] = phi
            g = shrink_step(g, i, phi)
        else:
            r_cached, v_used = r, v_true
        v_prev = v_true
        x = x + (g[i + 1] - g[i]) * v_used
    return g, phis

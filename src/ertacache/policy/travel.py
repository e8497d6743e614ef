"""A policy mapped to another step count: where along t the calibration put its computed steps, at ``T'`` steps.

What a calibrated set knows is which regions of t tolerate reuse: it computes densely where the
velocity changes fast and sparsely where it does not. The mapping keeps that density and the
speedup. With the ``M`` computed steps at times ``t_(0) > ... > t_(M-1)`` (the unadjusted grid), and
``M' = round(M T' / T)`` computed steps at ``T'``, the ``k``-th new computed step is the free step of
the new grid nearest the time at quantile ``k / (M' - 1)`` of the old computed times (interpolated
between neighbours), taken in order. Evenly spaced caching maps to evenly spaced caching; a set that
computes every second step early and every fourth late does the same at ``T'``.

Each new cached step takes from the old cached step nearest in t its rectification ``(a, b)`` and whether
it is on, its reuse mode, and its timestep-adjustment factor phi (Eq. 13, recovered from the adjusted grid
and applied with Eq. 14).

It is an approximation (the errors a cached step makes depend on the step size, which the mapping
changes); docs/travel.md measures it against evenly spaced caching and a policy calibrated at ``T'``.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from ..core.grids import shrink_step, time_grid
from ..errors import ErtaCacheError

if TYPE_CHECKING:
    from .policy import Policy


class StepCountWarning(UserWarning):
    """A policy mapped to another step count than it was calibrated at (:func:`for_steps`)."""


def _resample_grid(grid: tuple[float, ...], shift: float, steps: int) -> list[float]:
    """The policy's unadjusted grid at ``steps``: the shifted grid when it is one, else piecewise linear in i/T."""
    T = len(grid) - 1
    if all(abs(a - b) <= 1e-6 for a, b in zip(grid, time_grid(T, shift))):
        return time_grid(steps, shift)
    out = []
    for j in range(steps + 1):
        s = j * T / steps
        k = min(int(s), T - 1)
        out.append(grid[k] + (s - k) * (grid[k + 1] - grid[k]))
    out[0], out[-1] = grid[0], 0.0
    return out


def computed_by_density(policy: Policy, grid: list[float]) -> set[int]:
    """The computed steps at ``len(grid) - 1`` steps: the old computed times' quantiles, each to the nearest free
    step, in order (module docstring)."""
    T, T2 = policy.num_inference_steps, len(grid) - 1
    times = [policy.grid[i] for i in range(T) if i not in set(policy.cached_steps)]
    m, m2 = len(times), min(T2, max(2, round(len(times) * T2 / T)))
    picked: list[int] = [0]  # the first and the last step are computed, as in every policy
    for k in range(1, m2 - 1):
        q = k * (m - 1) / (m2 - 1) if m2 > 1 else 0.0
        lo = min(int(q), m - 1)
        hi = min(lo + 1, m - 1)
        target = times[lo] + (q - lo) * (times[hi] - times[lo])
        first, last = picked[-1] + 1, T2 - (m2 - k)  # leave room for the steps still to pick
        picked.append(min(range(first, last + 1), key=lambda j: (abs(grid[j] - target), j)))
    return {*picked, T2 - 1}


def recovered_phis(policy: Policy) -> dict[int, float]:
    """phi of each shrunk step, replaying Eq. 14 on the policy's grid (empty without an adjusted grid)."""
    if policy.adjusted_grid is None:
        return {}
    current, phis = list(policy.grid), {}
    for k in range(policy.num_inference_steps - 1):
        dt = current[k + 1] - current[k]
        taken = policy.adjusted_grid[k + 1] - current[k]
        if dt < 0 and abs(taken - dt) > 1e-9:
            phi = min(max(taken / dt, 0.0), 1.0)
            phis[k] = phi
            current = shrink_step(current, k, phi)
    return phis


def for_steps(policy: Policy, num_inference_steps: int) -> Policy:
    """``policy`` mapped to ``num_inference_steps`` steps by relative position (module docstring).

    Args:
        policy: any policy with T >= 2.
        num_inference_steps: T' >= 2.

    Returns:
        A new policy; ``provenance["mapped_from"]`` records the calibrated T.

    Raises:
        ErtaCacheError: T' not an int >= 2.
    """
    T, T2 = policy.num_inference_steps, num_inference_steps
    if isinstance(T2, bool) or not isinstance(T2, int) or T2 < 2:
        raise ErtaCacheError(f"num_inference_steps must be an int >= 2, got {T2!r}")
    if T2 == T:
        return policy
    if T < 2:
        raise ErtaCacheError(f"a policy of T = {T} step has no relative positions to map")
    warnings.warn(f"ertacache: this policy was calibrated at {T} steps and is mapped to {T2}; mapped policies were "
                  "0.3-5.4 dB above evenly spaced caching at the same NFE on the bundled video model and up to "
                  "0.7 dB below it on the image model (docs/travel.md). Recalibrate at this step count for the "
                  "best fidelity.", StepCountWarning, stacklevel=3)
    grid = _resample_grid(policy.grid, policy.shift, T2)
    computed = computed_by_density(policy, grid)
    cached = tuple(j for j in range(T2) if j not in computed)
    cached_old = list(policy.cached_steps)
    nearest = [0] * T2  # for each new cached step, the old cached step nearest in t (computed steps: unused)
    for j in cached:
        nearest[j] = min(cached_old, key=lambda i: (abs(policy.grid[i] - grid[j]), i))
    adjusted = None
    if policy.adjusted_grid is not None:
        phis = recovered_phis(policy)
        adjusted = list(grid)
        for j in cached:
            if j < T2 - 1 and nearest[j] in phis:
                adjusted = shrink_step(adjusted, j, phis[nearest[j]])
    rect: dict[str, dict[str, torch.Tensor]] = {"a": {}, "b": {}}
    enabled = None
    if policy.rect_form != "off" and policy.rect_enabled is not None:
        index = torch.tensor(nearest)
        on = torch.zeros(T2, dtype=torch.bool)
        on[list(cached)] = True
        enabled = policy.rect_enabled[:, index] & on
        for name in policy.branches:
            rect["a"][name] = policy.rect_a[name][index] * enabled[policy.branches.index(name), :, None]
            rect["b"][name] = policy.rect_b[name][index] * enabled[policy.branches.index(name), :, None]
    step_reuse = {j: policy.step_reuse[nearest[j]] for j in cached if nearest[j] in policy.step_reuse}
    return replace(policy, num_inference_steps=T2, cached_steps=cached, grid=tuple(grid), step_reuse=step_reuse,
                   adjusted_grid=None if adjusted is None else tuple(adjusted), rect_a=rect["a"], rect_b=rect["b"],
                   rect_enabled=enabled, provenance={**policy.provenance, "mapped_from": {"num_inference_steps": T}})

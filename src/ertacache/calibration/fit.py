"""Fitting explicit error rectification along the cached trajectory (Eq. 15-21, NOTES.md section 4)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import rectify
from ..cache import split_branches
from ..config import Granularity, Rectification
from ..rectify import RectStats
from .calibset import CalibSet


def fit_rectification(
    cs: CalibSet,
    n_fit: int,
    grid: list[float],
    cached_steps: tuple[int, ...],
    form: Rectification,
    granularity: Granularity,
) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
    """Fit ``(a, b)`` per cached step and branch on the first ``n_fit`` samples of ``cs``.

    The set runs along the cached trajectory on ``grid``. At each cached step the
    true ``v`` is computed beside the cached ``v~``; ``eps = v~ - v`` gives the
    sufficient statistics of the fit samples, solved at once (:meth:`RectStats.solve`),
    and the rectified ``v^`` advances the trajectory, so later fits see earlier ones.
    The samples after ``n_fit`` are held out: a fit whose ``||v^ - v||^2`` on them is
    not below ``||v~ - v||^2`` is switched off. With no held-out samples every fit
    that lowers the error on the fit samples stays on.

    Returns:
        ``(rect_a, rect_b, enabled)``: per branch name ``(T, C)`` float32 tensors, and
        ``(n_branches, T)`` bool.
    """
    T = len(grid) - 1
    nb = cs.num_branches
    names = ("cond", "uncond")[:nb]
    cached = set(cached_steps)
    n = cs.size
    hold = slice(n_fit, n) if n_fit < n else slice(0, n)
    a_rows: dict[str, list[Tensor]] = {name: [] for name in names}
    b_rows: dict[str, list[Tensor]] = {name: [] for name in names}
    enabled = torch.zeros(nb, T, dtype=torch.bool)
    channels = 1 if granularity == "step" else int(cs.noise.shape[1])
    zeros = torch.zeros(channels)
    x = cs.noise
    r_cached: Tensor | None = None
    for i in range(T):
        v, r = cs.compute(x, grid[i], i, "rectification fit")
        if i in cached and r_cached is not None:
            v_tilde = split_branches(cs.reuse(r_cached, x, grid[i]), nb)
            used = []
            for k, (vt, vk) in enumerate(zip(v_tilde, split_branches(v, nb))):
                a, b = RectStats.of(vt[:n_fit], vt[:n_fit] - vk[:n_fit], granularity).solve()
                v_hat = rectify.apply(vt, a, b, form)
                better = float((v_hat[hold] - vk[hold]).square().sum()) < float((vt[hold] - vk[hold]).square().sum())
                enabled[k, i] = better
                a_rows[names[k]].append(a if better else zeros)
                b_rows[names[k]].append(b if better else zeros)
                used.append(v_hat if better else vt)
            v = torch.cat(used)
        else:
            r_cached = r
            for name in names:
                a_rows[name].append(zeros)
                b_rows[name].append(zeros)
        x = x + (grid[i + 1] - grid[i]) * cs.guide(v)
    rect_a = {name: torch.stack(rows) for name, rows in a_rows.items()}
    rect_b = {name: torch.stack(rows) for name, rows in b_rows.items()}
    return rect_a, rect_b, enabled

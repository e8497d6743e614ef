"""The residual cache (Eq. 5-6): compute a step and keep ``r``, or reuse ``r``.

The branches of classifier-free guidance are evaluated as one batch, laid out
branch-major: rows ``[k * B, (k + 1) * B)`` belong to branch ``k``. The cached
``r`` keeps that layout, so every branch (and every sample) has its own cache while
a computed step is still a single forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .config import ReuseMode
from .errors import ErtaCacheError
from .model import is_split


def batch_branches(x: Tensor, t: Tensor, conds: Sequence[Tensor | None]) -> tuple[Tensor, Tensor, Tensor | None]:
    """Stack the branches: ``x (B, ...)`` -> ``(nb * B, ...)``, same for ``t`` and the conds."""
    nb = len(conds)
    if nb == 1:
        return x, t, conds[0]
    if any(c is None for c in conds):
        raise ErtaCacheError("with several guidance branches every branch needs a condition tensor, got None")
    return torch.cat([x] * nb), torch.cat([t] * nb), torch.cat([c for c in conds if c is not None])


def compute(model: Any, mode: ReuseMode, x: Tensor, t: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor]:
    """Run the full model on a branch-stacked batch; return ``(v, r)``, ``r`` being what ``mode`` caches.

    Args:
        model: a velocity function; a split model for ``block_residual``.
        x: ``(N, ...)`` states, t: ``(N,)`` times in [0, 1], cond: ``(N, ...)`` or None.
    """
    if mode == "block_residual":
        if not is_split(model):
            raise ErtaCacheError(
                "reuse='block_residual' needs a model with embed/blocks/head (SplitVelocityModel); "
                f"{type(model).__name__} has none: use reuse='velocity'"
            )
        h_in, ctx = model.embed(x, t, cond)
        h_out = model.blocks(h_in, ctx)
        return model.head(h_out, ctx), h_out - h_in
    v = model(x, t, cond)
    return v, (v if mode == "velocity" else v - x)


def reuse(model: Any, mode: ReuseMode, r: Tensor, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
    """The cached velocity ``v~`` at a skipped step from the stored ``r`` (Eq. 6)."""
    if mode == "block_residual":
        h_in, ctx = model.embed(x, t, cond)
        return model.head(h_in + r, ctx)
    if mode == "velocity":
        return r
    return x + r


def split_branches(v: Tensor, nb: int) -> list[Tensor]:
    """Inverse of :func:`batch_branches` for a model output."""
    return list(v.chunk(nb)) if nb > 1 else [v]


def guide(vs: Sequence[Tensor], guidance_scale: float) -> Tensor:
    """Classifier-free guidance ``v_u + s (v_c - v_u)`` of branches ``(cond, uncond)``; one branch passes through."""
    if len(vs) == 1:
        return vs[0]
    cond, uncond = vs
    return uncond + guidance_scale * (cond - uncond)


def l1(x: Tensor) -> float:
    """``||x||_1`` summed over everything (the batch's norm, Algorithm 2 step 3), as a float64 Python float."""
    return float(x.detach().double().abs().sum())

"""A calibration set on a model: noises, conditions and the passes' shared step."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from .. import cache
from ..config import ReuseMode
from ..errors import ErtaCacheError


@dataclass(frozen=True)
class CalibSet:
    """``N`` calibration samples: ``noise (N, *latent_shape)`` at t = 1 and their conditions.

    Attributes:
        model: the velocity model.
        noise: ``(N, ...)``.
        cond: ``(N, ...)`` or None; null_cond: ``(N, ...)`` with guidance, else None.
        guidance_scale: classifier-free guidance scale.
        mode: what the cache keeps.
    """

    model: Any
    noise: Tensor
    cond: Tensor | None
    null_cond: Tensor | None
    guidance_scale: float
    mode: ReuseMode

    @property
    def size(self) -> int:
        return int(self.noise.shape[0])

    @property
    def conds(self) -> list[Tensor | None]:
        return [self.cond] if self.null_cond is None else [self.cond, self.null_cond]

    @property
    def num_branches(self) -> int:
        return len(self.conds)

    def rows(self, sl: slice) -> CalibSet:
        """The samples ``sl`` of this set."""
        return replace(
            self,
            noise=self.noise[sl],
            cond=None if self.cond is None else self.cond[sl],
            null_cond=None if self.null_cond is None else self.null_cond[sl],
        )

    def inputs(self, x: Tensor, t: float) -> tuple[Tensor, Tensor, Tensor | None]:
        tt = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
        return cache.batch_branches(x, tt, self.conds)

    def compute(self, x: Tensor, t: float, step: int, stage: str) -> tuple[Tensor, Tensor]:
        """Full model at step ``step``: branch-stacked ``(v, r)``.

        Raises:
            ErtaCacheError: non-finite model output, naming the step, t and the stage.
        """
        v, r = cache.compute(self.model, self.mode, *self.inputs(x, t))
        if not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise ErtaCacheError(
                f"model output has {bad} NaN/inf values at step {step} (t = {t:.4f}) during {stage}; "
                "check the model's dtype (try float32) and inputs before calibrating"
            )
        return v, r

    def reuse(self, r: Tensor, x: Tensor, t: float) -> Tensor:
        """Cached ``v~`` from ``r`` (branch-stacked)."""
        return cache.reuse(self.model, self.mode, r, *self.inputs(x, t))

    def guide(self, v: Tensor) -> Tensor:
        return cache.guide(cache.split_branches(v, self.num_branches), self.guidance_scale)


def ratio(num: float, den: float) -> float:
    """``num / den`` with ``0 / 0 = 0`` and ``x / 0 = inf``."""
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.inf


def check_calibration_inputs(cond: Tensor | None, seeds: list[int], null_cond: Tensor | None) -> None:
    """Raise a clear error for an empty or inconsistent calibration set."""
    if len(seeds) == 0:
        raise ErtaCacheError("the calibration set is empty: give at least one seed (and one condition per seed)")
    if cond is not None and cond.shape[0] != len(seeds):
        raise ErtaCacheError(f"got {cond.shape[0]} conditions but {len(seeds)} seeds; give one seed per condition")
    if null_cond is not None and cond is not None and null_cond.shape[0] != cond.shape[0]:
        raise ErtaCacheError(f"null_cond has {null_cond.shape[0]} rows, cond has {cond.shape[0]}; they must match")

"""Calibration passes under the core Euler loop: the driver for a velocity model ``v(x, t, cond)``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from ..core.engine import Engine, Pass
from ..core.euler import branches_for, euler, seeded_noise
from ..core.grids import time_grid
from ..core.rectify import ChannelLayout
from ..core.reuse import get_reuse
from ..errors import ErtaCacheError


class Driver(Protocol):
    """What a calibration session needs from a driver (the core loop, or a pipeline).

    Attributes:
        size: N, the calibration rows (samples).
        num_inference_steps: T.
        layout: where the model output's channels are (per-channel rectification).
        adjustment_off: why timestep adjustment cannot be honoured, or None.
    """

    size: int
    num_inference_steps: int
    layout: ChannelLayout
    adjustment_off: str | None

    def run(self, pass_: Pass, rows: slice, n_fit: int, grid: Sequence[float] | None) -> Tensor:
        """Walk one trajectory of ``rows`` under ``pass_`` on ``grid`` (None: the driver's own); return x at t = 0.

        Rows ``< n_fit`` of the calibration set are fitting rows, the others held out.
        """
        ...

    def policy_fields(self, grid: Sequence[float]) -> dict[str, Any]:
        """The :class:`~ertacache.policy.Policy` fields the driver knows (branches, shapes, fingerprint, ...)."""
        ...

    def provenance(self) -> dict[str, Any]:
        """Extra provenance (seeds, pipeline class, ...)."""
        ...


def check_calibration_inputs(cond: Tensor | None, seeds: Sequence[int], null_cond: Tensor | None) -> None:
    """Raise a clear error for an empty or inconsistent calibration set."""
    if len(seeds) == 0:
        raise ErtaCacheError("the calibration set is empty: give at least one seed (and one condition per seed)")
    if cond is not None and cond.shape[0] != len(seeds):
        raise ErtaCacheError(f"got {cond.shape[0]} conditions but {len(seeds)} seeds; give one seed per condition")
    if null_cond is not None and cond is not None and null_cond.shape[0] != cond.shape[0]:
        raise ErtaCacheError(f"null_cond has {null_cond.shape[0]} rows, cond has {cond.shape[0]}; they must match")


class CoreDriver:
    """N calibration samples of a velocity model: ``noise (N, *latent_shape)`` from seeds, and their conditions.

    Args: those of :func:`ertacache.calibrate`; ``reuse`` is the reuse mode's name.
    """

    adjustment_off: str | None = None

    def __init__(self, model: Any, cond: Tensor | None, seeds: Sequence[int], latent_shape: Sequence[int],
                 num_inference_steps: int, shift: float, guidance_scale: float, null_cond: Tensor | None,
                 reuse: str, model_fingerprint: str | None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> None:
        self.seeds = [int(s) for s in seeds]
        check_calibration_inputs(cond, self.seeds, null_cond)
        self.model, self.reuse = model, get_reuse(reuse)
        self.names = branches_for(guidance_scale, null_cond)
        self.noise = seeded_noise(self.seeds, latent_shape, dtype, device)
        self.cond = None if cond is None else cond.to(device)
        self.null_cond = None if len(self.names) == 1 or null_cond is None else null_cond.to(device)
        self.guidance_scale, self.shift = guidance_scale, shift
        self.num_inference_steps, self.size = num_inference_steps, len(self.seeds)
        self.grid = time_grid(num_inference_steps, shift)
        self.latent_shape, self.model_fingerprint = tuple(latent_shape), model_fingerprint
        self.layout = ChannelLayout()

    @torch.no_grad()
    def run(self, pass_: Pass, rows: slice, n_fit: int, grid: Sequence[float] | None) -> Tensor:
        conds = [c if c is None else c[rows] for c in (self.cond, self.null_cond)[: len(self.names)]]
        fit = torch.arange(self.size)[rows] < n_fit
        engine = Engine(pass_, self.grid if grid is None else grid)
        return euler(self.model, self.reuse, self.noise[rows], conds, self.names, self.guidance_scale, engine, fit,
                     check_finite=True)

    def policy_fields(self, grid: Sequence[float]) -> dict[str, Any]:
        return dict(num_inference_steps=self.num_inference_steps, grid=tuple(grid), reuse=self.reuse.name,
                    branches=self.names, shift=self.shift, guidance_scale=self.guidance_scale,
                    latent_shape=self.latent_shape, model_fingerprint=self.model_fingerprint)

    def provenance(self) -> dict[str, Any]:
        return {"seeds": list(self.seeds)}

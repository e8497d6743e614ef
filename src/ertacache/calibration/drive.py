"""Calibration passes under the core Euler loop: the driver for a velocity model ``v(x, t, cond)``."""

from __future__ import annotations

import copy
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
from .distributed import all_reduce_sum, rank_and_size, shard

FRESH_SEED_OFFSET = 1_000_003
"""A fresh seed is the calibration seed plus this (mod 2**63): other noise, the same conditions, reproducible."""


def fresh_seeds(seeds: Sequence[int]) -> list[int]:
    """The noise seeds of the fresh-noise check (:mod:`.fresh`): each seed moved by :data:`FRESH_SEED_OFFSET`."""
    return [(int(s) + FRESH_SEED_OFFSET) % 2 ** 63 for s in seeds]


def other_seeds(seeds: Sequence[int], m: int) -> list[int]:
    """The noise seeds of the fresh check's ``m`` rows of other conditions (:mod:`.fresh`): the calibration seeds
    moved by three :data:`FRESH_SEED_OFFSET` (then four, five, ... as the rows cycle through them)."""
    n = len(seeds)
    return [(int(seeds[k % n]) + (3 + k // n) * FRESH_SEED_OFFSET) % 2 ** 63 for k in range(m)]


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
    last_model_calls: int

    def run(self, pass_: Pass, rows: slice, n_fit: int, grid: Sequence[float] | None) -> Tensor:
        """Walk one trajectory of this process' part of ``rows`` under ``pass_`` on ``grid`` (None: the
        driver's own); return x at t = 0 of those rows (in :meth:`local` order).

        Rows ``< n_fit`` of the calibration set are fitting rows, the others held out.
        """
        ...

    def local(self, rows: slice) -> list[int]:
        """The global indices of ``rows`` this process walks."""
        ...

    def reduce(self, t: Tensor) -> Tensor:
        """Sum a statistic over processes (identity on one)."""
        ...

    def policy_fields(self, grid: Sequence[float]) -> dict[str, Any]:
        """The :class:`~ertacache.policy.Policy` fields the driver knows (branches, shapes, fingerprint, ...)."""
        ...

    def provenance(self) -> dict[str, Any]:
        """Extra provenance (seeds, pipeline class, ...)."""
        ...

    def identity(self) -> dict[str, Any]:
        """What determines every pass' result (model, set, settings): a resumed calibration must match it."""
        ...

    def recorded(self) -> dict[str, Any]:
        """What the ground-truth run taught the driver (JSON-able), for :meth:`restore` on resume."""
        ...

    def restore(self, recorded: dict[str, Any]) -> None:
        """Take back :meth:`recorded` when ground truth is not run again."""
        ...

    # Optional: ``twin() -> Driver | None``, the same set under fresh noise seeds (:mod:`.fresh`), None where the
    # driver cannot draw other noise (then ``twin_off`` says why); ``check_rows``, the rows of other conditions its
    # twin adds (``unconditional_rows`` and ``other_rows`` on the twin say where each kind of row sits).


def check_batch_size(batch_size: object) -> int | None:
    """Validate a micro-batch size: None (the whole set at once) or an int >= 1.

    Raises:
        ErtaCacheError: anything else.
    """
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ErtaCacheError(f"batch_size must be an int >= 1 (rows per model call) or None, got {batch_size!r}")
    return batch_size


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
    last_model_calls = 0
    unconditional_rows = 0  # a fresh-noise twin's rows of the null condition (after the set's own)
    other_rows = 0  # a fresh-noise twin's rows of other conditions (its last ones)

    def __init__(self, model: Any, cond: Tensor | None, seeds: Sequence[int], latent_shape: Sequence[int],
                 num_inference_steps: int, shift: float, guidance_scale: float, null_cond: Tensor | None,
                 reuse: str, model_fingerprint: str | None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", batch_size: int | None = None,
                 check_cond: Tensor | None = None) -> None:
        self.seeds = [int(s) for s in seeds]
        check_calibration_inputs(cond, self.seeds, null_cond)
        if check_cond is not None and (cond is None or check_cond.shape[1:] != cond.shape[1:]
                                       or check_cond.shape[0] == 0):
            want = "cond is None: there are no conditions to vary" if cond is None else \
                f"rows shaped like cond's, (M, {', '.join(map(str, cond.shape[1:]))}) with M >= 1"
            raise ErtaCacheError(f"check_cond must be other conditions, {want}; got {tuple(check_cond.shape)}")
        self.check_cond = None if check_cond is None else check_cond.to(device)
        self.check_rows = 0 if check_cond is None else int(check_cond.shape[0])
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
        self.batch_size = check_batch_size(batch_size)
        self.rank, self.world_size = rank_and_size()

    def local(self, rows: slice) -> list[int]:
        return shard(range(self.size)[rows], self.rank, self.world_size)

    def reduce(self, t: Tensor) -> Tensor:
        return all_reduce_sum(t)

    @torch.no_grad()
    def run(self, pass_: Pass, rows: slice, n_fit: int, grid: Sequence[float] | None) -> Tensor:
        idx = self.local(rows)
        index = torch.tensor(idx, dtype=torch.long) if self.world_size > 1 else slice(idx[0], idx[-1] + 1)
        conds = [c if c is None else c[index] for c in (self.cond, self.null_cond)[: len(self.names)]]
        fit = torch.tensor(idx) < n_fit
        pass_.reduce = self.reduce
        engine = Engine(pass_, self.grid if grid is None else grid, self.reuse.needs_history)
        try:
            return euler(self.model, self.reuse, self.noise[index], conds, self.names, self.guidance_scale, engine,
                         fit, batch_size=self.batch_size, check_finite=True,
                         samples=torch.tensor(idx, dtype=torch.long))
        finally:
            self.last_model_calls = engine.model_calls

    def policy_fields(self, grid: Sequence[float]) -> dict[str, Any]:
        return dict(num_inference_steps=self.num_inference_steps, grid=tuple(grid), reuse=self.reuse.name,
                    branches=self.names, shift=self.shift, guidance_scale=self.guidance_scale,
                    latent_shape=self.latent_shape, model_fingerprint=self.model_fingerprint)

    def provenance(self) -> dict[str, Any]:
        return {"seeds": list(self.seeds), **({"check_conditions": self.check_rows} if self.check_rows else {})}

    def identity(self) -> dict[str, Any]:
        from .checkpoint import digest

        fingerprint = self.model_fingerprint
        if fingerprint is None and isinstance(self.model, torch.nn.Module):
            from ..fingerprint import model_fingerprint

            fingerprint = model_fingerprint(self.model)
        return {"driver": "core", "model_fingerprint": fingerprint, "seeds": self.seeds,
                "conditions": digest(*(c for c in (self.cond, self.null_cond) if c is not None)),
                **({} if self.check_cond is None else {"check_conditions": digest(self.check_cond)}),
                "latent_shape": list(self.latent_shape), "num_inference_steps": self.num_inference_steps,
                "shift": self.shift, "guidance_scale": self.guidance_scale, "dtype": str(self.noise.dtype)}

    def twin(self) -> CoreDriver:
        """The set for the fresh-noise check (:mod:`.fresh`): its conditions under fresh noise seeds, then, with a
        null condition (CFG), as many rows of the null condition (the unconditional prompt) under other fresh
        seeds (``2N`` rows, or ``N`` without one), then the ``M`` rows of ``check_cond`` (other conditions, the
        set was not fitted to) under their own seeds (:func:`other_seeds`)."""
        twin = copy.copy(self)
        unconditional = self.cond is not None and self.null_cond is not None
        m = self.check_rows
        twin.seeds = fresh_seeds(self.seeds) + (fresh_seeds(fresh_seeds(self.seeds)) if unconditional else []) \
            + other_seeds(self.seeds, m)
        twin.noise = seeded_noise(twin.seeds, self.latent_shape, self.noise.dtype, self.noise.device)
        if self.cond is not None:
            parts = [self.cond] + [c for c in (self.null_cond if unconditional else None, self.check_cond)
                                   if c is not None]
            twin.cond = torch.cat(parts)
        if self.null_cond is not None:
            null_rows = self.null_cond[:1].expand(m, *self.null_cond.shape[1:])
            twin.null_cond = torch.cat([self.null_cond, *([self.null_cond] if unconditional else []), null_rows])
        twin.size = len(twin.seeds)
        twin.unconditional_rows = self.size if unconditional else 0
        twin.other_rows = m
        twin.last_model_calls = 0
        return twin

    def recorded(self) -> dict[str, Any]:
        return {}

    def restore(self, recorded: dict[str, Any]) -> None:
        pass

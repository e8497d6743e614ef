"""Open-Sora 1.2 (its own codebase, not on PyPI) through the generic velocity API.

Open-Sora 1.2 samples with its rectified-flow scheduler ``RFLOW``: timesteps
``1000 (1 - i/T)``, each passed through a resolution- and frame-dependent transform,
``t' = r t / (1 + (r - 1) t)`` with ``r = sqrt(H W / 512^2) * sqrt(F // 17 * 5) * scale``
(``F`` video frames; ``sqrt(1)`` for an image), then Euler steps
``z <- z + v_os (t_i - t_{i+1})``. Its STDiT3 is called as ``model(z, 1000 t, y=...,
mask=..., height=..., width=..., num_frames=..., fps=...)`` and predicts learned-sigma
channels ``2C``, of which the first ``C`` are ``v_os = x_0 - noise``.

So, in ertacache's terms (Eq. 1-4: ``x_t = (1 - t) x_0 + t noise``, ``v = noise - x_0``):
the grid is :func:`~ertacache.core.grids.time_grid` with ``shift = r``
(:func:`opensora_shift`), and ``v = -v_os[:, :C]`` (:class:`OpenSoraVelocity`).
Nothing here imports Open-Sora; ``tests/test_opensora.py`` checks all of it on a small
stand-in with STDiT3's calling convention and against Open-Sora's own sampling loop,
written out from its ``RFLOW.sample``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..errors import ErtaCacheError


def opensora_shift(height: int, width: int, num_frames: int, *, base_resolution: int = 512 * 512,
                   scale: float = 1.0) -> float:
    """Open-Sora 1.2's timestep-transform ratio ``r`` for a video of ``num_frames`` frames of ``height x width`` pixels.

    Raises:
        ErtaCacheError: a non-positive size, or fewer than 17 frames of a video (Open-Sora's transform gives 0).
    """
    if height < 1 or width < 1 or num_frames < 1:
        raise ErtaCacheError(f"height, width and num_frames must be >= 1, got {height}, {width}, {num_frames}")
    frames = 1 if num_frames == 1 else num_frames // 17 * 5
    if frames == 0:
        raise ErtaCacheError(f"Open-Sora's transform needs 1 or >= 17 frames, got {num_frames}")
    return math.sqrt(height * width / base_resolution) * math.sqrt(frames) * scale


class OpenSoraVelocity:
    """An STDiT3-like model as a velocity function: ``v(x, t, y) = -model(x, 1000 t, y)[:, :C]``.

    Args:
        model: called as ``model(x, timestep, y=cond, mask=mask, **model_kwargs)``;
            returns ``(B, 2C, F, H, W)`` (learned sigma) or ``(B, C, F, H, W)``.
        mask: the text-token mask ``(B, L)`` or None; a batch of another size (the
            unconditional branch) gets it repeated, as STDiT3 does.
        model_kwargs: per-video tensors Open-Sora passes (``height``, ``width``,
            ``num_frames``, ``fps``): scalars or ``(1,)`` tensors, expanded to each batch.
    """

    def __init__(self, model: Any, mask: Tensor | None = None, **model_kwargs: Any) -> None:
        self.model, self.mask, self.model_kwargs = model, mask, model_kwargs

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        if cond is None:
            raise ErtaCacheError("Open-Sora needs the text embeddings y as cond (and y_null as null_cond)")
        b = x.shape[0]
        kwargs = {k: torch.as_tensor(v, device=x.device).reshape(-1)[:1].expand(b) for k, v in
                  self.model_kwargs.items()}
        mask = self.mask
        if mask is not None and mask.shape[0] != b:
            mask = mask[:1].expand(b, -1)
        out = self.model(x, t * 1000, y=cond, mask=mask, **kwargs)
        return -out[:, : x.shape[1]]

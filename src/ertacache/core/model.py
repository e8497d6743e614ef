"""What the core asks of a model: a velocity function, optionally split in three.

The core never imports model code. It calls a *velocity function*
``v(x, t, cond) -> v`` (flow matching, Eq. 1-4 of the paper), and, for the
``block_residual`` reuse mode (docs/method.md section 1), a model that can be split into
its cheap input embedding, its expensive block stack and its cheap output head.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class VelocityFn(Protocol):
    """A flow-matching velocity field ``v_theta(x, t, cond)``.

    Args:
        x: the sampler's state, shape ``(B, *latent_shape)``.
        t: times in [0, 1] (t = 1 is noise), shape ``(B,)``, float.
        cond: the condition for each sample, first dimension ``B``; the null
            condition for the unconditional branch of classifier-free guidance.

    Returns:
        The velocity ``dx/dt``, same shape and dtype as ``x``.
    """

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor: ...


@runtime_checkable
class SplitVelocityModel(Protocol):
    """A velocity model split as ``head(blocks(embed(x, t, cond)))``.

    ``embed`` and ``head`` are the cheap parts a cached step still runs; ``blocks``
    is the transformer's block stack, skipped at a cached step by adding the cached
    block residual ``r = h_out - h_in`` (docs/method.md section 1, ``block_residual``).
    ``ctx`` is whatever the three parts share (time embedding, text tokens, ...).
    """

    def embed(self, x: Tensor, t: Tensor, cond: Tensor | None) -> tuple[Tensor, Any]:
        """Return ``(h_in, ctx)``: image-token hidden states after the input embedding."""
        ...

    def blocks(self, h: Tensor, ctx: Any) -> Tensor:
        """Return ``h_out``, the image-token hidden states after the last block."""
        ...

    def head(self, h: Tensor, ctx: Any) -> Tensor:
        """Return the velocity (shape of ``x``) from hidden states ``h``."""
        ...


def is_split(model: object) -> bool:
    """True when ``model`` offers ``embed``, ``blocks`` and ``head``."""
    return all(callable(getattr(model, name, None)) for name in ("embed", "blocks", "head"))


def call_velocity(model: Any, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
    """Evaluate the full model once (all blocks), split or not."""
    if is_split(model):
        h, ctx = model.embed(x, t, cond)
        return torch.as_tensor(model.head(model.blocks(h, ctx), ctx))
    return torch.as_tensor(model(x, t, cond))

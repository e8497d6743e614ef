"""TeaCache (Liu et al. 2025, "Timestep Embedding Tells: It's Time to Cache"), our implementation.

The published algorithm: at every step take the first block's *modulated input*
(its AdaLN-normalised hidden states), measure its relative L1 change against the
previous step, map that through a polynomial fitted offline (input change -> output
change), and accumulate. While the accumulated estimate stays below a threshold the
block stack is skipped and its last residual ``h_out - h_in`` is added instead;
otherwise the blocks run, the residual is refreshed and the accumulator resets. The
first and last steps always compute.

Here it wraps a :class:`~ertacache.core.model.SplitVelocityModel`, so it runs under the
same Euler sampler as everything else; the decision is taken over the whole batch
(both guidance branches), as TeaCache's ``mean()`` over the batch tensor does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..core.euler import sample

ModulatedInput = Callable[[Tensor, Any], Tensor]


def rel_l1(a: Tensor, b: Tensor) -> float:
    """TeaCache's ``mean|a - b| / mean|b|``."""
    return float((a - b).abs().mean() / b.abs().mean().clamp_min(1e-12))


class TeaCacheModel:
    """A split model whose ``blocks`` TeaCache may skip.

    Args:
        model: the split model.
        modulated_input: ``(h, ctx) -> modulated input`` of the first block.
        threshold: the accumulated-change threshold (``rel_l1_thresh``); 0 computes every step.
        coefficients: the rescaling polynomial, highest power first (``numpy.polyval`` order).
        first_t, last_t: the times of the first and last steps, which always compute.
    """

    def __init__(self, model: Any, modulated_input: ModulatedInput, threshold: float,
                 coefficients: Sequence[float], first_t: float, last_t: float) -> None:
        self.model = model
        self.modulated_input = modulated_input
        self.threshold = threshold
        self.coefficients = list(coefficients)
        self.first_t, self.last_t = first_t, last_t
        self.reset()

    def reset(self) -> None:
        self.accumulated = 0.0
        self.previous: Tensor | None = None
        self.residual: Tensor | None = None
        self.nfe = 0
        self._t = 1.0

    def embed(self, x: Tensor, t: Tensor, cond: Tensor | None) -> tuple[Tensor, Any]:
        self._t = float(t[0])
        return self.model.embed(x, t, cond)

    def blocks(self, h: Tensor, ctx: Any) -> Tensor:
        mod = self.modulated_input(h, ctx)
        edge = min(abs(self._t - self.first_t), abs(self._t - self.last_t)) < 1e-6  # t arrives as float32
        compute = edge or self.previous is None or self.residual is None
        if not compute:
            assert self.previous is not None
            self.accumulated += float(np.polyval(self.coefficients, rel_l1(mod, self.previous)))
            compute = self.accumulated >= self.threshold
        self.previous = mod
        if not compute:
            assert self.residual is not None
            return h + self.residual
        self.accumulated = 0.0
        self.nfe += 1
        out = self.model.blocks(h, ctx)
        self.residual = out - h
        return out

    def head(self, h: Tensor, ctx: Any) -> Tensor:
        return self.model.head(h, ctx)

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        h, ctx = self.embed(x, t, cond)
        return self.head(self.blocks(h, ctx), ctx)


@torch.no_grad()
def fit_coefficients(model: Any, modulated_input: ModulatedInput, noise: Tensor, cond: Tensor | None,
                     num_inference_steps: int, guidance_scale: float = 1.0, null_cond: Tensor | None = None,
                     shift: float = 1.0, degree: int = 4) -> list[float]:
    """Fit TeaCache's polynomial the way its authors describe, on calibration conditions only.

    Runs the uncached sampler and pairs, for consecutive steps, the relative L1
    change of the first block's modulated input with that of the model output;
    ``numpy.polyfit`` of degree ``degree`` maps the first to the second.
    """
    records: list[tuple[Tensor, Tensor]] = []

    class Recorder:
        def embed(self, x: Tensor, t: Tensor, c: Tensor | None) -> tuple[Tensor, Any]:
            return model.embed(x, t, c)

        def blocks(self, h: Tensor, ctx: Any) -> Tensor:
            self._mod = modulated_input(h, ctx)
            return model.blocks(h, ctx)

        def head(self, h: Tensor, ctx: Any) -> Tensor:
            out = model.head(h, ctx)
            records.append((self._mod, out))
            return out

        def __call__(self, x: Tensor, t: Tensor, c: Tensor | None) -> Tensor:
            h, ctx = self.embed(x, t, c)
            return self.head(self.blocks(h, ctx), ctx)

    sample(Recorder(), noise, cond, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
           null_cond=null_cond, shift=shift)
    xs = [rel_l1(records[i][0], records[i - 1][0]) for i in range(1, len(records))]
    ys = [rel_l1(records[i][1], records[i - 1][1]) for i in range(1, len(records))]
    return [float(c) for c in np.polyfit(xs, ys, degree)]

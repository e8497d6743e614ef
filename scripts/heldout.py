"""What the measurement scripts share: a bundled model at a sampler, held-out conditions and seeds (10000..
unless given), the uncached samples there, and a policy's PSNR against them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ertacache import sample, seeded_noise
from ertacache.bench.methods import BenchSettings, Context
from ertacache.bench.metrics import psnr
from ertacache.models.bundled import bundled_model, labels_and_seeds


class Reference:
    """A bundled model at its sampler (T, CFG; ``shift`` or the model's), held-out ``labels`` and ``seeds`` (or
    ``per_class`` of each class, seeds 10000..), ``noise`` and ``ref``, the uncached samples there."""

    def __init__(self, name: str, shift: float | None = None, per_class: int = 4,
                 labels: torch.Tensor | None = None, seeds: Sequence[int] | None = None, threads: int = 2,
                 model: Any = None) -> None:
        torch.set_num_threads(threads)
        self.bundled = b = bundled_model(name)
        self.model = b.load(None) if model is None else model  # another reference's model: loaded once
        self.T, self.guidance_scale = b.num_inference_steps, b.guidance_scale
        self.shift = b.shift if shift is None else shift
        if labels is None or seeds is None:
            labels, seeds = labels_and_seeds(per_class, 10_000, b.num_classes)
        self.labels, self.seeds = labels, list(seeds)
        self.noise = seeded_noise(self.seeds, b.latent_shape)
        self.ref = self.sample(None)

    def sampler(self, labels: torch.Tensor) -> dict[str, Any]:
        """The sampler's keywords for conditions ``labels`` (the null condition of CFG beside them)."""
        return dict(num_inference_steps=self.T, shift=self.shift, guidance_scale=self.guidance_scale,
                    null_cond=torch.full_like(labels, self.bundled.null_class))

    @torch.no_grad()
    def sample(self, policy: Any) -> torch.Tensor:
        return sample(self.model, self.noise, self.labels, policy=policy, **self.sampler(self.labels)).x

    def score(self, policy: Any) -> float:
        """PSNR (dB, 2 decimals) of ``policy``'s samples against the uncached ones."""
        return round(psnr(self.sample(policy), self.ref), 2)


class HeldOut(Reference):
    """:class:`Reference` at the benchmark's settings, with ``settings`` and ``ctx`` (its calibration set and
    sampler keywords)."""

    def __init__(self, name: str) -> None:
        self.settings = BenchSettings.for_model(name)
        super().__init__(name, shift=self.settings.shift, per_class=self.settings.heldout_per_class)
        self.ctx = Context(self.model, self.settings, None, self.bundled)

"""What the measurement scripts share: a bundled model at the benchmark's settings, its held-out seeds
(10000..), the uncached samples there, and a policy's PSNR against them."""

from __future__ import annotations

from typing import Any

import torch

from ertacache import sample, seeded_noise
from ertacache.bench.methods import BenchSettings, Context
from ertacache.metrics import psnr
from ertacache.models.bundled import bundled_model, labels_and_seeds


class HeldOut:
    """``model``, ``ctx`` (calibration set and sampler keywords), ``settings``, ``seeds`` and :meth:`score`."""

    def __init__(self, name: str) -> None:
        torch.set_num_threads(2)
        self.settings = BenchSettings.for_model(name)
        bundled = bundled_model(name)
        self.model = bundled.load(None)
        self.ctx = Context(self.model, self.settings, None, bundled)
        self.labels, self.seeds = labels_and_seeds(self.settings.heldout_per_class, 10_000, bundled.num_classes)
        self.noise = seeded_noise(self.seeds, bundled.latent_shape)
        self.ref = self.sample(None)

    @torch.no_grad()
    def sample(self, policy: Any) -> torch.Tensor:
        return sample(self.model, self.noise, self.labels, policy=policy, **self.ctx.kwargs(self.labels)).x

    def score(self, policy: Any) -> float:
        """PSNR (dB, 2 decimals) of ``policy``'s samples against the uncached ones."""
        return round(psnr(self.sample(policy), self.ref), 2)

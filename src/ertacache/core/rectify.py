"""Explicit error rectification (Eq. 15-21): a closed-form least-squares fit of the cache error.

At a cached step the error ``eps = v~ - v`` is modelled as ``a * v~ + b`` (the
sigmoid model of Eq. 15 linearised by Eq. 17; docs/method.md section 4). The fit is
ordinary least squares from five additive sufficient statistics, so statistics
from several calibration chunks or processes can be summed before solving.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Rectification = Literal["linear", "sigmoid", "off"]
"""Eq. 15-21: ``v^ = v~ - (a v~ + b)`` (linearised, default), ``v~ - sigmoid(K v~ + B)``, or none."""
Granularity = Literal["step", "channel"]
"""One ``(a, b)`` per cached step and branch, or one per channel as well."""


@dataclass(frozen=True)
class ChannelLayout:
    """Where the channels of a model output lie, for per-channel rectification.

    Entries of axis ``dim`` belong to channel ``index // group``: ``(B, C, ...)``
    latents have ``dim=1, group=1``; FLUX's packed tokens ``(B, L, 4C)`` (2x2
    patches, channel-major) have ``dim=-1, group=4``.
    """

    dim: int = 1
    group: int = 1

    def view(self, x: Tensor) -> tuple[Tensor, int]:
        """``x`` viewed with the channel axis split out, and that axis' index."""
        d = self.dim % x.ndim
        if self.group == 1:
            return x, d
        return x.unflatten(d, (-1, self.group)), d


CHANNELS_FIRST = ChannelLayout()
"""``(B, C, ...)``: the core sampler's latents."""


def _reduce_dims(x: Tensor, granularity: Granularity, channel_dim: int) -> list[int]:
    return [d for d in range(x.ndim) if not (granularity == "channel" and d == channel_dim)]


@dataclass
class RectStats:
    """Sufficient statistics ``n, sum v~, sum eps, sum v~^2, sum v~ eps`` of one (step, branch).

    Each is float64 of shape ``(C,)``: C = 1 for ``granularity='step'``, the channel
    count (dimension 1 of ``x``) for ``'channel'``.
    """

    n: Tensor
    sv: Tensor
    se: Tensor
    svv: Tensor
    sve: Tensor

    @classmethod
    def of(cls, v_cached: Tensor, eps: Tensor, granularity: Granularity,
           layout: ChannelLayout = CHANNELS_FIRST) -> RectStats:
        """Statistics of cached velocities ``v_cached (B, C, ...)`` and errors ``eps`` (same shape).

        ``layout`` says where the channels are (``granularity='channel'``).
        """
        (v, d), (e, _) = layout.view(v_cached.detach().double()), layout.view(eps.detach().double())
        dims = _reduce_dims(v, granularity, d)
        sv = v.sum(dims).reshape(-1)
        return cls(
            n=torch.full_like(sv, v.numel() / sv.numel()),
            sv=sv,
            se=e.sum(dims).reshape(-1),
            svv=(v * v).sum(dims).reshape(-1),
            sve=(v * e).sum(dims).reshape(-1),
        )

    def __add__(self, other: RectStats) -> RectStats:
        return RectStats(*(getattr(self, k) + getattr(other, k) for k in ("n", "sv", "se", "svv", "sve")))

    def as_tensor(self) -> Tensor:
        """Stacked ``(5, C)`` for an all-reduce across processes."""
        return torch.stack([self.n, self.sv, self.se, self.svv, self.sve])

    @classmethod
    def from_tensor(cls, t: Tensor) -> RectStats:
        return cls(*t.unbind(0))

    def solve(self) -> tuple[Tensor, Tensor]:
        """Least squares ``eps ~ a v~ + b`` (Eq. 21 in ``a = K / 4``, ``b = B / 4 + 1/2`` form).

        ``a = S_ve / S_vv``, ``b = mean(eps) - a * mean(v~)``; ``S_vv = 0`` gives ``a = 0``.

        Returns:
            ``(a, b)``, float32 of shape ``(C,)``.
        """
        n = self.n.clamp_min(1)
        v_bar, e_bar = self.sv / n, self.se / n
        s_vv = self.svv - n * v_bar * v_bar
        s_ve = self.sve - n * v_bar * e_bar
        ok = s_vv > 1e-12 * self.svv.clamp_min(1e-300)
        a = torch.where(ok, s_ve / torch.where(ok, s_vv, torch.ones_like(s_vv)), torch.zeros_like(s_vv))
        b = e_bar - a * v_bar
        return a.float(), b.float()


def apply(v_cached: Tensor, a: Tensor, b: Tensor, form: Rectification,
          layout: ChannelLayout = CHANNELS_FIRST) -> Tensor:
    """The rectified velocity ``v^`` of Algorithm 1 line 17 (a new tensor).

    Args:
        v_cached: ``v~``, shape ``(B, C, ...)`` (or as ``layout`` says).
        a, b: shape ``(1,)`` or ``(C,)``.
        form: ``linear``: ``v~ - (a v~ + b)``; ``sigmoid``: ``v~ - sigmoid(K v~ + B)`` with
            ``K = 4a``, ``B = 4(b - 1/2)`` (Eq. 15, 21); ``off``: ``v~`` itself.
        layout: where the channels are, for ``(C,)`` coefficients.
    """
    if form == "off":
        return v_cached
    v, d = layout.view(v_cached) if a.numel() > 1 else (v_cached, 0)
    shape = [1] * v.ndim
    if a.numel() > 1:
        shape[d] = -1
    a_ = a.to(v).view(shape)
    b_ = b.to(v).view(shape)
    if form == "linear":
        out = v - (a_ * v + b_)
    else:
        out = v - torch.sigmoid(4 * a_ * v + 4 * (b_ - 0.5))
    return out.reshape(v_cached.shape)

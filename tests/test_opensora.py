"""Open-Sora 1.2 through the generic velocity API, on a small stand-in with STDiT3's calling convention."""

import math

import pytest
import torch
from torch import nn

from ertacache import Policy, calibrate, sample, seeded_noise, time_grid
from ertacache.core.config import CalibrationConfig
from ertacache.errors import ErtaCacheError
from ertacache.integrations.opensora import OpenSoraVelocity, opensora_shift


class TinySTDiT(nn.Module):
    """Spatial-temporal DiT stand-in: spatial then temporal self-attention per block, cross-attention to the text
    tokens (masked), timestep adaLN; ``forward(x, timestep, y, mask, ...)`` returns ``2C`` channels (learned sigma)."""

    def __init__(self, channels=4, dim=32, heads=2, depth=2, text_dim=16):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.c, self.dim = channels, dim
        self.patch = nn.Conv3d(channels, dim, (1, 2, 2), stride=(1, 2, 2))
        self.t_mlp = nn.Sequential(nn.Linear(64, dim), nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.y_proj = nn.Linear(text_dim, dim)
        self.spatial = nn.ModuleList(nn.MultiheadAttention(dim, heads, batch_first=True) for _ in range(depth))
        self.temporal = nn.ModuleList(nn.MultiheadAttention(dim, heads, batch_first=True) for _ in range(depth))
        self.cross = nn.ModuleList(nn.MultiheadAttention(dim, heads, batch_first=True) for _ in range(depth))
        self.out = nn.Linear(dim, 2 * channels * 4)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.05

    def forward(self, x, timestep, y, mask=None, x_mask=None, fps=None, height=None, width=None, num_frames=None):
        b, c, f, h, w = x.shape
        freqs = torch.exp(-math.log(10000) * torch.arange(32) / 32)
        temb = torch.cat([torch.sin(timestep[:, None] * freqs), torch.cos(timestep[:, None] * freqs)], dim=1)
        scale, shift = self.t_mlp(temb).chunk(2, dim=1)
        tok = self.patch(x)  # (B, D, F, h, w)
        hh, ww = tok.shape[-2:]
        tok = tok.permute(0, 2, 3, 4, 1).reshape(b, f, hh * ww, self.dim)
        text = self.y_proj(y.squeeze(1))  # y: (B, 1, L, text_dim)
        if mask is not None and mask.shape[0] != y.shape[0]:  # as STDiT3: one mask for both CFG halves
            mask = mask.repeat(y.shape[0] // mask.shape[0], 1)
        pad = None if mask is None else ~mask.bool()
        for sa, ta, ca in zip(self.spatial, self.temporal, self.cross):
            z = tok * (1 + scale[:, None, None]) + shift[:, None, None]
            s = z.reshape(b * f, hh * ww, self.dim)
            tok = tok + sa(s, s, s)[0].reshape(b, f, hh * ww, self.dim)
            tt = tok.transpose(1, 2).reshape(b * hh * ww, f, self.dim)
            tok = tok + ta(tt, tt, tt)[0].reshape(b, hh * ww, f, self.dim).transpose(1, 2)
            q = tok.reshape(b, f * hh * ww, self.dim)
            tok = tok + ca(q, text, text, key_padding_mask=pad)[0].reshape(b, f, hh * ww, self.dim)
        out = self.out(tok).reshape(b, f, hh, ww, 2 * c, 2, 2)
        return out.permute(0, 4, 1, 2, 5, 3, 6).reshape(b, 2 * c, f, h, w)


def opensora_rflow_sample(model, z, y, y_null, mask, T, guidance_scale, model_args):
    """Open-Sora 1.2's RFLOW.sample loop (use_timestep_transform=True), written out for a reference."""
    n = z.shape[0]
    timesteps = [torch.tensor([(1.0 - i / T) * 1000] * n) for i in range(T)]

    def transform(t):
        ratio_space = math.sqrt(model_args["height"] * model_args["width"] / (512 * 512))
        frames = 1 if model_args["num_frames"] == 1 else model_args["num_frames"] // 17 * 5
        ratio = ratio_space * math.sqrt(frames)
        t = t / 1000
        return ratio * t / (1 + (ratio - 1) * t) * 1000

    timesteps = [transform(t) for t in timesteps]
    kw = {k: torch.tensor([v] * 2 * n) for k, v in model_args.items()}
    for i, t in enumerate(timesteps):
        pred = model(torch.cat([z, z]), torch.cat([t, t]), y=torch.cat([y, y_null]), mask=mask, **kw)
        pred_cond, pred_uncond = pred.chunk(2, dim=1)[0].chunk(2, dim=0)
        v_pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
        dt = (timesteps[i] - timesteps[i + 1] if i < T - 1 else timesteps[i]) / 1000
        z = z + v_pred * dt[:, None, None, None, None]
    return z


ARGS = {"height": 720, "width": 1280, "num_frames": 51, "fps": 24}  # r = sqrt(3.52) * sqrt(15)


def test_shift_is_open_soras_transform():
    assert opensora_shift(512, 512, 1) == 1.0
    assert math.isclose(opensora_shift(720, 1280, 51), math.sqrt(720 * 1280 / 512**2) * math.sqrt(15))
    with pytest.raises(ErtaCacheError, match="1 or >= 17 frames"):
        opensora_shift(256, 256, 8)


def test_generic_api_reproduces_open_soras_sampler_and_caches():
    torch.manual_seed(0)
    model = TinySTDiT().eval()
    y = torch.randn(3, 1, 5, 16)
    y_null = torch.randn(1, 1, 5, 16).expand(3, -1, -1, -1)
    mask = torch.tensor([[1, 1, 1, 0, 0]] * 3)
    noise = seeded_noise([1, 2, 3], (4, 3, 8, 8))
    T, cfg = 12, 7.0
    shift = opensora_shift(ARGS["height"], ARGS["width"], ARGS["num_frames"])
    velocity = OpenSoraVelocity(model, mask, **ARGS)
    with torch.no_grad():
        ref = opensora_rflow_sample(model, noise, y, y_null, mask, T, cfg, ARGS)
        ours = sample(velocity, noise, y, num_inference_steps=T, shift=shift, guidance_scale=cfg, null_cond=y_null).x
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)  # same grid, sign, CFG and learned-sigma slice
        every = sample(velocity, noise, y, guidance_scale=cfg, null_cond=y_null,
                       policy=Policy.all_compute(T, shift=shift, branches=("cond", "uncond"), guidance_scale=cfg)).x
        assert torch.equal(every, ours)
        policy = calibrate(velocity, y, [10, 11, 12], latent_shape=(4, 3, 8, 8), num_inference_steps=T, shift=shift,
                           guidance_scale=cfg, null_cond=y_null, target_speedup=2.0,
                           config=CalibrationConfig(reuse="velocity"))
        assert policy.grid == tuple(time_grid(T, shift)) and policy.nfe <= T // 2
        out = sample(velocity, noise, y, guidance_scale=cfg, null_cond=y_null, policy=policy)
    assert out.stats.nfe == {"cond": policy.nfe, "uncond": policy.nfe} and torch.isfinite(out.x).all()

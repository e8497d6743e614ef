"""The bundled photo video model: diffusers' ``WanTransformer3DModel`` on a camera panning across photographs.

The video counterpart of :mod:`ertacache.models.photos`: each clip is 8 frames of 32x32
RGB in [-1, 1] of a window panning at a constant 1-3 px a frame (any direction, sub-pixel
bilinear) across one of the same 16 photographs, seen at one of three scales (the
photograph with short side 256, 128 or 64 px, antialiased), so the window covers 32 to
128 px of the 256-px photograph. The condition is the photograph (class
:data:`NULL_CLASS` is the unconditional branch of classifier-free guidance).

The network is :class:`~ertacache.models.moving_digits.MovingDigitsWan` with three
channels: Wan's architecture unchanged (patchify, 3D rotary embedding, cross-attention to
a learned 4-token "prompt" per photograph, AdaLN). Sampling defaults are Wan's
(:data:`SAMPLER`: T = 50, shift 5, CFG 4).
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import ErtaCacheError
from .moving_digits import MovingDigitsWan
from .photos import NUM_CLASSES, photographs

NULL_CLASS = NUM_CLASSES
FRAMES = 8
CANVAS = 32
LATENT_SHAPE = (3, FRAMES, CANVAS, CANVAS)
SAMPLER = {"num_inference_steps": 50, "shift": 5.0, "guidance_scale": 4.0}
"""Wan's sampling settings (shift 5 at 480p; T = 50)."""
LEVELS = (1, 2, 4)
"""Downscaling factors of the photographs a clip is cut from."""
TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=(2, 4, 4), num_attention_heads=2, attention_head_dim=48, in_channels=3, out_channels=3, text_dim=32,
    freq_dim=64, ffn_dim=256, num_layers=4, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    rope_max_seq_len=64,
)
WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "moving_photos_wan.safetensors"


@lru_cache(maxsize=1)
def _levels() -> tuple[tuple[Tensor, ...], ...]:
    out = []
    for photo in photographs():
        level = []
        for k in LEVELS:
            size = (photo.shape[-2] // k, photo.shape[-1] // k)
            level.append(photo if k == 1 else torch.nn.functional.interpolate(
                photo[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0])
        out.append(tuple(level))
    return tuple(out)


def panning_clips(labels: Tensor, generator: torch.Generator, speed_range: tuple[float, float] = (1.0, 3.0)
                  ) -> Tensor:
    """Clips ``(B, 3, FRAMES, CANVAS, CANVAS)`` in [-1, 1] of a window panning across photographs ``labels``.

    Each clip: a random scale of :data:`LEVELS`, a speed uniform in ``speed_range`` (px a
    frame, default 1-3) in a random direction, a start such that every frame stays inside
    the photograph where it can; bilinear sampling.
    """
    levels = _levels()
    b = labels.shape[0]
    level = torch.randint(0, len(LEVELS), (b,), generator=generator)
    lo, hi = speed_range
    speed = lo + (hi - lo) * torch.rand(b, generator=generator)
    angle = 2 * math.pi * torch.rand(b, generator=generator)
    start = torch.rand(b, 2, generator=generator)
    frames = torch.arange(FRAMES, dtype=torch.float32)
    out = []
    for i in range(b):
        photo = levels[int(labels[i])][int(level[i])]
        h, w = photo.shape[-2:]
        dy, dx = float(speed[i] * torch.sin(angle[i])), float(speed[i] * torch.cos(angle[i]))
        travel_y, travel_x = dy * (FRAMES - 1), dx * (FRAMES - 1)
        room_y, room_x = h - CANVAS - abs(travel_y), w - CANVAS - abs(travel_x)
        y0 = float(start[i, 0]) * max(room_y, 0.0) + max(-travel_y, 0.0)
        x0 = float(start[i, 1]) * max(room_x, 0.0) + max(-travel_x, 0.0)
        ys = y0 + dy * frames  # (F,) top-left corners in the photograph's pixels
        xs = x0 + dx * frames
        pix = torch.arange(CANVAS, dtype=torch.float32)
        rows = (ys[:, None] + pix[None]) / (h - 1) * 2 - 1  # (F, CANVAS), align_corners=True coordinates
        cols = (xs[:, None] + pix[None]) / (w - 1) * 2 - 1
        grid = torch.stack([cols[:, None, :].expand(-1, CANVAS, -1), rows[:, :, None].expand(-1, -1, CANVAS)], -1)
        clip = torch.nn.functional.grid_sample(photo[None].expand(FRAMES, -1, -1, -1), grid, mode="bilinear",
                                               padding_mode="border", align_corners=True)
        out.append(clip.transpose(0, 1))  # (3, F, H, W)
    return torch.stack(out).clamp(-1, 1)


class MovingPhotosWan(MovingDigitsWan):
    """Class-conditional video velocity model ``v(x (B, 3, 8, 32, 32), t (B,) in [0, 1], label (B,))``."""

    def __init__(self, transformer_config: dict[str, Any] | None = None) -> None:
        super().__init__(dict(TRANSFORMER_CONFIG if transformer_config is None else transformer_config),
                         num_classes=NUM_CLASSES)


def load_moving_photos_model(path: str | Path | None = None) -> MovingPhotosWan:
    """The bundled trained photo video model (eval mode, no grad), or weights at ``path``.

    Raises:
        ErtaCacheError: no weights there (train them: ``python -m training.train_moving_photos``),
            or weights of another architecture.
    """
    from safetensors.torch import load_file

    weights = Path(path) if path is not None else WEIGHTS
    if not weights.is_file():
        raise ErtaCacheError(f"no video-model weights at {weights}; train them with "
                             "python -m training.train_moving_photos")
    meta = weights.with_suffix(".json")
    config = json.loads(meta.read_text())["transformer_config"] if meta.is_file() else dict(TRANSFORMER_CONFIG)
    config["patch_size"] = tuple(config["patch_size"])
    model = MovingPhotosWan(config)
    try:
        model.load_state_dict(load_file(str(weights)))
    except RuntimeError as exc:
        raise ErtaCacheError(f"weights at {weights} do not fit the moving-photos architecture: {exc}") from exc
    return model.eval().requires_grad_(False)

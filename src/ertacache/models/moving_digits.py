"""The bundled video model: diffusers' ``WanTransformer3DModel`` trained on moving digits.

Data: scikit-learn's 8x8 digits, upscaled to 16x16, moving with a random constant
velocity on a 32x32 canvas and bouncing off its edges, 8 frames, in [-1, 1]. The model
is a class-conditional rectified flow in pixel space, ``x (B, 1, 8, 32, 32)``: Wan's
architecture unchanged (its patchify, 3D rotary embedding, cross-attention to the
condition, AdaLN), with the condition a learned 4-token "prompt" per class (class
:data:`NULL_CLASS` is the unconditional branch of classifier-free guidance).

Sampling defaults are Wan's: shift 5, T = 50 (:data:`SAMPLER`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ErtaCacheError
from .digits import NUM_CLASSES

NULL_CLASS = NUM_CLASSES
FRAMES = 8
CANVAS = 32
SPRITE = 16
LATENT_SHAPE = (1, FRAMES, CANVAS, CANVAS)
TEXT_TOKENS = 4
SAMPLER = {"num_inference_steps": 50, "shift": 5.0, "guidance_scale": 4.0}
"""Wan's sampling settings (shift 5 at 480p; T = 50), used by the demo and the benchmark."""

TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=(2, 4, 4), num_attention_heads=2, attention_head_dim=48, in_channels=1, out_channels=1, text_dim=32,
    freq_dim=64, ffn_dim=256, num_layers=4, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    rope_max_seq_len=64,
)
WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "moving_digits_wan.safetensors"


def digit_sprites() -> tuple[Tensor, Tensor]:
    """``(sprites (1797, 16, 16) in [0, 1], labels (1797,))`` from scikit-learn's digits (bilinear 8 -> 16)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    x = torch.nn.functional.interpolate(x, size=(SPRITE, SPRITE), mode="bilinear", align_corners=False)
    return x[:, 0].clamp(0, 1), torch.tensor(data.target, dtype=torch.long)


def bounce(start: Tensor, velocity: Tensor, frames: int, span: int) -> Tensor:
    """Positions ``(B, frames)`` of a point moving at ``velocity`` px/frame in ``[0, span]``, reflected at the ends."""
    raw = start[:, None] + velocity[:, None] * torch.arange(frames, dtype=torch.float32)[None]
    period = 2 * span
    folded = torch.remainder(raw, period)
    return torch.where(folded > span, period - folded, folded)


def moving_digits(sprites: Tensor, generator: torch.Generator) -> Tensor:
    """Clips ``(B, 1, FRAMES, CANVAS, CANVAS)`` in [-1, 1]: each sprite moving and bouncing (bilinear sub-pixel)."""
    b = sprites.shape[0]
    span = CANVAS - SPRITE
    start = torch.rand(b, 2, generator=generator) * span
    speed = 1.0 + 2.0 * torch.rand(b, generator=generator)  # 1-3 px per frame
    angle = 2 * math.pi * torch.rand(b, generator=generator)
    vel = torch.stack([speed * torch.cos(angle), speed * torch.sin(angle)], dim=1)
    ys, xs = bounce(start[:, 0], vel[:, 0], FRAMES, span), bounce(start[:, 1], vel[:, 1], FRAMES, span)
    # place with grid_sample: canvas pixel (i, j) reads sprite pixel (i - y, j - x)
    grid_i = torch.arange(CANVAS, dtype=torch.float32)
    rows = (grid_i[None, None, :] - ys[..., None]) / (SPRITE - 1) * 2 - 1  # (B, F, CANVAS)
    cols = (grid_i[None, None, :] - xs[..., None]) / (SPRITE - 1) * 2 - 1
    grid = torch.stack([cols[:, :, None, :].expand(-1, -1, CANVAS, -1),
                        rows[:, :, :, None].expand(-1, -1, -1, CANVAS)], dim=-1)  # (B, F, H, W, 2) as (x, y)
    src = sprites[:, None].expand(-1, FRAMES, -1, -1).reshape(b * FRAMES, 1, SPRITE, SPRITE)
    out = torch.nn.functional.grid_sample(src, grid.reshape(b * FRAMES, CANVAS, CANVAS, 2), mode="bilinear",
                                          padding_mode="zeros", align_corners=True)
    return out.view(b, FRAMES, 1, CANVAS, CANVAS).transpose(1, 2) * 2 - 1


def read_clips(clips: Tensor) -> tuple[Tensor, Tensor]:
    """What each frame shows: ``(classes (B, F), centres (B, F, 2))``.

    The centre is the bright pixels' centre of mass (row, col); the class is that of
    the nearest training sprite (1-NN, each sprite centred the same way) to the 16x16
    window around it. Used to check that samples show the requested digit moving smoothly.
    """
    sprites, labels = digit_sprites()
    sw = sprites.clamp_min(0.2) - 0.2
    g = torch.arange(SPRITE, dtype=torch.float32)
    sm = sw.sum((-1, -2)).clamp_min(1e-6)
    shift_r = ((SPRITE - 1) / 2 - (sw.sum(-1) * g).sum(-1) / sm + 0.5).floor().long()
    shift_c = ((SPRITE - 1) / 2 - (sw.sum(-2) * g).sum(-1) / sm + 0.5).floor().long()
    centred = torch.stack([torch.roll(sp, (int(a), int(b)), (0, 1)) for sp, a, b in zip(sprites, shift_r, shift_c)])
    x = ((clips[:, 0].clamp(-1, 1) + 1) / 2).float()  # (B, F, H, W)
    w = x.clamp_min(0.2) - 0.2
    grid = torch.arange(CANVAS, dtype=torch.float32)
    mass = w.sum((-1, -2)).clamp_min(1e-6)
    rows = (w.sum(-1) * grid).sum(-1) / mass
    cols = (w.sum(-2) * grid).sum(-1) / mass
    half = SPRITE // 2
    padded = torch.nn.functional.pad(x, (half, half, half, half))
    classes = torch.empty(x.shape[:2], dtype=torch.long)
    for b in range(x.shape[0]):
        for f in range(x.shape[1]):
            r, c = int((rows[b, f] + 0.5).floor()) + half, int((cols[b, f] + 0.5).floor()) + half
            window = padded[b, f, r - half:r + half, c - half:c + half]
            classes[b, f] = labels[((window[None] - centred) ** 2).flatten(1).sum(1).argmin()]
    return classes, torch.stack([rows, cols], dim=-1)



def clip_scores(clips: Tensor, labels: Tensor) -> dict[str, float]:
    """How well clips ``(B, 1, F, H, W)`` show digit ``labels (B,)`` moving smoothly, by :func:`read_clips`.

    Returns:
        ``frames``: fraction of frames read as the label; ``clips``: fraction of clips whose
        majority reading is the label; ``jumps``: fraction of frame-to-frame moves over 4 px
        (the training clips move 1-3 px a frame); ``largest_move``: in px.
    """
    classes, centres = read_clips(clips)
    moves = (centres[:, 1:] - centres[:, :-1]).norm(dim=-1)
    return {"frames": (classes == labels[:, None]).float().mean().item(),
            "clips": (classes.mode(1).values == labels).float().mean().item(),
            "jumps": (moves > 4.0).float().mean().item(), "largest_move": moves.max().item()}

@dataclass
class _Ctx:
    encoder_hidden_states: Tensor
    temb: Tensor
    timestep_proj: Tensor
    rotary: Any
    shape: tuple[int, ...]


class MovingDigitsWan(nn.Module):
    """Class-conditional video velocity model ``v(x, t, label)`` around a ``WanTransformer3DModel``.

    Implements :class:`ertacache.core.model.VelocityFn` (``__call__``: ``x (B, 1, 8, 32, 32)``,
    ``t (B,)`` in [0, 1], t = 1 noise; labels ``(B,)`` in 0..10) and
    :class:`ertacache.core.model.SplitVelocityModel` (``embed``/``blocks``/``head``, the
    transformer's own forward in three parts).
    """

    def __init__(self, transformer_config: dict[str, Any] | None = None, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        from diffusers import WanTransformer3DModel

        config = dict(TRANSFORMER_CONFIG if transformer_config is None else transformer_config)
        self.transformer: Any = WanTransformer3DModel(**config)
        self.num_classes, self.null_class = num_classes, num_classes
        self.text_tokens = nn.Embedding(num_classes + 1, TEXT_TOKENS * config["text_dim"])
        nn.init.normal_(self.text_tokens.weight, std=0.5)

    def prompt_embeds(self, labels: Tensor) -> Tensor:
        """Wan-style ``prompt_embeds (B, 4, text_dim)`` of class labels (``num_classes``: unconditional).

        Raises:
            ErtaCacheError: a label outside 0..num_classes.
        """
        labels = labels.long()
        if labels.numel() and (labels.min() < 0 or labels.max() > self.null_class):
            raise ErtaCacheError(f"class labels must be in 0..{self.null_class} ({self.null_class} is the null class); "
                                 f"got {labels.min().item()}..{labels.max().item()}")
        return self.text_tokens(labels).view(labels.shape[0], TEXT_TOKENS, -1)

    def _labels(self, x: Tensor, cond: Tensor | None) -> Tensor:
        return cond if cond is not None else torch.full((x.shape[0],), self.null_class, device=x.device)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        return self.transformer(hidden_states=x, timestep=t * 1000, return_dict=False,
                                encoder_hidden_states=self.prompt_embeds(self._labels(x, cond)))[0]

    def transformer_forward(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        """The velocity through ``WanTransformer3DModel.forward`` itself (hooks see a pipeline's call)."""
        return self.forward(x, t, cond)

    def embed(self, x: Tensor, t: Tensor, cond: Tensor | None) -> tuple[Tensor, _Ctx]:
        """Patch embedding and conditioning (the first part of the transformer's forward)."""
        tf = self.transformer
        rotary = tf.rope(x)
        h = tf.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()
        temb, proj, enc, _ = tf.condition_embedder(t * 1000, self.prompt_embeds(self._labels(x, cond)), None)
        return h, _Ctx(enc, temb, proj.unflatten(1, (6, -1)), rotary, tuple(x.shape))

    def blocks(self, h: Tensor, ctx: _Ctx) -> Tensor:
        for block in self.transformer.blocks:
            h = block(h, ctx.encoder_hidden_states, ctx.timestep_proj, ctx.rotary)
        return h

    def head(self, h: Tensor, ctx: _Ctx) -> Tensor:
        """Output norm, projection and unpatchify to ``(B, 1, 8, 32, 32)``."""
        tf = self.transformer
        shift, scale = (tf.scale_shift_table + ctx.temb.unsqueeze(1)).chunk(2, dim=1)
        h = (tf.norm_out(h.float()) * (1 + scale) + shift).type_as(h)
        h = tf.proj_out(h)
        b, _, f, hh, ww = ctx.shape
        p_t, p_h, p_w = tf.config.patch_size
        h = h.reshape(b, f // p_t, hh // p_h, ww // p_w, p_t, p_h, p_w, -1)
        return h.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)


def load_moving_digits_model(path: str | Path | None = None) -> MovingDigitsWan:
    """The bundled trained video model (eval mode, no grad), or weights at ``path``.

    Raises:
        ErtaCacheError: no weights there (train them: ``python -m training.train_moving_digits``).
    """
    from safetensors.torch import load_file

    weights = Path(path) if path is not None else WEIGHTS
    if not weights.is_file():
        raise ErtaCacheError(f"no video-model weights at {weights}; train them with "
                             "python -m training.train_moving_digits")
    meta = weights.with_suffix(".json")
    config = json.loads(meta.read_text())["transformer_config"] if meta.is_file() else TRANSFORMER_CONFIG
    config["patch_size"] = tuple(config["patch_size"])
    model = MovingDigitsWan(config)
    model.load_state_dict(load_file(str(weights)))
    return model.eval().requires_grad_(False)


def moving_digits_wan_pipeline(model: MovingDigitsWan, shift: float = SAMPLER["shift"]) -> Any:
    """The video model as a diffusers ``WanPipeline`` (no VAE, no text encoder; ``output_type="latent"``).

    Without a VAE the pipeline assumes Wan's 4x temporal and 8x spatial compression:
    call it with ``num_frames=29, height=256, width=256`` for the model's ``(8, 32, 32)``
    frames, and ``prompt_embeds``/``negative_prompt_embeds`` from
    :meth:`MovingDigitsWan.prompt_embeds`.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    return WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler, transformer=model.transformer)


PIPELINE_SIZE = {"num_frames": (FRAMES - 1) * 4 + 1, "height": CANVAS * 8, "width": CANVAS * 8}
"""The ``WanPipeline`` call size that gives the model's frames (see :func:`moving_digits_wan_pipeline`)."""


def wan_modulated_input(transformer: Any) -> Callable[[Tensor, Any], Tensor]:
    """The modulated input of Wan's first block, ``norm1(h) * (1 + scale_msa) + shift_msa`` (its self-attention's
    input): what TeaCache measures on Wan (:mod:`ertacache.peers.teacache`)."""
    block = transformer.blocks[0]

    def modulated(h: Tensor, ctx: Any) -> Tensor:
        shift, scale = (block.scale_shift_table + ctx.timestep_proj.float()).chunk(6, dim=1)[:2]
        return (block.norm1(h.float()) * (1 + scale) + shift).type_as(h)

    return modulated

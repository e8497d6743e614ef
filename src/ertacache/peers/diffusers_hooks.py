"""diffusers' built-in cache methods on the bundled model, through their public API.

FirstBlockCache, TaylorSeerCache, MagCache, PyramidAttentionBroadcast and FasterCache
are enabled with ``transformer.enable_cache(config)`` on the unchanged
``FluxTransformer2DModel``; the velocity calls ``transformer.forward`` inside
``cache_context`` exactly as a pipeline does. Both guidance branches go through one
forward, ordered ``[uncond, cond]`` as diffusers' batched-CFG pipelines order them.

FasterCache runs without its CFG reuse: that part needs an image-shaped output,
and FLUX packs its output into tokens.

NFE here counts forwards of the last block's attention (its query projection), per
sample and branch: the block stack's work that a method did not skip.
"""

from __future__ import annotations

import ast
import contextlib
import io
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..core.euler import sample
from .registry import PEERS, Where, peer, peers, setting_label

__all__ = ["TransformerVelocity", "calibrate_magcache", "magcache_ratios", "peer_config", "peer_settings",
           "run_with_cache", "setting_label"]


class TransformerVelocity:
    """``v(x, t, cond)`` through the transformer's own ``forward`` of a bundled model (``transformer_forward``).

    ``timestep`` holds the current diffusers timestep (``1000 t``) for the
    ``current_timestep_callback`` of PAB and FasterCache.

    Args:
        digits: a bundled model (:mod:`ertacache.models.bundled`).
        counted: a module that runs once per block-stack forward (the last block's
            attention query); its calls are the NFE a peer spent.
    """

    def __init__(self, digits: Any, counted: torch.nn.Module | None = None) -> None:
        self.digits = digits
        self.transformer = digits.transformer
        self.timestep = 1000.0
        self.attention_calls = 0
        last = counted if counted is not None else self.transformer.single_transformer_blocks[-1].attn.to_q
        last.register_forward_hook(self._count)

    def _count(self, *_: Any) -> None:
        self.attention_calls += 1

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        self.timestep = float(t[0]) * 1000
        n = x.shape[0] // 2
        # diffusers' batched CFG puts the unconditional half first; ertacache's sampler puts cond first
        swap = cond is not None and n > 0 and x.shape[0] == 2 * n
        if swap:
            x, t, cond = _halves_swapped(x), _halves_swapped(t), _halves_swapped(cond)  # type: ignore[arg-type]
        with self.transformer.cache_context("cond_uncond"):
            v = self.digits.transformer_forward(x, t, cond)
        return _halves_swapped(v) if swap else v


def _halves_swapped(x: Tensor) -> Tensor:
    a, b = x.chunk(2)
    return torch.cat([b, a])


def peer_settings(quick: bool, mag_ratios: list[float] | None, where: Where = "core"
                  ) -> list[tuple[str, dict[str, Any]]]:
    """``(peer name, setting)`` over the sweep of every diffusers peer of the registry that runs ``where``
    (:mod:`.registry`); MagCache only with ``mag_ratios`` (its own calibration run's)."""
    out = []
    for p in peers(where, "diffusers_hook"):
        if p.prepare == "mag_ratios" and mag_ratios is None:
            continue
        for setting in p.sweep(quick):
            out.append((p.name, {**setting, "mag_ratios": mag_ratios} if p.prepare == "mag_ratios" else setting))
    return out


def peer_config(name: str, setting: dict[str, Any], timestep: Callable[[], float], num_inference_steps: int,
                packed_tokens: bool = True) -> Any:
    """The diffusers config of a peer method at one setting.

    Args:
        timestep: the current diffusers timestep (``1000 t``), for PAB's and FasterCache's callbacks.
        packed_tokens: the transformer's output is packed tokens (FLUX), where FasterCache's CFG reuse
            cannot run (it splits the output into frequencies as an image); a pipeline's own layout else.

    Raises:
        ValueError: a name that is not a diffusers peer of the registry.
    """
    from diffusers.hooks import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )

    def current() -> int:
        return int(timestep())

    faster: dict[str, Any] = dict(tensor_format="BCHW", is_guidance_distilled=False,
                  unconditional_batch_timestep_skip_range=(-1, -1)) if packed_tokens else {}
    builders: dict[str, Callable[[], Any]] = {
        "first_block_cache": lambda: FirstBlockCacheConfig(**setting),
        "taylorseer": lambda: TaylorSeerCacheConfig(taylor_factors_dtype=torch.float32, **setting),
        "magcache": lambda: MagCacheConfig(num_inference_steps=num_inference_steps, **setting),
        "pab": lambda: PyramidAttentionBroadcastConfig(current_timestep_callback=current, **setting),
        "fastercache": lambda: FasterCacheConfig(current_timestep_callback=current,
                                                 attention_weight_callback=lambda _: 0.5, **faster, **setting),
    }
    if peer(name).kind != "diffusers_hook":
        hooks = [p.name for p in PEERS if p.kind == "diffusers_hook"]
        raise ValueError(f"{name!r} is not a diffusers peer; those are {hooks}")
    return builders[name]()


def run_with_cache(velocity: TransformerVelocity, config: Any, run: Callable[[Any], Tensor]) -> tuple[Tensor, int]:
    """Enable ``config``, run ``run(velocity)``, disable; return the output and the attention-call count."""
    tf = velocity.transformer
    tf.enable_cache(config)
    try:
        tf._reset_stateful_cache()
        velocity.attention_calls = 0
        x = run(velocity)
        return x, velocity.attention_calls
    finally:
        tf.disable_cache()


def calibrate_magcache(transformer: Any, num_inference_steps: int, run: Callable[[], object]) -> list[float]:
    """MagCache's own calibration mode on ``transformer`` during ``run()`` (one sampling run on calibration
    conditions); the ratios it prints for the user to paste back are parsed instead.

    Raises:
        RuntimeError: MagCache printed no ratios.
    """
    from diffusers.hooks import MagCacheConfig

    buf = io.StringIO()
    transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=num_inference_steps))
    try:
        transformer._reset_stateful_cache()
        with contextlib.redirect_stdout(buf):
            run()
    finally:
        transformer.disable_cache()
    lists = [line for line in buf.getvalue().splitlines() if line.strip().startswith("[")]
    if not lists:
        raise RuntimeError(f"MagCache calibration printed no ratios: {buf.getvalue()[:500]!r}")
    return [float(r) for r in ast.literal_eval(lists[-1].strip())]


def magcache_ratios(velocity: TransformerVelocity, noise: Tensor, cond: Tensor, null_cond: Tensor,
                    num_inference_steps: int, guidance_scale: float, shift: float) -> list[float]:
    """:func:`calibrate_magcache` on the bundled model's calibration conditions."""
    return calibrate_magcache(velocity.transformer, num_inference_steps, lambda: sample(
        velocity, noise, cond, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
        null_cond=null_cond, shift=shift))

"""The bundled trained models, as data: what the demo, the benchmark and the CLI need of each.

- ``digits``: a ``FluxTransformer2DModel`` on 16x16 digits (image), sampled as FLUX is:
  T = 30 on a time-shifted grid, shift 3 (FLUX's resolution-dependent shift is
  about 3.2 at 1024x1024), CFG 3.
- ``moving-digits``: a ``WanTransformer3DModel`` on 8-frame 32x32 moving digits
  (video), sampled as Wan is: T = 50, shift 5, CFG 4.
- ``photos``: the FLUX architecture on 32x32 RGB crops of 16 photographs (textures and
  edges, where caching hurts more), sampled as FLUX is: T = 30, shift 3, CFG 3.5.
- ``moving-photos``: the Wan architecture on 8-frame 32x32 RGB clips of a camera panning
  across the same photographs, sampled as Wan is: T = 50, shift 5, CFG 4.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import ErtaCacheError


@dataclass(frozen=True)
class BundledModel:
    """One bundled model and its family's sampling settings.

    Attributes:
        name: one of :data:`MODELS`.
        latent_shape: one sample's state, e.g. ``(1, 16, 16)`` or ``(1, 8, 32, 32)``.
        num_inference_steps, shift, guidance_scale: the realistic sampler defaults.
        video: samples are ``(C, F, H, W)`` clips.
        load: ``load(path or None) -> model`` (eval, no grad).
        pipeline: ``pipeline(model, shift) -> diffusers pipeline`` around the same transformer.
        pipeline_sample: ``(pipe, model, noise, labels, T, guidance_scale) -> x`` in the
            core's layout, through the pipeline's own ``__call__`` (true CFG).
        counted: ``counted(model) -> module`` run once per block-stack forward (NFE of peers).
        modulated_input: TeaCache's first-block modulated input for the model's transformer.
        num_classes: conditioning classes (labels ``0..num_classes - 1``); label ``num_classes``
            is the null class of classifier-free guidance.
        calibration_size: the calibration samples the command line uses by default, from the
            measured N-curve (docs/calibration.md, "How many prompts"): about 4 are enough on
            the image models; the video models need about 20 for calibration to resolve a
            searched schedule's gain. Rounded up to whole classes.
    """

    name: str
    latent_shape: tuple[int, ...]
    num_inference_steps: int
    shift: float
    guidance_scale: float
    video: bool
    load: Callable[[str | None], Any]
    pipeline: Callable[[Any, float], Any]
    pipeline_sample: Callable[[Any, Any, Tensor, Tensor, int, float], Tensor]
    counted: Callable[[Any], torch.nn.Module]
    modulated_input: Callable[[Any], Any]
    num_classes: int = 10

    @property
    def calibration_size(self) -> int:
        return self.calibration_per_class * self.num_classes

    @property
    def calibration_per_class(self) -> int:
        """Samples per class of the default calibration set (:attr:`calibration_size`)."""
        wanted = 20 if self.video else 4
        return -(-wanted // self.num_classes)

    @property
    def null_class(self) -> int:
        """The unconditional label (classifier-free guidance's null branch)."""
        return self.num_classes

    @property
    def sampler(self) -> dict[str, Any]:
        """``num_inference_steps``, ``guidance_scale`` and ``shift``: the keywords of the settings classes."""
        return dict(num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                    shift=self.shift)


def _flux(name: str, latent_shape: tuple[int, ...], T: int, shift: float, cfg: float, load: Callable[[str | None], Any],
          num_classes: int) -> BundledModel:
    from .digits import digits_flux_pipeline, flux_modulated_input, pack, unpack

    def pipeline(model: Any, shift: float) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        pipe = digits_flux_pipeline(model)
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline_sample(pipe: Any, model: Any, noise: Tensor, labels: Tensor, steps: int, cfg: float) -> Tensor:
        tokens, pooled = model.prompt_embeds(labels)
        null_tokens, null_pooled = model.prompt_embeds(torch.full_like(labels, num_classes))
        out = pipe(prompt_embeds=tokens, pooled_prompt_embeds=pooled, negative_prompt_embeds=null_tokens,
                   negative_pooled_prompt_embeds=null_pooled, true_cfg_scale=cfg, latents=pack(noise),
                   num_inference_steps=steps, height=noise.shape[-2], width=noise.shape[-1], output_type="latent")
        return unpack(out.images, noise.shape[-2], noise.shape[-1])

    return BundledModel(name, latent_shape, T, shift, cfg, False, load, pipeline, pipeline_sample,
                        lambda m: m.transformer.single_transformer_blocks[-1].attn.to_q,
                        lambda m: flux_modulated_input(m.transformer), num_classes)


def _digits() -> BundledModel:
    from .digits import LATENT_SHAPE, NUM_CLASSES, load_digits_model

    return _flux("digits", LATENT_SHAPE, 30, 3.0, 3.0, load_digits_model, NUM_CLASSES)


def _photos() -> BundledModel:
    from .photos import LATENT_SHAPE, NUM_CLASSES, SAMPLER, load_photos_model

    return _flux("photos", LATENT_SHAPE, int(SAMPLER["num_inference_steps"]), SAMPLER["shift"],
                 SAMPLER["guidance_scale"], load_photos_model, NUM_CLASSES)


def _wan(name: str, latent_shape: tuple[int, ...], sampler: dict[str, float], load: Callable[[str | None], Any],
         num_classes: int) -> BundledModel:
    from .moving_digits import moving_digits_wan_pipeline, wan_modulated_input

    def pipeline(model: Any, shift: float) -> Any:
        pipe = moving_digits_wan_pipeline(model, shift)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline_sample(pipe: Any, model: Any, noise: Tensor, labels: Tensor, steps: int, cfg: float) -> Tensor:
        _, f, h, w = noise.shape[1:]
        out = pipe(prompt_embeds=model.prompt_embeds(labels),
                   negative_prompt_embeds=model.prompt_embeds(torch.full_like(labels, num_classes)),
                   guidance_scale=cfg, latents=noise, num_inference_steps=steps, num_frames=(f - 1) * 4 + 1,
                   height=h * 8, width=w * 8, output_type="latent")
        return torch.as_tensor(out.frames)

    return BundledModel(name, latent_shape, int(sampler["num_inference_steps"]), sampler["shift"],
                        sampler["guidance_scale"], True, load, pipeline, pipeline_sample,
                        lambda m: m.transformer.blocks[-1].attn1.to_q,
                        lambda m: wan_modulated_input(m.transformer), num_classes)


def _moving_digits() -> BundledModel:
    from .moving_digits import LATENT_SHAPE, NUM_CLASSES, SAMPLER, load_moving_digits_model

    return _wan("moving-digits", LATENT_SHAPE, SAMPLER, load_moving_digits_model, NUM_CLASSES)


def _moving_photos() -> BundledModel:
    from .moving_photos import LATENT_SHAPE, SAMPLER, load_moving_photos_model
    from .photos import NUM_CLASSES

    return _wan("moving-photos", LATENT_SHAPE, SAMPLER, load_moving_photos_model, NUM_CLASSES)


MODELS = ("digits", "moving-digits", "photos", "moving-photos")
_BUILDERS = {"digits": _digits, "moving-digits": _moving_digits, "photos": _photos, "moving-photos": _moving_photos}


def bundled_model(name: str) -> BundledModel:
    """The bundled model ``name`` (:data:`MODELS`).

    Raises:
        ErtaCacheError: an unknown name.
    """
    if name not in _BUILDERS:
        raise ErtaCacheError(f"unknown bundled model {name!r}; choose one of {list(MODELS)}")
    return _BUILDERS[name]()


def labels_and_seeds(per_class: int, seed_base: int, num_classes: int = 10) -> tuple[Tensor, list[int]]:
    """Classes ``0..num_classes - 1`` repeated ``per_class`` times, with seeds ``seed_base, seed_base + 1, ...``."""
    labels = torch.arange(num_classes).repeat(per_class)
    return labels, [seed_base + i for i in range(labels.numel())]

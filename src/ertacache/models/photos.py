"""The bundled photo model: diffusers' ``FluxTransformer2DModel`` on crops of real photographs.

Digits are flat strokes whose sampling trajectories are nearly straight, so caching barely
hurts them. This model is trained where caching hurts as it does on FLUX: textures and
edges of photographs. Data: random square crops (side 32 to 192 px of a photograph whose
short side is scaled to 256, and random horizontal flips) of the colour photographs that
ship inside scikit-image and scikit-learn, resized to 32x32 RGB in [-1, 1]. The condition
is the source photograph (:data:`PHOTOS`, 16 classes; class :data:`NULL_CLASS` is the
unconditional branch of classifier-free guidance).

The network is :class:`~ertacache.models.digits.DigitsFlux` at 32x32x3: a 2x2 patch
packing gives 256 tokens of 12 channels, exactly as ``FluxPipeline`` packs its latents.
Sampling defaults are FLUX's (:data:`SAMPLER`: T = 30, shift 3, CFG 3.5).

scikit-image's ``lfw_subset`` is deliberately not used: it is kept out for an independent check.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import ErtaCacheError
from .digits import DigitsFlux

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle", "hubble_deep_field", "retina",
          "immunohistochemistry", "colorwheel", "grass", "gravel", "brick", "camera", "coins", "china", "flower")
"""The source photographs, in class order (0-15)."""
NUM_CLASSES = len(PHOTOS)
NULL_CLASS = NUM_CLASSES
IMAGE_SIZE = 32
LATENT_SHAPE = (3, IMAGE_SIZE, IMAGE_SIZE)
"""One sample's state shape ``(C, H, W)`` in the core sampler."""
SAMPLER = {"num_inference_steps": 30, "shift": 3.0, "guidance_scale": 3.5}
"""FLUX's sampling settings (shift about 3 at 1024x1024, T = 30, guidance 3.5)."""
SHORT_SIDE = 256
CROP_SIDES = (32, 192)
WEIGHTS_NAME = "photos_flux.safetensors"

TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 12,
    "num_layers": 2,
    "num_single_layers": 4,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 64,
    "guidance_embeds": False,
    "axes_dims_rope": (8, 12, 12),
}


def _load(name: str) -> Any:
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")
    from skimage import data

    if name == "motorcycle":
        return data.stereo_motorcycle()[0]
    return getattr(data, name)()


@lru_cache(maxsize=1)
def photographs() -> tuple[Tensor, ...]:
    """The :data:`PHOTOS` as ``(3, H, W)`` tensors in [-1, 1], short side :data:`SHORT_SIDE` (antialiased).

    Grey photographs are repeated over the three channels.

    Raises:
        ErtaCacheError: scikit-image is not installed (``pip install "ertacache[photos]"``).
    """
    try:
        import skimage  # noqa: F401
    except ImportError as exc:
        raise ErtaCacheError('the photo models need scikit-image: pip install "ertacache[photos]"') from exc
    out = []
    for name in PHOTOS:
        img = torch.tensor(np.array(_load(name)), dtype=torch.float32) / 255.0
        img = img[..., None].expand(-1, -1, 3) if img.ndim == 2 else img[..., :3]
        img = img.permute(2, 0, 1)[None]
        scale = SHORT_SIDE / min(img.shape[-2:])
        size = (round(img.shape[-2] * scale), round(img.shape[-1] * scale))
        img = torch.nn.functional.interpolate(img, size=size, mode="bilinear", antialias=True, align_corners=False)
        out.append((img[0].clamp(0, 1) * 2 - 1).contiguous())
    return tuple(out)


def crop_boxes(shapes: list[tuple[int, int]], generator: torch.Generator,
               sides: tuple[int, int] = CROP_SIDES) -> list[tuple[int, int, int]]:
    """One random square ``(top, left, side)`` per ``(H, W)``: side log-uniform in ``sides`` (px, lo <= hi)."""
    lo, hi = sides
    n = len(shapes)
    drawn = torch.exp(torch.empty(n).uniform_(float(torch.tensor(lo).log()), float(torch.tensor(hi).log()),
                                              generator=generator)).round().long()
    u = torch.rand(n, 2, generator=generator)
    boxes = []
    for (h, w), side, (a, b) in zip(shapes, drawn.tolist(), u.tolist()):
        side = min(side, h, w)
        boxes.append((int(a * (h - side)), int(b * (w - side)), side))
    return boxes


def photo_crops(labels: Tensor, generator: torch.Generator, size: int = IMAGE_SIZE,
                sides: tuple[int, int] = CROP_SIDES) -> Tensor:
    """Random crops ``(B, 3, size, size)`` in [-1, 1] of the photographs ``labels`` (antialiased, random flips).

    ``sides`` is the range of the square window's side in pixels of the photograph (short side 256) before it
    is resized to ``size``: ``(size, size)`` crops at full resolution, larger windows are downscaled.
    """
    photos = photographs()
    shapes = [tuple(photos[i].shape[-2:]) for i in labels.tolist()]
    boxes = crop_boxes(shapes, generator, sides)  # type: ignore[arg-type]
    flips = torch.rand(len(boxes), generator=generator) < 0.5
    out = []
    for label, (top, left, side), flip in zip(labels.tolist(), boxes, flips.tolist()):
        crop = photos[label][None, :, top:top + side, left:left + side]
        crop = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", antialias=True,
                                               align_corners=False)
        out.append(crop.flip(-1) if flip else crop)
    return torch.cat(out).clamp(-1, 1)


class PhotosFlux(DigitsFlux):
    """Class-conditional velocity model ``v(x (B, 3, 32, 32), t (B,) in [0, 1], label (B,))`` (see module doc)."""

    def __init__(self, transformer_config: dict[str, Any] | None = None) -> None:
        super().__init__(dict(TRANSFORMER_CONFIG if transformer_config is None else transformer_config),
                         num_classes=NUM_CLASSES, image_size=IMAGE_SIZE)


def bundled_weights_path() -> Path:
    """Path of the committed weights inside the installed package."""
    return Path(str(resources.files("ertacache.weights").joinpath(WEIGHTS_NAME)))


def load_photos_model(path: str | Path | None = None, device: str | torch.device = "cpu") -> PhotosFlux:
    """Load the bundled photo model (offline, from package data) or weights at ``path``.

    Raises:
        ErtaCacheError: the file is missing or does not match the architecture.
    """
    from safetensors.torch import load_file

    weights = Path(path) if path is not None else bundled_weights_path()
    if not weights.is_file():
        raise ErtaCacheError(
            f"no weights at {weights}; train them with `python -m training.train_photos --out {weights}`"
        )
    config_path = weights.with_suffix(".json")
    config = TRANSFORMER_CONFIG
    if config_path.is_file():
        config = json.loads(config_path.read_text())["transformer_config"]
    model = PhotosFlux(config)
    try:
        model.load_state_dict(load_file(str(weights)))
    except RuntimeError as exc:
        raise ErtaCacheError(f"weights at {weights} do not fit the photos architecture: {exc}") from exc
    return model.to(device).eval().requires_grad_(False)


def _features(images: Tensor) -> Tensor:
    """Per image ``(B, 3, H, W)`` in [-1, 1]: channel means, channel standard deviations and mean absolute
    horizontal and vertical differences per channel, ``(B, 12)``: colour and texture, no layout."""
    x = images.float().clamp(-1, 1)
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean((-1, -2))
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean((-1, -2))
    return torch.cat([x.mean((-1, -2)), x.std((-1, -2)), dx, dy], dim=1)


def photo_scores(images: Tensor, labels: Tensor, crops_per_class: int = 64, seed: int = 0) -> dict[str, float]:
    """How well images ``(B, 3, 32, 32)`` in [-1, 1] show the photographs ``labels (B,)`` asked for.

    A nearest-centroid classifier on colour and texture statistics (:func:`_features`,
    standardised), its centroids from ``crops_per_class`` training crops of each photograph.

    Returns:
        ``accuracy``: fraction of images classified as their label (chance: 1/16);
        ``crops_accuracy``: the same classifier on fresh training crops, the ceiling a
        model that reproduced the data exactly would reach.
    """
    gen = torch.Generator().manual_seed(seed)
    ref_labels = torch.arange(NUM_CLASSES).repeat_interleave(crops_per_class)
    feats = _features(photo_crops(ref_labels, gen))
    mean, std = feats.mean(0), feats.std(0).clamp_min(1e-6)
    centroids = torch.stack([((feats[ref_labels == c] - mean) / std).mean(0) for c in range(NUM_CLASSES)])

    def accuracy(x: Tensor, y: Tensor) -> float:
        z = (_features(x) - mean) / std
        return float((torch.cdist(z, centroids).argmin(1) == y).float().mean())

    fresh = torch.arange(NUM_CLASSES).repeat(4)
    return {"accuracy": accuracy(images, labels.long()), "crops_accuracy": accuracy(photo_crops(fresh, gen), fresh)}

"""Fidelity against the uncached output: PSNR and SSIM (torchmetrics); LPIPS and CLIP where weights exist.

Images are ``(B, C, H, W)`` in [-1, 1] (the model's range); each metric is computed
per sample and averaged. Videos ``(B, C, F, H, W)`` are scored frame by frame.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from ..errors import ErtaCacheError

INSTALL_HINT = "pip install 'ertacache[metrics]'"


def _frames(x: Tensor) -> Tensor:
    if x.ndim == 5:
        b, c, f, h, w = x.shape
        return x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
    if x.ndim != 4:
        raise ErtaCacheError(f"metrics take (B, C, H, W) images or (B, C, F, H, W) videos, got shape {tuple(x.shape)}")
    return x


def _to_unit(x: Tensor) -> Tensor:
    return ((_frames(x).float().clamp(-1, 1) + 1) / 2).cpu()


def psnr(x: Tensor, ref: Tensor) -> float:
    """Mean per-sample PSNR in dB of ``x`` against ``ref`` (both in [-1, 1]); inf where identical."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    a, b = _to_unit(x), _to_unit(ref)
    values = [peak_signal_noise_ratio(a[i], b[i], data_range=1.0) for i in range(a.shape[0])]
    return float(torch.stack(values).mean())


def psnr_last_frame(x: Tensor, ref: Tensor) -> float | None:
    """PSNR of the last frame alone (videos ``(B, C, F, H, W)``; None for images): caching error that builds up
    along the clip shows here first (the first-to-last-frame consistency the paper's figures discuss)."""
    if x.ndim != 5:
        return None
    return psnr(x[:, :, -1], ref[:, :, -1])


def ssim(x: Tensor, ref: Tensor) -> float:
    """Mean SSIM of ``x`` against ``ref``: Gaussian window 11, sigma 1.5 (smaller for images under 11 pixels)."""
    try:
        from torchmetrics.functional.image import structural_similarity_index_measure
    except ImportError as exc:  # pragma: no cover - the dev extra installs it
        raise ErtaCacheError(f"SSIM needs torchmetrics: {INSTALL_HINT}") from exc
    a, b = _to_unit(x), _to_unit(ref)
    k = min(11, a.shape[-1], a.shape[-2])
    k -= 1 - k % 2
    sigma = 1.5 if k == 11 else max(0.3, (k - 1) / 7)  # the Gaussian window reaches 3.5 sigma
    value = structural_similarity_index_measure(a, b, data_range=1.0, kernel_size=k, sigma=sigma,
                                                reduction="elementwise_mean")
    return float(value if isinstance(value, Tensor) else value[0])


def lpips(x: Tensor, ref: Tensor) -> float | None:
    """LPIPS (AlexNet) when its backbone weights are available locally, else None.

    The weights cannot be downloaded in every environment (offline CI); callers
    report None as "unavailable".
    """
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        metric: Any = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)
    except Exception:  # missing package, missing torchvision or weights that cannot be fetched
        return None
    a, b = _to_unit(x), _to_unit(ref)
    if a.shape[1] == 1:
        a, b = a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1)
    return float(metric(a, b))


CLIP_MODEL = "openai/clip-vit-base-patch32"


@functools.lru_cache(maxsize=2)
def _clip(model_name: str) -> Any:
    try:
        from transformers import CLIPModel

        return CLIPModel.from_pretrained(model_name, local_files_only=True).eval()
    except Exception:  # no transformers, or weights not cached locally
        return None


def clip_similarity(x: Tensor, ref: Tensor, model_name: str = CLIP_MODEL) -> float | None:
    """Mean cosine similarity of CLIP image embeddings, when the CLIP weights are in the local cache, else None.

    Loaded with ``local_files_only=True``: nothing is downloaded.
    """
    model = _clip(model_name)
    if model is None:
        return None
    a, b = _to_unit(x), _to_unit(ref)
    if a.shape[1] == 1:
        a, b = a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1)
    size = model.config.vision_config.image_size
    mean = torch.tensor([0.4815, 0.4578, 0.4082]).view(1, 3, 1, 1)
    std = torch.tensor([0.2686, 0.2613, 0.2758]).view(1, 3, 1, 1)

    def embed(img: Tensor) -> Tensor:
        img = torch.nn.functional.interpolate(img, size=(size, size), mode="bicubic", align_corners=False)
        with torch.no_grad():
            e = model.get_image_features(pixel_values=(img - mean) / std)
        return torch.nn.functional.normalize(e, dim=-1)

    return float((embed(a) * embed(b)).sum(-1).mean())

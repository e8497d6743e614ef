"""Loading a diffusers pipeline for the command line and the benchmark: settings, ``from_pretrained``, its errors."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...errors import ErtaCacheError

DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class PipelineSettings:
    """A diffusers pipeline and the call settings shared by calibration and generation.

    Attributes:
        pipeline: hub id or local folder (``DiffusionPipeline.from_pretrained``).
        num_inference_steps: T.
        guidance_scale: the pipeline's ``guidance_scale`` (None: not passed, the pipeline's default; a pipeline
            whose guidance is its guider's, as HunyuanVideo 1.5's, takes none).
        height, width, num_frames: output size (None: the pipeline's default).
        negative_prompt: the negative prompt (CFG pipelines; None: the pipeline's default).
        true_cfg_scale: FLUX's true classifier-free guidance scale (None: not passed).
        max_sequence_length: the text encoder's token limit (None: the pipeline's default).
        dtype: ``float32``, ``float16`` or ``bfloat16``.
        device: torch device name.
    """

    pipeline: str
    num_inference_steps: int = 30
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    dtype: str = "bfloat16"
    device: str = "cpu"
    negative_prompt: str | None = None
    true_cfg_scale: float | None = None
    max_sequence_length: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ErtaCacheError(f"--dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.num_inference_steps < 1:
            raise ErtaCacheError(f"--num-inference-steps must be >= 1, got {self.num_inference_steps}")
        for name in ("height", "width", "num_frames", "max_sequence_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ErtaCacheError(f"--{name.replace('_', '-')} must be >= 1, got {value}")

    def call_kwargs(self) -> dict[str, Any]:
        """The pipeline-call keywords the user set (the same at calibration and at generation)."""
        kwargs: dict[str, Any] = {}
        for name in ("guidance_scale", "height", "width", "num_frames", "negative_prompt", "true_cfg_scale",
                     "max_sequence_length"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        return kwargs



def load_pipeline(settings: PipelineSettings) -> Any:
    """``DiffusionPipeline.from_pretrained`` of a hub id or a local folder, moved to the device."""
    from diffusers import DiffusionPipeline

    try:
        with quiet_hub():
            pipe = DiffusionPipeline.from_pretrained(settings.pipeline, dtype=getattr(torch, settings.dtype))
    except (OSError, ValueError) as exc:
        raise cannot_load(settings.pipeline, exc) from exc
    return pipe.to(settings.device)


@contextmanager
def quiet_hub() -> Iterator[None]:
    """huggingface_hub's deprecation warning about an argument diffusers passes says nothing to a user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        yield


def cannot_load(name: str, exc: Exception) -> ErtaCacheError:
    """What went wrong loading ``name``, said for a user: a folder that is not a pipeline, a hub id that is not in
    the cache while offline, or the loader's own first line."""
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if Path(name).is_dir():
        return ErtaCacheError(f"the folder {name} is not a diffusers pipeline (no model_index.json): pass the folder "
                              "that pipe.save_pretrained(...) wrote, or a hub id")
    if Path(name).exists():
        return ErtaCacheError(f"--pipeline {name} is a file; pass a pipeline folder (save_pretrained) or a hub id")
    if name.startswith(("/", ".", "~")) or name.count("/") != 1:  # a hub id is owner/name
        return ErtaCacheError(f"no pipeline folder at {name} (and it is not a hub id, owner/name): pass the folder "
                              "that pipe.save_pretrained(...) wrote, or a hub id")
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if offline:
        return ErtaCacheError(f"{name!r} is not a local folder and not in the hub cache, and the hub is off "
                              f"(HF_HUB_OFFLINE=1): download it where the hub is reachable (hf download {name}) "
                              "or pass a local pipeline folder")
    return ErtaCacheError(f"cannot load the pipeline {name!r}: it is not a local folder, and the hub says: {first}")



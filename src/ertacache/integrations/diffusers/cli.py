"""``ertacache calibrate|generate --pipeline ID_OR_DIR``: the command line on a diffusers pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...errors import ErtaCacheError
from ...settings import CalibrateSettings, GenerateSettings, PipelineSettings


def load_pipeline(settings: PipelineSettings) -> Any:
    """``DiffusionPipeline.from_pretrained`` of a hub id or a local folder, moved to the device."""
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(settings.pipeline, dtype=getattr(torch, settings.dtype))
    except (OSError, ValueError) as exc:
        raise ErtaCacheError(f"cannot load the pipeline {settings.pipeline!r} (a hub id, or a folder written by "
                             f"save_pretrained): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                             ) from exc
    return pipe.to(settings.device)


def calibrate(settings: CalibrateSettings) -> int:
    from .calibrate import calibrate_pipeline

    if settings.pipeline is None:
        raise ErtaCacheError("calibrate on a pipeline needs --pipeline")
    pipe = load_pipeline(settings.pipeline)
    policy = calibrate_pipeline(pipe, list(settings.prompts), num_inference_steps=settings.pipeline.num_inference_steps,
                                target_speedup=settings.target_speedup, threshold=settings.threshold,
                                seeds=range(settings.seed, settings.seed + len(settings.prompts)),
                                config=settings.config, progress=True, batch_size=settings.batch_size,
                                checkpoint_dir=settings.checkpoint_dir, **settings.pipeline.call_kwargs())
    from ...calibration.distributed import rank_and_size

    if rank_and_size()[0] != 0:
        return 0  # every rank reached the same policy; rank 0 writes it
    path = policy.save(settings.out)
    print(policy.summary())
    print(f"wrote {path} and {path.with_suffix('.safetensors')}")
    return 0


def generate(settings: GenerateSettings) -> int:
    from ...policy import Policy
    from .apply import apply_ertacache

    if settings.pipeline is None or not settings.prompt:
        raise ErtaCacheError("generate on a pipeline needs --pipeline and --prompt")
    policy = Policy.load(settings.policy) if settings.policy else None
    pipe = load_pipeline(settings.pipeline)
    generator = torch.Generator().manual_seed(settings.seed)
    handle = apply_ertacache(pipe, policy) if policy is not None else None
    try:
        out = pipe(prompt=settings.prompt, num_inference_steps=settings.pipeline.num_inference_steps,
                   generator=generator, **settings.pipeline.call_kwargs())
        stats = handle.steps() if handle is not None else None
    finally:
        if handle is not None:
            handle.remove()
    path = Path(settings.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(out, "frames"):
        from diffusers.utils import export_to_video

        path = path.with_suffix(".mp4")
        export_to_video(out.frames[0], str(path), fps=settings.fps)
    else:
        path = path.with_suffix(".png")
        out.images[0].save(path)
    if stats is not None:
        print(f"computed steps {stats}")
    print(f"wrote {path}")
    return 0

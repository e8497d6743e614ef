"""``ertacache calibrate|generate --pipeline ID_OR_DIR``: the command line on a diffusers pipeline."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ...errors import ErtaCacheError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_pipeline(id_or_dir: str, dtype: str, device: str) -> Any:
    """``DiffusionPipeline.from_pretrained`` of a hub id or a local folder, moved to ``device``."""
    from diffusers import DiffusionPipeline

    if dtype not in DTYPES:
        raise ErtaCacheError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    pipe = DiffusionPipeline.from_pretrained(id_or_dir, dtype=DTYPES[dtype])
    return pipe.to(device)


def call_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline-call keywords the user set (the same at calibration and at generation)."""
    kwargs: dict[str, Any] = {"guidance_scale": args.guidance_scale}
    for name in ("height", "width", "num_frames"):
        if getattr(args, name, None) is not None:
            kwargs[name] = getattr(args, name)
    return kwargs


def calibrate(args: argparse.Namespace) -> int:
    from ...config import CalibrationConfig
    from .calibrate import calibrate_pipeline

    prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ErtaCacheError(f"{args.prompts} holds no prompts (one per line); the calibration set is empty")
    pipe = load_pipeline(args.pipeline, args.dtype, args.device)
    config = CalibrationConfig(reuse=args.reuse, rectification=args.rectification,
                               timestep_adjustment=not args.no_timestep_adjustment)
    policy = calibrate_pipeline(pipe, prompts, num_inference_steps=args.num_inference_steps,
                                target_speedup=args.target_speedup, threshold=args.threshold,
                                seeds=range(args.seed, args.seed + len(prompts)), config=config, progress=True,
                                **call_kwargs(args))
    path = policy.save(args.out)
    print(policy.summary())
    print(f"wrote {path} and {path.with_suffix('.safetensors')}")
    return 0


def generate(args: argparse.Namespace) -> int:
    from ...policy import Policy
    from .apply import apply_ertacache

    if not args.prompt:
        raise ErtaCacheError("--prompt TEXT is required with --pipeline")
    pipe = load_pipeline(args.pipeline, args.dtype, args.device)
    policy = Policy.load(args.policy) if args.policy else None
    kwargs = call_kwargs(args)
    generator = torch.Generator().manual_seed(args.seed)
    handle = apply_ertacache(pipe, policy) if policy is not None else None
    try:
        out = pipe(prompt=args.prompt, num_inference_steps=args.num_inference_steps, generator=generator, **kwargs)
        stats = handle.steps() if handle is not None else None
    finally:
        if handle is not None:
            handle.remove()
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(out, "frames"):
        from diffusers.utils import export_to_video

        path = path.with_suffix(".mp4")
        export_to_video(out.frames[0], str(path), fps=args.fps)
    else:
        path = path.with_suffix(".png")
        out.images[0].save(path)
    if stats is not None:
        print(f"computed steps {stats}")
    print(f"wrote {path}")
    return 0

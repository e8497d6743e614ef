"""``ertacache calibrate|generate --pipeline ID_OR_DIR``: the command line on a diffusers pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import ErtaCacheError
from ..integrations.diffusers.load import PipelineSettings, cannot_load, load_pipeline, quiet_hub
from .output import write_policy
from .settings import CalibrateSettings, GenerateSettings

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
VIDEO_SUFFIXES = (".mp4", ".gif")


def pipeline_class(settings: PipelineSettings) -> type:
    """The pipeline's class from its ``model_index.json`` alone (nothing heavy loads).

    Raises:
        ErtaCacheError: no such folder or hub id (or offline), or a class diffusers lacks.
    """
    import diffusers

    try:
        with quiet_hub():
            config = diffusers.DiffusionPipeline.load_config(settings.pipeline)
    except (OSError, ValueError) as exc:
        raise cannot_load(settings.pipeline, exc) from exc
    name = config.get("_class_name") if isinstance(config, dict) else None
    cls = getattr(diffusers, str(name), None)
    if not isinstance(cls, type):
        raise ErtaCacheError(f"{settings.pipeline!r}: diffusers has no pipeline class {name!r} (model_index.json)")
    return cls


def check_call_arguments(cls: type, settings: PipelineSettings) -> None:
    """Refuse an option the pipeline's ``__call__`` does not take (``--true-cfg-scale`` on Wan), before loading."""
    import inspect

    params = inspect.signature(cls.__call__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = [k for k in settings.call_kwargs() if k not in params]
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise ErtaCacheError(f"{cls.__name__} takes no {flags}; drop {'it' if len(unknown) == 1 else 'them'}")


def output_path(out: str, video: bool) -> Path:
    """Where ``generate`` writes: ``out``, given the suffix the output needs when it has none.

    Raises:
        ErtaCacheError: a suffix of the other kind (``--out vid.png`` for a video).
    """
    path = Path(out)
    allowed = VIDEO_SUFFIXES if video else IMAGE_SUFFIXES
    if not path.suffix:
        return path.with_suffix(allowed[0])
    if path.suffix.lower() not in allowed:
        kind = "a video" if video else "an image"
        raise ErtaCacheError(f"--out {out}: this pipeline makes {kind}; use a {' or '.join(allowed)} file name")
    return path


def check_policy_settings(policy: Any, settings: PipelineSettings) -> None:
    """Refuse, before the pipeline loads, a step count or guidance the policy was not calibrated for."""
    from ..errors import PolicyMismatchError
    from ..integrations.diffusers.call import check_guidance

    if policy.num_inference_steps != settings.num_inference_steps:
        raise PolicyMismatchError(f"num_inference_steps: policy {policy.num_inference_steps}, got "
                                  f"{settings.num_inference_steps}; pass --num-inference-steps "
                                  f"{policy.num_inference_steps}, or recalibrate")
    given = {} if settings.guidance_scale is None else {"guidance_scale": settings.guidance_scale}
    if settings.true_cfg_scale is not None:
        given["true_cfg_scale"] = settings.true_cfg_scale
    check_guidance(policy.guidance, given)


def calibrate(settings: CalibrateSettings) -> int:
    from ..integrations.diffusers.calibrate import calibrate_pipeline

    if settings.pipeline is None:
        raise ErtaCacheError("calibrate on a pipeline needs --pipeline")
    check_call_arguments(pipeline_class(settings.pipeline), settings.pipeline)
    pipe = load_pipeline(settings.pipeline)
    if settings.dry_run:
        from ..integrations.diffusers.estimate import estimate_pipeline

        steps = settings.pipeline.num_inference_steps
        plan = estimate_pipeline(pipe, list(settings.prompts), num_inference_steps=steps,
                                 target_speedups=settings.targets, config=settings.config,
                                 check_prompts=settings.check_prompts, **settings.pipeline.call_kwargs())
        print(f"{len(settings.prompts)} calibration prompts, T = {settings.pipeline.num_inference_steps}")
        print(plan.describe())
        return 0
    policy = calibrate_pipeline(pipe, list(settings.prompts), num_inference_steps=settings.pipeline.num_inference_steps,
                                target_speedup=settings.target_speedup, threshold=settings.threshold,
                                seeds=range(settings.seed, settings.seed + len(settings.prompts)),
                                config=settings.config, progress=True, batch_size=settings.batch_size,
                                checkpoint_dir=settings.checkpoint_dir, check_prompts=settings.check_prompts,
                                **settings.pipeline.call_kwargs())

    return write_policy(policy, settings.out)


def generate(settings: GenerateSettings) -> int:
    from ..integrations.diffusers.apply import apply_ertacache
    from ..policy import Policy

    if settings.pipeline is None or not settings.prompt:
        raise ErtaCacheError("generate on a pipeline needs --pipeline and --prompt")
    from ..integrations.diffusers.families import family_for_class

    policy = Policy.from_pretrained(settings.policy) if settings.policy else None
    cls = pipeline_class(settings.pipeline)
    check_call_arguments(cls, settings.pipeline)
    family = family_for_class(cls)
    if policy is not None:
        check_policy_settings(policy, settings.pipeline)
        if family is None:
            raise ErtaCacheError(f"{settings.pipeline.pipeline!r} is not a pipeline of a registered ertacache family")
    path = output_path(settings.out, video=bool(family and family.video))
    pipe = load_pipeline(settings.pipeline)
    generator = torch.Generator().manual_seed(settings.seed)
    if policy is None and settings.target_speedup is not None:
        handle: Any = apply_ertacache(pipe, target_speedup=settings.target_speedup, cache_dir=settings.cache_dir,
                                      check_fingerprint=settings.check_fingerprint)
    else:
        handle = None if policy is None else apply_ertacache(pipe, policy, check_fingerprint=settings.check_fingerprint)
    try:
        out = pipe(prompt=settings.prompt, num_inference_steps=settings.pipeline.num_inference_steps,
                   generator=generator, **settings.pipeline.call_kwargs())
        stats = handle.steps() if handle is not None else None
    finally:
        if handle is not None:
            handle.remove()
    path.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(out, "frames"):
        from diffusers.utils import export_to_gif, export_to_video

        if path.suffix.lower() == ".gif":
            from PIL import Image

            frames = [f if isinstance(f, Image.Image)
                      else Image.fromarray((f * 255).round().clip(0, 255).astype("uint8")) for f in out.frames[0]]
            export_to_gif(frames, str(path), fps=settings.fps)
        else:
            export_to_video(out.frames[0], str(path), fps=settings.fps)
    else:
        from ..integrations.diffusers.adapters import pipeline_output

        pipeline_output(out)[0].save(path)
    if stats is not None:
        print(f"computed steps {stats}")
    print(f"wrote {path}")
    return 0

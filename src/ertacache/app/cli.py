"""The ``ertacache`` command line: parse, call the library, print. ``main(argv) -> int``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, get_args

import torch

from ..bench.pipeline import PipelineBenchSettings
from ..core.config import SOURCES
from ..core.rectify import Granularity, Rectification
from ..core.reuse import DEFAULT_REUSE, REUSE_MODES
from ..errors import ErtaCacheError
from ..integrations.diffusers.load import PipelineSettings
from ..models.bundled import MODELS
from .output import write_policy
from .settings import CalibrateSettings, GenerateSettings, read_prompts


def _add_sampler_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-inference-steps", type=int, default=None,
                   help="T (default: the bundled model's, 30 or 50; a pipeline: 30)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance scale (default: the bundled model's; a pipeline's own default)")
    p.add_argument("--shift", type=float, default=None,
                   help="time shift of the grid, bundled model (default: its family's, 3 or 5; a pipeline uses its "
                        "scheduler's)")
    p.add_argument("--model", default=None,
                   help=f"a bundled model ({', '.join(MODELS)}; default digits) or other digits weights (.safetensors)")
    p.add_argument("--pipeline", default=None, help="a diffusers pipeline: hub id or local folder (from_pretrained)")
    p.add_argument("--height", type=int, default=None, help="pipeline output height")
    p.add_argument("--width", type=int, default=None, help="pipeline output width")
    p.add_argument("--num-frames", type=int, default=None, help="pipeline video frames")
    p.add_argument("--dtype", default="bfloat16", help="pipeline dtype: float32, float16, bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--negative-prompt", default=None, help="pipeline negative prompt (CFG)")
    p.add_argument("--true-cfg-scale", type=float, default=None, help="FLUX true CFG scale (with --negative-prompt)")
    p.add_argument("--max-sequence-length", type=int, default=None, help="pipeline text token limit")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ertacache", description="ERTACache: calibrated caching for diffusion "
                                     "transformers (arXiv 2508.21091). Runs on the bundled digits model.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="calibrate, then compare uncached, uniform and ERTACache on held-out seeds")
    p.add_argument("--model", dest="bundled", choices=list(MODELS), default="digits",
                   help="bundled model: digits or photos (image, FLUX architecture), moving-digits or moving-photos "
                        "(video, Wan)")
    p.add_argument("--weights", dest="model", default=None, help="other weights for the bundled model")
    p.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    p.add_argument("--repeats", type=int, default=None, help="timing repeats per method (median; default 3, video 2)")

    _add_calibrate_parser(sub)
    _add_other_parsers(sub)
    return parser


def _add_calibrate_parser(sub: Any) -> None:
    p = sub.add_parser("calibrate", help="calibrate a policy and write it (one .safetensors file)")
    _add_sampler_args(p)
    goal = p.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target-speedup", type=float, help="wanted T / NFE, e.g. 2")
    goal.add_argument("--threshold", type=float, help="lambda of Algorithm 2, e.g. 0.2")
    p.add_argument("--out", required=True, help="policy path, e.g. policy.safetensors")
    p.add_argument("--prompts", default=None, help="with --pipeline: a text file, one calibration prompt per line")
    p.add_argument("--check-prompts", default=None, help="with --pipeline: a text file of prompts unlike the "
                   "calibration's, one per line: a fitted set must also gain on them (docs/method.md 2.8)")
    p.add_argument("--calibration-per-class", type=int, default=None,
                   help="calibration samples per class (default: the model's; image models 1, so 10 or 16 samples; "
                        "video models 20 samples or more; docs/calibration.md, 'How many prompts')")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows per model call (micro-batches; default: the whole set); the policy does not change")
    p.add_argument("--checkpoint-dir", default=None,
                   help="keep each finished pass here; rerun the same command to resume after a crash")
    p.add_argument("--seed", type=int, default=0, help="first calibration seed")
    p.add_argument("--reuse", choices=list(REUSE_MODES), default=DEFAULT_REUSE)
    p.add_argument("--thorough", action="store_true",
                   help="the full competition (Algorithm 2's lambda sweep, timestep adjustment and every searched "
                        "set's per-step reuse beside the default's sets): several times the default's model "
                        "calls; see --dry-run")
    p.add_argument("--dry-run", action="store_true",
                   help="print the passes, model calls and estimated wall time (one model call is timed), then exit")
    p.add_argument("--candidates", default=None,
                   help=f"candidate sources that compete, comma-separated, of {','.join(SOURCES)} (threshold: "
                        "Algorithm 2's sweep; search: the schedule search); default search,uniform (--thorough: all)")
    p.add_argument("--rectification", choices=get_args(Rectification), default="linear")
    p.add_argument("--granularity", choices=get_args(Granularity), default="step")
    p.add_argument("--timestep-adjustment", action=argparse.BooleanOptionalAction, default=None,
                   help="estimate Eq. 13-14's adjusted grid and keep it where it wins (default: off; --thorough: on)")
    p.add_argument("--keep-all-components", action="store_true",
                   help="keep adjustment and rectification even where the calibration samples say they do not help")
    p.add_argument("--step-reuse-choice", action=argparse.BooleanOptionalAction, default=None,
                   help="also try the schedule search's best set with each cached step's reuse mode chosen by the "
                        "error model (default: on)")
    p.add_argument("--fresh-check", action=argparse.BooleanOptionalAction, default=None,
                   help="with one calibration prompt, keep a searched set only where it also wins on fresh noise "
                        "(one more uncached pass; default: on)")


def _add_other_parsers(sub: Any) -> None:
    p = sub.add_parser("generate", help="sample a bundled model or a pipeline, with a policy or uncached")
    _add_sampler_args(p)
    p.add_argument("--policy", default=None,
                   help="policy file, folder or hub id (Policy.from_pretrained); omit for the uncached sampler")
    p.add_argument("--target-speedup", type=float, default=None,
                   help="with --pipeline and no --policy: calibrate on the first run of these settings (this prompt) "
                        "and keep the policy in the cache directory for later runs")
    p.add_argument("--cache-dir", default=None,
                   help="where --target-speedup keeps policies (default $ERTACACHE_CACHE or ~/.cache/ertacache)")
    p.add_argument("--digit", type=int, action="append",
                   help="class of the bundled model (repeatable; default all: 0-9, photos 0-15)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/generate.png", help="image: PNG; video (with --pipeline): MP4")
    p.add_argument("--prompt", default=None, help="with --pipeline: the prompt")
    p.add_argument("--fps", type=int, default=16, help="MP4 frame rate")
    p.add_argument("--no-check-fingerprint", dest="check_fingerprint", action="store_false",
                   help="apply the policy to other weights than it was calibrated on (another checkpoint, fused "
                        "LoRA weights) without checking the model fingerprint")

    p = sub.add_parser("inspect", help="print a policy")
    p.add_argument("policy", help="policy file, folder or hub id")

    p = sub.add_parser("cache", help="the policies kept by --target-speedup / apply_ertacache(target_speedup=...)")
    p.add_argument("action", choices=["list", "clear"])
    p.add_argument("--cache-dir", default=None, help="default $ERTACACHE_CACHE or ~/.cache/ertacache")

    p = sub.add_parser("bench", help="ERTACache against every peer method on the bundled model")
    p.add_argument("--model", dest="bundled", choices=list(MODELS), default="digits",
                   help="bundled model, sampled with its family's settings (digits, photos: T=30, shift 3; "
                        "moving-digits, moving-photos: T=50, shift 5)")
    p.add_argument("--quick", action="store_true",
                   help="fewer settings and samples (6 to 26 minutes on 2 cores, by model: docs/benchmarks)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--docs", default=None, help="folder for table, plot and grid (default docs/benchmarks[/quick])")
    p.add_argument("--repeats", type=int, default=None, help="timing repeats per method (median)")
    p.add_argument("--pipeline", default=None, help="a diffusers pipeline: hub id or local folder")
    p.add_argument("--prompts", default=None, help="with --pipeline: one prompt per line; the first half calibrates")
    p.add_argument("--num-inference-steps", type=int, default=30)
    p.add_argument("--guidance-scale", type=float, default=None, help="(default: the pipeline's own)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num-frames", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")

    p = sub.add_parser("step-cost", help="benchmark: a cached step's cost as a fraction of a computed step's")
    p.add_argument("--batch-size", type=int, default=40)
    p.add_argument("--repeats", type=int, default=20)


def _pipeline_settings(args: argparse.Namespace) -> PipelineSettings | None:
    if args.pipeline is None:
        return None
    steps = 30 if args.num_inference_steps is None else args.num_inference_steps
    return PipelineSettings(args.pipeline, steps, args.guidance_scale, args.height, args.width, args.num_frames,
                            args.dtype, args.device,
                            negative_prompt=getattr(args, "negative_prompt", None),
                            true_cfg_scale=getattr(args, "true_cfg_scale", None),
                            max_sequence_length=getattr(args, "max_sequence_length", None))


def _bundled(model: str | None) -> tuple[Any, str | None]:
    """``--model``: a bundled model's name or weights of the digits architecture; ``(BundledModel, weights)``."""
    from ..models.bundled import bundled_model

    if model is None or model in MODELS:
        return bundled_model(model or "digits"), None
    return bundled_model("digits"), model


def _sampler(args: argparse.Namespace, pipeline: PipelineSettings | None) -> dict[str, Any]:
    """T, shift and guidance scale: the flags given, else the bundled model's family settings (a pipeline: 30; its
    guidance is ``pipeline.guidance_scale``)."""
    base = dict(num_inference_steps=30, guidance_scale=3.0, shift=1.0) if pipeline is not None \
        else _bundled(args.model)[0].sampler
    return {k: base[k] if getattr(args, k) is None else getattr(args, k) for k in base}


def calibrate_settings(args: argparse.Namespace) -> CalibrateSettings:
    """``ertacache calibrate`` arguments as typed settings (checked before anything loads)."""
    from ..core.config import CalibrationConfig

    pipeline = _pipeline_settings(args)
    if pipeline is not None and not args.prompts or pipeline is None and args.check_prompts:
        raise ErtaCacheError("--pipeline needs --prompts FILE (one calibration prompt per line); --check-prompts "
                             "FILE comes with them")
    options: dict[str, object] = dict(reuse=args.reuse, rectification=args.rectification,
                                      granularity=args.granularity, component_check=not args.keep_all_components)
    if args.timestep_adjustment is not None:
        options["timestep_adjustment"] = args.timestep_adjustment
    if args.step_reuse_choice is not None:
        options["step_reuse_choice"] = args.step_reuse_choice
    if args.fresh_check is not None:
        options["fresh_check"] = args.fresh_check
    if args.candidates is not None:
        options["candidates"] = tuple(c.strip() for c in args.candidates.split(",") if c.strip())
    config = CalibrationConfig.thorough(**options) if args.thorough else CalibrationConfig(**options)  # type: ignore[arg-type]
    return CalibrateSettings(
        out=args.out, config=config, target_speedup=args.target_speedup, threshold=args.threshold, seed=args.seed,
        **_sampler(args, pipeline), model=args.model,
        calibration_per_class=_bundled(args.model)[0].calibration_per_class if args.calibration_per_class is None
        else args.calibration_per_class,
        pipeline=pipeline,
        prompts=read_prompts(args.prompts) if pipeline is not None else (), batch_size=args.batch_size,
        check_prompts=read_prompts(args.check_prompts) if args.check_prompts else None,
        checkpoint_dir=args.checkpoint_dir, dry_run=args.dry_run)


def _calibrate(settings: CalibrateSettings) -> int:
    from ..calibration.distributed import finish, init_from_env

    initialised = init_from_env()  # under torchrun: one shard of the set per process, statistics all-reduced
    try:
        return _calibrate_here(settings)
    finally:
        finish(initialised)


def _calibrate_here(settings: CalibrateSettings) -> int:
    if settings.pipeline is not None:
        from . import pipeline_cli

        return pipeline_cli.calibrate(settings)
    from ..calibration import calibrate
    from ..fingerprint import model_fingerprint
    from ..models.bundled import labels_and_seeds

    bundled, weights = _bundled(settings.model)
    model = bundled.load(weights)
    labels, seeds = labels_and_seeds(settings.calibration_per_class, settings.seed, bundled.num_classes)
    null = torch.full_like(labels, bundled.null_class)
    if settings.dry_run:
        from ..calibration import estimate

        plan = estimate(model, labels, seeds, target_speedups=settings.targets, latent_shape=bundled.latent_shape,
                        num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
                        null_cond=null, config=settings.config)
        print(f"{len(seeds)} calibration samples, T = {settings.num_inference_steps}, 2 guidance branches")
        print(plan.describe())
        return 0
    policy = calibrate(model, labels, seeds, latent_shape=bundled.latent_shape,
                       num_inference_steps=settings.num_inference_steps, shift=settings.shift,
                       guidance_scale=settings.guidance_scale, null_cond=null, target_speedup=settings.target_speedup,
                       threshold=settings.threshold, config=settings.config, model_fingerprint=model_fingerprint(model),
                       progress=True, batch_size=settings.batch_size, checkpoint_dir=settings.checkpoint_dir)
    return write_policy(policy, settings.out)


def generate_settings(args: argparse.Namespace) -> GenerateSettings:
    """``ertacache generate`` arguments as typed settings."""
    pipeline = _pipeline_settings(args)
    if pipeline is not None and not args.prompt:
        raise ErtaCacheError("--prompt TEXT is required with --pipeline")
    if args.target_speedup is not None and (args.policy or pipeline is None):
        raise ErtaCacheError("--target-speedup in generate calibrates a pipeline on its first run: use it with "
                             "--pipeline and without --policy")
    n = 10 if pipeline is not None else _bundled(args.model)[0].num_classes
    digits = tuple(args.digit or range(n))
    if any(not 0 <= d < n for d in digits):
        raise ErtaCacheError(f"--digit takes classes 0-{n - 1} for this model, got {list(digits)}")
    return GenerateSettings(out=args.out, policy=args.policy, seed=args.seed, **_sampler(args, pipeline),
                            model=args.model, digits=digits, pipeline=pipeline,
                            prompt=args.prompt, fps=args.fps, check_fingerprint=args.check_fingerprint,
                            target_speedup=args.target_speedup, cache_dir=args.cache_dir)


def _cache(action: str, cache_dir: str | None) -> int:
    from ..policy import Policy
    from ..policy.cache import cache_home

    folder = Path(cache_dir) if cache_dir else cache_home()
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if action == "clear":
        for f in files:
            f.unlink()
        for lock in folder.glob("*.safetensors.lock") if folder.is_dir() else []:
            lock.unlink()
        print(f"removed {len(files)} policies from {folder}")
        return 0
    print(f"{len(files)} policies in {folder}")
    for f in files:
        try:
            p = Policy.load(f)
            print(f"{f.name}: {p.provenance.get('pipeline', '?')}, T = {p.num_inference_steps}, NFE {p.nfe}, "
                  f"guidance {p.guidance or '-'}, size {p.sample_size or '-'}")
        except Exception as exc:  # noqa: BLE001 - a damaged file is listed as such
            print(f"{f.name}: unreadable ({type(exc).__name__}); the next run with its settings replaces it")
    return 0


def _generate(settings: GenerateSettings) -> int:
    if settings.pipeline is not None:
        from . import pipeline_cli

        return pipeline_cli.generate(settings)
    from ..core.euler import sample, seeded_noise
    from ..fingerprint import model_fingerprint
    from ..policy import Policy
    from .demo import save_grid

    policy = Policy.from_pretrained(settings.policy) if settings.policy else None
    bundled, weights = _bundled(settings.model)
    model = bundled.load(weights)
    labels = torch.tensor(settings.digits)
    noise = seeded_noise([settings.seed + i for i in range(len(labels))], bundled.latent_shape)
    out = sample(model, noise, labels, num_inference_steps=settings.num_inference_steps, shift=settings.shift,
                 guidance_scale=settings.guidance_scale, null_cond=torch.full_like(labels, bundled.null_class),
                 policy=policy,
                 model_fingerprint=model_fingerprint(model) if settings.check_fingerprint else None, progress=True)
    save_grid({"cached" if policy else "uncached": out.x}, Path(settings.out), columns=len(labels))
    s = out.stats
    print(f"NFE {s.nfe}, computed steps {s.computed_steps}, cached steps {s.cached_steps}, {s.seconds:.2f} s")
    print(f"wrote {settings.out}")
    return 0


def _bench(args: argparse.Namespace, argv: list[str] | None) -> int:
    from dataclasses import replace

    from ..bench import BenchSettings, run_bench

    command = "ertacache " + " ".join(argv if argv is not None else sys.argv[1:])
    pipeline = _pipeline_settings(args)
    if pipeline is not None:
        from ..bench.pipeline import run_pipeline_bench

        if not args.prompts:
            raise ErtaCacheError("bench --pipeline needs --prompts FILE (one per line; the first half calibrates)")
        settings = PipelineBenchSettings(pipeline, read_prompts(args.prompts), args.quick, args.repeats,
                                         args.docs or "docs/benchmarks/pipeline", args.json)
        run_pipeline_bench(settings, command)
        print(Path(settings.docs, "results.md").read_text())
        return 0
    bench = BenchSettings.for_model(args.bundled, quick=args.quick)
    if args.repeats is not None:
        bench = replace(bench, repeats=args.repeats)
    folder = "docs/benchmarks" if args.bundled == "digits" else f"docs/benchmarks/{args.bundled}"
    docs = args.docs or (f"{folder}/quick" if args.quick else folder)
    run_bench(docs, bench, json_path=args.json, command=command)
    print(Path(docs, "results.md").read_text())
    return 0


def _out_of_memory(args: argparse.Namespace, exc: BaseException) -> int:
    where = getattr(args, "device", None) or "cpu"
    print(f"ertacache: error: out of memory on {where} ({type(exc).__name__}). A pipeline runs at its default "
          "size unless told (Wan: 480x832, 81 frames): pass --height/--width/--num-frames, --batch-size 1, "
          "--dtype bfloat16, or --device cuda; a calibration with --checkpoint-dir resumes where it stopped",
          file=sys.stderr)
    return 1


def _raised_in_pipeline_code(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc`` outside torch is diffusers' or transformers' code (the pipeline's own
    computation, e.g. a size its transformer does not support), not this library's."""
    roots = [Path(m.__file__).parent for name in ("diffusers", "transformers")
             if (m := sys.modules.get(name)) is not None and m.__file__]
    torch_root = Path(torch.__file__).parent
    innermost = None
    tb = exc.__traceback__
    while tb is not None:
        if not Path(tb.tb_frame.f_code.co_filename).is_relative_to(torch_root):
            innermost = Path(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    return innermost is not None and any(innermost.is_relative_to(r) for r in roots)


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to ``sys.stderr`` as it is at each message (a test's captured stream, or a redirected one)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def show_progress() -> None:
    """The library's progress messages (its modules' loggers, under ``ertacache``) on stderr, once."""
    root = logging.getLogger("ertacache")
    if not root.handlers:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    show_progress()
    try:
        if args.command == "demo":
            from dataclasses import replace

            from .demo import DemoSettings, run_demo

            demo = DemoSettings.for_model(args.bundled)
            run_demo(args.out, demo if args.repeats is None else replace(demo, repeats=args.repeats),
                     model_path=args.model)
        elif args.command == "calibrate":
            return _calibrate(calibrate_settings(args))
        elif args.command == "generate":
            return _generate(generate_settings(args))
        elif args.command == "cache":
            return _cache(args.action, args.cache_dir)
        elif args.command == "inspect":
            from ..policy import Policy

            print(Policy.from_pretrained(args.policy).summary())
        elif args.command == "bench":
            return _bench(args, argv)
        elif args.command == "step-cost":
            from ..bench.stepcost import main as step_cost

            step_cost(args.batch_size, args.repeats)
    except ErtaCacheError as exc:
        print(f"ertacache: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        text = str(exc).strip()
        if isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or \
                (isinstance(exc, RuntimeError) and "can't allocate memory" in text):  # a CPU allocation failure
            return _out_of_memory(args, exc)
        if getattr(args, "pipeline", None) is None or os.environ.get("ERTACACHE_TRACEBACK") \
                or not _raised_in_pipeline_code(exc):
            raise
        size = ", ".join(f"{k.replace('_', ' ')} {getattr(args, k)}" for k in ("height", "width", "num_frames")
                         if getattr(args, k, None) is not None) or "its default size"
        message = text.splitlines()[0] if text else ""
        print(f"\nertacache: error: the pipeline's own call failed at {size} ({type(exc).__name__}: {message}); "
              "pass --height/--width/--num-frames the model supports (ERTACACHE_TRACEBACK=1 prints the traceback)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nertacache: interrupted (with --checkpoint-dir, the same command resumes a calibration)",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``ertacache bench --pipeline ID_OR_DIR --prompts FILE``: the benchmark on a diffusers pipeline.

The first half of the prompts calibrates (ERTACache, MagCache's ratios); the second
half, with seeds never used in calibration, is the held-out set. Methods: uncached,
uniform caching, ERTACache at each target speedup, and diffusers' FirstBlockCache,
TaylorSeerCache, MagCache, PyramidAttentionBroadcast and FasterCache through
``transformer.enable_cache``. Our TeaCache needs a split model and is not run on
pipelines. Fidelity is measured on the decoded outputs (``output_type="pt"``).
"""

from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._version import source
from ..errors import ErtaCacheError
from ..integrations.diffusers.load import PipelineSettings
from ..policy import Policy
from .methods import Method

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineBenchSettings:
    """``ertacache bench --pipeline``: the first half of the prompts calibrates, the second half is held out."""

    pipeline: PipelineSettings
    prompts: tuple[str, ...]
    quick: bool = False
    repeats: int | None = None
    docs: str = "docs/benchmarks/pipeline"
    json_path: str | None = None

    def __post_init__(self) -> None:
        if len(self.prompts) < 2:
            raise ErtaCacheError(f"bench --pipeline needs at least 2 prompts (calibration, held out); got "
                                 f"{len(self.prompts)}")



def _decoded(out: Any) -> Tensor:
    """Pipeline output as ``(B, C, H, W)`` or ``(B, C, F, H, W)`` in [-1, 1]."""
    from ..integrations.diffusers.adapters import pipeline_output

    x = torch.as_tensor(pipeline_output(out)).float()
    if x.ndim == 5:  # (B, F, C, H, W) -> (B, C, F, H, W)
        x = x.permute(0, 2, 1, 3, 4)
    return x * 2 - 1


def _last_block_linear(transformer: Any) -> Any:
    blocks = [m for m in transformer.modules() if type(m).__name__.endswith("Block")]
    if not blocks:
        raise ErtaCacheError(f"cannot find the blocks of {type(transformer).__name__}")
    return next(m for m in blocks[-1].modules() if isinstance(m, torch.nn.Linear))


def pipeline_methods(pipe: Any, settings: PipelineSettings, cal_prompts: list[str], held: list[str],
                     targets: tuple[float, ...], quick: bool, log: Any) -> list[Method]:
    from ..core.config import CalibrationConfig
    from ..integrations.diffusers.apply import apply_ertacache
    from ..integrations.diffusers.calibrate import calibrate_pipeline
    from ..peers.diffusers_hooks import calibrate_magcache, peer_config, peer_settings, setting_label

    T, kw = settings.num_inference_steps, settings.call_kwargs()
    counter = {"n": 0, "branches": 1}  # NFE is per branch; calibration tells how many branches a step calls
    _last_block_linear(pipe.transformer).register_forward_hook(lambda *a: counter.__setitem__("n", counter["n"] + 1))

    def call(prompts: list[str], seed_base: int) -> Any:
        gens = [torch.Generator().manual_seed(seed_base + i) for i in range(len(prompts))]
        return pipe(prompt=prompts, generator=gens, num_inference_steps=T, output_type="pt", **kw)

    def plain() -> tuple[Tensor, int]:
        counter["n"] = 0
        x = _decoded(call(held, 10_000))
        return x, counter["n"] // counter["branches"]

    def with_policy(policy: Policy) -> Any:
        def run(*_: Any) -> tuple[Tensor, int]:
            with apply_ertacache(pipe, policy, check_fingerprint=False):
                return plain()
        return run

    def with_cache(config: Any) -> Any:
        def run(*_: Any) -> tuple[Tensor, int]:
            pipe.transformer.enable_cache(config)
            try:
                return plain()
            finally:
                pipe.transformer.disable_cache()
        return run

    methods = [Method("none", "uncached", lambda *_: plain())]
    config = CalibrationConfig(thresholds=(0.05, 0.1, 0.2, 0.4) if quick else CalibrationConfig().thresholds)
    for s in targets:
        start = time.perf_counter()
        p = calibrate_pipeline(pipe, cal_prompts, num_inference_steps=T, target_speedup=s, config=config, **kw)
        log(f"calibrated ERTACache for {s}x in {time.perf_counter() - start:.0f} s")
        counter["branches"] = len(p.branches)
        methods.append(Method("ertacache", f"target={s}x ({p.provenance['selected']}, {p.provenance['variant']})",
                              with_policy(p)))
        uni = Policy(T, Policy.uniform(T, p.nfe).cached_steps, p.grid, reuse="velocity", branches=p.branches,
                     guidance_scale=p.guidance_scale)  # as the core benchmark's uniform rows: the last output
        methods.append(Method("uniform", f"nfe={p.nfe}", with_policy(uni)))
    ratios: list[float] | None
    try:  # MagCache's own calibration mode, on the calibration prompts
        ratios = calibrate_magcache(pipe.transformer, T, lambda: call(cal_prompts, 0))
    except RuntimeError as exc:
        log(f"MagCache not run: {exc}")
        ratios = None

    def timestep() -> float:
        return float(pipe.current_timestep) if pipe.current_timestep is not None else 0.0

    for name, setting in peer_settings(quick, ratios, where="pipeline"):
        methods.append(Method(name, setting_label(setting),
                              with_cache(peer_config(name, setting, timestep, T, packed_tokens=False))))
    return methods


def run_pipeline_bench(settings: PipelineBenchSettings, command: str) -> list[dict[str, Any]]:
    """Run the benchmark on ``settings.pipeline`` and write the report under ``settings.docs``."""
    import json

    from ..integrations.diffusers.load import load_pipeline
    from ..io import atomic_write_text
    from . import measure
    from .report import write_report

    prompts = list(settings.prompts)
    half = len(prompts) // 2
    ps = settings.pipeline
    pipe = load_pipeline(ps)
    pipe.set_progress_bar_config(disable=True)

    def log(msg: str) -> None:
        logger.info(msg)

    start = time.perf_counter()
    targets = (1.5, 2.0, 3.0) if settings.quick else (1.5, 2.0, 2.5, 3.0)
    methods = pipeline_methods(pipe, ps, prompts[:half], prompts[half:], targets, settings.quick, log)
    repeats = settings.repeats or (1 if settings.quick else 3)
    rows = measure(methods, torch.zeros(1), torch.zeros(1), repeats, log)
    header = {
        "command": command,
        "source": f"ertacache {source()}, {time.strftime('%Y-%m-%d')}",
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}",
        "model": f"{ps.pipeline} ({type(pipe).__name__})",
        "protocol": f"T={ps.num_inference_steps}; calibration: {half} prompts; held out: {len(prompts) - half} "
                    f"prompts (seeds 10000..), {repeats} interleaved repeats, median; TeaCache: not on pipelines",
        "seconds_total": round(time.perf_counter() - start, 1),
    }
    docs = Path(settings.docs)
    write_report(docs, rows, header)
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    if settings.json_path:
        atomic_write_text(settings.json_path, json.dumps(clean, indent=2) + "\n")
    return clean

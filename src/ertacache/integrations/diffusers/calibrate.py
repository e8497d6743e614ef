"""Calibrating a policy on a diffusers pipeline: the core's session, driven through the pipeline's own ``__call__``.

:class:`PipelineDriver` walks each trajectory as one pipeline call (``output_type="latent"``)
on the rows a pass needs, with :class:`~.hooks.StepHook` on the transformer(s) running the
pass; :class:`~ertacache.calibration.CalibrationSession` is the method, the same as for
:func:`ertacache.calibrate`. Every option of :class:`~ertacache.config.CalibrationConfig`
is honoured, or refused before the first model call. DDIM-family schedulers (CogVideoX)
take no custom grid, so their candidates have no adjusted variant and the policy says
why (NOTES.md section 5).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ...calibration import CalibrationSession, check_goal
from ...calibration.session import logger
from ...config import CalibrationConfig
from ...core.engine import Engine, Pass
from ...core.reuse import get_reuse
from ...errors import ErtaCacheError
from ...policy import Policy
from .adapters import block_stack
from .families import family_for, pipeline_fingerprint, transformers_of
from .hooks import PipelineRun, register_hooks, remove_hooks
from .scheduler import grid_unsupported, restore_scheduler, set_scheduler_grid


class PipelineDriver:
    """The calibration set as pipeline calls: prompts (or per-row tensors in ``pipe_kwargs``) and seeds.

    Args:
        pipe: a pipeline of a registered family.
        prompts: one prompt per row, or None when ``pipe_kwargs`` carries per-row
            tensors (``prompt_embeds``, ...) whose first dimension is the row count.
        seeds: one noise seed per row (through ``generator=``).
        num_inference_steps: T.
        reuse: the reuse mode's name.
        pipe_kwargs: the rest of the call (height, width, guidance, ...); tensors and
            lists with one entry per row are split with the rows.
    """

    def __init__(self, pipe: Any, prompts: Sequence[str] | None, seeds: Sequence[int], num_inference_steps: int,
                 reuse: str, pipe_kwargs: dict[str, Any]) -> None:
        self.pipe, self.family = pipe, family_for(pipe)
        self.prompts = None if prompts is None else list(prompts)
        self.kwargs = dict(pipe_kwargs)
        self.seeds = [int(s) for s in seeds]
        self.size, self.num_inference_steps = len(self.seeds), num_inference_steps
        self.reuse = get_reuse(reuse)
        self.transformers = transformers_of(pipe, self.family)
        if not self.transformers:
            raise ErtaCacheError(f"{type(pipe).__name__} has none of the transformers {self.family.transformers}")
        self.layout = self.family.channels
        self.adjustment_off = grid_unsupported(pipe.scheduler)
        self.own_grid: list[float] | None = None
        self.branches: tuple[str, ...] = ()
        self.latent_shape: tuple[int, ...] | None = None
        self.calls_per_step: int | None = None
        self.observed_guidance: float | None = None

    def _rows(self, rows: slice) -> dict[str, Any]:
        out = {}
        for key, value in self.kwargs.items():
            per_row = (isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == self.size) or \
                (isinstance(value, list) and len(value) == self.size)
            out[key] = value[rows] if per_row else value
        if self.prompts is not None:
            out["prompt"] = self.prompts[rows]
        return out

    @torch.no_grad()
    def run(self, pass_: Pass, rows: slice, n_fit: int, grid: Sequence[float] | None) -> Tensor:
        engine = Engine(pass_, grid)
        recording = grid is None
        n = len(range(self.size)[rows])
        run = PipelineRun(engine, self.family, self.reuse, scheduler=self.pipe.scheduler,
                          calls_per_step=None if recording else self.calls_per_step,
                          rows=(n, max(0, min(n_fit, rows.stop or self.size) - (rows.start or 0))), check_finite=True)
        modules = register_hooks(self.transformers, run, self.family, with_blocks=self.reuse.needs_blocks)
        own = grid is None or self.own_grid is None or _same(grid, self.own_grid)
        try:
            if not own:
                set_scheduler_grid(self.pipe.scheduler, grid)  # type: ignore[arg-type]
            gens = [torch.Generator().manual_seed(s) for s in self.seeds[rows]]
            out = self.pipe(generator=gens, num_inference_steps=self.num_inference_steps, output_type="latent",
                            **self._rows(rows))
            run.finish()
        finally:
            restore_scheduler(self.pipe.scheduler)
            remove_hooks(modules)
        if recording:
            self.own_grid = [*run.times, 0.0]
            self.branches, self.latent_shape = tuple(run.branches), run.latent_shape
            self.calls_per_step = len(self.branches)
            got = getattr(self.pipe, "_guidance_scale", None)
            self.observed_guidance = None if got is None else float(got)
        return torch.as_tensor(out.frames if hasattr(out, "frames") else out.images)

    def policy_fields(self, grid: Sequence[float]) -> dict[str, Any]:
        kw = self.kwargs
        return dict(num_inference_steps=self.num_inference_steps, grid=tuple(grid), reuse=self.reuse.name,
                    branches=self.branches, shift=float(getattr(self.pipe.scheduler.config, "shift", 1.0)),
                    guidance_scale=float(kw.get("true_cfg_scale", kw.get("guidance_scale", 1.0))),
                    latent_shape=self.latent_shape, model_fingerprint=pipeline_fingerprint(self.pipe, self.family))

    def provenance(self) -> dict[str, Any]:
        return {"seeds": list(self.seeds), "pipeline": type(self.pipe).__name__,
                "pipeline_guidance_scale": self.observed_guidance}


def _same(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= 1e-7 for x, y in zip(a, b))


def check_pipeline_config(pipe: Any, config: CalibrationConfig) -> None:
    """Refuse, before any model call, a config this pipeline cannot honour.

    Raises:
        ErtaCacheError: ``block_residual`` reuse on a transformer without a registered block stack.
    """
    family = family_for(pipe)
    if get_reuse(config.reuse).needs_blocks:
        for tf in transformers_of(pipe, family):
            block_stack(tf, family)


def calibrate_pipeline(
    pipe: Any,
    prompts: Sequence[str] | None,
    *,
    num_inference_steps: int,
    target_speedup: float | None = None,
    threshold: float | None = None,
    seeds: Sequence[int] | None = None,
    config: CalibrationConfig | None = None,
    progress: bool = False,
    **pipe_kwargs: Any,
) -> Policy:
    """Calibrate a policy for ``pipe`` by running ``pipe(...)`` itself on a calibration set.

    The method is :class:`~ertacache.calibration.CalibrationSession`, the same as
    :func:`ertacache.calibrate`: on the same model, conditions and noise both return
    the same policy.

    Args:
        pipe: a pipeline of a registered family.
        prompts: the calibration prompts (one sample each), or None when
            ``pipe_kwargs`` carries ``prompt_embeds`` (their rows are the samples).
        num_inference_steps: T, as the policy will be used.
        target_speedup / threshold: exactly one, as in :func:`ertacache.calibrate`.
        seeds: one noise seed per sample (default ``0..N-1``), via ``generator=``.
        config: calibration options (every reuse mode and granularity).
        progress: print the stages.
        pipe_kwargs: everything else the pipeline call needs (height, width,
            num_frames, guidance_scale, ...), the same as for inference.

    Returns:
        The :class:`~ertacache.policy.Policy`, fingerprinted with the transformer(s).

    Raises:
        ErtaCacheError: bad goal values, an empty set, an option the pipeline cannot
            honour (before any model call), NaN output.
    """
    config = config or CalibrationConfig()
    check_goal(target_speedup, threshold, num_inference_steps)
    if prompts is not None:
        n = len(prompts)
    elif isinstance(pipe_kwargs.get("prompt_embeds"), Tensor):
        n = int(pipe_kwargs["prompt_embeds"].shape[0])
    else:
        raise ErtaCacheError("give the calibration prompts, or prompt_embeds with one row per sample")
    seeds = list(range(n)) if seeds is None else [int(s) for s in seeds]
    if n == 0 or len(seeds) != n:
        raise ErtaCacheError(f"the calibration set is empty or its seeds do not match: {n} samples, {len(seeds)} seeds")
    check_pipeline_config(pipe, config)
    driver = PipelineDriver(pipe, prompts, seeds, num_inference_steps, config.reuse, pipe_kwargs)
    log = logger(progress, "calibrate_pipeline")
    if driver.adjustment_off is not None and config.timestep_adjustment and log is not None:
        log(f"timestep adjustment {driver.adjustment_off}")
    return CalibrationSession(driver, config, log).policy(target_speedup, threshold)

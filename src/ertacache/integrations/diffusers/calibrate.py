"""Calibrating a policy on a diffusers pipeline: the core's session, driven through the pipeline's own ``__call__``.

:class:`PipelineDriver` walks each trajectory as one pipeline call (``output_type="latent"``)
on the rows a pass needs, with :class:`~.hooks.StepHook` on the transformer(s) running the
pass; :class:`~ertacache.calibration.CalibrationSession` is the method, the same as for
:func:`ertacache.calibrate`. Every option of :class:`~ertacache.core.config.CalibrationConfig`
is honoured, or refused before the first model call. DDIM-family schedulers (CogVideoX)
take no custom grid, so their candidates have no adjusted variant and the policy says
why (docs/method.md section 5).
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ...calibration import CalibrationSession, check_goal
from ...calibration.distributed import all_reduce_sum, rank_and_size, rows_over_processes, shard
from ...calibration.drive import check_batch_size
from ...calibration.passes import GroundTruth
from ...core.config import CalibrationConfig
from ...core.engine import Engine, Pass
from ...core.reuse import get_reuse
from ...errors import ErtaCacheError
from ...policy import Policy
from .adapters import block_stack, embeds_rows, per_row, pipeline_output, take_rows
from .call import call_settings
from .families import family_for, guidance_that_counts, pipeline_fingerprint, transformers_of
from .hooks import register_hooks, remove_hooks
from .run import PipelineRun
from .scheduler import grid_unsupported, model_steps, restore_scheduler, scheduler_refusal, set_scheduler_grid
from .twin import check_prompts_valid, fresh_twin

logger = logging.getLogger(__name__)


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
        batch_size: rows per pipeline call. Several micro-batches run as concurrent
            calls (threads, each with its own copy of the scheduler) whose hooks meet at
            every step, so each decision sums over the whole set, as one batch would.
        local_rows: the rows passed are this process' own (:func:`calibrate_pipeline`).
        check_prompts: other prompts for the fresh check (:mod:`.twin`).
    """

    def __init__(self, pipe: Any, prompts: Sequence[str] | None, seeds: Sequence[int], num_inference_steps: int,
                 reuse: str, pipe_kwargs: dict[str, Any], batch_size: int | None = None,
                 local_rows: bool = False, check_prompts: Sequence[str] | None = None) -> None:
        self.pipe, self.family = pipe, family_for(pipe)
        self.prompts = None if prompts is None else list(prompts)
        self.kwargs = dict(pipe_kwargs)
        self.seeds = [int(s) for s in seeds]
        self.size, self.call_steps = len(self.seeds), num_inference_steps
        self.rank, self.world_size = rank_and_size()
        self.local_rows = bool(local_rows) and self.world_size > 1  # global row i is rank i % W's row i // W
        self.rows_here = self.size // self.world_size if self.local_rows else self.size
        self.unconditional_rows = 0  # a fresh-noise twin's rows of the unconditional prompt (after the set's own)
        self.other_rows = 0  # a fresh-noise twin's rows of other prompts (its last ones)
        self.check_prompts = check_prompts_valid(check_prompts, self.prompts, self.local_rows)
        self.check_rows = len(self.check_prompts or [])
        # a policy's T: the transformer calls per branch (Heun's 2T - 1), on the steps that run (strength)
        self.num_inference_steps = model_steps(pipe.scheduler, steps_that_run(num_inference_steps,
                                                                              self.kwargs.get("strength")))
        self.reuse = get_reuse(reuse)
        self.transformers = transformers_of(pipe, self.family)
        if not self.transformers:
            raise ErtaCacheError(f"{type(pipe).__name__} has none of the transformers {self.family.transformers}")
        self.layout = self.family.channels
        self.adjustment_off = grid_unsupported(pipe.scheduler)
        self.own_grid: list[float] | None = None
        self.branches: tuple[str, ...] = ()
        self.latent_shape: tuple[int, ...] | None = None
        self.guidance: dict[str, float] = {}
        self.sample_size: dict[str, int] = {}
        self.last_model_calls = 0
        self.batch_size = check_batch_size(batch_size)
        if any(c.__name__ in self.family.one_generator for c in type(pipe).__mro__):
            self.batch_size = 1  # the pipeline takes one generator: one row a call

    def local(self, rows: slice) -> list[int]:
        return shard(range(self.size)[rows], self.rank, self.world_size)

    def reduce(self, t: Tensor) -> Tensor:
        return all_reduce_sum(t)

    def _per_row(self, value: Any, key: str | None = None) -> bool:
        """Whether call argument ``key`` has one entry per row this process holds (:func:`~.adapters.per_row`, on
        the family's :meth:`~.families.Family.row_dim`)."""
        return per_row(value, self.rows_here, self.family.row_dim(key))

    def _rows(self, idx: list[int]) -> dict[str, Any]:
        """The call arguments of global rows ``idx`` (this process' own, with ``local_rows``)."""
        at = [i // self.world_size for i in idx] if self.local_rows else idx
        out: dict[str, Any] = {}
        for key, value in self.kwargs.items():
            out[key] = take_rows(value, at, self.family.row_dim(key)) if self._per_row(value, key) else value
        if self.prompts is not None:
            out["prompt"] = [self.prompts[i] for i in at]
        return out

    @torch.no_grad()
    def run(self, pass_: Pass, rows: slice, n_fit: int, grid: Sequence[float] | None) -> Tensor:
        idx = self.local(rows)
        size = self.batch_size or max(len(idx), 1)
        chunks = [idx[a:a + size] for a in range(0, len(idx), size)]
        if grid is None:  # ground truth decides nothing: micro-batches one after the other, sums reduced once
            return self._record(pass_, chunks, n_fit)
        pass_.reduce = self.reduce
        engine = Engine(pass_, grid, self.reuse.needs_history)
        run = PipelineRun(engine, self.family, self.reuse, chunks=len(chunks),
                          calls_per_step=len(chunks) * max(len(self.branches), 1), check_finite=True)
        try:
            return self._calls(run, chunks, n_fit, grid)
        finally:
            self.last_model_calls = engine.model_calls

    def _calls(self, run: PipelineRun, chunks: list[list[int]], n_fit: int, grid: Sequence[float] | None) -> Tensor:
        """One pipeline call per micro-batch (threads when several, meeting at each step), hooks on meanwhile."""
        pipes = [self.pipe] if len(chunks) == 1 else [_pipe_copy(self.pipe) for _ in chunks]
        bars = [getattr(p, "_progress_bar_config", None) for p in pipes]
        for p in pipes:  # the calibration has one bar of its own
            p.set_progress_bar_config(disable=True)
        run.schedulers = [p.scheduler for p in pipes]
        modules = register_hooks(self.transformers, run, self.family, with_blocks=self.reuse.needs_blocks)
        own = grid is None or self.own_grid is None or _same(grid, self.own_grid)
        outs: list[Any] = [None] * len(chunks)

        def work(c: int) -> None:
            rows = chunks[c]
            run.enter_chunk(c, rows, sum(1 for i in rows if i < n_fit))
            try:
                gens = [torch.Generator().manual_seed(self.seeds[i]) for i in rows]
                out = pipes[c](generator=gens if len(gens) > 1 else gens[0], num_inference_steps=self.call_steps,
                               output_type="latent", **self._rows(rows))
                outs[c] = torch.as_tensor(pipeline_output(out))
            except BaseException as exc:
                run.fail(exc)
                raise

        try:
            if not own:
                for p in pipes:
                    set_scheduler_grid(p.scheduler, grid)  # type: ignore[arg-type]
            if len(chunks) == 1:
                work(0)
            else:
                errors: list[BaseException] = []
                threads = [threading.Thread(target=_catching(work, c, errors)) for c in range(len(chunks))]
                for th in threads:
                    th.start()
                for th in threads:
                    th.join()
                if errors:
                    raise next((e for e in errors if not str(e).startswith("another micro-batch")), errors[0])
            run.finish()
        finally:
            for p, bar in zip(pipes, bars):
                restore_scheduler(p.scheduler)
                if bar is None:
                    del p._progress_bar_config
                else:
                    p._progress_bar_config = bar
            remove_hooks(modules)
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _record(self, pass_: Pass, chunks: list[list[int]], n_fit: int) -> Tensor:
        """Ground truth, micro-batch after micro-batch; its per-step sums are reduced over processes once."""
        pass_.reduce = lambda t: t
        outs, calls = [], 0
        seen: list[tuple[dict[str, float], dict[str, int]]] = []

        def settings(hidden: Tensor, branch: str) -> None:  # the call's own guidance and size, as inference reads them
            seen.append(call_settings(self.pipe))

        for chunk in chunks:
            engine = Engine(pass_, None, self.reuse.needs_history)
            run = PipelineRun(engine, self.family, self.reuse, check_finite=True, on_start=settings)
            outs.append(self._calls(run, [chunk], n_fit, None))
            run.check_calls_per_step()
            calls += engine.model_calls
        gt = pass_
        if isinstance(gt, GroundTruth):
            steps = sorted(gt.r_norms)
            summed = self.reduce(torch.tensor([gt.r_norms[i] for i in steps], dtype=torch.float64))
            gt.r_norms = {i: float(v) for i, v in zip(steps, summed)}
        guidance, size = seen[0] if seen else ({}, {})
        counts = guidance_that_counts(self.pipe, self.family, tuple(run.branches))
        guidance = {k: v for k, v in guidance.items() if k in counts}
        self.restore({"grid": [*run.times, 0.0], "branches": list(run.branches),
                      "latent_shape": list(run.latent_shape or ()), "guidance": guidance, "sample_size": size})
        self.last_model_calls = calls
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    @property
    def twin_off(self) -> str | None:
        """Why the set cannot be drawn under other noise (the call passes its own ``latents``), or None."""
        return "the calibration call passes its own latents" if self.kwargs.get("latents") is not None else None

    def twin(self) -> PipelineDriver | None:
        """The set for the fresh check (:mod:`.twin`): its rows under fresh noise seeds, the unconditional
        prompt's, the ``check_prompts``; None where the call passes its own ``latents`` (:attr:`twin_off`)."""
        return None if self.twin_off is not None else fresh_twin(self)

    def recorded(self) -> dict[str, Any]:
        return {"grid": self.own_grid, "branches": list(self.branches), "latent_shape": list(self.latent_shape or ()),
                "guidance": self.guidance, "sample_size": self.sample_size}

    def restore(self, recorded: dict[str, Any]) -> None:
        self.own_grid = list(recorded["grid"])
        self.branches = tuple(recorded["branches"])
        self.latent_shape = tuple(recorded["latent_shape"]) or None
        self.guidance = dict(recorded.get("guidance") or {})
        self.sample_size = dict(recorded.get("sample_size") or {})

    def identity(self) -> dict[str, Any]:
        from ...calibration.checkpoint import digest

        tensors = [v for v in self.kwargs.values() if isinstance(v, Tensor)]
        settings = {k: v for k, v in self.kwargs.items() if not isinstance(v, Tensor)}
        return {"driver": type(self.pipe).__name__, "model_fingerprint": pipeline_fingerprint(self.pipe, self.family),
                "seeds": self.seeds, "prompts": digest(self.prompts), "call": digest(settings, *tensors),
                "num_inference_steps": self.num_inference_steps, "scheduler": digest(dict(self.pipe.scheduler.config)),
                **({"check_prompts": digest(self.check_prompts)} if self.check_prompts else {})}

    def policy_fields(self, grid: Sequence[float]) -> dict[str, Any]:
        kw = self.kwargs
        return dict(num_inference_steps=self.num_inference_steps, grid=tuple(grid), reuse=self.reuse.name,
                    branches=self.branches, shift=float(getattr(self.pipe.scheduler.config, "shift", 1.0)),
                    guidance_scale=float(kw.get("true_cfg_scale", kw.get("guidance_scale", 1.0))),
                    latent_shape=self.latent_shape, model_fingerprint=pipeline_fingerprint(self.pipe, self.family),
                    guidance=self.guidance, sample_size=self.sample_size)

    def provenance(self) -> dict[str, Any]:
        strength = self.kwargs.get("strength")
        config = dict(getattr(self.pipe.scheduler, "config", {}))
        scheduler = {"class": type(self.pipe.scheduler).__name__,
                     **{k: config[k] for k in GRID_SETTINGS if isinstance(config.get(k), (int, float, bool, str))}}
        differ = strength is not None or self.num_inference_steps != self.call_steps  # strength, Heun
        steps = {"pipeline_steps": self.call_steps} if differ else {}
        return {"seeds": list(self.seeds), "pipeline": type(self.pipe).__name__, "scheduler": scheduler, **steps,
                **({} if strength is None else {"strength": float(strength)}),
                **({"check_prompts": list(self.check_prompts)} if self.check_prompts else {})}


GRID_SETTINGS = ("shift", "flow_shift", "use_dynamic_shifting", "base_shift", "max_shift", "time_shift_type",
                 "use_flow_sigmas", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                 "prediction_type", "timestep_spacing", "shift_terminal")
"""Scheduler settings that define its grid, recorded in a policy's provenance with the scheduler's class."""


def steps_that_run(num_inference_steps: int, strength: Any) -> int:
    """The denoising steps an image-to-image call runs: diffusers' pipelines skip the first
    ``int(T - min(T * strength, T))`` of the ``T`` steps' grid (strength 1: all of them). A policy covers the steps
    that run (its ``num_inference_steps``), indexed from the first."""
    if strength is None:
        return num_inference_steps
    T = num_inference_steps
    return T - int(max(T - min(T * float(strength), T), 0))


_VAE_LOCK = threading.Lock()


class _OneAtATime:
    """A VAE shared by concurrent pipeline calls, whose ``encode`` and ``decode`` run one call at a time: Wan's
    causal VAE keeps its convolutions' frames on the module between the chunks of one call."""

    def __init__(self, vae: Any) -> None:
        object.__setattr__(self, "_vae", vae)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._vae, name)

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        with _VAE_LOCK:
            return self._vae.encode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> Any:
        with _VAE_LOCK:
            return self._vae.decode(*args, **kwargs)


def _pipe_copy(pipe: Any) -> Any:
    """The same pipeline (modules shared) with a scheduler of its own: concurrent calls step independently; their
    VAE calls take turns (:class:`_OneAtATime`)."""
    other = copy.copy(pipe)
    object.__setattr__(other, "scheduler", copy.deepcopy(pipe.scheduler))
    if getattr(pipe, "vae", None) is not None:
        object.__setattr__(other, "vae", _OneAtATime(pipe.vae))
    return other


def _catching(fn: Any, arg: int, errors: list[BaseException]) -> Any:
    def target() -> None:
        try:
            fn(arg)
        except BaseException as exc:  # reported by the caller after join
            errors.append(exc)

    return target


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


def set_size(prompts: Sequence[str] | None, pipe_kwargs: dict[str, Any]) -> int:
    """The calibration set's size: the prompts, or the rows of ``prompt_embeds`` (a tensor's first dimension, or
    a list of one tensor per row, as Z-Image takes them; :func:`~.adapters.embeds_rows`).

    Raises:
        ErtaCacheError: neither is given.
    """
    if prompts is not None:
        return len(prompts)
    rows = embeds_rows(pipe_kwargs)
    if rows is None:
        raise ErtaCacheError("give the calibration prompts, or prompt_embeds with one row per sample")
    return rows


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
    batch_size: int | None = None,
    checkpoint_dir: str | None = None,
    local_rows: bool = False,
    check_prompts: Sequence[str] | None = None,
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
        progress: one tqdm bar over the passes.
        batch_size: rows per pipeline call (peak memory is bounded by it; the policy
            does not depend on it): concurrent calls that meet at every step.
        checkpoint_dir: keep each finished pass there; the same call again resumes.
        local_rows: under ``torch.distributed``, the prompts (or per-row tensors) passed are this process' own,
            and every process passes as many: the calibration set is all of them (global row ``i`` is process
            ``i % world_size``'s row ``i // world_size``; ``seeds`` cover the whole set). False: every process
            passes the whole set and walks its share.
        check_prompts: prompts unlike the calibration set's (a few, e.g. 4): a set the schedule search fitted to
            the set is kept only where it also gains on them (each under its own seed), at any calibration size
            (docs/method.md section 2.8); they cost about one generation each, plus one evaluation per policy
            compared. Needs prompt strings (not ``prompt_embeds``), and not ``local_rows``.
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
    n = set_size(prompts, pipe_kwargs)
    if local_rows:
        n = rows_over_processes(n)
    seeds = list(range(n)) if seeds is None else [int(s) for s in seeds]
    if n == 0 or len(seeds) != n:
        raise ErtaCacheError(f"the calibration set is empty or its seeds do not match: {n} samples, {len(seeds)} seeds")
    check_pipeline_config(pipe, config)
    refusal = scheduler_refusal(getattr(pipe, "scheduler", None))
    if refusal is not None:
        raise ErtaCacheError(refusal)
    driver = PipelineDriver(pipe, prompts, seeds, num_inference_steps, config.reuse, pipe_kwargs, batch_size,
                            local_rows, check_prompts)
    if driver.adjustment_off is not None and config.timestep_adjustment and progress:
        logger.warning("timestep adjustment off: %s", driver.adjustment_off)
    session = CalibrationSession(driver, config, progress=progress, checkpoint_dir=checkpoint_dir)
    return session.policy(target_speedup, threshold)

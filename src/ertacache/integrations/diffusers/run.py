"""One engine driven from inside pipeline calls (:class:`PipelineRun`), shared by the hooks of all transformers.

Each transformer call (through :class:`~.hooks.StepHook`) finds its step (the scheduler's
``step_index``, or the timestep matched against the grid), runs or rebuilds the unit's
output as the engine's pass asks, and reports the call; a step is decided when its last
unit has called (docs/diffusers.md).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ...core.engine import Engine, UnitCall
from ...core.euler import check_finite_output
from ...core.reuse import Reuse
from ...errors import ErtaCacheError, PolicyMismatchError
from .adapters import hidden_states_of, latent_of, output_like, sample_of, timestep_of
from .families import Family
from .scheduler import (
    begin_index,
    inverted,
    note_call_start,
    order_of,
    scheduler_refusal,
    start_pending,
    write_grid,
)

if TYPE_CHECKING:
    from .hooks import StepHook


def same_time(a: float, t: float) -> bool:
    """Whether a grid time ``a`` and a call's time ``t`` (in [0, 1]) are one step's: bfloat16 timesteps are rounded
    to 2^-9 relative."""
    return abs(a - t) <= 1e-4 + 4e-3 * abs(t)


@dataclass
class PipelineRun:
    """One engine driven from inside pipeline calls; shared by the hooks of all transformers.

    Args:
        engine: the pass and the grid (None while ground truth records it).
        family: the pipeline family.
        reuse: the reuse mode.
        calls_per_step: how many transformer calls make one step (units), or None
            while unknown (ground truth: decisions there change nothing).
        chunks: how many micro-batches call concurrently (threads); a step is decided
            when every micro-batch has made its calls, and each waits for that.
        check_finite: raise on NaN/inf model output (calibration).
        on_start: called with ``(hidden_states, branch)`` at each unit's step 0 (inference checks).
        pipe: (inference) the pipeline, whose scheduler is read at each call (the user
            may swap it). A call's step is its scheduler's ``step_index`` (host state, so
            finding the step reads no tensor and syncs nothing with the device), checked
            against the policy's step count; in calibration the scheduler is the
            micro-batch's own (:attr:`schedulers`). A scheduler without ``step_index``
            has the ``timestep`` matched against the grid.

    Attributes:
        times: the recorded step times (ground truth).
        branches: branch names in the order they were first called.
        schedulers: (calibration) each micro-batch's scheduler, in chunk order: where its step is
            read, and where timestep adjustment writes a changed grid.
        latent_shape: ``hidden_states.shape[1:]`` of the latest call.
    """

    engine: Engine
    family: Family
    reuse: Reuse
    chunks: int = 1
    calls_per_step: int | None = None
    check_finite: bool = False
    on_start: Callable[[Tensor, str], None] | None = None
    pipe: Any = None
    times: list[float] = field(default_factory=list)
    branches: list[str] = field(default_factory=list)
    latent_shape: tuple[int, ...] | None = None
    last: dict[Hashable, int] = field(default_factory=dict)
    schedulers: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.local = threading.local()
        self.lock = threading.Condition()
        self.decided: set[int] = set()
        self.made: dict[tuple[int, int], int] = {}
        self.failed: BaseException | None = None
        self.context_free: dict[tuple[int, int], tuple[Any, int]] = {}
        self.units_at: dict[int, list[Hashable]] = {}

    def enter_chunk(self, chunk: int, samples: Sequence[int], n_fit: int) -> None:
        """This thread runs micro-batch ``chunk``: its calls' batch holds the calibration samples ``samples``
        (global indices; repeated for batched CFG), the first ``n_fit`` of them fitting rows. Without it
        (inference) every row fits."""
        self.local.chunk, self.local.rows = chunk, (len(samples), n_fit)
        self.local.samples = torch.tensor(list(samples), dtype=torch.long)

    def fail(self, exc: BaseException) -> None:
        """A micro-batch thread failed: wake the others, which raise too."""
        with self.lock:
            self.failed = exc
            self.lock.notify_all()

    def step_of(self, unit: Hashable, t: float) -> int:
        """The step of a call at time t: the next grid time after the unit's last step (a new run at t_0)."""
        grid = self.engine.grid
        if grid is None:  # recording: a new time starts a new step
            if not self.times or not same_time(self.times[-1], t):
                self.times.append(t)
                self.flush(len(self.times) - 1)
            return len(self.times) - 1
        last = self.last.get(unit, -1)
        matches = sorted((abs(grid[i] - t), i) for i in range(len(grid) - 1) if same_time(grid[i], t))
        later = [i for _, i in matches if i > last]
        if matches and matches[0][1] == 0 and last >= 0:  # nearest t_0 again: a new run (after any other)
            self.new_run()
            step = 0
        elif later:
            step = later[0]  # the nearest time after the unit's last step (equal times: the earlier step)
        else:
            raise PolicyMismatchError(
                f"the pipeline called the transformer at t = {t:.5f}, which is not the next time of the policy's "
                f"grid (T = {len(grid) - 1}; grid starts {[round(g, 4) for g in grid[:4]]}). Call the pipeline "
                "with the policy's num_inference_steps (and resolution), or recalibrate."
            )
        self.last[unit] = step
        return step

    def new_run(self) -> None:
        """Forget the last call, whatever became of it (finished, interrupted or refused)."""
        self.engine.reset()
        self.last, self.decided, self.made = {}, set(), {}

    def scheduler(self) -> Any:
        """The scheduler of this thread's pipeline call if it keeps a ``step_index``, else None: the pipeline's
        (inference, read at each call: the user may have swapped it) or this micro-batch's (calibration)."""
        if self.pipe is not None:
            scheduler = self.pipe.scheduler
        elif self.schedulers:
            scheduler = self.schedulers[getattr(self.local, "chunk", 0)]
        else:
            return None
        return scheduler if hasattr(scheduler, "step_index") else None

    @staticmethod
    def _index(scheduler: Any) -> int:
        """The step among those the call runs: 0 at its first step, whatever strength skipped before it."""
        begin = begin_index(scheduler)
        index = scheduler.step_index
        if index is None:  # before the first scheduler step of a call
            index = begin
        return int(index) - begin

    def time_of(self, kwargs: dict[str, Any], scheduler: Any) -> float:
        """The call's time t in [0, 1]: from its ``timestep`` (the family's scale), or for a detected family from
        the scheduler's ``sigmas`` at its step (host state)."""
        if self.family.timestep_scale:
            return timestep_of(kwargs, self.family)
        if scheduler is None:
            raise ErtaCacheError(f"{self.family.name}: this family's time is read from the scheduler, and "
                                 f"{type(self.pipe.scheduler).__name__ if self.pipe is not None else 'its scheduler'} "
                                 "keeps no step_index: use a flow-matching scheduler")
        sigma = float(scheduler.sigmas[self._index(scheduler) + begin_index(scheduler)])
        return 1.0 - sigma if inverted(scheduler) else sigma

    def check_calls_per_step(self) -> None:
        """Ground truth: the same transformer calls (units) at every step, or a one-line error naming what was seen.

        Raises:
            ErtaCacheError: the calls change from step to step.
        """
        # the branches called at each step (Wan 2.2 hands them from one transformer to the other part-way)
        kinds = {tuple(sorted(str(u[1]) for u in units)) for units in self.units_at.values()}  # type: ignore[index]
        if len(kinds) > 1:
            counts = sorted({len(units) for units in self.units_at.values()})
            names: set[str] = {str(u[1]) for units in self.units_at.values() for u in units}  # type: ignore[index]
            raise ErtaCacheError(
                f"{self.family.name}: the transformer's calls change from step to step ({counts} calls a step, "
                f"branches {sorted(names)}); ertacache needs the same calls at every step: register the family "
                "with its branches (register_family)")

    def branch_of(self, hook: Any, scheduler: Any, kwargs: dict[str, Any]) -> str:
        """The call's branch: its ``cache_context``, or for a pipeline that sets none, the family's name for the
        k-th call at this step (FluxImg2ImgPipeline calls cond, then uncond, with no context)."""
        context = hook.state_manager._context
        if context is not None:
            return str(context.name)
        key = (getattr(self.local, "chunk", 0), hook.index)
        step = (scheduler.step_index, id(scheduler.timesteps)) if scheduler is not None \
            else float(self.time_of(kwargs, None))
        seen, k = self.context_free.get(key, (None, -1))
        k = k + 1 if seen == step else 0
        self.context_free[key] = (step, k)
        names = self.family.context_free_branches
        return names[k] if k < len(names) else f"{self.family.default_context}{k}"

    def record_step(self, scheduler: Any, t: float) -> int:
        """Ground truth: the step of a call from the scheduler's ``step_index``, its time ``t`` recorded at the
        step's first call (the steps before it decided then).

        Raises:
            ErtaCacheError: the scheduler skipped a step, or ran backwards, within one call.
        """
        index = self._index(scheduler)
        if index == len(self.times):
            self.times.append(t)
            self.flush(index)
        elif index > len(self.times) or not same_time(self.times[index], t):
            raise ErtaCacheError(
                f"the scheduler's step_index is {index} at t = {t:.5f} after {len(self.times)} recorded steps "
                f"(times {[round(x, 4) for x in self.times[-3:]]}): the pipeline's scheduler does not step once "
                "per denoising step; report the pipeline class")
        return index

    def index_step(self, unit: Hashable, scheduler: Any) -> int:
        """The step of a call from the scheduler's ``step_index`` (a new run when it does not move forward).

        Raises:
            PolicyMismatchError: the scheduler runs another number of steps than the policy.
        """
        grid = self.engine.grid
        assert grid is not None
        T = len(grid) - 1
        begin = begin_index(scheduler)
        n = len(scheduler.timesteps) - begin
        if n != T and not (start_pending(scheduler) and n > T):  # a sliced start is known after the first step
            runs = f"{n} (the steps that run: strength skips the first {begin} of {n + begin})" if begin else f"{n}"
            order = order_of(scheduler)
            calls = "" if order == 1 else (f" (transformer calls per branch: {type(scheduler).__name__} makes "
                                           f"{order} (T - 1) + 1 for T steps)")
            raise PolicyMismatchError(
                f"num_inference_steps: policy {T}, got {runs}{calls}; call the pipeline with the policy's "
                f"num_inference_steps (and strength and scheduler), or recalibrate for these steps")
        index = self._index(scheduler)
        if not 0 <= index < T:
            raise PolicyMismatchError(f"the scheduler is at step {index}, outside the policy's 0..{T - 1}")
        if index <= self.last.get(unit, -1):  # the unit called at this step or later already: a new call
            self.new_run()
        self.last[unit] = index
        return int(index)

    def flush(self, before: int) -> None:
        """Decide every pending step before ``before`` (ground truth, where the unit count is unknown)."""
        for step in sorted(s for s in self.engine.pending if s < before):
            self.engine.end_step(step, write_back=True)

    def fit_mask(self, batch: int) -> Tensor:
        rows = getattr(self.local, "rows", None)
        if rows is None:
            return torch.ones(batch, dtype=torch.bool)
        n, n_fit = rows
        return (torch.arange(batch) % n) < n_fit

    def sample_ids(self, batch: int) -> Tensor | None:
        """``(batch,)`` each row's calibration sample (rows repeat the ``n`` samples for batched CFG), or None."""
        samples = getattr(self.local, "samples", None)
        if samples is None:
            return None
        return samples[torch.arange(batch) % samples.numel()]

    def call(self, hook: StepHook, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """One transformer call: run, reuse or both, as the engine's pass asks; return the output to use."""
        scheduler = self.scheduler()
        refusal = scheduler_refusal(self.pipe.scheduler if self.pipe is not None else scheduler)
        if refusal is not None:
            raise ErtaCacheError(refusal)
        if scheduler is not None:
            note_call_start(scheduler)
        with self.lock:
            name = self.branch_of(hook, scheduler, kwargs)
        if name not in self.branches:
            self.branches.append(name)
        hidden = hidden_states_of(args, kwargs)
        self.latent_shape = tuple(hidden.shape[1:])
        chunk = getattr(self.local, "chunk", 0)
        unit = (hook.index, name) if self.chunks == 1 else (hook.index, name, chunk)
        if scheduler is None:
            t = self.time_of(kwargs, None)
            with self.lock:
                step = self.step_of(unit, t)
        elif self.engine.grid is None:
            t = self.time_of(kwargs, scheduler)
            with self.lock:
                step = self.record_step(scheduler, t)
                self.units_at.setdefault(step, []).append(unit)
        else:
            with self.lock:
                step = self.index_step(unit, scheduler)
            t = self.engine.grid[step]
        if step == 0 and self.on_start is not None:
            self.on_start(hidden, name)
        engine = self.engine
        kept = engine.state(unit).kept
        if kept is not None and kept.shape[0] != hidden.shape[0]:
            raise ErtaCacheError(
                f"{self.family.name}: the transformer's batch changed from {kept.shape[0]} to {hidden.shape[0]} rows "
                f"within a call (branch {name}, step {step}): a guidance branch dropped part-way, as Z-Image's "
                "cfg_truncation < 1 does; ertacache needs the same calls at every step: run without it")
        out_obj = v = r = v_cached = None
        if engine.needs_model(step, unit):
            out_obj, h_res = hook.forward_full(args, kwargs)
            v = sample_of(out_obj)
            if self.check_finite:
                check_finite_output(v, step, t, engine.pass_.name)
            r = self.reuse.keep(v, self._latent(hidden, v.shape), h_res)
        kept = engine.state(unit).kept
        if kept is not None and engine.wants_cached(step, unit):
            shape = v.shape if v is not None else kept.shape
            v_cached = engine.reuse(step, self.reuse).rebuild(kept, self._latent(hidden, shape),
                                          lambda res: hook.forward_head(args, kwargs, res), engine.history(unit, t))
        done = v if v is not None else v_cached
        x = hidden if done is None else self._latent(hidden, done.shape)
        call = UnitCall(step, t, unit, name, x, self.fit_mask(hidden.shape[0]), v=v, r=r, v_cached=v_cached,
                        samples=self.sample_ids(hidden.shape[0]))
        with self.lock:
            if self.chunks == 1 and self.calls_per_step is not None and any(s < step for s in engine.pending):
                made = sorted({c.branch for s in engine.pending for c in engine.pending[s] if s < step})
                raise PolicyMismatchError(
                    f"the pipeline called the transformer {engine.pending_count(min(engine.pending))} time(s) at a "
                    f"step ({made}) where {self.calls_per_step} calls (guidance branches) were expected: the "
                    "guidance setting differs from the one calibrated; recalibrate for it")
            out = engine.observe(call)
            self._maybe_decide(step, chunk)
        return out_obj if out_obj is not None and out is v else output_like(args, kwargs, out)

    def _maybe_decide(self, step: int, chunk: int) -> None:
        """Decide ``step`` once every unit has called; a micro-batch that made all its calls waits for that."""
        if self.calls_per_step is None:
            return
        if self.engine.pending_count(step) >= self.calls_per_step:
            before = list(self.engine.grid or [])
            self.engine.end_step(step, write_back=True)
            if self.engine.grid is not None and self.engine.grid != before:
                for scheduler in self.schedulers:
                    write_grid(scheduler, self.engine.grid, step + 1)
            self.decided.add(step)
            self.lock.notify_all()
            return
        if self.chunks == 1:
            return
        key = (chunk, step)
        self.made[key] = self.made.get(key, 0) + 1
        if self.made[key] >= self.calls_per_step // self.chunks:
            while step not in self.decided:
                if self.failed is not None:
                    raise ErtaCacheError(f"another micro-batch failed: {self.failed}")
                self.lock.wait(timeout=1.0)

    def _latent(self, hidden: Tensor, shape: Any) -> Tensor:
        if self.reuse.needs_blocks:
            return hidden
        return latent_of(hidden, tuple(shape))

    def finish(self) -> None:
        """Decide what is still pending (the end of a pipeline call)."""
        self.flush(1 << 30)

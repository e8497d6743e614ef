"""The diffusers driver: hooks that run the core's engine inside a pipeline's own ``__call__``.

:class:`StepHook` sits on each transformer (through diffusers' ``HookRegistry``). At
each transformer call it reads the step from the scheduler's ``step_index`` (the
pipeline's own state: host only, never by counting calls; a scheduler without it, such
as DDIM's, has the ``timestep`` passed matched in order against the grid), runs the
model when the engine's pass needs it, rebuilds ``v~`` from the unit's cache when
asked, and reports the call to the :class:`~ertacache.core.engine.Engine` shared by all
transformers of the pipeline (:class:`PipelineRun`). A unit is one ``cache_context`` branch of one transformer.

A step is decided when its last unit has called. Units called before it already
returned their (provisional) output; where the decision changes it (a calibration
pass only), the engine writes the final output into that tensor in place, before the
pipeline combines the branches and steps the scheduler. Timestep adjustment writes
the new times into the scheduler in place (:func:`~.scheduler.write_grid`).

:class:`BlockHook` sits on each block of the stack for ``block_residual`` reuse: it
records ``h_in`` and ``h_out`` at a computed step, and at a cached step the first
block returns ``h_in + r`` while the others pass their inputs through.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import StateManager
from torch import Tensor

from ...core.engine import Engine, UnitCall
from ...core.euler import check_finite_output
from ...core.reuse import Reuse
from ...errors import ErtaCacheError, PolicyMismatchError
from .adapters import (
    BlockOutput,
    encoder_states_of,
    hidden_states_of,
    latent_of,
    output_like,
    sample_of,
    timestep_of,
)
from .families import Family
from .scheduler import write_grid

STEP_HOOK = "ertacache"
BLOCK_HOOK = "ertacache_block"
RELAY_HOOK = "ertacache_context"


def same_time(a: float, t: float) -> bool:
    """Whether a grid time ``a`` and a call's time ``t`` (in [0, 1]) are one step's: bfloat16 timesteps are rounded
    to 2^-9 relative."""
    return abs(a - t) <= 1e-4 + 4e-3 * abs(t)


class BlockSwitch(threading.local):
    """Shared by a transformer's block hooks: ``off``, ``record`` (keep ``h_in``, ``h_out``) or ``inject``
    (skip the stack). Per thread, since micro-batches of a calibration call the model concurrently."""

    def __init__(self) -> None:
        self.mode: Literal["off", "record", "inject"] = "off"
        self.h_in: Tensor | None = None
        self.h_out: Tensor | None = None
        self.residual: Tensor | None = None


class BlockHook(ModelHook):
    """On one block of the stack: records its states, or replaces the stack by ``h_in + r`` (``block_residual``).

    Args:
        switch: the transformer's :class:`BlockSwitch`.
        output: how the block returns its states.
        first, last: the block's place in the stack.
    """

    def __init__(self, switch: BlockSwitch, output: BlockOutput, first: bool, last: bool) -> None:
        super().__init__()
        self.switch, self.output, self.first, self.last = switch, output, first, last
        self.compiled: Any = None

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        sw = self.switch
        forward: Any = self.compiled or self.fn_ref.original_forward
        if sw.mode == "off":
            return forward(*args, **kwargs)
        h = hidden_states_of(args, kwargs)
        if self.first:
            sw.h_in = h
        if sw.mode == "inject":
            if sw.residual is None or sw.h_in is None:
                raise ErtaCacheError("block_residual: a cached step without a cached residual")
            out_h = sw.h_in + sw.residual if self.first else h
            return self.output.pack(out_h, encoder_states_of(args, kwargs))
        out = forward(*args, **kwargs)
        if self.last:
            sw.h_out = self.output.hidden_of(out)
        return out


class _NoState:
    def reset(self, *args: Any, **kwargs: Any) -> None:
        pass


class ThreadContext(StateManager):
    """diffusers' ``StateManager`` holding the ``cache_context`` per thread (micro-batches run concurrently)."""

    def __init__(self) -> None:
        self._local = threading.local()
        super().__init__(_NoState)  # type: ignore[arg-type]

    @property  # type: ignore[override]
    def _context(self) -> Any:
        return getattr(self._local, "context", None)

    @_context.setter
    def _context(self, value: Any) -> None:
        self._local.context = value


class ContextRelay(ModelHook):
    """On the module a ``torch.compile`` wrapper holds: receives its ``cache_context`` for the :class:`StepHook` on
    the wrapper (the pipeline sets the context on the inner module, whose attributes the wrapper passes through)."""

    _is_stateful = True

    def __init__(self, state_manager: StateManager) -> None:
        super().__init__()
        self.state_manager = state_manager

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        return module


def _registry(module: torch.nn.Module) -> Any:
    """The module's own hook registry (a compile wrapper gets one of its own, not its inner module's)."""
    from diffusers.hooks import HookRegistry

    if isinstance(module, _COMPILED) and "_diffusers_hook" not in module.__dict__:
        module._diffusers_hook = HookRegistry(module)
    return HookRegistry.check_if_exists_or_initialize(module)


_COMPILED = torch._dynamo.eval_frame.OptimizedModule


class StepHook(ModelHook):
    """On a transformer: reports each call to the pipeline's :class:`PipelineRun`.

    Args:
        run: the shared run (engine, grid, step matching).
        index: which transformer of the pipeline (Wan 2.2 has two), part of the unit key.
        switch: the block stack's switch for ``block_residual`` reuse, else None.
    """

    _is_stateful = True  # receives cache_context from diffusers

    def __init__(self, run: PipelineRun, index: int, switch: BlockSwitch | None = None) -> None:
        super().__init__()
        self.run, self.index, self.switch = run, index, switch
        self.state_manager = ThreadContext()
        self.compiled: Any = None  # the transformer's own forward, compiled (module.compile() after apply)

    def branch(self) -> str:
        context = self.state_manager._context
        return self.run.family.default_context if context is None else context.name

    def forward_full(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Tensor | None]:
        """The whole model: ``(output, block residual or None)``."""
        forward: Any = self.compiled or self.fn_ref.original_forward
        if self.switch is None:
            return forward(*args, **kwargs), None
        self.switch.mode = "record"
        try:
            out = forward(*args, **kwargs)
            if self.switch.h_out is None or self.switch.h_in is None:
                raise ErtaCacheError("block_residual: the block stack did not run")
            return out, self.switch.h_out - self.switch.h_in
        finally:
            self.switch.mode, self.switch.h_in, self.switch.h_out = "off", None, None

    def forward_head(self, args: tuple[Any, ...], kwargs: dict[str, Any], residual: Tensor) -> Tensor:
        """Embedding and head only, the stack replaced by ``h_in + residual``."""
        if self.switch is None:
            raise ErtaCacheError("block_residual reuse needs block hooks; apply the cache with that reuse mode")
        forward: Any = self.compiled or self.fn_ref.original_forward
        self.switch.mode, self.switch.residual = "inject", residual
        try:
            return sample_of(forward(*args, **kwargs))
        finally:
            self.switch.mode, self.switch.residual, self.switch.h_in = "off", None, None

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.run.call(self, args, kwargs)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state_manager.reset()
        return module


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
        index = scheduler.step_index
        if index is None:  # before the first scheduler step of a call
            index = getattr(scheduler, "begin_index", None) or 0
        return int(index)

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
        n = len(scheduler.timesteps)
        if n != T:
            raise PolicyMismatchError(
                f"num_inference_steps: policy {T}, got {n}; call the pipeline with the policy's num_inference_steps, "
                "or map the policy with policy.for_steps(n), or recalibrate")
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
        name = hook.branch()
        if name not in self.branches:
            self.branches.append(name)
        hidden = hidden_states_of(args, kwargs)
        self.latent_shape = tuple(hidden.shape[1:])
        chunk = getattr(self.local, "chunk", 0)
        unit = (hook.index, name) if self.chunks == 1 else (hook.index, name, chunk)
        scheduler = self.scheduler()
        if scheduler is None:
            t = timestep_of(kwargs, self.family)
            with self.lock:
                step = self.step_of(unit, t)
        elif self.engine.grid is None:
            t = timestep_of(kwargs, self.family)
            with self.lock:
                step = self.record_step(scheduler, t)
        else:
            with self.lock:
                step = self.index_step(unit, scheduler)
            t = self.engine.grid[step]
        if step == 0 and self.on_start is not None:
            self.on_start(hidden, name)
        engine = self.engine
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
        return out_obj if out_obj is not None and out is v else output_like(kwargs, out)

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


def register_hooks(transformers: list[Any], run: PipelineRun, family: Family, with_blocks: bool) -> list[Any]:
    """Put a :class:`StepHook` (and block hooks) on each transformer; return the modules hooked.

    Raises:
        ErtaCacheError: a transformer already has ertacache applied, or (``with_blocks``)
            has no registered block stack.
    """
    from .adapters import block_stack

    stacks = [block_stack(tf, family) if with_blocks else [] for tf in transformers]  # refuse before registering
    for tf, blocks in zip(transformers, stacks):
        check_compilable(tf, [b for b, _ in blocks])
        if _registry(tf).get_hook(STEP_HOOK) is not None:
            raise ErtaCacheError(f"{type(tf).__name__} already has ertacache applied; remove() the old handle first")
    hooked: list[Any] = []
    for index, (tf, blocks) in enumerate(zip(transformers, stacks)):
        switch = BlockSwitch() if with_blocks else None
        for k, (block, output) in enumerate(blocks):
            block_hook = BlockHook(switch, output, first=k == 0, last=k == len(blocks) - 1)  # type: ignore[arg-type]
            _registry(block).register_hook(block_hook, BLOCK_HOOK)
            _route_compile(block, block_hook)
            hooked.append(block)
        step_hook = StepHook(run, index, switch)
        _registry(tf).register_hook(step_hook, STEP_HOOK)
        if isinstance(tf, _COMPILED):  # torch.compile(transformer): the hook is outside the compiled call
            _registry(tf._orig_mod).register_hook(ContextRelay(step_hook.state_manager), RELAY_HOOK)
            hooked.append(tf._orig_mod)
        else:
            _route_compile(tf, step_hook)
        if hasattr(tf, "enable_parallelism"):
            _route_parallelism(tf, step_hook)
        hooked.append(tf)
    return hooked


def check_compilable(transformer: Any, blocks: list[torch.nn.Module]) -> None:
    """Refuse what would put the per-step decisions inside a compiled region.

    Raises:
        ErtaCacheError: a module to hook already compiled in place (``.compile()``,
            ``compile_repeated_blocks()`` with ``block_residual``), or ``block_residual``
            on a ``torch.compile``-wrapped transformer.
    """
    order = ("apply it first and compile afterwards (pipe.transformer.compile(...) or "
             "pipe.transformer.compile_repeated_blocks(...)), or wrap before applying: "
             "pipe.transformer = torch.compile(pipe.transformer)")
    for module in [transformer, *blocks]:
        if getattr(module, "_compiled_call_impl", None) is not None:
            raise ErtaCacheError(f"{type(module).__name__} was compiled in place before ertacache was applied, which "
                                 f"would put the cache's per-step decisions inside the compiled graph: {order}")
    if blocks and isinstance(transformer, _COMPILED):
        raise ErtaCacheError("block_residual reuse on a torch.compile-wrapped transformer would compile the block "
                             "hooks into its graph: apply ertacache to the plain transformer, then "
                             "compile_repeated_blocks(...) (regional compile), or use reuse='velocity'")


ROUTED = ("compile", "enable_parallelism")
"""Module methods :func:`register_hooks` replaces on the instance (and :func:`remove_hooks` restores)."""


def _route(module: torch.nn.Module, name: str, method: Any) -> None:
    method.__ertacache__ = True
    setattr(module, name, method)


def _route_compile(module: torch.nn.Module, hook: Any) -> None:
    """``module.compile(...)`` after apply compiles the module's own forward; the hook around it stays eager."""

    def compile(*args: Any, **kwargs: Any) -> None:
        hook.compiled = torch.compile(hook.fn_ref.original_forward, *args, **kwargs)

    _route(module, "compile", compile)


def _route_parallelism(module: torch.nn.Module, hook: StepHook) -> None:
    """``enable_parallelism(...)`` after apply: the step hook moves outside the context-parallel hooks it adds,
    so it sees the whole input and output, as the pipeline passes them, and every rank decides alike."""
    original: Any = module.enable_parallelism

    def enable_parallelism(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        registry = _registry(module)
        registry.remove_hook(STEP_HOOK, recurse=False)
        registry.register_hook(hook, STEP_HOOK)  # registered last: outermost
        return out

    _route(module, "enable_parallelism", enable_parallelism)


def remove_hooks(modules: list[Any]) -> None:
    """Undo :func:`register_hooks` on the modules it returned."""
    for module in modules:
        for routed in ROUTED:
            if getattr(module.__dict__.get(routed), "__ertacache__", False):
                delattr(module, routed)
        registry = _registry(module)
        for name in (STEP_HOOK, BLOCK_HOOK, RELAY_HOOK):
            if registry.get_hook(name) is not None:
                registry.remove_hook(name, recurse=False)

"""The diffusers driver: hooks that run the core's engine inside a pipeline's own ``__call__``.

:class:`StepHook` sits on each transformer (through diffusers' ``HookRegistry``). At
each transformer call it reads the step from the scheduler's ``step_index`` (the
pipeline's own state: host only, never by counting calls; a scheduler without it, such
as DDIM's, has the ``timestep`` passed matched in order against the grid), runs the
model when the engine's pass needs it, rebuilds ``v~`` from the unit's cache when
asked, and reports the call to the :class:`~ertacache.core.engine.Engine` shared by all
transformers of the pipeline (:class:`~.run.PipelineRun`). A unit is one ``cache_context`` branch of one transformer.

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
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import StateManager
from torch import Tensor

from ...errors import ErtaCacheError
from .adapters import (
    BlockOutput,
    encoder_states_of,
    hidden_states_of,
    sample_of,
)
from .families import Family
from .run import PipelineRun

STEP_HOOK = "ertacache"
BLOCK_HOOK = "ertacache_block"
RELAY_HOOK = "ertacache_context"


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


@contextmanager
def beneath_accelerate(module: torch.nn.Module) -> Iterator[None]:
    """Change the module's hooks with accelerate's hook (model or sequential CPU offload) lifted off, then put it
    back on top: the hooks end up inside accelerate's.

    accelerate wraps ``forward`` by replacing it and keeps the replaced one as ``_old_forward``; diffusers'
    pipelines remove and re-add that hook at the end of every call (``maybe_free_model_hooks``), which puts
    ``_old_forward`` back. A hook registered on top of accelerate's would be dropped there; one beneath it is
    what accelerate keeps and wraps again. Without an accelerate hook this does nothing.
    """
    hook = getattr(module, "_hf_hook", None)
    if hook is None or not hasattr(module, "_old_forward"):
        yield
        return
    from accelerate.hooks import add_hook_to_module, remove_hook_from_module

    remove_hook_from_module(module)
    try:
        yield
    finally:
        add_hook_to_module(module, hook)


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
            with beneath_accelerate(block):
                _registry(block).register_hook(block_hook, BLOCK_HOOK)
            _route_compile(block, block_hook)
            hooked.append(block)
        step_hook = StepHook(run, index, switch)
        with beneath_accelerate(tf):
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
        with beneath_accelerate(module):
            for name in (STEP_HOOK, BLOCK_HOOK, RELAY_HOOK):
                if registry.get_hook(name) is not None:
                    registry.remove_hook(name, recurse=False)

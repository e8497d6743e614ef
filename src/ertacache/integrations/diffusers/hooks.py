"""ERTACache inference on a diffusers pipeline through diffusers' own hook machinery.

One stateful :class:`diffusers.hooks.ModelHook` per transformer replaces nothing:
at a computed step it calls the transformer's original forward and keeps its output;
at a cached step it returns the kept output (``velocity`` reuse) or ``x + r``
(``latent_residual``), rectified (Eq. 15-21), without running the transformer. The
step is found from the ``timestep`` the pipeline passes, matched against the policy's
grid, never by counting calls. Each ``cache_context`` branch has its own state.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ... import rectify
from ...errors import ErtaCacheError, PolicyMismatchError
from ...policy import Policy
from .families import Family, family_for, pipeline_fingerprint, transformers_of

HOOK_NAME = "ertacache"


@dataclass
class _BranchState:
    output: Tensor | None = None
    residual: Tensor | None = None
    last_step: int = -1

    def reset(self, *args: Any, **kwargs: Any) -> None:
        self.output, self.residual, self.last_step = None, None, -1


def _timestep_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
    ts = kwargs.get("timestep")
    if ts is None:
        raise ErtaCacheError("the transformer was called without a `timestep` keyword; ertacache needs it to find "
                             "the step")
    return float(torch.as_tensor(ts).flatten()[0])


def _hidden_states(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    x = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(x, Tensor):
        raise ErtaCacheError("the transformer was called without `hidden_states`")
    return x


def _sample_of(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, tuple):
        return output[0]
    return output.sample


def _like(output: Any, sample: Tensor) -> Any:
    if isinstance(output, Tensor):
        return sample
    if isinstance(output, tuple):
        return (sample, *output[1:])
    return type(output)(sample=sample)


def _build_hook(policy: Policy, family: Family, pipe: Any) -> Any:
    from diffusers.hooks import ModelHook
    from diffusers.hooks.hooks import StateManager

    class ErtaCacheHook(ModelHook):
        _is_stateful = True

        def __init__(self) -> None:
            super().__init__()
            self.policy, self.family = policy, family
            self.state_manager = StateManager(_BranchState)  # type: ignore[arg-type]
            self.grid = list(policy.sampling_grid[:-1])
            self.mask = policy.compute_mask
            self.branch_index = {name: k for k, name in enumerate(policy.branches)}
            # per branch, the last run's computed and cached steps (kept after the pipeline resets its hooks)
            self.steps: dict[str, dict[str, list[int]]] = {}

        def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
            return module

        def _step(self, t: float, state: _BranchState) -> int:
            tol = 1e-4 * max(1.0, abs(t))
            matches = [i for i, g in enumerate(self.grid) if abs(g - t) <= tol and i > state.last_step]
            if not matches:
                raise PolicyMismatchError(
                    f"the pipeline called the transformer at t = {t:.5f}, which is not the next time of the policy's "
                    f"grid (calibrated for num_inference_steps={self.policy.num_inference_steps}, shift="
                    f"{self.policy.shift}; grid starts {[round(g, 4) for g in self.grid[:4]]}). Call the pipeline "
                    "with the policy's num_inference_steps (and resolution), or recalibrate."
                )
            return matches[0]

        def _check_guidance(self) -> None:
            expected = self.policy.provenance.get("pipeline_guidance_scale")
            got = getattr(pipe, "_guidance_scale", None)
            if expected is not None and got is not None and abs(float(got) - float(expected)) > 1e-6:
                raise PolicyMismatchError(
                    f"guidance_scale: policy {expected}, got {got}; recalibrate for this guidance setting"
                )

        def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            from diffusers.hooks.hooks import CacheContext

            if self.state_manager._context is None:
                self.state_manager.set_context(CacheContext(self.family.default_context))
            name = self.state_manager.context.name
            state: _BranchState = self.state_manager.get_state()
            if name not in self.branch_index:
                raise PolicyMismatchError(
                    f"the pipeline runs guidance branch {name!r}, the policy was calibrated for branches "
                    f"{self.policy.branches}: the guidance setting differs; recalibrate for it"
                )
            x = _hidden_states(args, kwargs)
            if self.policy.latent_shape is not None and tuple(x.shape[1:]) != self.policy.latent_shape:
                raise PolicyMismatchError(
                    f"latent shape: policy {self.policy.latent_shape}, got {tuple(x.shape[1:])} (another resolution "
                    "or frame count); recalibrate for it"
                )
            t = _timestep_of(args, kwargs) / self.family.timestep_scale
            step = self._step(t, state)
            if step == 0:
                self._check_guidance()
                state.reset()
                self.steps[name] = {"computed": [], "cached": []}
            state.last_step = step
            if self.mask[step] or state.output is None:
                self.steps.setdefault(name, {"computed": [], "cached": []})["computed"].append(step)
                forward: Any = self.fn_ref.original_forward
                out = forward(*args, **kwargs)
                sample = _sample_of(out)
                state.output = sample
                state.residual = sample - x if self.policy.reuse == "latent_residual" else None
                return out
            self.steps[name]["cached"].append(step)
            cached = state.output if state.residual is None else x + state.residual
            coeffs = self.policy.rectification(self.branch_index[name], step)
            if coeffs is not None:
                cached = rectify.apply(cached, coeffs[0], coeffs[1], self.policy.rect_form)  # type: ignore[arg-type]
            return _like(_wrap_output(kwargs), cached)

        def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
            self.state_manager.reset()
            return module

    return ErtaCacheHook()


def _wrap_output(kwargs: dict[str, Any]) -> Any:
    """An empty output of the form the caller asked for (``return_dict``)."""
    if kwargs.get("return_dict", True):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=torch.empty(0))
    return (torch.empty(0),)


def set_scheduler_grid(scheduler: Any, grid: list[float]) -> None:
    """Make ``scheduler.set_timesteps`` end with the times ``grid`` (``T + 1`` values, 1 -> 0).

    The scheduler's own ``set_timesteps`` still runs (it sets the step count and its
    state); then its ``sigmas`` become ``grid`` and its ``timesteps`` ``1000 * grid[:-1]``.
    This is the one way in that every family shares: FLUX's dynamic shifting would
    re-shift ``sigmas=`` passed to the call, and Wan takes none. Flow-matching
    schedulers only (``sigmas`` in [0, 1]).

    Raises:
        ErtaCacheError: a scheduler without flow-matching ``sigmas``.
    """
    if not hasattr(scheduler, "sigmas") or not hasattr(scheduler.config, "num_train_timesteps") or \
            "FlowMatch" not in type(scheduler).__name__:
        raise ErtaCacheError(f"timestep adjustment needs a flow-matching scheduler; {type(scheduler).__name__} is "
                             "not one (NOTES.md section 5): use a policy without an adjusted grid")
    original = scheduler.set_timesteps

    @functools.wraps(original)  # pipelines inspect its signature for `sigmas` / `timesteps`
    def set_timesteps(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        device = scheduler.timesteps.device
        sigmas = torch.tensor(grid, dtype=torch.float32)
        scheduler.sigmas = sigmas
        scheduler.timesteps = (sigmas[:-1] * scheduler.config.num_train_timesteps).to(device)
        return out

    set_timesteps.__ertacache_original__ = original  # type: ignore[attr-defined]
    scheduler.set_timesteps = set_timesteps


def restore_scheduler(scheduler: Any) -> None:
    """Undo :func:`set_scheduler_grid`."""
    patched = scheduler.__dict__.get("set_timesteps")
    if patched is not None and hasattr(patched, "__ertacache_original__"):
        del scheduler.set_timesteps


@dataclass
class ErtaCacheHandle:
    """What :func:`apply_ertacache` returns: ``.remove()``, a context manager, and per-call stats
    (:meth:`forwards`, :meth:`steps`). A policy's adjusted grid is set on the scheduler while the
    handle is applied (:func:`set_scheduler_grid`)."""

    pipe: Any
    policy: Policy
    family: Family
    modules: list[torch.nn.Module] = field(default_factory=list)
    hooks: list[Any] = field(default_factory=list)
    _scheduler_patched: bool = False

    def remove(self) -> None:
        """Unregister the hooks (and the scheduler's grid): the pipeline runs exactly as before."""
        from diffusers.hooks import HookRegistry

        for module in self.modules:
            registry = HookRegistry.check_if_exists_or_initialize(module)
            if registry.get_hook(HOOK_NAME) is not None:
                registry.remove_hook(HOOK_NAME, recurse=False)
        self.modules, self.hooks = [], []
        if self._scheduler_patched:
            restore_scheduler(self.pipe.scheduler)
            self._scheduler_patched = False

    def forwards(self) -> dict[str, int]:
        """Transformer forwards of the last pipeline call per branch, summed over transformers (NFE per branch)."""
        out: dict[str, int] = {}
        for hook in self.hooks:
            for name, steps in hook.steps.items():
                out[name] = out.get(name, 0) + len(steps["computed"])
        return out

    def steps(self) -> dict[str, dict[str, list[int]]]:
        """The last call's computed and cached steps per branch, over all transformers."""
        out: dict[str, dict[str, list[int]]] = {}
        for hook in self.hooks:
            for name, steps in hook.steps.items():
                both = out.setdefault(name, {"computed": [], "cached": []})
                both["computed"] += steps["computed"]
                both["cached"] += steps["cached"]
        return out

    def __enter__(self) -> ErtaCacheHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def apply_ertacache(pipe: Any, policy: Policy, *, check_fingerprint: bool = True) -> ErtaCacheHandle:
    """Cache a diffusers pipeline's transformer(s) by ``policy``.

    Args:
        pipe: a pipeline of a registered family (:func:`~.families.family_for`).
        policy: calibrated for this model and these settings; ``velocity`` or
            ``latent_residual`` reuse, ``step`` granularity.
        check_fingerprint: compare the policy's model fingerprint with the transformer's.

    Returns:
        A handle; ``handle.remove()`` (or leaving its ``with`` block) restores the
        pipeline exactly (hooks and, for an adjusted grid, the scheduler).

    Raises:
        ErtaCacheError: unknown pipeline, a reuse mode or granularity the hooks do not
            support, or a transformer that already has ertacache applied.
        PolicyMismatchError: another model (fingerprint).
    """
    from diffusers.hooks import HookRegistry

    family = family_for(pipe)
    if policy.reuse == "block_residual":
        raise ErtaCacheError("block_residual reuse is not supported on pipelines yet; calibrate with reuse='velocity'")
    if policy.config.granularity != "step" and policy.rect_form != "off":
        raise ErtaCacheError("per-channel rectification is not supported on pipelines yet; use granularity='step'")
    if check_fingerprint and policy.model_fingerprint is not None and transformers_of(pipe, family):
        got = pipeline_fingerprint(pipe, family)
        if got != policy.model_fingerprint:
            raise PolicyMismatchError(f"model fingerprint: policy {policy.model_fingerprint}, got {got}; "
                                      "calibrate a policy for this model")
    handle = ErtaCacheHandle(pipe, policy, family)
    for attr in family.transformers:
        module = getattr(pipe, attr, None)
        if module is None:
            continue
        registry = HookRegistry.check_if_exists_or_initialize(module)
        if registry.get_hook(HOOK_NAME) is not None:
            handle.remove()
            raise ErtaCacheError(f"{attr} already has ertacache applied; remove() the old handle first")
        hook = _build_hook(policy, family, pipe)
        registry.register_hook(hook, HOOK_NAME)
        handle.modules.append(module)
        handle.hooks.append(hook)
    if not handle.modules:
        raise ErtaCacheError(f"{type(pipe).__name__} has none of the transformers {family.transformers}")
    if policy.adjusted_grid is not None:
        try:
            set_scheduler_grid(pipe.scheduler, list(policy.adjusted_grid))
        except ErtaCacheError:
            handle.remove()
            raise
        handle._scheduler_patched = True
    return handle

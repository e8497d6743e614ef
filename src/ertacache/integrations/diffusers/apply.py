"""``apply_ertacache``: a pipeline follows a policy (inference), through diffusers' hook machinery."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from ...core.engine import Engine, FollowPolicy
from ...core.reuse import get_reuse
from ...errors import ErtaCacheError, PolicyMismatchError
from ...policy import Policy
from .call import call_settings, check_guidance
from .families import (
    Family,
    check_truncation,
    expert_switch_step,
    family_for,
    guidance_that_counts,
    transformers_of,
)
from .hooks import register_hooks, remove_hooks
from .identity import AdapterWatch, check_identity
from .run import PipelineRun
from .scheduler import grid_unsupported, possible_grids, restore_scheduler, scheduler_refusal, set_scheduler_grid
from .twin import check_prompts_valid


@dataclass
class ErtaCacheHandle:
    """What :func:`apply_ertacache` returns: ``.remove()``, a context manager, and the last call's stats
    (:meth:`forwards`, :meth:`steps`). A policy's adjusted grid is set on the scheduler while the
    handle is applied (:func:`~.scheduler.set_scheduler_grid`)."""

    pipe: Any
    policy: Policy
    family: Family
    run: PipelineRun | None = None
    modules: list[Any] = field(default_factory=list)
    _scheduler_patched: bool = False

    def remove(self) -> None:
        """Unregister the hooks (and the scheduler's grid): the pipeline runs exactly as before."""
        remove_hooks(self.modules)
        self.modules = []
        if self._scheduler_patched:
            restore_scheduler(self.pipe.scheduler)
            self._scheduler_patched = False

    def _follower(self) -> FollowPolicy:
        assert self.run is not None
        return self.run.engine.pass_  # type: ignore[return-value]

    def forwards(self) -> dict[str, int]:
        """Transformer forwards of the last pipeline call per branch, summed over transformers (NFE per branch)."""
        return self._follower().stats.nfe()

    def steps(self, transformer: int | None = None) -> dict[str, dict[str, list[int]]]:
        """The last call's computed and cached steps per branch, over all transformers or of one (its index)."""
        stats = self._follower().stats
        if transformer is not None:
            return {unit[1]: {k: list(v) for k, v in steps.items()}  # type: ignore[index]
                    for unit, steps in stats.units.items() if unit[0] == transformer}  # type: ignore[index]
        names = list(dict.fromkeys([*stats.computed, *stats.cached]))
        return {n: {"computed": list(stats.computed.get(n, [])), "cached": list(stats.cached.get(n, []))}
                for n in names}

    def __enter__(self) -> ErtaCacheHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def _checker(pipe: Any, family: Family, policy: Policy, strict: bool, adapters: AdapterWatch) -> Any:
    """The checks at each unit's first step: branches, guidance, sample size (the call's own settings), adapters."""
    warned: set[Any] = set()

    def on_start(hidden: Tensor, branch: str) -> None:
        adapters()
        check_truncation(pipe, family)
        _check_scheduler(pipe.scheduler, policy, strict, warned)
        if branch not in policy.branches and not policy.any_guidance:
            raise PolicyMismatchError(
                f"the pipeline runs guidance branch {branch!r}, the policy was calibrated for branches "
                f"{policy.branches}: the guidance setting differs; recalibrate for it")
        guidance, size = call_settings(pipe)
        counts = guidance_that_counts(pipe, family, policy.branches)
        check_guidance({k: v for k, v in policy.guidance.items() if k in counts}, guidance)
        shape = tuple(hidden.shape[1:])
        if policy.latent_shape is None or shape == policy.latent_shape:
            return
        calibrated = _size_text(policy.sample_size, policy.latent_shape)
        current = _size_text(size, shape)
        if strict:
            raise PolicyMismatchError(
                f"sample size: policy calibrated at {calibrated}, got {current} (another resolution or frame count); "
                "recalibrate for it, or apply with strict=False to follow the policy by step index")
        if shape not in warned:
            warned.add(shape)
            warnings.warn(f"ertacache: this policy was calibrated at {calibrated}; following it by step index at "
                          f"{current} on the pipeline's own grid (docs/diffusers.md, 'Policies that travel'). "
                          "Calibrate at this size for the best fidelity.", PolicyTravelWarning, stacklevel=2)

    return on_start


def _check_scheduler(scheduler: Any, policy: Policy, strict: bool, warned: set[Any]) -> None:
    """The scheduler's grid against the policy's (another scheduler, shift or dynamic shifting moves it): one
    :class:`SchedulerWarning` per grid, or (``strict``) a refusal."""
    T = policy.num_inference_steps
    grids = possible_grids(scheduler, T)  # before a sliced call's first step: every start it may have
    if any(g is None or all(abs(a - b) <= 1e-3 for a, b in zip(g, policy.sampling_grid[:T])) for g in grids):
        return
    grid = grids[0]
    assert grid is not None
    calibrated = policy.provenance.get("scheduler", {}).get("class", "the calibrated scheduler")
    ours = [round(t, 3) for t in policy.sampling_grid[:4]]
    text = (f"the scheduler's grid differs from the policy's ({type(scheduler).__name__}: t = "
            f"{[round(t, 3) for t in grid[:4]]}..., policy ({calibrated}): {ours}...: another scheduler, shift or "
            "dynamic shifting)")
    if strict:
        raise PolicyMismatchError(f"{text}; recalibrate with this scheduler, or apply with strict=False to follow the "
                                  "policy by step index")
    key = (type(scheduler).__name__, tuple(round(t, 4) for t in grid))
    if key not in warned:
        warned.add(key)
        warnings.warn(f"ertacache: {text}; following the policy by step index. Recalibrate with this scheduler for the "
                      "best fidelity.", SchedulerWarning, stacklevel=3)


class SchedulerWarning(UserWarning):
    """A policy is followed on another scheduler's grid than it was calibrated on."""


class PolicyTravelWarning(UserWarning):
    """A policy is followed at another resolution or frame count than it was calibrated at."""


def _size_text(size: dict[str, int], latent_shape: Any) -> str:
    named = ", ".join(f"{k}={v}" for k, v in size.items())
    return f"{named + ', ' if named else ''}latent shape {tuple(latent_shape)}"


def apply_ertacache(pipe: Any, policy: Policy | None = None, *, target_speedup: float | None = None,
                    cache_dir: str | Path | None = None, recalibrate: bool = False,
                    calibration_prompts: Sequence[str] | None = None, check_fingerprint: bool = True,
                    strict: bool = False, check_prompts: Sequence[str] | None = None,
                    calibration_rows: int | None = None) -> Any:
    """Cache a diffusers pipeline's transformer(s) by ``policy`` (Algorithm 1, inference), or, given a
    ``target_speedup`` instead, by the policy of each call's settings, calibrated on the first such call
    and kept on disk (:mod:`~.auto`).

    Args:
        pipe: a pipeline of a registered family (:func:`~.families.family_for`).
        policy: calibrated for this model and these settings; any reuse mode and
            granularity (``block_residual`` needs the family's block stack).
        target_speedup: without a policy: T / NFE to calibrate for, on the first call of each setting
            (its own rows, or ``calibration_prompts``), with the default configuration.
        cache_dir: where those policies are kept (default ``$ERTACACHE_CACHE`` or ``~/.cache/ertacache``).
        recalibrate: calibrate again for each setting met, replacing the kept policy.
        calibration_prompts: calibrate on these prompts instead of the first call's rows.
        check_prompts: prompts unlike the calibration's, on which a fitted set must also gain
            (:func:`~.calibrate.calibrate_pipeline`); part of each setting's key.
        calibration_rows: calibrate on at least this many rows: a first call with fewer has its rows repeated
            with further seeds (the same prompt, other noise); part of each setting's key. None: the call's rows.
        check_fingerprint: refuse another checkpoint than the policy's (its fingerprint, which
            ignores precision, offloading, compilation and unfused LoRA adapters; adapters give one
            :class:`~.identity.AdapterWarning`). False applies the policy to any weights.
        strict: refuse a call at another resolution or frame count than calibrated, or on
            another grid (another scheduler, shift or dynamic shifting). By default such a
            call follows the policy by step index on the pipeline's own grid, with one
            :class:`PolicyTravelWarning` per size or :class:`SchedulerWarning` per grid.

    Each call's step is the scheduler's ``step_index`` (host state): following the
    policy reads no tensor and copies nothing between host and device; the
    coefficients go to the transformer's device and dtype here, once.

    Returns:
        A handle; ``handle.remove()`` (or leaving its ``with`` block) restores the
        pipeline exactly (hooks and, for an adjusted grid, the scheduler). With a
        ``target_speedup``, an :class:`~.auto.AutoHandle` (the same methods).

    Raises:
        ErtaCacheError: unknown pipeline, a transformer that already has ertacache
            applied, a reuse mode the family cannot split for, an adjusted grid on a
            scheduler that takes none (Heun's included), a cached step where Wan 2.2 switches transformers, or
            a solver of order 2 other than FlowMatchHeunDiscreteScheduler, also one swapped in after apply (at the
            call). With Heun's solver a policy's T counts transformer calls per branch (2 T - 1 for T steps).
        PolicyMismatchError: another model (fingerprint); at call time, another step
            count, guidance setting, guidance branches, or (``strict``) sample size.
    """
    if policy is None:
        if target_speedup is None:
            raise ErtaCacheError("apply_ertacache needs a policy, or target_speedup= to calibrate one on the first "
                                 "call of each setting")
        from .auto import AutoCache, AutoHandle

        family_for(pipe)
        calibration = None if calibration_prompts is None else list(calibration_prompts)
        check = check_prompts_valid(check_prompts, [""], False)
        whole = isinstance(calibration_rows, int) and not isinstance(calibration_rows, bool)
        if calibration_rows is not None and not (whole and calibration_rows >= 1):
            raise ErtaCacheError(f"calibration_rows must be a whole number >= 1, got {calibration_rows!r}")
        return AutoHandle(AutoCache(pipe, target_speedup, cache_dir, recalibrate, calibration,
                                    lambda p: apply_policy(pipe, p, check_fingerprint, strict), check,
                                    calibration_rows))
    if target_speedup is not None or check_prompts is not None or calibration_rows is not None:
        raise ErtaCacheError("give apply_ertacache a policy or a target_speedup (with calibration_prompts, "
                             "calibration_rows or check_prompts), not both")
    return apply_policy(pipe, policy, check_fingerprint, strict)


def apply_policy(pipe: Any, policy: Policy, check_fingerprint: bool, strict: bool) -> ErtaCacheHandle:
    """:func:`apply_ertacache` with a policy (its arguments and errors)."""
    family = family_for(pipe)
    transformers = transformers_of(pipe, family)
    if not transformers:
        raise ErtaCacheError(f"{type(pipe).__name__} has none of the transformers {family.transformers}")
    if check_fingerprint:
        check_identity(pipe, family, policy)
    adapters = AdapterWatch(pipe, family, policy)
    adapters()
    switch = expert_switch_step(pipe, family, policy.sampling_grid[:-1])
    if switch is not None and switch in policy.cached_steps:
        raise ErtaCacheError(f"the policy caches step {switch}, where {type(pipe).__name__} hands over to "
                             "transformer_2, which has no output there to reuse (it would compute it, one forward "
                             "more than the policy's NFE); calibrate on this pipeline (calibrated policies compute "
                             "that step), or make a policy that computes it")
    if scheduler_refusal(pipe.scheduler) is not None:
        raise ErtaCacheError(str(scheduler_refusal(pipe.scheduler)))
    if policy.adjusted_grid is not None and grid_unsupported(pipe.scheduler) is not None:
        raise ErtaCacheError(str(grid_unsupported(pipe.scheduler)))
    reuse = get_reuse(policy.reuse)
    param = next(transformers[0].parameters(), None)
    follower = policy.follower(family.channels, device=None if param is None else param.device,
                               dtype=None if param is None else param.dtype)
    engine = Engine(follower, policy.sampling_grid, reuse.needs_history)
    run = PipelineRun(engine, family, reuse, calls_per_step=len(policy.branches),
                      on_start=_checker(pipe, family, policy, strict, adapters), pipe=pipe)
    handle = ErtaCacheHandle(pipe, policy, family, run)
    handle.modules = register_hooks(transformers, run, family, with_blocks=reuse.needs_blocks)
    if policy.adjusted_grid is not None:
        set_scheduler_grid(pipe.scheduler, list(policy.adjusted_grid))
        handle._scheduler_patched = True
    return handle

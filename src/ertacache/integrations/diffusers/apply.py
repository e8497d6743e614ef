"""``apply_ertacache``: a pipeline follows a policy (inference), through diffusers' hook machinery."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ...core.engine import Engine, FollowPolicy
from ...core.reuse import get_reuse
from ...errors import ErtaCacheError, PolicyMismatchError
from ...policy import Policy
from .families import Family, family_for, pipeline_fingerprint, transformers_of
from .hooks import PipelineRun, register_hooks, remove_hooks
from .scheduler import grid_unsupported, restore_scheduler, set_scheduler_grid


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


def _checker(pipe: Any, policy: Policy) -> Any:
    def on_start(hidden: Tensor, branch: str) -> None:
        if branch not in policy.branches:
            raise PolicyMismatchError(
                f"the pipeline runs guidance branch {branch!r}, the policy was calibrated for branches "
                f"{policy.branches}: the guidance setting differs; recalibrate for it")
        if policy.latent_shape is not None and tuple(hidden.shape[1:]) != policy.latent_shape:
            raise PolicyMismatchError(
                f"latent shape: policy {policy.latent_shape}, got {tuple(hidden.shape[1:])} (another resolution "
                "or frame count); recalibrate for it")
        expected = policy.provenance.get("pipeline_guidance_scale")
        got = getattr(pipe, "_guidance_scale", None)
        if expected is not None and got is not None and abs(float(got) - float(expected)) > 1e-6:
            raise PolicyMismatchError(f"guidance_scale: policy {expected}, got {got}; recalibrate for this guidance "
                                      "setting")

    return on_start


def apply_ertacache(pipe: Any, policy: Policy, *, check_fingerprint: bool = True) -> ErtaCacheHandle:
    """Cache a diffusers pipeline's transformer(s) by ``policy`` (Algorithm 1, inference).

    Args:
        pipe: a pipeline of a registered family (:func:`~.families.family_for`).
        policy: calibrated for this model and these settings; any reuse mode and
            granularity (``block_residual`` needs the family's block stack).
        check_fingerprint: compare the policy's model fingerprint with the transformers'.

    Returns:
        A handle; ``handle.remove()`` (or leaving its ``with`` block) restores the
        pipeline exactly (hooks and, for an adjusted grid, the scheduler).

    Raises:
        ErtaCacheError: unknown pipeline, a transformer that already has ertacache
            applied, a reuse mode the family cannot split for, or an adjusted grid on a
            scheduler that takes none.
        PolicyMismatchError: another model (fingerprint).
    """
    family = family_for(pipe)
    transformers = transformers_of(pipe, family)
    if not transformers:
        raise ErtaCacheError(f"{type(pipe).__name__} has none of the transformers {family.transformers}")
    if check_fingerprint and policy.model_fingerprint is not None:
        got = pipeline_fingerprint(pipe, family)
        if got != policy.model_fingerprint:
            raise PolicyMismatchError(f"model fingerprint: policy {policy.model_fingerprint}, got {got}; "
                                      "calibrate a policy for this model")
    if policy.adjusted_grid is not None and grid_unsupported(pipe.scheduler) is not None:
        raise ErtaCacheError(str(grid_unsupported(pipe.scheduler)))
    reuse = get_reuse(policy.reuse)
    run = PipelineRun(Engine(policy.follower(family.channels), policy.sampling_grid), family, reuse,
                      calls_per_step=len(policy.branches), on_start=_checker(pipe, policy))
    handle = ErtaCacheHandle(pipe, policy, family, run)
    handle.modules = register_hooks(transformers, run, family, with_blocks=reuse.needs_blocks)
    if policy.adjusted_grid is not None:
        set_scheduler_grid(pipe.scheduler, list(policy.adjusted_grid))
        handle._scheduler_patched = True
    return handle

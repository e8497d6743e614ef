"""The flow-matching Euler sampler with ERTACache (Algorithm 1, inference part).

``x_{i+1} = x_i + (t_{i+1} - t_i) * v_i`` (Eq. 4, indexed forward), where ``v_i`` is
computed at the steps a policy computes, and reconstructed from the cache (Eq. 6)
and rectified (Algorithm 1 line 17) at the steps it caches.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import cache, rectify
from .config import ReuseMode
from .errors import ErtaCacheError
from .grids import check_grid, time_grid
from .policy import Policy


@dataclass
class SampleStats:
    """What one sampling run did.

    Attributes:
        computed_steps: steps that ran the full model, per branch (same for all).
        cached_steps: steps that reused the cache.
        nfe: transformer forwards per sample, per branch name.
        seconds: wall time of the sampling loop.
    """

    computed_steps: list[int] = field(default_factory=list)
    cached_steps: list[int] = field(default_factory=list)
    nfe: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class SampleResult:
    """``x``: the final state at t = 0, shape of the noise; ``stats``: :class:`SampleStats`."""

    x: Tensor
    stats: SampleStats


def branches_for(guidance_scale: float, null_cond: Tensor | None) -> tuple[str, ...]:
    """``("cond", "uncond")`` with classifier-free guidance, else ``("cond",)``."""
    return ("cond", "uncond") if null_cond is not None and guidance_scale != 1.0 else ("cond",)


def seeded_noise(seeds: Sequence[int], shape: Sequence[int], dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> Tensor:
    """Standard normal noise, one sample per seed: ``(len(seeds), *shape)``; sample k depends on ``seeds[k]`` only."""
    out = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s)), dtype=dtype) for s in seeds]
    return torch.stack(out).to(device)


@torch.no_grad()
def sample(
    model: Any,
    noise: Tensor,
    cond: Tensor | None = None,
    *,
    num_inference_steps: int | None = None,
    shift: float | None = None,
    guidance_scale: float = 1.0,
    null_cond: Tensor | None = None,
    policy: Policy | None = None,
    reuse: ReuseMode = "velocity",
    model_fingerprint: str | None = None,
    callback: Callable[[int, float, Tensor], None] | None = None,
    progress: bool = False,
) -> SampleResult:
    """Integrate ``dx/dt = v(x, t, cond)`` from t = 1 (noise) to t = 0 with Euler steps.

    Args:
        model: a :class:`~ertacache.model.VelocityFn`; a
            :class:`~ertacache.model.SplitVelocityModel` for ``block_residual``.
        noise: ``x`` at t = 1, shape ``(B, *latent_shape)``.
        cond: conditions ``(B, ...)``, or None for an unconditional model.
        num_inference_steps: T; taken from the policy when omitted.
        shift: time shift of the grid (:func:`~ertacache.grids.time_grid`); default 1,
            or the policy's.
        guidance_scale: classifier-free guidance scale; with ``null_cond`` and a
            scale other than 1, two branches (cond, uncond) each with its own cache.
        null_cond: the unconditional condition ``(B, ...)``.
        policy: which steps to cache, the grid, rectification. None computes every
            step on the plain grid (the uncached reference).
        reuse: reuse mode when no policy is given (irrelevant then: nothing is cached).
        model_fingerprint: checked against the policy's when both are given.
        callback: called as ``callback(i, t_i, x_{i+1})`` after each step.
        progress: show a tqdm bar.

    Returns:
        :class:`SampleResult` with ``x`` at t = 0 and the run's stats.

    Raises:
        ErtaCacheError: missing step count, or guidance without ``null_cond``.
        PolicyMismatchError: the policy does not fit these settings.
    """
    names = branches_for(guidance_scale, null_cond)
    if guidance_scale != 1.0 and null_cond is None and cond is not None:
        raise ErtaCacheError(f"guidance_scale={guidance_scale} needs null_cond (the unconditional condition)")
    if policy is None:
        if num_inference_steps is None:
            raise ErtaCacheError("give num_inference_steps, or a policy that fixes it")
        grid = time_grid(num_inference_steps, 1.0 if shift is None else shift)
        compute_mask = [True] * num_inference_steps
        mode: ReuseMode = reuse
    else:
        policy.check_compatible(
            num_inference_steps=num_inference_steps, shift=shift, guidance_scale=guidance_scale, branches=names,
            latent_shape=tuple(noise.shape[1:]), model_fingerprint=model_fingerprint,
        )
        grid = check_grid(policy.sampling_grid)
        compute_mask, mode = policy.compute_mask, policy.reuse
    conds = [cond] if len(names) == 1 else [cond, null_cond]
    return _run(model, noise, conds, grid, compute_mask, mode, guidance_scale, policy, callback, progress)


def _run(model: Any, x: Tensor, conds: list[Tensor | None], grid: list[float], compute_mask: list[bool],
         mode: ReuseMode, guidance_scale: float, policy: Policy | None,
         callback: Callable[[int, float, Tensor], None] | None, progress: bool) -> SampleResult:
    nb = len(conds)
    names = ("cond", "uncond")[:nb]
    stats = SampleStats(nfe={n: 0 for n in names})
    r: Tensor | None = None
    start = time.perf_counter()
    steps = range(len(compute_mask))
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="sampling", unit="step")
    for i in steps:
        t = grid[i]
        xb, tb, cb = cache.batch_branches(x, torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device), conds)
        if compute_mask[i] or r is None:
            v, r = cache.compute(model, mode, xb, tb, cb)
            vs = cache.split_branches(v, nb)
            stats.computed_steps.append(i)
            for n in names:
                stats.nfe[n] += 1
        else:
            vs = cache.split_branches(cache.reuse(model, mode, r, xb, tb, cb), nb)
            if policy is not None:
                vs = [_rectified(policy, k, i, v_k) for k, v_k in enumerate(vs)]
            stats.cached_steps.append(i)
        x = x + (grid[i + 1] - t) * cache.guide(vs, guidance_scale)
        if callback is not None:
            callback(i, t, x)
    stats.seconds = time.perf_counter() - start
    return SampleResult(x=x, stats=stats)


def _rectified(policy: Policy, branch: int, step: int, v_cached: Tensor) -> Tensor:
    coeffs = policy.rectification(branch, step)
    if coeffs is None:
        return v_cached
    return rectify.apply(v_cached, coeffs[0], coeffs[1], policy.rect_form)  # type: ignore[arg-type]

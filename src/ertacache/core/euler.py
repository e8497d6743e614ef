"""The flow-matching Euler loop: the one trajectory every pass and ``sample`` walk (Algorithm 1).

``x_{i+1} = x_i + (t_{i+1} - t_i) * v_i`` (Eq. 4, indexed forward). The branches of
classifier-free guidance run as one batch, laid out branch-major: rows
``[k * B, (k + 1) * B)`` belong to branch ``k``; each branch is a unit of the
:class:`~ertacache.core.engine.Engine` with its own cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from ..errors import ErtaCacheError
from .engine import Engine, FollowPolicy, UnitCall
from .grids import check_grid, time_grid
from .model import is_split
from .reuse import DEFAULT_REUSE, History, Reuse, get_reuse

StepCallback = Callable[[int, float, Tensor], None]


def branches_for(guidance_scale: float, null_cond: Tensor | None) -> tuple[str, ...]:
    """``("cond", "uncond")`` with classifier-free guidance, else ``("cond",)``."""
    return ("cond", "uncond") if null_cond is not None and guidance_scale != 1.0 else ("cond",)


def seeded_noise(seeds: Sequence[int], shape: Sequence[int], dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> Tensor:
    """Standard normal noise, one sample per seed: ``(len(seeds), *shape)``; sample k depends on ``seeds[k]`` only."""
    out = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s)), dtype=dtype) for s in seeds]
    return torch.stack(out).to(device)


def guide(vs: Sequence[Tensor], guidance_scale: float) -> Tensor:
    """Classifier-free guidance ``v_u + s (v_c - v_u)`` of branches ``(cond, uncond)``; one branch passes through."""
    if len(vs) == 1:
        return vs[0]
    cond, uncond = vs
    return uncond + guidance_scale * (cond - uncond)


def _stack(x: Tensor, t: float, conds: Sequence[Tensor | None]) -> tuple[Tensor, Tensor, Tensor | None]:
    nb = len(conds)
    tb = torch.full((x.shape[0] * nb,), t, dtype=x.dtype, device=x.device)
    if nb == 1:
        return x, tb, conds[0]
    if any(c is None for c in conds):
        raise ErtaCacheError("with several guidance branches every branch needs a condition tensor, got None")
    return torch.cat([x] * nb), tb, torch.cat([c for c in conds if c is not None])


def compute(model: Any, reuse: Reuse, x: Tensor, t: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The full model on a branch-stacked batch: ``(v, block residual or None)``.

    Args:
        x: ``(N, ...)`` states, t: ``(N,)`` times in [0, 1], cond: ``(N, ...)`` or None.
    """
    if reuse.needs_blocks:
        if not is_split(model):
            raise ErtaCacheError(f"reuse='{reuse.name}' needs a model with embed/blocks/head (SplitVelocityModel); "
                                 f"{type(model).__name__} has none: use reuse='velocity'")
        h_in, ctx = model.embed(x, t, cond)
        h_out = model.blocks(h_in, ctx)
        return torch.as_tensor(model.head(h_out, ctx)), h_out - h_in
    return torch.as_tensor(model(x, t, cond)), None


def check_finite_output(v: Tensor, step: int, t: float, stage: str) -> None:
    """Raise on NaN/inf in a model output ``v``, naming the step, ``t`` (in [0, 1]) and the pass.

    Raises:
        ErtaCacheError: ``v`` has NaN or inf entries.
    """
    if not bool(torch.isfinite(v).all()):
        bad = int((~torch.isfinite(v)).sum())
        raise ErtaCacheError(f"model output has {bad} NaN/inf values at step {step} (t = {t:.4f}) during {stage}; "
                             "check the model's dtype (try float32) and inputs")


def euler(model: Any, reuse: Reuse, x: Tensor, conds: Sequence[Tensor | None], names: Sequence[str],
          guidance_scale: float, engine: Engine, fit: Tensor | None = None, *, batch_size: int | None = None,
          check_finite: bool = False, callback: StepCallback | None = None, progress: bool = False,
          samples: Tensor | None = None) -> Tensor:
    """Walk the engine's grid from ``t_0`` to ``t_T = 0``; the engine's pass decides every step.

    Args:
        model: a velocity function ``v(x, t, cond)``; split (embed/blocks/head) when
            ``reuse.needs_blocks``.
        reuse: the reuse mode.
        x: the state at ``t_0``, ``(B, *latent_shape)``.
        conds: one condition tensor ``(B, ...)`` (or None) per branch.
        names: the branch names, one per condition.
        guidance_scale: CFG scale combining two branches.
        engine: holds the pass and the grid (which the pass may change).
        fit: ``(B,)`` bool, the rows that fit statistics (default: all).
        batch_size: rows per model call (micro-batches; None: all). The micro-batches of
            a step all report before the step is decided, so decisions do not depend on it;
            activation memory is bounded by ``batch_size`` rows (times the branches).
        check_finite: raise on NaN/inf model output (calibration does).
        callback: ``callback(i, t_i, x_{i+1})`` after each step.
        samples: ``(B,)`` long, each row's calibration sample (reported to the pass; None: unknown).

    Returns:
        The state at t = 0.
    """
    if engine.grid is None:
        raise ErtaCacheError("the core Euler loop needs a grid")
    T = len(engine.grid) - 1
    fit = torch.ones(x.shape[0], dtype=torch.bool) if fit is None else fit
    size = x.shape[0] if not batch_size else batch_size
    chunks = [slice(a, min(a + size, x.shape[0])) for a in range(0, x.shape[0], max(size, 1))]
    units = [[n if len(chunks) == 1 else (n, c) for n in names] for c in range(len(chunks))]
    steps: Any = range(T)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=engine.pass_.name, unit="step")
    for i in steps:
        t = engine.grid[i]
        for c, rows in enumerate(chunks):
            _observe_chunk(model, reuse, engine, i, t, x[rows], [None if cc is None else cc[rows] for cc in conds],
                           names, units[c], fit[rows], check_finite, None if samples is None else samples[rows])
        out = {call.unit: call.out for call in engine.end_step(i)}
        vs = [guide([out[u] for u in units[c]], guidance_scale) for c in range(len(chunks))]  # type: ignore[misc]
        x = x + (engine.grid[i + 1] - t) * (vs[0] if len(vs) == 1 else torch.cat(vs))
        if callback is not None:
            callback(i, t, x)
    return x


def _observe_chunk(model: Any, reuse: Reuse, engine: Engine, i: int, t: float, x: Tensor,
                   conds: Sequence[Tensor | None], names: Sequence[str], units: Sequence[Any], fit: Tensor,
                   check_finite: bool, samples: Tensor | None = None) -> None:
    """One micro-batch at step i: the model (branch-stacked) where a unit needs it, ``v~`` where asked."""
    nb = len(names)
    xb, tb, cb = _stack(x, t, conds)
    v_all = r_all = vc_all = None
    if any(engine.needs_model(i, u) for u in units):
        v_all, h_res = compute(model, reuse, xb, tb, cb)
        if check_finite:
            check_finite_output(v_all, i, t, engine.pass_.name)
        r_all = reuse.keep(v_all, xb, h_res)
    if all(engine.wants_cached(i, u) for u in units):
        vc_all = _rebuild(model, engine.reuse(i, reuse), engine, units, xb, tb, cb, t)
    for k, (name, unit) in enumerate(zip(names, units)):
        engine.observe(UnitCall(i, t, unit, name, x, fit, v=_part(v_all, k, nb), r=_part(r_all, k, nb),
                                v_cached=_part(vc_all, k, nb), samples=samples))


def _part(v: Tensor | None, k: int, nb: int) -> Tensor | None:
    return None if v is None else (v if nb == 1 else v.chunk(nb)[k])


def _rebuild(model: Any, reuse: Reuse, engine: Engine, units: Sequence[Any], xb: Tensor, tb: Tensor,
             cb: Tensor | None, t: float) -> Tensor:
    def cat(parts: list[Any]) -> Any:
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    stacked = cat([engine.state(u).kept for u in units])
    history = None
    if reuse.needs_history:  # the units of a micro-batch refresh together: one history for all
        hs = [engine.history(u, t) for u in units]
        previous = [h.previous if h is not None else None for h in hs]
        first = hs[0]
        if first is not None:
            history = replace(first, previous=None if any(p is None for p in previous) else cat(previous))
    return rebuild(model, reuse, stacked, xb, tb, cb, history)


def rebuild(model: Any, reuse: Reuse, kept: Tensor, x: Tensor, t: Tensor, cond: Tensor | None,
            history: History | None = None) -> Tensor:
    """``v~`` at a cached step from the stored ``kept`` (Eq. 6): the embedding and head only for ``block_residual``;
    ``history`` for modes that extrapolate (:class:`~ertacache.core.reuse.History`)."""
    if not reuse.needs_blocks:
        return reuse.rebuild(kept, x, None, history)
    xb, tb, cb = x, t, cond

    def head(r: Tensor) -> Tensor:
        h_in, ctx = model.embed(xb, tb, cb)
        return torch.as_tensor(model.head(h_in + r, ctx))

    return reuse.rebuild(kept, xb, head, history)


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
    policy: Any = None,
    reuse: str = DEFAULT_REUSE,
    model_fingerprint: str | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> SampleResult:
    """Integrate ``dx/dt = v(x, t, cond)`` from t = 1 (noise) to t = 0 with Euler steps, following a policy.

    Args:
        model: a :class:`~ertacache.core.model.VelocityFn`; a
            :class:`~ertacache.core.model.SplitVelocityModel` for ``block_residual``.
        noise: ``x`` at t = 1, shape ``(B, *latent_shape)``.
        cond: conditions ``(B, ...)``, or None for an unconditional model.
        num_inference_steps: T; taken from the policy when omitted.
        shift: time shift of the grid (:func:`~ertacache.core.grids.time_grid`); default 1,
            or the policy's.
        guidance_scale: classifier-free guidance scale; with ``null_cond`` and a
            scale other than 1, two branches (cond, uncond) each with its own cache.
        null_cond: the unconditional condition ``(B, ...)``.
        policy: a :class:`~ertacache.policy.Policy`: which steps to cache, the grid,
            rectification. None computes every step on the plain grid (the uncached reference).
        reuse: reuse mode when no policy is given (nothing is cached then).
        model_fingerprint: checked against the policy's when both are given.
        callback: called as ``callback(i, t_i, x_{i+1})`` after each step.
        progress: show a tqdm bar.

    Returns:
        :class:`SampleResult` with ``x`` at t = 0 and the run's stats.

    Raises:
        ErtaCacheError: missing step count, an unknown reuse mode, or guidance without ``null_cond``.
        PolicyMismatchError: the policy does not fit these settings.
    """
    names = branches_for(guidance_scale, null_cond)
    if guidance_scale != 1.0 and null_cond is None and cond is not None:
        raise ErtaCacheError(f"guidance_scale={guidance_scale} needs null_cond (the unconditional condition)")
    if policy is None:
        if num_inference_steps is None:
            raise ErtaCacheError("give num_inference_steps, or a policy that fixes it")
        grid = time_grid(num_inference_steps, 1.0 if shift is None else shift)
        follow = FollowPolicy([True] * num_inference_steps)
        mode = get_reuse(reuse)
    else:
        policy.check_compatible(
            num_inference_steps=num_inference_steps, shift=shift, guidance_scale=guidance_scale, branches=names,
            latent_shape=tuple(noise.shape[1:]), model_fingerprint=model_fingerprint,
        )
        grid = check_grid(policy.sampling_grid)
        follow = policy.follower()
        mode = get_reuse(policy.reuse)
    conds = [cond] if len(names) == 1 else [cond, null_cond]
    start = time.perf_counter()
    x = euler(model, mode, noise, conds, names, guidance_scale, Engine(follow, grid, mode.needs_history),
              callback=callback,
              progress=progress)
    stats = SampleStats(computed_steps=follow.stats.computed.get(names[0], []),
                        cached_steps=follow.stats.cached.get(names[0], []), nfe=follow.stats.nfe(),
                        seconds=time.perf_counter() - start)
    return SampleResult(x=x, stats=stats)

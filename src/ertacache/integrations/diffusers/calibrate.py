"""Calibrating a policy on a diffusers pipeline, through the pipeline's own ``__call__``.

Every pass is one call of the pipeline on the whole calibration set (one batch,
``output_type="latent"``) with a calibration hook on its transformer(s); no denoising
loop is reimplemented. The passes are the core's (NOTES.md section 2 and 4):

1. ground truth: the uncached run logs ``||r_gt_i||_1`` per step and branch, the
   grid of times the pipeline uses, and the final latents;
2. Algorithm 2's threshold search, one call per lambda: the model runs every step, a
   step whose ``l1_rel`` is below lambda returns the stale output (the first branch
   called at a step decides for all its branches);
3. per candidate cached set: timestep adjustment (Eq. 13-14, one pass; the adjusted
   grid goes in through the scheduler), the rectification fit (Eq. 15-21) on the
   fitting rows with the held-out check on the others, then the held-out
   final-latent error of each variant (plain, adjusted, rectified, full); the least
   error wins.

Not yet on pipelines: ``block_residual`` reuse and per-channel fits; a config asking
for them is refused. DDIM-family schedulers (CogVideoX) take no custom grid, so
their candidates have no adjusted variant (NOTES.md section 5).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from ... import rectify
from ...cache import l1
from ...calibration import Candidate, SearchResult, check_target_speedup, select_candidates, shrink_step
from ...config import CalibrationConfig, check_threshold
from ...errors import ErtaCacheError
from ...policy import Policy, provenance
from ...rectify import RectStats
from .families import Family, family_for, pipeline_fingerprint, transformers_of
from .hooks import (
    _hidden_states,
    _like,
    _sample_of,
    _timestep_of,
    _wrap_output,
    apply_ertacache,
    restore_scheduler,
    set_scheduler_grid,
)

CALIB_HOOK = "ertacache_calibration"


class _Recorder:
    """What every calibration pass shares: the grid, the rows, the mode's per-step behaviour."""

    def __init__(self, family: Family, n: int, n_fit: int) -> None:
        self.family, self.n, self.n_fit = family, n, n_fit
        self.mode = "gt"
        self.times: list[float] = []
        self.branches: list[str] = []
        self.latent_shape: tuple[int, ...] | None = None
        self.gt_norms: dict[str, dict[int, float]] = {}
        self.threshold = math.inf
        self.cached: set[int] = set()
        self.decision: dict[int, bool] = {}
        self.rect: dict[str, dict[int, tuple[Tensor, Tensor, bool]]] = {}
        self.form = "linear"
        self.state: dict[str, dict[str, Any]] = {}
        self.phi_terms: dict[int, list[float]] = {}
        self.phi_denominator = "velocity_change"

    def rows(self, x: Tensor, fit: bool) -> Tensor:
        idx = torch.arange(x.shape[0]) % self.n
        return x[idx < self.n_fit] if fit else x[idx >= self.n_fit]

    def step_of(self, name: str, t: float) -> int:
        st = self.state.setdefault(name, {"last": -1, "out": None, "prev": None})
        if name not in self.branches:
            if self.mode != "gt":
                raise ErtaCacheError(f"calibration: branch {name!r} appeared after ground truth")
            self.branches.append(name)
        if self.mode == "gt" and name == self.branches[0]:
            self.times.append(t)
            st["last"] = len(self.times) - 1
            return st["last"]
        tol = 1e-4 * max(1.0, abs(t))
        for i in range(st["last"] + 1, len(self.times)):
            if abs(self.times[i] - t) <= tol:
                st["last"] = i
                return i
        raise ErtaCacheError(f"calibration: the pipeline called the transformer at an unexpected t = {t:.5f}")

    def reset(self) -> None:
        self.state = {}
        self.decision = {}

    def forward(self, name: str, x: Tensor, t: float, run: Any) -> Tensor | None:
        """The output to return at this call, or None for the true one."""
        step = self.step_of(name, t)
        st = self.state[name]
        out = _sample_of(run())
        if not bool(torch.isfinite(out).all()):
            raise ErtaCacheError(f"model output has NaN/inf values at step {step} (t = {t:.4f}) during {self.mode}")
        if self.mode == "gt":
            self.gt_norms.setdefault(name, {})[step] = l1(self.rows(out, True))
            return None
        cached = st["out"]
        if self.mode == "search":
            last = len(self.gt_norms[self.branches[0]]) - 1
            if step not in self.decision:
                use = 0 < step < last and cached is not None and l1(self.rows(cached - out, True)) / max(
                    self.gt_norms[name][step], 1e-30) < self.threshold
                self.decision[step] = bool(use)
                if use:
                    self.cached.add(step)
            if self.decision[step] and cached is not None:
                return cached
            st["out"] = out
            return None
        if self.mode == "adjust":
            prev, st["prev"] = st["prev"], out
            if step in self.cached and cached is not None and prev is not None:
                terms = self.phi_terms.setdefault(step, [0.0, 0.0])
                terms[0] += l1(self.rows(cached - out, True))
                terms[1] += l1(self.rows(out - prev if self.phi_denominator == "velocity_change" else out, True))
                return cached
            st["out"] = out
            return None
        if self.mode == "rect":
            if step in self.cached and cached is not None:
                a, b = RectStats.of(self.rows(cached, True), self.rows(cached - out, True), "step").solve()
                v_hat = rectify.apply(cached, a, b, self.form)  # type: ignore[arg-type]
                hold = self.rows(v_hat - out, False), self.rows(cached - out, False)
                if hold[0].numel() == 0:
                    hold = self.rows(v_hat - out, True), self.rows(cached - out, True)
                better = float(hold[0].square().sum()) < float(hold[1].square().sum())
                self.rect.setdefault(name, {})[step] = (a, b, better)
                return v_hat if better else cached
            st["out"] = out
            return None
        return None


def _build_calibration_hook(rec: _Recorder, family: Family) -> Any:
    from diffusers.hooks import ModelHook
    from diffusers.hooks.hooks import CacheContext, StateManager

    class _State:
        def reset(self, *args: Any, **kwargs: Any) -> None:
            pass

    class CalibrationHook(ModelHook):
        _is_stateful = True

        def __init__(self) -> None:
            super().__init__()
            self.state_manager = StateManager(_State)  # type: ignore[arg-type]

        def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            if self.state_manager._context is None:
                self.state_manager.set_context(CacheContext(family.default_context))
            name = self.state_manager.context.name
            x = _hidden_states(args, kwargs)
            rec.latent_shape = tuple(x.shape[1:])
            t = _timestep_of(args, kwargs) / family.timestep_scale
            kept: dict[str, Any] = {}

            def run() -> Any:
                forward: Any = self.fn_ref.original_forward
                kept["out"] = forward(*args, **kwargs)
                return kept["out"]

            replacement = rec.forward(name, x, t, run)
            return kept["out"] if replacement is None else _like(_wrap_output(kwargs), replacement)

        def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
            self.state_manager.reset()
            return module

    return CalibrationHook()


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

    Args:
        pipe: a pipeline of a registered family.
        prompts: the calibration prompts (one sample each), or None when
            ``pipe_kwargs`` carries ``prompt_embeds`` (their rows are the samples).
        num_inference_steps: T, as the policy will be used.
        target_speedup / threshold: exactly one, as in :func:`ertacache.calibrate`.
        seeds: one noise seed per sample (default ``0..N-1``), via ``generator=``.
        config: ``reuse`` must be ``velocity`` or ``latent_residual``.
        pipe_kwargs: everything else the pipeline call needs (height, width,
            num_frames, guidance_scale, ...), the same as for inference.

    Returns:
        The :class:`~ertacache.policy.Policy`, fingerprinted with the transformer.

    Raises:
        ErtaCacheError: bad goal values, an empty set, unsupported options, NaN output.
    """

    config = config or CalibrationConfig()
    if config.reuse == "block_residual":
        raise ErtaCacheError("block_residual reuse is not supported on pipelines yet: use reuse='velocity'")
    if (target_speedup is None) == (threshold is None):
        raise ErtaCacheError("give exactly one of target_speedup (e.g. 2.0) or threshold (lambda, e.g. 0.2)")
    T = num_inference_steps
    max_nfe = T if target_speedup is None else math.floor(T / check_target_speedup(target_speedup, T) + 1e-9)
    n = len(prompts) if prompts is not None else int(pipe_kwargs["prompt_embeds"].shape[0])
    seeds = list(range(n)) if seeds is None else [int(s) for s in seeds]
    if n == 0 or len(seeds) != n:
        raise ErtaCacheError(f"the calibration set is empty or its seeds do not match: {n} samples, {len(seeds)} seeds")
    family = family_for(pipe)
    n_hold = round(n * config.holdout_fraction) if n >= 2 else 0
    rec = _Recorder(family, n, n - n_hold)
    modules = transformers_of(pipe, family)

    def call() -> Tensor:
        rec.reset()
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        kwargs = dict(pipe_kwargs)
        if prompts is not None:
            kwargs["prompt"] = list(prompts)
        out = pipe(generator=gens, num_inference_steps=T, output_type="latent", **kwargs)
        images = out.frames if hasattr(out, "frames") else out.images
        return torch.as_tensor(images)

    def log(msg: str) -> None:
        if progress:
            print(f"[calibrate_pipeline] {msg}", flush=True)

    with _calibration_hooks(modules, rec, family):
        log(f"ground truth on {n - n_hold} fitting and {n_hold} held-out samples")
        gt_final = call()
        observed_guidance = getattr(pipe, "_guidance_scale", None)
        if len(rec.times) != T:
            raise ErtaCacheError(f"the pipeline ran {len(rec.times)} steps, not num_inference_steps={T}")
        base = dict(num_inference_steps=T, grid=(*rec.times, 0.0), reuse=config.reuse, branches=tuple(rec.branches),
                    shift=float(getattr(pipe.scheduler.config, "shift", 1.0)),
                    guidance_scale=float(pipe_kwargs.get("true_cfg_scale", pipe_kwargs.get("guidance_scale", 1.0))),
                    latent_shape=rec.latent_shape, model_fingerprint=pipeline_fingerprint(pipe, family),
                    config=config)
        adjustment_note = "on" if config.timestep_adjustment else "off (config)"
        if config.timestep_adjustment:
            try:
                set_scheduler_grid(pipe.scheduler, [1.0, 0.0])
                restore_scheduler(pipe.scheduler)
            except ErtaCacheError as exc:
                adjustment_note = f"off: {exc}"
                log(f"timestep adjustment {adjustment_note}")
        candidates = _search(rec, call, config, threshold, max_nfe, T, log)
        rec.mode = "off"
    best: tuple[float, Policy, Candidate] | None = None
    for cand in candidates:
        log(f"evaluating {cand.source} candidate, NFE {T - len(cand.cached_steps)}")
        variants = {"plain": Policy(cached_steps=cand.cached_steps, **base)}  # type: ignore[arg-type]
        if adjustment_note == "on" and cand.cached_steps:
            variants["adjusted"] = _adjust(pipe, modules, family, rec, call, variants["plain"], config)
        if config.rectification != "off" and cand.cached_steps:
            variants["rectified"] = _fit(pipe, modules, family, rec, call, variants["plain"], config)
            if "adjusted" in variants:
                variants["full"] = _fit(pipe, modules, family, rec, call, variants["adjusted"], config)
        for name, policy in variants.items():
            with apply_ertacache(pipe, policy, check_fingerprint=False):
                final = call()
            cand.errors[name] = float(rec.rows((final - gt_final).double(), False).square().mean()) if n_hold else \
                float((final - gt_final).double().square().mean())
        cand.variant = min(cand.errors, key=cand.errors.__getitem__)
        if best is None or cand.errors[cand.variant] < best[0]:
            best = (cand.errors[cand.variant], variants[cand.variant], cand)
    if best is None:  # pragma: no cover - _search never returns an empty list
        raise ErtaCacheError("calibration produced no candidate policy")
    info = provenance(calibration_size=n, holdout_size=n_hold, seeds=seeds, target_speedup=target_speedup,
                      threshold=best[2].threshold, selected=best[2].source, variant=best[2].variant,
                      pipeline=type(pipe).__name__, candidates=[c.as_dict(T) for c in candidates],
                      pipeline_guidance_scale=None if observed_guidance is None else float(observed_guidance),
                      timestep_adjustment=adjustment_note)
    return replace(best[1], provenance=info)


def _search(rec: _Recorder, call: Any, config: CalibrationConfig, threshold: float | None, max_nfe: int, T: int,
            log: Any) -> list[Candidate]:
    """Algorithm 2 through the pipeline: one call per lambda; candidates as the core picks them."""
    if threshold is None and max_nfe >= T:
        return [Candidate("all_compute", None, ())]
    lambdas = [check_threshold(threshold)] if threshold is not None else sorted(config.thresholds)
    results = []
    rec.mode = "search"
    for lam in lambdas:
        rec.threshold, rec.cached = lam, set()
        call()
        results.append(SearchResult(lam, tuple(sorted(rec.cached)), ()))
    log(f"policy search over {len(lambdas)} thresholds")
    if threshold is not None:
        return [Candidate("threshold", threshold, results[0].cached_steps)]
    return select_candidates(results, T, max_nfe, config)


@contextlib.contextmanager
def _calibration_hooks(modules: list[Any], rec: _Recorder, family: Family) -> Iterator[None]:
    """The calibration hook on every transformer for the duration of the block."""
    from diffusers.hooks import HookRegistry

    for module in modules:
        HookRegistry.check_if_exists_or_initialize(module).register_hook(
            _build_calibration_hook(rec, family), CALIB_HOOK)
    try:
        yield
    finally:
        for module in modules:
            HookRegistry.check_if_exists_or_initialize(module).remove_hook(CALIB_HOOK, recurse=False)


def _pass(pipe: Any, modules: list[Any], family: Family, rec: _Recorder, call: Any, policy: Policy) -> None:
    """One calibration call with the hook on, on the policy's grid (set through the scheduler)."""
    with _calibration_hooks(modules, rec, family):
        if policy.adjusted_grid is not None:
            set_scheduler_grid(pipe.scheduler, list(policy.adjusted_grid))
            rec.times = list(policy.adjusted_grid[:-1])
        try:
            call()
        finally:
            restore_scheduler(pipe.scheduler)
            rec.times = list(policy.grid[:-1])


def _adjust(pipe: Any, modules: list[Any], family: Family, rec: _Recorder, call: Any, plain: Policy,
            config: CalibrationConfig) -> Policy:
    """Eq. 13-14 on a pipeline: phi of every cached step in one pass along the cached trajectory.

    Unlike the core (NOTES.md section 3), each phi is estimated on the unadjusted grid
    and the shrinks are applied afterwards in step order: a pipeline's grid is fixed
    for the whole call. Norms are summed over the branches (not taken of the guided
    velocity, whose scale the hook does not see). Only for schedulers that take a
    custom grid (:func:`calibrate_pipeline` checks; not DDIM, NOTES.md section 5).
    """
    rec.mode, rec.cached, rec.phi_terms = "adjust", set(plain.cached_steps), {}
    rec.phi_denominator = config.phi_denominator
    _pass(pipe, modules, family, rec, call, plain)
    grid = list(plain.grid)
    for step in sorted(rec.phi_terms):
        num, den = rec.phi_terms[step]
        phi = 1.0 if den == 0 else min(1.0, max(0.0, 1.0 - num / den))
        grid = shrink_step(grid, step, phi)
    return replace(plain, adjusted_grid=tuple(grid))


def _fit(pipe: Any, modules: list[Any], family: Family, rec: _Recorder, call: Any, plain: Policy,
         config: CalibrationConfig) -> Policy:
    rec.mode, rec.cached, rec.rect, rec.form = "rect", set(plain.cached_steps), {}, config.rectification
    _pass(pipe, modules, family, rec, call, plain)
    T = plain.num_inference_steps
    a = {b: torch.zeros(T, 1) for b in plain.branches}
    b_ = {b: torch.zeros(T, 1) for b in plain.branches}
    enabled = torch.zeros(len(plain.branches), T, dtype=torch.bool)
    for k, name in enumerate(plain.branches):
        for step, (ak, bk, ok) in rec.rect.get(name, {}).items():
            if ok:
                a[name][step], b_[name][step], enabled[k, step] = ak, bk, True
    return replace(plain, rect_a=a, rect_b=b_, rect_enabled=enabled, rect_form=config.rectification)

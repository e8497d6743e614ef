"""Offline calibration: from a model and a calibration set to a :class:`~ertacache.policy.Policy`.

Stages (NOTES.md sections 2-4): ground-truth logging and the threshold search of
Algorithm 2 give candidate cached-step sets S; for each candidate the timestep
adjustment (Eq. 13-14) and the rectification fit (Eq. 15-21) are estimated, and the
candidate whose whole cached sampler has the least final-output error on the
held-out part of the set wins.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from ..config import CalibrationConfig, check_threshold
from ..errors import ErtaCacheError
from ..grids import time_grid
from ..policy import Policy, provenance, uniform_cached_steps
from ..sampler import branches_for, sample, seeded_noise
from .adjust import adjust_grid, shrink_step
from .calibset import CalibSet, check_calibration_inputs
from .fit import fit_rectification
from .search import GroundTruth, SearchResult, log_ground_truth, sweep, threshold_search

__all__ = [
    "VARIANTS", "CalibSet", "CalibrationSession", "Candidate", "GroundTruth", "SearchResult", "adjust_grid",
    "calibrate", "calibrate_many",
    "calibrate_with_variants",
    "check_target_speedup", "select_candidates",
    "fit_rectification", "log_ground_truth", "shrink_step", "sweep", "threshold_search",
]


VARIANTS = ("plain", "adjusted", "rectified", "full")
"""Component variants of a candidate: no adjustment or rectification, adjustment only,
rectification only (fitted on the original grid), both (fitted on the adjusted grid)."""


@dataclass
class Candidate:
    """One cached-step set competing for the policy, with each variant's held-out error (MSE at t = 0)."""

    source: str
    threshold: float | None
    cached_steps: tuple[int, ...]
    errors: dict[str, float] = field(default_factory=dict)
    variant: str = "plain"

    def as_dict(self, T: int) -> dict[str, Any]:
        return {"source": self.source, "threshold": self.threshold, "nfe": T - len(self.cached_steps),
                "cached_steps": list(self.cached_steps), "errors": dict(self.errors), "variant": self.variant}


def check_target_speedup(target_speedup: object, num_inference_steps: int) -> float:
    """Validate a wanted NFE reduction ``T / NFE``.

    Raises:
        ErtaCacheError: not a finite number, below 1, above T, or above T / 2 (the
            first and last steps are always computed, so NFE >= 2).
    """
    T = num_inference_steps
    s = target_speedup
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
        raise ErtaCacheError(f"target_speedup must be a finite number, got {s!r}")
    if s < 1 or s > T:
        raise ErtaCacheError(f"target_speedup must be in [1, T={T}] (T / NFE), got {s}")
    if T >= 2 and s > T / 2:
        raise ErtaCacheError(
            f"target_speedup {s} needs NFE < 2, but the first and last of T={T} steps are always computed: "
            f"the most is {T / 2:g}; use more steps or a smaller target"
        )
    return float(s)


def calibrate(
    model: Any,
    cond: Tensor | None,
    seeds: Sequence[int],
    *,
    latent_shape: Sequence[int],
    num_inference_steps: int,
    shift: float = 1.0,
    guidance_scale: float = 1.0,
    null_cond: Tensor | None = None,
    target_speedup: float | None = None,
    threshold: float | None = None,
    config: CalibrationConfig | None = None,
    model_fingerprint: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Policy:
    """Calibrate an ERTACache policy (Algorithm 2, Eq. 13-14, Eq. 15-21) for one model and sampler setting.

    Args:
        model: a velocity function ``v(x, t, cond)`` (split for ``block_residual``).
        cond: one condition per calibration sample ``(N, ...)``, or None.
        seeds: one noise seed per sample (N of them); noise is
            :func:`~ertacache.sampler.seeded_noise`.
        latent_shape: one sample's state shape, e.g. ``(1, 16, 16)``.
        num_inference_steps: T.
        shift: time shift of the grid.
        guidance_scale: CFG scale; with ``null_cond`` (``(N, ...)``) two branches.
        target_speedup: wanted ``T / NFE`` in [1, T/2]: the candidate with
            ``NFE <= T / target_speedup`` and the least held-out error wins.
        threshold: instead of a target, the lambda of Algorithm 2 (> 0): S is that
            lambda's set, as in the paper.
        config: options; :class:`~ertacache.config.CalibrationConfig` by default.
        model_fingerprint: stored in the policy and checked when it is used.
        progress: print the stages.

    Returns:
        The :class:`~ertacache.policy.Policy`; ``policy.provenance["candidates"]``
        lists every candidate with its held-out errors.

    Raises:
        ErtaCacheError: an empty calibration set, both or neither of
            ``target_speedup``/``threshold``, an invalid value of either, or NaN
            in the model's output (naming the step).
    """
    _check_goal(target_speedup, threshold, num_inference_steps)
    session = CalibrationSession(model, cond, seeds, latent_shape, num_inference_steps, shift, guidance_scale,
                                 null_cond, config or CalibrationConfig(), model_fingerprint, dtype, device, progress)
    return session.policy(target_speedup, threshold)


def calibrate_with_variants(model: Any, cond: Tensor | None, seeds: Sequence[int], **kwargs: Any
                            ) -> tuple[Policy, dict[str, Policy]]:
    """:func:`calibrate`, also returning the chosen cached set's component variants.

    The variants (keys of :data:`VARIANTS` that the config allows) are the paper's
    ablation ladder for that set: ``plain`` (offline policy alone), ``adjusted``
    (+ timestep adjustment), ``full`` (+ rectification on the adjusted grid), and
    ``rectified`` (rectification alone); the returned policy is one of them.
    """
    target_speedup, threshold = kwargs.pop("target_speedup", None), kwargs.pop("threshold", None)
    _check_goal(target_speedup, threshold, kwargs["num_inference_steps"])
    config = kwargs.pop("config", None) or CalibrationConfig()
    if config.component_check is False:
        raise ErtaCacheError("calibrate_with_variants compares the variants itself; leave component_check on")
    session = CalibrationSession(model, cond, seeds, config=config, **kwargs)
    policy = session.policy(target_speedup, threshold)
    return policy, session.variants


def _check_goal(target_speedup: float | None, threshold: float | None, num_inference_steps: int) -> None:
    if (target_speedup is None) == (threshold is None):
        raise ErtaCacheError("give exactly one of target_speedup (e.g. 2.0) or threshold (lambda, e.g. 0.2)")
    if target_speedup is not None:
        check_target_speedup(target_speedup, num_inference_steps)
    if threshold is not None:
        check_threshold(threshold)


def calibrate_many(model: Any, cond: Tensor | None, seeds: Sequence[int], *, target_speedups: Sequence[float],
                   latent_shape: Sequence[int], num_inference_steps: int, shift: float = 1.0,
                   guidance_scale: float = 1.0, null_cond: Tensor | None = None,
                   config: CalibrationConfig | None = None, model_fingerprint: str | None = None,
                   dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                   progress: bool = False) -> list[Policy]:
    """:func:`calibrate` for several target speedups, sharing ground truth and the lambda sweep.

    Returns one policy per target, in order. The sweep is shared, so lambdas bisected
    for one target are candidates for the next too: a policy can differ from what
    :func:`calibrate` picks for its target alone only by having seen more candidates.
    """
    for s in target_speedups:
        _check_goal(s, None, num_inference_steps)
    session = CalibrationSession(model, cond, seeds, latent_shape, num_inference_steps, shift, guidance_scale,
                                 null_cond, config or CalibrationConfig(), model_fingerprint, dtype, device, progress)
    return [session.policy(s, None) for s in target_speedups]


class CalibrationSession:
    """One calibration set on one model: its fit/held-out split, ground truth and lambda sweep.

    Build it once, then ask for policies at several targets; ground truth and every
    threshold search already run are reused. Arguments are those of :func:`calibrate`.

    Attributes:
        variants: the component variants of the cached set chosen by the latest
            :meth:`policy` call (see :func:`calibrate_with_variants`).
    """

    def __init__(self, model: Any, cond: Tensor | None, seeds: Sequence[int], latent_shape: Sequence[int],
                 num_inference_steps: int, shift: float = 1.0, guidance_scale: float = 1.0,
                 null_cond: Tensor | None = None, config: CalibrationConfig | None = None,
                 model_fingerprint: str | None = None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", progress: bool = False) -> None:
        config = config or CalibrationConfig()
        self.seeds = [int(s) for s in seeds]
        check_calibration_inputs(cond, self.seeds, null_cond)
        self.config, self.T = config, num_inference_steps
        self.grid = time_grid(num_inference_steps, shift)
        names = branches_for(guidance_scale, null_cond)
        self.full = CalibSet(
            model, seeded_noise(self.seeds, latent_shape, dtype, device),
            None if cond is None else cond.to(device),
            None if len(names) == 1 or null_cond is None else null_cond.to(device),
            guidance_scale, config.reuse,
        )
        self.n_hold = round(self.full.size * config.holdout_fraction) if self.full.size >= 2 else 0
        self.n_fit = self.full.size - self.n_hold
        self.fit_set = self.full.rows(slice(0, self.n_fit))
        self.hold_set = self.full.rows(slice(self.n_fit, self.full.size)) if self.n_hold else self.fit_set
        self.log = _logger(progress)
        self.base = dict(num_inference_steps=num_inference_steps, grid=tuple(self.grid), reuse=config.reuse,
                         branches=names, shift=shift, guidance_scale=guidance_scale,
                         latent_shape=tuple(latent_shape), model_fingerprint=model_fingerprint, config=config)
        self.log(f"ground truth on {self.n_fit} fitting and {self.n_hold} held-out samples")
        with torch.no_grad():
            self.gt_fit = log_ground_truth(self.fit_set, self.grid)
            self.gt_hold = log_ground_truth(self.hold_set, self.grid) if self.n_hold else self.gt_fit
        self.searched: list[SearchResult] = []
        self.variants: dict[str, Policy] = {}

    @torch.no_grad()
    def policy(self, target_speedup: float | None = None, threshold: float | None = None) -> Policy:
        """The policy for a target speedup or a threshold (exactly one); see :func:`calibrate`."""
        _check_goal(target_speedup, threshold, self.T)
        T = self.T
        max_nfe = T if target_speedup is None else math.floor(T / target_speedup + 1e-9)
        candidates = self._candidates(threshold, max_nfe)
        best: tuple[float, Policy, Candidate] | None = None
        for cand in candidates:
            self.log(f"evaluating {cand.source} candidate, NFE {T - len(cand.cached_steps)}")
            variants = _variants(self.full, self.fit_set, self.n_fit, self.grid, cand, self.config, self.base)
            cand.errors = {name: _error(self.hold_set, self.gt_hold, p) for name, p in variants.items()}
            most_complete = list(variants)[-1]
            cand.variant = (min(cand.errors, key=cand.errors.__getitem__) if self.config.component_check
                            else most_complete)
            if best is None or cand.errors[cand.variant] < best[0]:
                best = (cand.errors[cand.variant], variants[cand.variant], cand)
                self.variants = variants
        if best is None:  # pragma: no cover - _candidates never returns an empty list
            raise ErtaCacheError("calibration produced no candidate policy")
        chosen = best[2]
        info = provenance(
            calibration_size=self.full.size, holdout_size=self.n_hold, seeds=self.seeds,
            target_speedup=target_speedup, threshold=chosen.threshold, selected=chosen.source,
            variant=chosen.variant, candidates=[c.as_dict(T) for c in candidates],
        )
        return replace(best[1], provenance=info)

    def _candidates(self, threshold: float | None, max_nfe: int) -> list[Candidate]:
        T, config = self.T, self.config
        if threshold is not None:
            self.log(f"policy search at lambda={threshold:g}")
            res = threshold_search(self.fit_set, self.grid, self.gt_fit, threshold, config.l1_denominator)
            return [Candidate("threshold", threshold, res.cached_steps)]
        if max_nfe >= T:
            return [Candidate("all_compute", None, ())]
        self.log(f"policy search over {len(config.thresholds)} thresholds (target NFE <= {max_nfe})")
        self.searched = sweep(self.fit_set, self.grid, self.gt_fit, config.thresholds, config.l1_denominator,
                              max_nfe=max_nfe, known=self.searched)
        return select_candidates(self.searched, T, max_nfe, config)


def select_candidates(results: Sequence[SearchResult], num_inference_steps: int, max_nfe: int,
                      config: CalibrationConfig) -> list[Candidate]:
    """The cached-step sets that compete for a target NFE (NOTES.md section 2.5).

    From the threshold searches within the budget, the ``config.max_candidates``
    distinct sets with the most computed steps (ties: the smaller lambda), plus the
    evenly spaced set at ``max_nfe`` when ``config.candidates`` asks for it or no
    threshold set fits.
    """
    T = num_inference_steps
    seen: dict[tuple[int, ...], Candidate] = {}
    fitting = sorted((r for r in results if T - len(r.cached_steps) <= max_nfe),
                     key=lambda r: (len(r.cached_steps), r.threshold))
    for r in fitting:
        if r.cached_steps not in seen and len(seen) < config.max_candidates:
            seen[r.cached_steps] = Candidate("threshold", r.threshold, r.cached_steps)
    out = list(seen.values())
    if config.candidates == "threshold_and_uniform" or not out:
        uni = uniform_cached_steps(T, max_nfe)
        if uni not in seen:
            out.append(Candidate("uniform", None, uni))
    return out


def _variants(full: CalibSet, fit_set: CalibSet, n_fit: int, grid: list[float], cand: Candidate,
              config: CalibrationConfig, base: dict[str, Any]) -> dict[str, Policy]:
    """The candidate's policies, from fewest components to all that the config asks for."""
    plain = Policy(cached_steps=cand.cached_steps, **base)
    out = {"plain": plain}
    if not cand.cached_steps:
        return out
    adjusted: list[float] | None = None
    if config.timestep_adjustment:
        adjusted, _ = adjust_grid(fit_set, grid, cand.cached_steps, config.phi_denominator)
        out["adjusted"] = replace(plain, adjusted_grid=tuple(adjusted))
    if config.rectification != "off":
        grids = [("rectified", grid)]
        if adjusted is not None:
            grids = ([("rectified", grid)] if config.component_check else []) + [("full", adjusted)]
        for name, g in grids:
            a, b, enabled = fit_rectification(full, n_fit, g, cand.cached_steps, config.rectification,
                                              config.granularity)
            out[name] = replace(out["adjusted"] if name == "full" else plain, rect_a=a, rect_b=b,
                                rect_enabled=enabled, rect_form=config.rectification)
    return out


def _error(cs: CalibSet, gt: GroundTruth, policy: Policy) -> float:
    out = sample(cs.model, cs.noise, cs.cond, null_cond=cs.null_cond, guidance_scale=cs.guidance_scale,
                 shift=policy.shift, policy=policy)
    return float((out.x - gt.x_final).double().square().mean())


def _logger(enabled: bool) -> Any:
    def log(msg: str) -> None:
        if enabled:
            print(f"[calibrate] {msg}", flush=True)

    return log

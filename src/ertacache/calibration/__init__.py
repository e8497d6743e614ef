"""Offline calibration: from a model and a calibration set to a :class:`~ertacache.policy.Policy`.

The method lives once, in :class:`~.session.CalibrationSession` (with its rooms: :mod:`.runner`,
:mod:`.judge`, :mod:`.proposals`, :mod:`.components`) and the passes of :mod:`.passes`;
:func:`calibrate` drives it with the core Euler loop, and
:func:`ertacache.calibrate_pipeline` with a diffusers pipeline's own ``__call__``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.config import CalibrationConfig
from ..errors import ErtaCacheError
from ..policy import Policy
from .drive import CoreDriver, Driver, check_calibration_inputs
from .judge import Margin
from .passes import AdjustTimesteps, FitRectification, GroundTruth, ThresholdSearch
from .plan import Plan, plan, time_one_call
from .runner import PassCallback
from .session import CalibrationSession
from .sets import VARIANTS, Candidate, SearchResult, check_goal, check_target_speedup, select_candidates, sweep

__all__ = [
    "VARIANTS", "AdjustTimesteps", "CalibrationSession", "Candidate", "CoreDriver", "Driver", "FitRectification",
    "GroundTruth", "Margin", "Plan", "SearchResult", "ThresholdSearch", "calibrate", "calibrate_many",
    "calibrate_with_variants", "check_calibration_inputs", "check_goal", "check_target_speedup", "core_session",
    "estimate", "plan", "select_candidates", "sweep", "time_one_call",
]


def core_session(model: Any, cond: Tensor | None, seeds: Sequence[int], *, latent_shape: Sequence[int],
                 num_inference_steps: int, shift: float = 1.0, guidance_scale: float = 1.0,
                 null_cond: Tensor | None = None, config: CalibrationConfig | None = None,
                 model_fingerprint: str | None = None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", progress: bool = False,
                 batch_size: int | None = None, checkpoint_dir: str | Path | None = None,
                 callback: PassCallback | None = None, targets: Sequence[float] | None = None,
                 check_cond: Tensor | None = None) -> CalibrationSession:
    """A :class:`CalibrationSession` of a velocity model under the core Euler loop (arguments of :func:`calibrate`;
    ``targets``: the target speedups that will be asked for, to size the progress bar)."""
    config = config or CalibrationConfig()
    driver = CoreDriver(model, cond, seeds, latent_shape, num_inference_steps, shift, guidance_scale, null_cond,
                        config.reuse, model_fingerprint, dtype, device, batch_size, check_cond)
    return CalibrationSession(driver, config, progress=progress, checkpoint_dir=checkpoint_dir, callback=callback,
                              targets=targets)


def estimate(model: Any, cond: Tensor | None, seeds: Sequence[int], *, target_speedups: Sequence[float],
             latent_shape: Sequence[int], num_inference_steps: int, guidance_scale: float = 1.0,
             null_cond: Tensor | None = None, config: CalibrationConfig | None = None,
             dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", **_: Any) -> Plan:
    """What :func:`calibrate_many` (or :func:`calibrate`, one target) would cost, without running it (a dry run).

    Counts the passes and model calls of ``config`` (:func:`~.plan.plan`, an upper bound)
    and times one model call on one calibration row, so :attr:`Plan.seconds` estimates
    the wall time. Takes :func:`calibrate`'s arguments (those that do not change the cost
    are accepted and ignored).

    Raises:
        ErtaCacheError: an empty or inconsistent calibration set, an invalid target.
    """
    from ..core.euler import branches_for, seeded_noise

    config = config or CalibrationConfig()
    check_calibration_inputs(cond, seeds, null_cond)
    for s in target_speedups:
        check_goal(s, None, num_inference_steps)
    rows = len(seeds) * len(branches_for(guidance_scale, null_cond))
    x = seeded_noise([int(seeds[0])], latent_shape, dtype, device)
    t = torch.ones(1, dtype=dtype, device=device)
    c = None if cond is None else cond[:1].to(device)
    with torch.no_grad():
        seconds = time_one_call(lambda: model(x, t, c))
    return replace(plan(config, num_inference_steps, target_speedups, rows, len(seeds)), seconds_per_call=seconds)


def calibrate(model: Any, cond: Tensor | None, seeds: Sequence[int], *, target_speedup: float | None = None,
              threshold: float | None = None, **kwargs: Any) -> Policy:
    """Calibrate an ERTACache policy (Algorithm 2, Eq. 13-14, Eq. 15-21) for one model and sampler setting.

    Args:
        model: a velocity function ``v(x, t, cond)`` with ``x (B, *latent_shape)``, ``t (B,)``
            in [0, 1] (t = 1 is noise); split (embed/blocks/head) for ``block_residual``.
        cond: one condition per calibration sample ``(N, ...)``, or None.
        seeds: one noise seed per sample (N of them); noise is
            :func:`~ertacache.core.euler.seeded_noise`.
        target_speedup: wanted ``T / NFE`` in [1, T/2]: the candidate with
            ``NFE <= T / target_speedup`` and the least held-out error wins.
        threshold: instead of a target, the lambda of Algorithm 2 (> 0): S is that
            lambda's set, as in the paper.
        kwargs: ``latent_shape`` (one sample's state shape, e.g. ``(1, 16, 16)``),
            ``num_inference_steps`` (T), ``shift`` (grid time shift, default 1),
            ``guidance_scale`` and ``null_cond`` (``(N, ...)``; two branches with CFG),
            ``config`` (:class:`~ertacache.core.config.CalibrationConfig`),
            ``model_fingerprint`` (stored and checked when the policy is used),
            ``dtype``, ``device``, ``progress`` (one tqdm bar over the passes),
            ``checkpoint_dir`` (keep each finished pass there; started again with the same
            arguments, calibration resumes and ends with the identical policy),
            ``callback`` (called with each finished pass' name), ``batch_size``
            (rows per model call: peak activation memory is bounded by it; the policy
            does not depend on it), ``check_cond`` (``(M, ...)``, conditions unlike the
            calibration set's, e.g. other prompts' embeddings: a set the schedule search
            fitted to the set is kept only where it also gains on them, each under its
            own fresh noise seed, at any calibration size; docs/method.md section 2.8).
            Inside an initialised ``torch.distributed`` process
            group each rank walks its shard of the set and the statistics are summed
            over ranks: every rank returns the same policy.

    Returns:
        The :class:`~ertacache.policy.Policy`; ``policy.provenance["candidates"]``
        lists every candidate with its held-out errors.

    Raises:
        ErtaCacheError: an empty calibration set, a missing ``num_inference_steps`` or
            ``latent_shape``, both or neither of ``target_speedup``/``threshold``, an
            invalid value of either, or NaN in the model's output (naming the step).
    """
    check_goal(target_speedup, threshold, _steps(kwargs, "calibrate"))
    return core_session(model, cond, seeds, **kwargs).policy(target_speedup, threshold)


def _steps(kwargs: dict[str, Any], name: str) -> int:
    """``num_inference_steps`` and ``latent_shape`` are required keywords; a clear error names what is missing."""
    missing = [k for k in ("num_inference_steps", "latent_shape") if k not in kwargs]
    if missing:
        raise ErtaCacheError(f"{name} needs {' and '.join(missing)}: num_inference_steps=T (the sampler's step count, "
                             "as the policy will be used) and latent_shape=one sample's state shape, e.g. (1, 16, 16)")
    return int(kwargs["num_inference_steps"])


def calibrate_with_variants(model: Any, cond: Tensor | None, seeds: Sequence[int], **kwargs: Any
                            ) -> tuple[Policy, dict[str, Policy]]:
    """:func:`calibrate`, also returning the chosen cached set's component variants.

    The variants (keys of :data:`VARIANTS` that the config allows) are the paper's
    ablation ladder for that set: ``plain`` (offline policy alone), ``adjusted``
    (+ timestep adjustment), ``full`` (+ rectification on the adjusted grid), and
    ``rectified`` (rectification alone); the returned policy is one of them.
    """
    target_speedup, threshold = kwargs.pop("target_speedup", None), kwargs.pop("threshold", None)
    check_goal(target_speedup, threshold, _steps(kwargs, "calibrate_with_variants"))
    config = kwargs.pop("config", None) or CalibrationConfig()
    if config.component_check is False:
        raise ErtaCacheError("calibrate_with_variants compares the variants itself; leave component_check on")
    session = core_session(model, cond, seeds, config=config, **kwargs)
    policy = session.policy(target_speedup, threshold)
    return policy, session.variants


def calibrate_many(model: Any, cond: Tensor | None, seeds: Sequence[int], *, target_speedups: Sequence[float],
                   **kwargs: Any) -> list[Policy]:
    """:func:`calibrate` for several target speedups, sharing the ground truth (and every pass two targets share).

    Returns one policy per target, in the order given. Targets are calibrated from the
    smallest NFE budget up, and each budget's choice (and the schedule search's set that
    adds steps to it) competes for the larger ones: on the calibration samples a larger
    budget's policy is never rated below a smaller one's. A policy can differ from what
    :func:`calibrate` picks for its target alone only by having seen more candidates.
    Each policy's ``provenance["cost"]`` gives its own target's passes beside the
    shared ground truth.
    """
    for s in target_speedups:
        check_goal(s, None, _steps(kwargs, "calibrate_many"))
    session = core_session(model, cond, seeds, targets=list(target_speedups), **kwargs)
    return session.policies(target_speedups)

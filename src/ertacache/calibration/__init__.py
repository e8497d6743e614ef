"""Offline calibration: from a model and a calibration set to a :class:`~ertacache.policy.Policy`.

The method lives once, in :class:`~.session.CalibrationSession` and the passes of
:mod:`.passes`; :func:`calibrate` drives it with the core Euler loop, and
:func:`ertacache.calibrate_pipeline` with a diffusers pipeline's own ``__call__``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import CalibrationConfig
from ..errors import ErtaCacheError
from ..policy import Policy
from .drive import CoreDriver, Driver, check_calibration_inputs
from .passes import AdjustTimesteps, FitRectification, GroundTruth, ThresholdSearch
from .select import VARIANTS, Candidate, SearchResult, check_goal, check_target_speedup, select_candidates, sweep
from .session import CalibrationSession, PassCallback

__all__ = [
    "VARIANTS", "AdjustTimesteps", "CalibrationSession", "Candidate", "CoreDriver", "Driver", "FitRectification",
    "GroundTruth", "SearchResult", "ThresholdSearch", "calibrate", "calibrate_many", "calibrate_with_variants",
    "check_calibration_inputs", "check_goal", "check_target_speedup", "core_session", "select_candidates", "sweep",
]


def core_session(model: Any, cond: Tensor | None, seeds: Sequence[int], *, latent_shape: Sequence[int],
                 num_inference_steps: int, shift: float = 1.0, guidance_scale: float = 1.0,
                 null_cond: Tensor | None = None, config: CalibrationConfig | None = None,
                 model_fingerprint: str | None = None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", progress: bool = False,
                 batch_size: int | None = None, checkpoint_dir: str | Path | None = None,
                 callback: PassCallback | None = None) -> CalibrationSession:
    """A :class:`CalibrationSession` of a velocity model under the core Euler loop (arguments of :func:`calibrate`)."""
    config = config or CalibrationConfig()
    driver = CoreDriver(model, cond, seeds, latent_shape, num_inference_steps, shift, guidance_scale, null_cond,
                        config.reuse, model_fingerprint, dtype, device, batch_size)
    return CalibrationSession(driver, config, progress=progress, checkpoint_dir=checkpoint_dir, callback=callback)


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
            ``config`` (:class:`~ertacache.config.CalibrationConfig`),
            ``model_fingerprint`` (stored and checked when the policy is used),
            ``dtype``, ``device``, ``progress`` (one tqdm bar over the passes),
            ``checkpoint_dir`` (keep each finished pass there; started again with the same
            arguments, calibration resumes and ends with the identical policy),
            ``callback`` (called with each finished pass' name), ``batch_size``
            (rows per model call: peak activation memory is bounded by it; the policy
            does not depend on it). Inside an initialised ``torch.distributed`` process
            group each rank walks its shard of the set and the statistics are summed
            over ranks: every rank returns the same policy.

    Returns:
        The :class:`~ertacache.policy.Policy`; ``policy.provenance["candidates"]``
        lists every candidate with its held-out errors.

    Raises:
        ErtaCacheError: an empty calibration set, both or neither of
            ``target_speedup``/``threshold``, an invalid value of either, or NaN
            in the model's output (naming the step).
    """
    check_goal(target_speedup, threshold, kwargs["num_inference_steps"])
    return core_session(model, cond, seeds, **kwargs).policy(target_speedup, threshold)


def calibrate_with_variants(model: Any, cond: Tensor | None, seeds: Sequence[int], **kwargs: Any
                            ) -> tuple[Policy, dict[str, Policy]]:
    """:func:`calibrate`, also returning the chosen cached set's component variants.

    The variants (keys of :data:`VARIANTS` that the config allows) are the paper's
    ablation ladder for that set: ``plain`` (offline policy alone), ``adjusted``
    (+ timestep adjustment), ``full`` (+ rectification on the adjusted grid), and
    ``rectified`` (rectification alone); the returned policy is one of them.
    """
    target_speedup, threshold = kwargs.pop("target_speedup", None), kwargs.pop("threshold", None)
    check_goal(target_speedup, threshold, kwargs["num_inference_steps"])
    config = kwargs.pop("config", None) or CalibrationConfig()
    if config.component_check is False:
        raise ErtaCacheError("calibrate_with_variants compares the variants itself; leave component_check on")
    session = core_session(model, cond, seeds, config=config, **kwargs)
    policy = session.policy(target_speedup, threshold)
    return policy, session.variants


def calibrate_many(model: Any, cond: Tensor | None, seeds: Sequence[int], *, target_speedups: Sequence[float],
                   **kwargs: Any) -> list[Policy]:
    """:func:`calibrate` for several target speedups, sharing ground truth and the lambda sweep.

    Returns one policy per target, in order. The sweep is shared, so lambdas bisected
    for one target are candidates for the next too: a policy can differ from what
    :func:`calibrate` picks for its target alone only by having seen more candidates.
    """
    for s in target_speedups:
        check_goal(s, None, kwargs["num_inference_steps"])
    session = core_session(model, cond, seeds, **kwargs)
    return [session.policy(s, None) for s in target_speedups]

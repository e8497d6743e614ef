"""The settings of the running pipeline call, read once per call from its own frame (host only, no sync).

A policy is calibrated for one guidance setting and one sample size. Pipelines name
them alike (``guidance_scale``, ``true_cfg_scale``, ``guidance_scale_2``, ``height``,
``width``, ``num_frames``), and by the time the transformer runs, their ``__call__``
has resolved every default (Wan 2.2's ``guidance_scale_2 = guidance_scale``, FLUX's
default height). One rule reads them for calibration and for inference alike: the
locals of the innermost running ``__call__`` of the pipeline's class.

Why a frame and not the pipeline's attributes: diffusers pipelines keep the guidance
scale as a property (``pipe.guidance_scale``, Wan 2.2's ``_guidance_scale_2``), but not
the resolved height, width and frame count, nor QwenImage's ``true_cfg_scale``; the
arguments bound at the call miss every default resolved inside it. The frame is read
once per call, on the host.
"""

from __future__ import annotations

import math
import sys
from typing import Any

from ...errors import PolicyMismatchError

GUIDANCE_ARGUMENTS = ("guidance_scale", "true_cfg_scale", "guidance_scale_2")
"""Every pipeline argument that changes what the guided transformer outputs are combined into."""
SIZE_ARGUMENTS = ("height", "width", "num_frames")
"""Pixels (height, width) and frames of the sample."""


def call_settings(pipe: Any) -> tuple[dict[str, float], dict[str, int]]:
    """``(guidance, sample_size)`` of the pipeline call running on this thread, or ``({}, {})`` outside one.

    Only names the call has and whose values are numbers are reported.
    """
    frame = sys._getframe(1)
    cls = type(pipe)
    while frame is not None:
        if frame.f_code.co_name == "__call__" and isinstance(frame.f_locals.get("self"), cls):
            local = frame.f_locals
            guidance = {k: float(local[k]) for k in GUIDANCE_ARGUMENTS
                        if isinstance(local.get(k), (int, float)) and not isinstance(local.get(k), bool)}
            size = {k: int(local[k]) for k in SIZE_ARGUMENTS
                    if isinstance(local.get(k), int) and not isinstance(local.get(k), bool)}
            return guidance, size
        frame = frame.f_back  # type: ignore[assignment]
    return {}, {}


def check_guidance(calibrated: dict[str, float], got: dict[str, float]) -> None:
    """Refuse a call whose guidance differs from the calibrated one, naming every difference.

    An argument is compared when both the policy and the call have it.

    Raises:
        PolicyMismatchError: one or more guidance arguments differ.
    """
    diffs = [f"{k}: policy {calibrated[k]}, got {got[k]}" for k in GUIDANCE_ARGUMENTS
             if k in calibrated and k in got and not math.isclose(calibrated[k], got[k], rel_tol=1e-6, abs_tol=1e-9)]
    if diffs:
        raise PolicyMismatchError("the guidance setting differs from the one calibrated (" + "; ".join(diffs)
                                  + "); call the pipeline with the calibrated values, or recalibrate for these")

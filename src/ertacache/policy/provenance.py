"""A policy's provenance: the standard fields calibration records, and their lines in the summary."""

from __future__ import annotations

import datetime as _dt
from typing import Any

import torch

from .._version import __version__

GUIDANCE_OF_THE_CALL = "the call's"
"""``provenance["guidance"]`` of a policy that follows the call's guidance (:meth:`Policy.uniform`)."""


def provenance(**extra: Any) -> dict[str, Any]:
    """Standard provenance fields plus ``extra``."""
    return {
        "library_version": __version__,
        "torch_version": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }



def provenance_lines(provenance: dict[str, Any]) -> list[str]:
    """Lines of :meth:`~ertacache.policy.Policy.summary` from a policy's provenance (a file's, any JSON: keys that
    are missing or of another type are left out)."""
    lines: list[str] = []
    for key in ("selected", "variant", "threshold", "calibration_size", "seeds", "mapped_from", "library_version",
                "date"):
        if key in provenance:
            lines.append(f"  {key}: {provenance[key]}")
    if "judged_on" in provenance:
        lines.append(f"  judged on: {provenance['judged_on']}")
    for d in provenance.get("decisions", []) if isinstance(provenance.get("decisions"), list) else []:
        numbers = isinstance(d, dict) and all(isinstance(d.get(k), (int, float)) and not isinstance(d.get(k), bool)
                                              for k in ("gain_db", "se_db"))
        if numbers and {"decision", "n", "kept"} <= set(d):
            check, fold = d.get("k_fold"), ""
            if isinstance(check, dict) and {"folds", "refit_differs"} <= set(check):
                fold = (f"; {check['folds']}-fold, {check['refit_differs']} refitted sets differ, in-sample "
                        f"{d.get('in_sample_gain_db', 0.0):+.2f} dB")
            elif check:  # the check could not run (its reason)
                fold = f"; k-fold check {check}"
            lines.append(f"  {d['decision']}: {d['gain_db']:+.2f} dB +- {d['se_db']:.2f} (standard error, "
                         f"{d['n']} samples{fold}): {'kept' if d['kept'] else 'not kept'}")
    cost = provenance.get("cost")
    if isinstance(cost, dict) and "model_calls" in cost:
        lines.append(f"  calibration cost: {cost['model_calls']} model calls ({cost.get('uncached_generations')} "
                     f"uncached generations of the set), {cost.get('seconds')} s")
        target, gt = cost.get("target"), cost.get("ground_truth")
        if isinstance(target, dict) and isinstance(gt, dict):
            lines.append(f"    this target: {target.get('model_calls')} model calls "
                         f"({target.get('uncached_generations')} generations); ground truth (shared by every "
                         f"target of the session): {gt.get('model_calls')}")
    return lines

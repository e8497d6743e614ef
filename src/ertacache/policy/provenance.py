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



def _number(d: Any, key: str) -> float | None:
    value = d.get(key) if isinstance(d, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _samples(n: Any) -> str:
    return f"{n} sample{'' if n == 1 else 's'}"


def _evidence(d: dict[str, Any]) -> str:
    """What a margin rests on: its samples' mean gain and the error model's prior, where recorded."""
    measured, prior = d.get("measured"), d.get("prior")
    text = _samples(d.get("n"))
    m, m_se = _number(measured, "gain_db"), _number(measured, "se_db")
    if m is not None and m_se is not None:
        text += f" {m:+.2f} +- {m_se:.2f}"
    p, p_sd = _number(prior, "gain_db"), _number(prior, "sd_db")
    if p is not None and p_sd is not None:
        text += f", error model {p:+.2f} +- {p_sd:.2f}"
    return text


def _decision_lines(decision: Any) -> list[str]:
    """The choice in one line: the estimated gain over evenly spaced caching, its 80 % interval, its evidence."""
    gain, sd = _number(decision, "gain_db"), _number(decision, "se_db")
    if not isinstance(decision, dict) or not isinstance(decision.get("option"), str) or gain is None or sd is None:
        return []
    interval = decision.get("interval_db")
    ends = f", 80 % interval {interval[0]:+.2f} to {interval[1]:+.2f} dB" if isinstance(interval, list) and len(
        interval) == 2 and all(isinstance(v, (int, float)) for v in interval) else ""
    verdict = "kept" if decision.get("kept") else "not kept: the evidence does not show it better"
    evidence = decision.get("evidence")
    count = evidence.get("predicted_policies") if isinstance(evidence, dict) else None
    fitted = f"; the error model calibrated on {count} judged policies" if isinstance(count, int) and count else ""
    fresh = evidence.get("fresh_check") if isinstance(evidence, dict) else None
    if isinstance(fresh, dict) and _number(fresh, "gain_db") is not None:
        fitted += f"; {fresh.get('samples')} of them on fresh noise, {fresh['gain_db']:+.2f} dB there"
    return [f"  decision: {decision['option']} over {decision.get('over')}: {gain:+.2f} dB +- {sd:.2f}{ends} "
            f"({_evidence(decision)}{fitted}): {verdict}"]


def provenance_lines(provenance: dict[str, Any]) -> list[str]:
    """Lines of :meth:`~ertacache.policy.Policy.summary` from a policy's provenance (a file's, any JSON: keys that
    are missing or of another type are left out)."""
    lines: list[str] = []
    for key in ("selected", "variant", "threshold", "calibration_size", "seeds", "check_prompts", "check_conditions",
                "mapped_from", "library_version", "date"):
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
            fresh = d.get("fresh_check")
            if isinstance(fresh, dict) and _number(fresh, "gain_db") is not None:
                fold += f"; on fresh noise {fresh['gain_db']:+.2f} dB ({_samples(fresh.get('samples'))})"
                other = fresh.get("other_prompts")
                if isinstance(other, dict) and _number(other, "gain_db") is not None:
                    fold += f", {other['gain_db']:+.2f} dB per prompt not fitted to ({other.get('prompts')})"
            elif isinstance(fresh, str):
                fold += f"; fresh-noise check {fresh}"
            lines.append(f"  {d['decision']}: {d['gain_db']:+.2f} dB +- {d['se_db']:.2f} ({_evidence(d)}{fold}): "
                         f"{'kept' if d['kept'] else 'not kept'}")
        elif isinstance(d, dict) and isinstance(d.get("decision"), str) and isinstance(d.get("fresh_check"), str):
            lines.append(f"  {d['decision']}: not tried (fresh check {d['fresh_check']})")
    lines += _decision_lines(provenance.get("decision"))
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

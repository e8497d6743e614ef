"""Which cached-step sets compete for a policy: Algorithm 2's lambda sweep, and the candidates of a budget."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..core.config import CalibrationConfig, check_threshold
from ..errors import ErtaCacheError
from ..policy import uniform_cached_steps

Refit = Callable[[int], "tuple[tuple[int, ...], dict[int, str]] | None"]
"""A fitted set's recipe: ``refit(k)`` is the set (cached steps, per-step reuse modes) it gives without fold k's
samples, or None (no set)."""
VARIANTS = ("plain", "adjusted", "rectified", "full")
"""Component variants of a candidate: no adjustment or rectification, adjustment only,
rectification only (fitted on the original grid), both (fitted on the adjusted grid)."""


@dataclass(frozen=True)
class SearchResult:
    """The cached set S for one threshold, and each step's ``l1_rel`` (Eq. 12; 0 where not eligible)."""

    threshold: float
    cached_steps: tuple[int, ...]
    l1_rel: tuple[float, ...] = ()
    complete: bool = True
    """False: the search stopped once over its budget; ``cached_steps`` are those up to there."""


@dataclass
class Candidate:
    """One cached-step set competing for the policy, with each variant's held-out error (the geometric mean over
    held-out samples of each one's MSE at t = 0; :meth:`~.judge.Judge.error`)."""

    source: str
    threshold: float | None
    cached_steps: tuple[int, ...]
    errors: dict[str, float] = field(default_factory=dict)
    variant: str = "plain"
    rule: str | None = None
    """The schedule search's reading of its error model (:data:`~.schedule.RULES`), for ``source='search'``."""
    step_reuse: dict[int, str] = field(default_factory=dict)
    """Cached steps that rebuild with another reuse mode than the config's (:attr:`ertacache.Policy.step_reuse`)."""
    inherited: str | None = None
    """For a smaller budget's chosen set competing for a larger one: the variant that budget kept."""
    refit: Refit | None = field(
        default=None, repr=False, compare=False)
    """For a set fitted to the calibration samples: ``refit(k)`` is what the same recipe gives from the ground
    truth without fold k's samples (cached steps, per-step reuse modes), or None (no set); None: not fitted."""
    cross_validated: dict[str, Any] | None = None
    """The k-fold check's record, once made: errors with each sample scored by its fold's refitted set."""

    @property
    def identity(self) -> tuple[tuple[int, ...], tuple[tuple[int, str], ...]]:
        """What makes two candidates sample alike: the cached steps and the per-step reuse modes."""
        return self.cached_steps, tuple(sorted(self.step_reuse.items()))

    def label(self, T: int) -> str:
        """A short name for decisions, e.g. ``search set (NFE 15)``."""
        extra = ", per-step reuse" if self.step_reuse else ""
        return f"{self.source} set (NFE {T - len(self.cached_steps)}{extra})"

    def as_dict(self, T: int) -> dict[str, Any]:
        return {"source": self.source, "threshold": self.threshold, "nfe": T - len(self.cached_steps),
                "cached_steps": list(self.cached_steps), "errors": dict(self.errors), "variant": self.variant,
                **({"rule": self.rule} if self.rule is not None else {}),
                **({"step_reuse": {str(k): v for k, v in self.step_reuse.items()}} if self.step_reuse else {}),
                **({"inherited": self.inherited} if self.inherited is not None else {}),
                **({"cross_validated": self.cross_validated} if self.cross_validated is not None else {})}


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


def check_goal(target_speedup: float | None, threshold: float | None, num_inference_steps: int) -> int:
    """Validate the goal of a calibration (exactly one of the two); return the NFE budget.

    Raises:
        ErtaCacheError: both or neither given, or an invalid value.
    """
    if (target_speedup is None) == (threshold is None):
        raise ErtaCacheError("give exactly one of target_speedup (e.g. 2.0) or threshold (lambda, e.g. 0.2)")
    if threshold is not None:
        check_threshold(threshold)
        return num_inference_steps
    s = check_target_speedup(target_speedup, num_inference_steps)
    return math.floor(num_inference_steps / s + 1e-9)


def sweep(search: Callable[[float], SearchResult], num_inference_steps: int, thresholds: Sequence[float],
          max_nfe: int | None = None, refine: int = 6, known: Sequence[SearchResult] = (),
          enough: int | None = None) -> list[SearchResult]:
    """Algorithm 2's search for each lambda (the curve lambda -> |S|), reusing ``known`` results.

    With ``max_nfe``, when no lambda of the sweep gives exactly ``max_nfe`` computed
    steps, the bracket around it is bisected (geometrically, ``refine`` times). With
    ``enough``, the sweep (in increasing lambda) stops once ``enough`` distinct cached
    sets within ``max_nfe`` are known: a larger lambda caches at least as much, so its
    set has fewer computed steps and would not be among the candidates
    (:func:`select_candidates` keeps those with the most).
    """
    T = num_inference_steps
    # a stopped search is only known to be over its own budget: search again for a larger one
    results = [r for r in known if r.complete or max_nfe is None or T - len(r.cached_steps) > max_nfe]
    done = {res.threshold for res in results}

    def satisfied() -> bool:
        within = {r.cached_steps for r in results if max_nfe is not None and T - len(r.cached_steps) <= max_nfe}
        return enough is not None and max_nfe is not None and len(within) >= enough

    for lam in sorted(thresholds):
        if satisfied():
            break
        if lam not in done:
            results.append(search(lam))
    if max_nfe is None:
        return results
    for _ in range(refine):
        nfes = {T - len(res.cached_steps) for res in results}
        if max_nfe in nfes:
            break
        above = [res.threshold for res in results if T - len(res.cached_steps) > max_nfe]
        below = [res.threshold for res in results if T - len(res.cached_steps) < max_nfe]
        if not above or not below:
            break
        results.append(search((max(above) * min(below)) ** 0.5))
    return sorted(results, key=lambda res: res.threshold)


def select_candidates(results: Sequence[SearchResult], num_inference_steps: int, max_nfe: int,
                      config: CalibrationConfig, computed: Sequence[int] = ()) -> list[Candidate]:
    """The cached-step sets that compete for a target NFE (docs/method.md section 2.5).

    From the threshold searches within the budget, the ``config.max_candidates``
    distinct sets with the most computed steps (ties: the smaller lambda), plus the
    evenly spaced set within ``max_nfe`` when ``config.candidates`` holds ``"uniform"``,
    or when neither a threshold set fits nor the schedule search is among the sources.
    Steps in ``computed`` (a transformer's first step, as at Wan 2.2's expert switch)
    are never cached, and count in the NFE.
    """
    T = num_inference_steps
    forced = set(computed)
    results = [r for r in results if not forced & set(r.cached_steps)]
    seen: dict[tuple[int, ...], Candidate] = {}
    fitting = sorted((r for r in results if T - len(r.cached_steps) <= max_nfe),
                     key=lambda r: (len(r.cached_steps), r.threshold))
    for r in fitting:
        if r.cached_steps not in seen and len(seen) < config.max_candidates:
            seen[r.cached_steps] = Candidate("threshold", r.threshold, r.cached_steps)
    out = list(seen.values())
    if "uniform" in config.candidates or (not out and "search" not in config.candidates):
        uni: tuple[int, ...] = ()
        for nfe in range(max_nfe, 1, -1):  # the most evenly spaced computation that fits beside the forced steps
            uni = tuple(i for i in uniform_cached_steps(T, nfe) if i not in forced)
            if T - len(uni) <= max_nfe:
                break
        if uni not in seen:
            out.append(Candidate("uniform", None, uni))
    return out

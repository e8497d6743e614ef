"""The calibration config: every reading of the paper docs/method.md lists is a field."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

from ..errors import ErtaCacheError
from .rectify import Granularity, Rectification
from .reuse import DEFAULT_REUSE, get_reuse

ReuseMode = str
"""What the cache keeps: the name of a registered reuse mode (:data:`ertacache.core.reuse.REUSE_MODES`, one
class each in :mod:`ertacache.core.reuse`; docs/method.md section 1). Shipped:

- ``block_residual``: ``r = h_out - h_in`` of the block stack; a cached step runs the
  embedding and head only (needs a :class:`~ertacache.core.model.SplitVelocityModel`).
- ``velocity``: ``v~_j = v_i``.
- ``latent_residual``: ``r = v_i - x_i``, ``v~_j = x_j + r`` (Eq. 5-6 read literally).
- ``extrapolate``: ``v~_j = v_i + (v_i - v_h)(t_j - t_i)/(t_i - t_h)`` from the last two
  computed steps (TaylorSeer's order 1; not in the paper).
"""
L1Denominator = Literal["gt", "current"]
"""Eq. 12's denominator: ``||r_gt_i||_1`` (v1 of the paper) or ``||r_i||_1`` (v2)."""
PhiDenominator = Literal["velocity_change", "velocity", "gt_velocity_change"]
"""Eq. 13's denominator: ``||v_j - v_{j-1}||_1`` on the cached trajectory (v1), ``||v_j||_1`` (v2),
or ``||v_j - v_{j-1}||_1`` along the ground-truth trajectory (logged by the uncached pass)."""
Source = Literal["threshold", "uniform", "search"]
"""Where a candidate cached-step set comes from (docs/method.md section 2.5):

- ``threshold``: Algorithm 2's lambda sweep (the paper's rule);
- ``uniform``: evenly spaced computed steps;
- ``search``: the budgeted shortest path over an error model logged by the
  ground-truth pass (:mod:`ertacache.calibration.schedule`).
"""
SOURCES: tuple[str, ...] = get_args(Source)
LEGACY_CANDIDATES = {"threshold": ("threshold",), "threshold_and_uniform": ("threshold", "uniform")}
"""``candidates`` as the policy files of ertacache 0.1 wrote it (one string)."""

DEFAULT_THRESHOLDS: tuple[float, ...] = (
    0.02, 0.04, 0.06, 0.08, 0.1, 0.13, 0.16, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5,
)


@dataclass(frozen=True)
class CalibrationConfig:
    """Options of offline calibration (Algorithm 2 and Eq. 12-21).

    The defaults are the cheap calibration (``docs/calibration.md``): the schedule
    search's set and the evenly spaced set compete, rectification is fitted and judged
    leave-one-out, and every decision is a paired comparison over all calibration
    samples. A default calibration costs at most 5 uncached generations of the
    calibration set for one target (1 + at most 4 per target in
    :func:`~ertacache.calibrate_many`). :meth:`thorough` is the full competition
    (Algorithm 2's lambda sweep, timestep adjustment, per-step reuse),
    about 5-10 times the cost. Each reading of the paper stays available here.

    Attributes:
        reuse: what the cache keeps; see :data:`ReuseMode`.
        l1_denominator: Eq. 12's denominator; see :data:`L1Denominator`.
        timestep_adjustment: estimate the adjusted grid (Eq. 13-14).
        phi_denominator: Eq. 13's denominator; see :data:`PhiDenominator`.
        rectification: see :data:`Rectification`.
        granularity: see :data:`Granularity`.
        candidates: which sources compete for a target speedup, a tuple of
            :data:`Source` names (the legacy strings ``"threshold"`` and
            ``"threshold_and_uniform"`` are read as their tuples).
        search_candidates: how many distinct sets the schedule search proposes (its
            error model read four ways, best first); in 1..4.
        thresholds: the lambda sweep, each > 0.
        holdout_fraction: 0 (default): every calibration sample both fits and judges
            (rectification is judged leave-one-out, the cached sets on every sample);
            otherwise the part of the set (taken from its end, in (0, 0.9]) that alone
            judges.
        folds: k of the k-fold check of the sets the schedule search fits to the
            calibration samples (with ``holdout_fraction=0``): a searched set replaces
            another only when it wins the paired comparison with each sample scored by
            the set the search makes *without* that sample's fold (refitted from the
            ground truth's log, no model call; evaluated only on folds where it comes out
            different, at most one more evaluation pass of the set). Capped at
            N / world size (each process needs a sample of every fold); 1, or fewer than
            2 samples per process, judges the sets on the samples they were fitted to.
        max_candidates: how many threshold candidates (those with the most
            computed steps within the budget) are fully evaluated.
        sweep_early_stop: stop the lambda sweep (increasing lambda) once ``max_candidates``
            distinct cached sets within the NFE budget are known (larger lambdas cache more
            and would not be candidates); False runs every lambda, as before.
        step_reuse_choice: the schedule search's best set (by its evaluation) also
            competes with each cached step rebuilt by the reuse mode of least modelled
            error (``velocity`` or ``extrapolate``, for those two modes;
            :func:`~ertacache.calibration.schedule.choose_step_reuse`): one more
            evaluation at the set's NFE; needs ``"search"`` among the candidates, whose
            ground-truth log it reads. Not in the paper.
        propagation_candidate: one more schedule-search set, from segment costs weighted
            by how a drift carries to the output (``exp(beta t)``, ``beta`` fitted to the
            errors of the sets already judged:
            :func:`~ertacache.calibration.schedule.fit_propagation`), judged as the others;
            no extra model call beyond its evaluation (docs/calibration.md, "A
            propagation-weighted candidate"). Not in the paper.
        error_model_prior: weigh each comparison's samples with the error model's prediction
            (:class:`~ertacache.calibration.evidence.ErrorModelPrior`, docs/method.md section 2.7).
            Off by default: the regression behind it is fitted on the same samples it would
            add evidence to, and at one or two samples it made worse choices (docs/calibration.md,
            "Error rates over many draws"). Not in the paper.
        fresh_check: with one or two samples per process (no fold to leave out, or folds of a
            single sample), a set the schedule search fitted to the samples wins only where its
            mean gain is positive on fresh rows (with two, after its k-fold check):
            the same conditions under fresh noise seeds and, with a null condition, as many rows
            of the unconditional prompt (:mod:`~ertacache.calibration.fresh`): one uncached pass
            of those rows (up to twice the set), shared by every target, and one evaluation of
            them per policy compared, outside ``max_passes``; run only when such a set would be
            kept. False judges it on the samples it was fitted to. Not in the paper.
        component_check: judge the chosen set with and without timestep adjustment
            and rectification, and keep a component only where it wins a paired
            comparison over the calibration samples beyond its uncertainty (:mod:`~ertacache.calibration.evidence`)
            (a component that does not help is switched off, and the policy's
            provenance gives the margin). False keeps every component the config asks for.
        max_passes: whole-set passes each target may spend on evaluations and component
            fits beside the shared ground truth and Algorithm 2's sweep (an evaluation at
            NFE counts ``NFE / T`` of a pass; a fit at every step one). In
            priority order (the evenly spaced set, the previous target's set, the schedule
            search's first set, its per-step-reuse version, the nested set, the search's
            other sets, the propagation-weighted set, keeping room for the best set's
            components; then the runner-up's components) what would go over it is skipped.
            The evenly spaced set is always judged. None: no limit, and the per-step-reuse
            versions of the other searched sets compete too (:meth:`thorough`).

    Raises:
        ErtaCacheError: a field outside its allowed values.
    """

    reuse: ReuseMode = DEFAULT_REUSE
    l1_denominator: L1Denominator = "gt"
    timestep_adjustment: bool = False
    phi_denominator: PhiDenominator = "velocity_change"
    rectification: Rectification = "linear"
    granularity: Granularity = "step"
    candidates: tuple[str, ...] = ("search", "uniform")
    search_candidates: int = 2
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    holdout_fraction: float = 0.0
    folds: int = 5
    max_candidates: int = 3
    component_check: bool = True
    sweep_early_stop: bool = True
    step_reuse_choice: bool = True
    propagation_candidate: bool = True
    max_passes: float | None = 4.0
    error_model_prior: bool = False
    fresh_check: bool = True

    @classmethod
    def thorough(cls, **overrides: Any) -> CalibrationConfig:
        """The full competition: Algorithm 2's lambda sweep beside the schedule search's sets (each also with
        its per-step reuse choice) and the uniform set; timestep adjustment (Eq. 13-14) tried on the best set
        and the runner-up, judged k-fold. No budget (``max_passes=None``).

        It judges as the default does (every sample, paired comparisons); ``docs/calibration.md`` gives its
        measured cost and quality beside the default's.
        ``overrides`` replace fields, e.g. ``thorough(reuse="velocity")``.
        """
        base: dict[str, Any] = dict(timestep_adjustment=True, candidates=SOURCES,
                                    search_candidates=2, max_passes=None, propagation_candidate=True)
        return cls(**{**base, **overrides})

    def __post_init__(self) -> None:
        if not isinstance(self.reuse, str):
            raise ErtaCacheError(f"reuse must be a reuse-mode name, got {self.reuse!r}")
        get_reuse(self.reuse)
        for name in ("timestep_adjustment", "component_check", "sweep_early_stop", "step_reuse_choice",
                     "propagation_candidate", "error_model_prior", "fresh_check"):
            if not isinstance(getattr(self, name), bool):
                raise ErtaCacheError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name, kind in (
            ("l1_denominator", L1Denominator),
            ("phi_denominator", PhiDenominator),
            ("rectification", Rectification),
            ("granularity", Granularity),
        ):
            allowed = get_args(kind)
            if not isinstance(getattr(self, name), str) or getattr(self, name) not in allowed:
                raise ErtaCacheError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if isinstance(self.thresholds, (str, bytes)) or not isinstance(self.thresholds, (tuple, list)):
            raise ErtaCacheError(f"thresholds must be a sequence of lambdas > 0, got {self.thresholds!r}")
        if not self.thresholds:
            raise ErtaCacheError("thresholds must hold at least one lambda > 0, got an empty sweep")
        object.__setattr__(self, "thresholds", tuple(check_threshold(lam) for lam in self.thresholds))
        if isinstance(self.holdout_fraction, bool) or not isinstance(self.holdout_fraction, (int, float)) \
                or not (0.0 <= self.holdout_fraction <= 0.9):
            raise ErtaCacheError(f"holdout_fraction must be in [0, 0.9], got {self.holdout_fraction}")
        if isinstance(self.folds, bool) or not isinstance(self.folds, int) or self.folds < 1:
            raise ErtaCacheError(f"folds must be an int >= 1 (1: no k-fold check), got {self.folds!r}")
        object.__setattr__(self, "candidates", check_sources(self.candidates))
        if isinstance(self.search_candidates, bool) or not isinstance(self.search_candidates, int) \
                or not 1 <= self.search_candidates <= 4:
            raise ErtaCacheError(f"search_candidates must be an int in 1..4, got {self.search_candidates!r}")
        if isinstance(self.max_candidates, bool) or not isinstance(self.max_candidates, int) \
                or not 1 <= self.max_candidates <= 1000:
            raise ErtaCacheError(f"max_candidates must be an int in 1..1000, got {self.max_candidates}")
        if self.max_passes is not None and (isinstance(self.max_passes, bool)
                                            or not isinstance(self.max_passes, (int, float))
                                            or not math.isfinite(self.max_passes) or self.max_passes <= 0):
            raise ErtaCacheError(f"max_passes must be a number of passes > 0 or None (no limit), "
                                 f"got {self.max_passes!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["thresholds"] = list(self.thresholds)
        d["candidates"] = list(self.candidates)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CalibrationConfig:
        """Build from :meth:`to_dict` output; unknown keys are an error."""
        if not isinstance(data, dict):
            raise ErtaCacheError(f"a calibration config must be an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ErtaCacheError(f"unknown calibration config keys {sorted(unknown)}; known: {sorted(known)}")
        kwargs = dict(data)
        for key in ("thresholds", "candidates"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)


def check_threshold(lam: object) -> float:
    """Validate a policy-search threshold lambda (Eq. 12): a finite number > 0.

    Raises:
        ErtaCacheError: lambda <= 0, NaN, infinite or not a number.
    """
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam <= 0:
        raise ErtaCacheError(
            f"threshold lambda must be a finite number > 0 (typical 0.05-1.0), got {lam!r}"
        )
    return float(lam)


def check_sources(candidates: object) -> tuple[str, ...]:
    """Validate the candidate sources of a config; a legacy string becomes its tuple.

    Raises:
        ErtaCacheError: not a non-empty sequence of distinct names from :data:`SOURCES`.
    """
    if isinstance(candidates, str):
        if candidates in LEGACY_CANDIDATES:
            return LEGACY_CANDIDATES[candidates]
        if candidates in SOURCES:
            return (candidates,)
    if isinstance(candidates, (str, bytes)) or not isinstance(candidates, (tuple, list)) or not candidates \
            or any(not isinstance(c, str) or c not in SOURCES for c in candidates) \
            or len(set(candidates)) != len(candidates):
        raise ErtaCacheError(f"candidates must be a non-empty tuple of distinct sources from {SOURCES} "
                             f"(e.g. ('threshold', 'uniform', 'search')), got {candidates!r}")
    return tuple(candidates)

"""What a calibration will cost before it runs: passes and model calls by the config, and the wall time they take.

A *pass* walks the whole calibration set once (a pass at every step computes the model
at all T steps: ground truth, Algorithm 2's search, the adjustment and rectification
fits; an evaluation computes at the NFE steps of the set it judges). The counts are
upper bounds: a search that stops over its budget, a set smaller than the budget, a
pass shared with an earlier target or kept by a checkpoint costs less.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..core.config import CalibrationConfig


@dataclass(frozen=True)
class Plan:
    """The cost of a calibration, in whole-set passes and model calls.

    Attributes:
        passes: whole-set passes (an evaluation at NFE counts ``NFE / T`` of one).
        model_calls: transformer forwards, one per sample, branch and step (the unit of
            :attr:`ertacache.Policy.provenance` ``["cost"]``).
        rows: calibration samples times guidance branches (the rows of one pass).
        per_target: ``[(target_speedup, passes, model_calls)]`` beside the shared ground truth.
        seconds_per_call: measured time of one model call on one row, or None.
        shared: the passes every target shares: the ground truth, and its fresh-noise twin where fitted sets
            are checked on fresh noise.
    """

    passes: float
    model_calls: int
    rows: int
    per_target: list[tuple[float, float, int]] = field(default_factory=list)
    seconds_per_call: float | None = None
    shared: float = 1.0

    @property
    def seconds(self) -> float | None:
        """Estimated wall time: model calls times the measured time of one (batching makes it faster)."""
        return None if self.seconds_per_call is None else self.model_calls * self.seconds_per_call

    def describe(self) -> str:
        """A few lines for a user: passes, calls per branch and sample, the time estimate."""
        lines = [f"calibration plan: at most {self.passes:.1f} whole-set passes, {self.model_calls} model calls "
                 f"({self.model_calls / max(self.rows, 1):.0f} per sample and branch)",
                 f"  ground truth: {self.shared:g} pass{'es' if self.shared != 1 else ''} (shared by every "
                 f"target{'; all but one under fresh noise' if self.shared > 1 else ''})"]
        for target, passes, calls in self.per_target:
            lines.append(f"  target {target:g}x: at most {passes:.1f} passes, {calls} model calls")
        if self.seconds_per_call is not None and self.seconds is not None:
            lines.append(f"  one model call (one row): {self.seconds_per_call * 1e3:.1f} ms; estimated wall time at "
                         f"most {_duration(self.seconds)} (batched calls are faster per row)")
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def variant_passes(config: CalibrationConfig, frac: float) -> float:
    """Whole-set passes of one set's components (adjustment and rectification fits and their evaluations; with
    every sample judging, the adjustment's k-fold passes, one per fold).

    Args:
        frac: the set's NFE / T (what an evaluation of it costs).
    """
    c = config
    judged_apart = c.holdout_fraction > 0  # else the rectification fit judges itself (leave-one-out)
    rectified = c.rectification != "off"
    passes = 0.0
    if rectified:
        passes += 1 + frac * judged_apart
    if c.timestep_adjustment:
        folds = 0 if judged_apart or c.folds < 2 else c.folds  # judged k-fold: a pass per fold
        judged = folds + (frac if rectified else 0) if folds else frac
        passes += 1 + judged + (1 + frac * judged_apart if rectified else 0)
    return passes


def target_passes(config: CalibrationConfig, T: int, max_nfe: int, first: bool) -> float:
    """Whole-set passes of one target (beside the ground truth), an upper bound.

    The sets' evaluations, the components of the two sets that compete with them (the best
    and the runner-up), the k-fold checks of the searched sets, at most ``config.max_passes``;
    Algorithm 2's sweep where asked for.

    Args:
        first: the session's first target (later ones reuse the lambda sweep, and add the nested candidate).
    """
    c = config
    frac = min(max_nfe, T) / T
    search = "search" in c.candidates
    searched = (c.search_candidates + (0 if first else 1) + c.propagation_candidate) if search else 0
    per_step = (searched if c.max_passes is None else 1) if search and c.step_reuse_choice else 0  # unbudgeted: all
    sets = searched + per_step + ("uniform" in c.candidates) + (c.max_candidates if "threshold" in c.candidates else 0)
    passes = sets * frac + variant_passes(c, frac) * min(2, sets)
    if search and c.folds > 1 and c.holdout_fraction == 0:  # k-fold checks: at most one evaluation per searched set
        passes += frac * (searched + per_step)
    if c.max_passes is not None:
        passes = min(passes, max(c.max_passes, frac))  # the evenly spaced set is judged in any case
    if "threshold" in c.candidates:  # Algorithm 2's sweep, beside the budget
        passes += (len(c.thresholds) + 6) if first else 6
    return passes


FRESH_BELOW = 3
"""Fitted sets are checked on fresh rows where a process has fewer samples than this: with one there is no fold
to leave out, with two each fold's set is judged on one other sample (docs/method.md section 2.8). At four
samples the check was measured not to help (a set fitted to four prompts passes it and loses on other prompts)."""


def fresh_checked(config: CalibrationConfig, samples: int | None, other: int = 0) -> bool:
    """Whether fitted sets are checked on fresh rows (:mod:`.fresh`): the config asks for it, a set is fitted,
    every sample judges, and a process has fewer than :data:`FRESH_BELOW` ``samples`` (or ``folds=1``), or the
    calibration was given ``other`` conditions to check on (any number of samples)."""
    return (config.fresh_check and "search" in config.candidates and config.holdout_fraction == 0
            and samples is not None and (samples < FRESH_BELOW or config.folds < 2 or other > 0))


def plan(config: CalibrationConfig, num_inference_steps: int, target_speedups: Sequence[float], rows: int,
         samples: int | None = None, other: int = 0) -> Plan:
    """The cost of calibrating ``target_speedups`` in one session (ground truth shared).

    Args:
        config: the calibration options.
        num_inference_steps: T.
        target_speedups: the targets (``T / NFE``), as :func:`ertacache.calibrate_many` takes them.
        rows: calibration samples times guidance branches.
        samples: the calibration samples per process, where known: with one, the fresh-noise check's uncached
            passes (its rows: the set's and as many of the unconditional prompt) and its two evaluations of them
            per target are counted (:func:`fresh_checked`).
        other: the rows of other conditions the check runs too (``check_cond``, ``check_prompts``).
    """
    T = num_inference_steps
    # the set's rows, as many of the unconditional prompt (at most), and the other conditions' rows, in sets
    fresh = (2 + other / max(samples or 1, 1)) * fresh_checked(config, samples, other)
    total = 1.0 + fresh
    per: list[tuple[float, float, int]] = []
    budgets = sorted(((math.floor(T / s + 1e-9), s) for s in target_speedups), key=lambda b: b[0])
    for k, (max_nfe, s) in enumerate(budgets):
        passes = target_passes(config, T, max_nfe, first=k == 0) + fresh * 2 * min(max_nfe, T) / T  # 2 policies
        per.append((s, passes, math.ceil(passes * rows * T)))
        total += passes
    order = {s: i for i, s in enumerate(target_speedups)}
    per.sort(key=lambda p: order.get(p[0], 0))
    return Plan(total, math.ceil(total * rows * T), rows, per, shared=1.0 + fresh)


def time_one_call(call: Callable[[], Any], repeats: int = 3) -> float:
    """Seconds of one model call: ``call()`` once to warm up, then the fastest of ``repeats``."""
    call()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best

"""Calibration's evidence room: a decision's gain estimated from everything calibration measured (docs/method.md
section 2.7).

A comparison of two policies on N calibration samples has N per-sample gains (dB); their
mean is noisy at small N (one prompt's luck moves it by several dB). Calibration knows
more than those N numbers: the ground truth logged every step's outputs, from which the
error model predicts each set's error (:mod:`.schedule`), and the session has judged many
sets whose measured errors say how far those predictions can be trusted. The gain is
estimated as a normal posterior:

- **prior** (the error model): across every judged policy with a prediction, the measured
  log error is regressed on the predicted log cost, ``log err = a + b log P + e``; for a
  comparison, the prior gain is ``DB b (log P_old - log P_new)`` with variance
  ``DB^2 (2 s_e^2 + (log P_old - log P_new)^2 var(b))`` (``s_e^2``: the residual variance,
  each policy's own deviation from the model, counted for both). No prior without four
  predicted policies or with ``b <= 0`` (a model that does not rank the sets).
- **measurement**: the mean per-sample gain ``m`` with variance ``h^2 / N``; the spread
  ``h`` of the gain over prompts is the samples' own, pooled with :data:`SPREAD_DB` as one
  pseudo-sample (``N = 1`` has no spread of its own: ``h`` is :data:`SPREAD_DB`).
- **posterior**: precision-weighted, ``1/v = 1/v_prior + N/h^2``.

Assumptions: per-sample gains are independent draws around the population gain (so the
k-fold scores of fitted sets stand in for held-out ones); the model's residuals of two
sets are independent (conservative where they share a bias); normal tails.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..policy import Policy
from .schedule import path_cost

DB = 10.0 / math.log(10.0)
"""dB per unit of natural-log MSE."""
SPREAD_DB = 6.5
"""The spread (standard deviation, dB) of a set's gain over prompts assumed before the samples show theirs. At 20
samples on the bundled models, searched over evenly spaced sets spread 2.3-4.7 dB (image model) and 7.1 dB (video
model). At one sample it must also cover a fitted set's in-sample optimism, which no k-fold check can remove there:
on digits (shifts 1 and 5, 2x and 3x, one sample), searched sets that won by 6.27 dB or less on their sample did not
hold on held-out seeds at shift 1 (one was 0.48 dB below evenly spaced caching), those that won by 6.84 dB or more
did (docs/calibration.md, "Error rates over many draws"). Chosen on that design data, between the two."""
PRIOR_SAMPLES = 1.0
"""How many samples :data:`SPREAD_DB` counts as when pooled with the samples' own spread."""
INTERVAL_Z = 1.2816
"""The stated interval: the central 80 % of the posterior."""
MIN_PREDICTED = 4
"""Predicted policies the regression needs before it gives a prior."""


@dataclass(frozen=True)
class Margin:
    """A paired comparison of two policies: the gain of ``new`` over ``old`` in dB (mean over prompts of
    ``10 log10(MSE_old / MSE_new)``), estimated from the samples and the error model.

    Attributes:
        gain_db, se_db: the posterior mean and standard deviation of the gain.
        n: the samples measured.
        measured_db, measured_se_db: the samples' mean gain and its standard error (``h / sqrt(n)``).
        prior_db, prior_sd_db: the error model's prior gain and its standard deviation (None: no prior).
    """

    gain_db: float
    se_db: float
    n: int
    measured_db: float | None = None
    measured_se_db: float | None = None
    prior_db: float | None = None
    prior_sd_db: float | None = None

    @property
    def significant(self) -> bool:
        """The new policy wins by more than one posterior standard deviation."""
        return self.gain_db > self.se_db

    @property
    def interval_db(self) -> tuple[float, float]:
        """The central 80 % interval of the gain (dB)."""
        return self.gain_db - INTERVAL_Z * self.se_db, self.gain_db + INTERVAL_Z * self.se_db

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"gain_db": round(self.gain_db, 3), "se_db": round(self.se_db, 3), "n": self.n,
                               "kept": self.significant}
        if self.measured_db is not None:
            out["measured"] = {"gain_db": round(self.measured_db, 3), "se_db": round(self.measured_se_db or 0.0, 3)}
        if self.prior_db is not None:
            out["prior"] = {"gain_db": round(self.prior_db, 3), "sd_db": round(self.prior_sd_db or 0.0, 3)}
        return out


def posterior(d: Tensor, reduce: Callable[[Tensor], Tensor], prior: tuple[float, float] | None) -> Margin:
    """The gain's posterior from per-sample gains ``d`` (dB, this process' rows; ``reduce`` sums over processes)
    and a prior ``(mean, variance)`` in dB (or None)."""
    sums = reduce(torch.stack([d.sum(), d.square().sum(), torch.tensor(float(d.numel()), dtype=torch.float64)]))
    n = int(sums[2])
    mean = float(sums[0]) / n
    own = max(0.0, (float(sums[1]) - n * mean * mean)) if n > 1 else 0.0  # (n - 1) s^2
    spread2 = (PRIOR_SAMPLES * SPREAD_DB ** 2 + own) / (PRIOR_SAMPLES + n - 1)
    like = spread2 / n
    if prior is None or not prior[1] > 0:
        return Margin(mean, math.sqrt(like), n, mean, math.sqrt(like))
    var = 1.0 / (1.0 / like + 1.0 / prior[1])
    return Margin(var * (mean / like + prior[0] / prior[1]), math.sqrt(var), n, mean, math.sqrt(like),
                  prior[0], math.sqrt(prior[1]))


class ErrorModelPrior:
    """The error model's prediction of a policy's error, calibrated on the session's judged policies.

    Args:
        costs: the error model's segment costs: ``raw`` (and ``rectified`` with rectification), ``(T, T)`` or
            ``(T, T, T)``; empty: no predictions.
        errors: the judge's ``{evaluation key: calibration error}`` (read at each call).
    """

    def __init__(self, costs: Callable[[], dict[str, Tensor]], errors: dict[str, float]) -> None:
        self.costs, self.errors = costs, errors
        self.predicted: dict[str, float] = {}  # evaluation key -> log predicted cost

    def predict(self, key: str, policy: Policy) -> float | None:
        """The log of the error model's cost for ``policy`` (recorded under its evaluation key), or None where the
        model has none: an adjusted grid, or no costs."""
        if key in self.predicted:
            return self.predicted[key]
        costs = self.costs()
        rectified = policy.rect_form != "off" and policy.rect_enabled is not None and bool(policy.rect_enabled.any())
        cost = costs.get("rectified" if rectified else "raw")
        if cost is None or policy.adjusted_grid is not None:
            return None
        value = path_cost(cost, policy.cached_steps)
        if not math.isfinite(value) or value <= 0:
            return None
        self.predicted[key] = math.log(value)
        return self.predicted[key]

    def fit(self) -> tuple[float, float, float] | None:
        """``(b, var(b), s_e^2)`` of ``log err = a + b log P`` over the predicted, judged policies; None with too
        few of them."""
        points = [(x, math.log(self.errors[k])) for k, x in self.predicted.items() if self.errors.get(k, 0) > 0]
        if len({x for x, _ in points}) < MIN_PREDICTED:
            return None
        xs, ys = torch.tensor([p[0] for p in points], dtype=torch.float64), torch.tensor([p[1] for p in points],
                                                                                         dtype=torch.float64)
        xc, yc = xs - xs.mean(), ys - ys.mean()
        sxx = float(xc.square().sum())
        b = float((xc * yc).sum()) / sxx
        resid = yc - b * xc
        s2 = float(resid.square().sum()) / (len(points) - 2)
        return b, s2 / sxx, s2

    def prior(self, old: tuple[str, Policy], new: tuple[str, Policy]) -> tuple[float, float] | None:
        """The prior gain of ``new`` over ``old`` (each ``(evaluation key, policy)``): ``(mean, variance)`` in dB,
        or None."""
        x_old, x_new = self.predict(*old), self.predict(*new)
        fit = self.fit()
        if x_old is None or x_new is None or fit is None or fit[0] <= 0:
            return None
        b, var_b, s2 = fit
        dx = x_old - x_new
        return DB * b * dx, DB * DB * (2 * s2 + dx * dx * var_b)

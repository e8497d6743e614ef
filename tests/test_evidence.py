"""A decision's gain from all the evidence (calibration/evidence.py): the samples' gains, the error model's prior
calibrated on the session's judged sets, and a posterior whose stated interval is honest."""

import math

import pytest
import torch

from ertacache.calibration.evidence import (
    DB,
    INTERVAL_Z,
    PRIOR_SAMPLES,
    SPREAD_DB,
    ErrorModelPrior,
    posterior,
)
from ertacache.policy import Policy


def ident(t):
    return t


def test_without_a_prior_the_margin_is_the_samples_mean_with_a_pooled_spread():
    d = torch.tensor([3.0, 5.0, 10.0, -2.0], dtype=torch.float64)
    m = posterior(d, ident, None)
    spread2 = (PRIOR_SAMPLES * SPREAD_DB ** 2 + 3 * float(d.var())) / (PRIOR_SAMPLES + 3)  # d.var(): unbiased
    assert m.gain_db == pytest.approx(4.0) and m.se_db == pytest.approx(math.sqrt(spread2 / 4))
    one = posterior(torch.tensor([SPREAD_DB + 0.5], dtype=torch.float64), ident, None)
    assert one.se_db == pytest.approx(SPREAD_DB) and one.significant  # one sample: a gain above the assumed spread
    assert not posterior(torch.tensor([SPREAD_DB - 0.5], dtype=torch.float64), ident, None).significant


def test_a_prior_is_weighed_by_precision():
    d = torch.tensor([8.0], dtype=torch.float64)
    m = posterior(d, ident, (12.0, 4.0))  # prior 12 dB +- 2
    like = SPREAD_DB ** 2
    var = 1 / (1 / like + 1 / 4.0)
    assert m.se_db == pytest.approx(math.sqrt(var)) and m.gain_db == pytest.approx(var * (8 / like + 12 / 4))
    assert m.measured_db == 8.0 and m.prior_db == 12.0 and m.se_db < min(SPREAD_DB, 2.0)
    lo, hi = m.interval_db
    assert hi - lo == pytest.approx(2 * INTERVAL_Z * m.se_db)


def test_the_stated_interval_covers_the_population_gain_at_its_level():
    """Per-sample gains drawn around a population gain with the assumed spread: the 80 % interval covers it in
    about 80 % of calibration sets, at every size (a normal interval: at two samples, whose own spread is one
    degree of freedom beside the assumed one, a little under: 75-76 %)."""
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 4, 8):
        covered = 0
        for _ in range(2000):
            d = 5.0 + SPREAD_DB * torch.randn(n, generator=g, dtype=torch.float64)
            lo, hi = posterior(d, ident, None).interval_db
            covered += lo <= 5.0 <= hi
        assert 0.74 <= covered / 2000 <= 0.9, (n, covered)


def _policy(cached):
    return Policy(num_inference_steps=10, cached_steps=cached, grid=tuple(1 - i / 10 for i in range(11)))


def test_the_error_model_prior_follows_the_regression_of_measured_on_predicted_errors():
    """Predicted costs from segment costs; measured errors exactly ``2 log P`` plus noise: the prior's slope is
    about 2, and the prior gain between two sets is DB b (log P_old - log P_new)."""
    T = 10
    cost = torch.full((T, T), float("inf"), dtype=torch.float64)
    for i in range(T):
        for k in range(i + 1, T):
            cost[i, k] = float((k - i) ** 3) if k > i + 1 else 0.01
    errors: dict[str, float] = {}
    prior = ErrorModelPrior(lambda: {"raw": cost}, errors)
    sets = [(2,), (2, 5), (2, 5, 7), (1, 3, 5, 7), (2, 3), (4, 5, 6), (1, 2, 3)]
    g = torch.Generator().manual_seed(1)
    for k, cached in enumerate(sets):
        key = f"k{k}"
        x = prior.predict(key, _policy(cached))
        assert x == pytest.approx(math.log(sum(c for c in [
            float(cost[i, j]) for i, j in zip(*_computed_pairs(cached, T))])))
        errors[key] = math.exp(2 * x - 3 + 0.05 * float(torch.randn(1, generator=g)))
    b, var_b, s2 = prior.fit()
    assert b == pytest.approx(2.0, abs=0.1) and s2 < 0.01
    old, new = ("k1", _policy(sets[1])), ("k3", _policy(sets[3]))
    mean, var = prior.prior(old, new)
    dx = prior.predicted["k1"] - prior.predicted["k3"]
    assert mean == pytest.approx(DB * b * dx) and var == pytest.approx(DB * DB * (2 * s2 + dx * dx * var_b))
    back = prior.prior(new, old)
    assert back[0] == pytest.approx(-mean) and back[1] == pytest.approx(var)  # antisymmetric


def test_no_prior_without_enough_predictions_or_from_a_model_that_does_not_rank():
    cost = torch.ones(6, 6, dtype=torch.float64)
    errors: dict[str, float] = {}
    prior = ErrorModelPrior(lambda: {"raw": cost}, errors)
    p1 = Policy(num_inference_steps=6, cached_steps=(1,), grid=tuple(1 - i / 6 for i in range(7)))
    p2 = Policy(num_inference_steps=6, cached_steps=(1, 2), grid=p1.grid)
    for k, p in enumerate((p1, p2)):
        prior.predict(f"k{k}", p)
        errors[f"k{k}"] = 1e-3
    assert prior.prior(("k0", p1), ("k1", p2)) is None  # two predicted policies: no regression
    adjusted = Policy(num_inference_steps=6, cached_steps=(1,), grid=p1.grid, adjusted_grid=p1.grid)
    assert prior.predict("adj", adjusted) is None  # the model knows nothing of an adjusted grid
    assert ErrorModelPrior(lambda: {}, {}).predict("k", p1) is None  # no error model (search not run)


def _computed_pairs(cached, T):
    computed = [i for i in range(T) if i not in cached]
    return computed[:-1], computed[1:]

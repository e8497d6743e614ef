"""The schedule search: its error model, its shortest path, and its place among the candidate sources."""

import itertools
from dataclasses import replace

import pytest
import torch

from ertacache import CalibrationConfig, Policy, sample, seeded_noise
from ertacache.calibration import core_session
from ertacache.calibration.schedule import propose, shortest_schedule
from ertacache.calibration.sketch import ErrorSketch
from ertacache.core.grids import time_grid
from ertacache.errors import ErtaCacheError


class PatternField:
    """``v(x, t) = g(t) * P``: independent of ``x``, so a cached step's error does not propagate."""

    def __init__(self, g, shape=(1, 4, 4), seed=0):
        self.g = g
        self.pattern = torch.randn(shape, generator=torch.Generator().manual_seed(seed))

    def __call__(self, x, t, cond):
        return self.g(t).view(-1, *[1] * (x.ndim - 1)) * self.pattern.expand_as(x)


def session(model, config, T=8, shift=1.0, n=4, shape=(1, 4, 4)):
    return core_session(model, None, range(n), latent_shape=shape, num_inference_steps=T, shift=shift,
                        config=config)


def brute_force(cost, nfe, forced):
    T = cost.shape[0]
    best, arg = float("inf"), None
    for inner in itertools.combinations(range(1, T - 1), nfe - 2):
        computed = (0, *inner, T - 1)
        if not set(forced) <= set(computed):
            continue
        total = sum(float(cost[i, k]) for i, k in zip(computed, computed[1:]))
        if total < best:
            best, arg = total, tuple(sorted(set(range(T)) - set(computed)))
    return best, arg


@pytest.mark.parametrize("seed", range(6))
def test_shortest_schedule_is_the_brute_force_optimum(seed):
    gen = torch.Generator().manual_seed(seed)
    T = 9
    cost = torch.rand(T, T, generator=gen, dtype=torch.float64).triu(1)
    forced = [int(s) for s in torch.randint(1, T - 1, (seed % 3,), generator=gen)]
    for nfe in range(2, T + 1):
        got = shortest_schedule(cost, nfe, forced)
        best, arg = brute_force(cost, nfe, forced)
        if arg is None:
            assert got is None or nfe >= T
            continue
        computed = sorted(set(range(T)) - set(got))
        assert len(computed) == nfe and computed[0] == 0 and computed[-1] == T - 1 and set(forced) <= set(computed)
        assert sum(float(cost[i, k]) for i, k in zip(computed, computed[1:])) == pytest.approx(best)


def test_segment_cost_is_the_final_error_of_that_segment():
    # v independent of x and velocity reuse: caching steps i+1..k-1 moves x_0 by exactly D(i, k)
    model = PatternField(lambda t: torch.sin(5 * t) + t * t)
    T, shift = 10, 3.0
    s = session(model, CalibrationConfig(candidates=("search",), rectification="off", holdout_fraction=0.0), T, shift)
    q = s.truth.search_costs["raw"]
    noise = seeded_noise(range(4), (1, 4, 4))
    ref = sample(model, noise, num_inference_steps=T, shift=shift).x
    for i, k in [(0, 3), (2, 7), (4, 9), (1, 2)]:
        policy = Policy(num_inference_steps=T, grid=tuple(time_grid(T, shift)), cached_steps=tuple(range(i + 1, k)),
                        shift=shift, reuse="velocity")
        out = sample(model, noise, policy=policy).x
        final_error = float((out - ref).double().square().sum())
        assert float(q[i, k]) == pytest.approx(final_error, rel=1e-4, abs=1e-9)  # float32 sampling


def test_the_search_caches_where_the_velocity_does_not_change():
    # g is constant for t > 0.5 (steps 0-5 of 12): reusing there costs nothing, so every cached step lies there
    model = PatternField(lambda t: torch.where(t > 0.5, torch.ones_like(t), torch.cos(9 * t)))
    T = 12
    s = session(model, CalibrationConfig(candidates=("search",), rectification="off", holdout_fraction=0.0), T)
    grid = time_grid(T)
    for nfe in (7, 8):
        (rule, cached), *_ = propose(s.truth.search_costs, nfe, (), 1)
        assert len(cached) == T - nfe
        assert all(grid[j] > 0.5 for j in cached), (rule, cached)


def test_rectification_removes_a_proportional_error_from_the_model():
    # v~ = g(t_i) P and v = g(t_j) P: eps = a v~ exactly, so every rectified segment costs nothing
    model = PatternField(lambda t: 1 + t * t)
    s = session(model, CalibrationConfig(candidates=("search",), holdout_fraction=0.0), T=10)
    raw, rect = s.truth.search_costs["raw"], s.truth.search_costs["rectified"]
    assert float(raw[0, 9]) > 1e-3 and float(rect.triu(1).max()) < 1e-9 * float(raw[0, 9])


def test_count_sketch_estimates_large_latents():
    gen = torch.Generator().manual_seed(1)
    y = torch.randn(3, 8192, generator=gen, dtype=torch.float64)
    sketch = ErrorSketch(dim=2048)
    s = sketch._sketch(y)
    assert s.shape == (3, 2048)
    assert float(s.square().sum()) == pytest.approx(float(y.square().sum()), rel=0.05)
    assert torch.equal(ErrorSketch(dim=2048)._sketch(y), s)  # the same hash everywhere
    assert torch.equal(ErrorSketch(dim=8192)._sketch(y), y)  # kept exactly when it fits


def test_search_only_calibration_takes_at_most_five_passes():
    model = PatternField(lambda t: torch.sin(4 * t))
    config = CalibrationConfig(candidates=("search",), search_candidates=1, component_check=False,
                               step_reuse_choice=False)
    pol = session(model, config, T=12).policy(target_speedup=2.0)
    by_pass = pol.provenance["cost"]["by_pass"]
    assert sum(v["passes"] for v in by_pass.values()) <= 5, by_pass
    # the per-step reuse choice adds at most an adjustment, a rectification fit and an evaluation
    with_choice = session(model, replace(config, step_reuse_choice=True), T=12).policy(target_speedup=2.0)
    assert sum(v["passes"] for v in with_choice.provenance["cost"]["by_pass"].values()) <= 8
    assert pol.provenance["selected"] == "search" and pol.nfe <= 6
    assert pol.provenance["candidates"][0]["rule"]


def test_every_source_competes_and_forced_steps_stay_computed():
    model = PatternField(lambda t: torch.sin(4 * t) + t)
    pol = session(model, CalibrationConfig(thresholds=(0.1, 0.3), max_candidates=1), T=12).policy(target_speedup=3.0)
    sources = {c["source"] for c in pol.provenance["candidates"]}
    assert sources == {"threshold", "uniform", "search"} or sources >= {"uniform", "search"}
    assert all(c["nfe"] <= 4 for c in pol.provenance["candidates"])
    assert shortest_schedule(torch.zeros(12, 12), 4, (3, 9)) is not None
    cached = shortest_schedule(torch.zeros(12, 12), 4, (3, 9))
    assert 3 not in cached and 9 not in cached
    assert shortest_schedule(torch.zeros(12, 12), 3, (3, 9)) is None


def test_candidate_sources_are_validated_and_legacy_strings_load():
    assert CalibrationConfig(candidates="threshold_and_uniform").candidates == ("threshold", "uniform")
    assert CalibrationConfig(candidates="threshold").candidates == ("threshold",)
    c = CalibrationConfig(candidates=("search",))
    assert CalibrationConfig.from_dict(c.to_dict()) == c
    for bad in ((), ("search", "search"), ("greedy",), "uniform_and_search", 3):
        with pytest.raises(ErtaCacheError, match="candidates"):
            CalibrationConfig(candidates=bad)
    with pytest.raises(ErtaCacheError, match="search_candidates"):
        CalibrationConfig(search_candidates=0)


def test_extrapolation_is_exact_for_a_velocity_linear_in_time():
    # v = (1 + 2t) P: the line through two computed outputs is v itself, so every cached step is exact
    model = PatternField(lambda t: 1 + 2 * t)
    T = 10
    noise = seeded_noise(range(3), (1, 4, 4))
    ref = sample(model, noise, num_inference_steps=T, shift=3.0).x
    cached = (2, 3, 5, 6, 7)  # each after at least two computed steps (0, 1, then 4)
    outs = {}
    for mode in ("extrapolate", "velocity"):
        policy = Policy(num_inference_steps=T, grid=tuple(time_grid(T, 3.0)), cached_steps=cached, shift=3.0,
                        reuse=mode)
        outs[mode] = sample(model, noise, policy=policy).x
    assert torch.allclose(outs["extrapolate"], ref, atol=1e-5)
    assert (outs["velocity"] - ref).abs().max() > 1e-2


def pair_brute_force(cost, nfe, forced):
    T = cost.shape[0]
    best, arg = float("inf"), None
    for inner in itertools.combinations(range(1, T - 1), nfe - 2):
        computed = (0, *inner, T - 1)
        if not set(forced) <= set(computed):
            continue
        total = float(cost[0, 0, computed[1]]) + sum(
            float(cost[h, i, k]) for h, i, k in zip(computed, computed[1:], computed[2:]))
        if total < best:
            best, arg = total, tuple(sorted(set(range(T)) - set(computed)))
    return best, arg


@pytest.mark.parametrize("seed", range(4))
def test_pair_shortest_schedule_is_the_brute_force_optimum(seed):
    gen = torch.Generator().manual_seed(seed)
    T = 9
    cost = torch.rand(T, T, T, generator=gen, dtype=torch.float64)
    h, i, k = torch.meshgrid(torch.arange(T), torch.arange(T), torch.arange(T), indexing="ij")
    cost[~(((h < i) | ((h == 0) & (i == 0))) & (i < k))] = torch.inf
    forced = [int(s) for s in torch.randint(1, T - 1, (seed % 3,), generator=gen)]
    for nfe in range(2, T):
        got = shortest_schedule(cost, nfe, forced)
        best, arg = pair_brute_force(cost, nfe, forced)
        if arg is None:
            assert got is None
            continue
        computed = sorted(set(range(T)) - set(got))
        assert len(computed) == nfe and set(forced) <= set(computed)
        total = float(cost[0, 0, computed[1]]) + sum(
            float(cost[a, b, c]) for a, b, c in zip(computed, computed[1:], computed[2:]))
        assert total == pytest.approx(best)


def test_extrapolation_segment_cost_is_the_final_error_of_that_segment():
    from ertacache.calibration.schedule import extrapolation_costs

    model = PatternField(lambda t: torch.sin(5 * t) + t * t)
    T, shift = 10, 3.0
    s = session(model, CalibrationConfig(candidates=("search",), rectification="off", holdout_fraction=0.0,
                                         reuse="extrapolate"), T, shift)
    q = extrapolation_costs(s.truth.search_costs["gram"], s.grid, rectified=False)
    rect = extrapolation_costs(s.truth.search_costs["gram"], s.grid, rectified=True)
    noise = seeded_noise(range(4), (1, 4, 4))
    ref = sample(model, noise, num_inference_steps=T, shift=shift).x
    for i, k in [(0, 3), (2, 7), (4, 9), (1, 5)]:
        policy = Policy(num_inference_steps=T, grid=tuple(time_grid(T, shift)), cached_steps=tuple(range(i + 1, k)),
                        shift=shift, reuse="extrapolate")
        final_error = float((sample(model, noise, policy=policy).x - ref).double().square().sum())
        h = 0 if i == 0 else i - 1  # the computed step before i (none before step 0)
        assert float(q[h, i, k]) == pytest.approx(final_error, rel=1e-4, abs=1e-9)
        assert float(rect[h, i, k]) <= 1e-9 * float(q[h, i, k]) + 1e-12  # proportional errors rectify away
    assert torch.isinf(q[3, 2, 5]) and torch.isinf(q[1, 1, 5]) and float(q[2, 4, 5]) == 0.0


def test_extrapolate_reuse_searches_with_its_own_error_model():
    model = PatternField(lambda t: torch.sin(4 * t) + t)
    config = CalibrationConfig(candidates=("search",), search_candidates=2, reuse="extrapolate")
    pol = session(model, config, T=12).policy(target_speedup=2.0)
    rules = [c["rule"] for c in pol.provenance["candidates"] if c["source"] == "search" and "step_reuse" not in c]
    assert rules and rules[0].startswith("extrapolation, ") and len(rules) <= 2


def test_fit_propagation_recovers_the_slope_of_errors_that_follow_it():
    """Errors made to follow exp(beta t_k)-weighted segment costs (any scale) give back that beta; fewer than 3
    judged sets fit nothing."""
    from ertacache.calibration.schedule import BETAS, fit_propagation, path_cost
    from ertacache.core.grids import time_grid

    T = 12
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(T, T, generator=g, dtype=torch.float64).triu(1)
    grid = time_grid(T, 3.0)
    w = torch.exp(2.0 * torch.tensor(grid[:T], dtype=torch.float64))
    sets = [(1, 2, 5, 8), (3, 4, 9, 10), (1, 3, 5, 7), (2, 6, 9, 10), (4, 5, 6, 7)]
    judged = [(s, 7.5 * path_cost(cost * w, s)) for s in sets]
    beta, weighted = fit_propagation(cost, grid, judged)
    assert beta == 2.0 and 2.0 in BETAS
    assert torch.allclose(weighted, cost * w)
    assert fit_propagation(cost, grid, judged[:2]) is None
    flat = [(s, 3.0 * path_cost(cost, s)) for s in sets]  # errors counted once: no propagation
    assert fit_propagation(cost, grid, flat)[0] == 0.0

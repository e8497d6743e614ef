"""Per-step reuse modes: the error model that chooses them, the policy field that carries them, both drivers."""

from dataclasses import replace

import pytest
import torch

from ertacache import CalibrationConfig, Policy, sample, seeded_noise
from ertacache.calibration import core_session
from ertacache.calibration.schedule import choose_step_reuse, reuse_error
from ertacache.core.grids import time_grid
from ertacache.errors import ErtaCacheError


class PatternField:
    """``v(x, t) = g(t) * P``: independent of ``x``, so every error is known in closed form."""

    def __init__(self, g, shape=(1, 4, 4), seed=0):
        self.g = g
        self.pattern = torch.randn(shape, generator=torch.Generator().manual_seed(seed))

    def __call__(self, x, t, cond):
        return self.g(t).view(-1, *[1] * (x.ndim - 1)) * self.pattern.expand_as(x)


def kink(t):
    """Linear for t >= 0.5, flat below: extrapolation is exact above the kink, plain reuse below it."""
    return torch.where(t >= 0.5, 2 * t, torch.ones_like(t))


def session(model, config, T=12, n=4):
    return core_session(model, None, range(n), latent_shape=(1, 4, 4), num_inference_steps=T, shift=1.0,
                        config=config)


def test_modelled_reuse_error_is_the_exact_step_error():
    g = lambda t: torch.sin(5 * t) + t * t  # noqa: E731
    model, T, n = PatternField(g), 10, 4
    s = session(model, CalibrationConfig(candidates=("search",), holdout_fraction=0.0), T, n)
    gram, grid = s.truth.search_costs["gram"], s.grid
    p2 = float(model.pattern.double().square().sum())
    gv = [float(g(torch.tensor(t, dtype=torch.float64))) for t in grid[:-1]]
    for h, i, j in [(0, 2, 3), (1, 4, 7), (3, 5, 6), (None, 0, 2)]:
        exact_v = n * p2 * (gv[i] - gv[j]) ** 2
        assert reuse_error(gram, grid, "velocity", h, i, j, False) == pytest.approx(exact_v, rel=1e-5)
        if h is not None:
            slope = (grid[j] - grid[i]) / (grid[i] - grid[h])
            exact_x = n * p2 * (gv[i] + (gv[i] - gv[h]) * slope - gv[j]) ** 2
            assert reuse_error(gram, grid, "extrapolate", h, i, j, False) == pytest.approx(exact_x, rel=1e-5)
        # the error is proportional to v~ here, so the step's rectification removes all of it
        assert reuse_error(gram, grid, "velocity", h, i, j, True) < 1e-9 * max(exact_v, 1e-12) + 1e-12


def test_the_choice_follows_the_velocity_field():
    model, T = PatternField(kink), 12
    s = session(model, CalibrationConfig(candidates=("search",), holdout_fraction=0.0), T)
    cached = (2, 4, 6, 8, 10)  # computed 0, 1, 3, 5, 7, 9, 11: t = 1, .92, .75, .58, .42, .25, .08
    chosen = choose_step_reuse(s.truth.search_costs["gram"], s.grid, cached, ["extrapolate", "velocity"], False)
    assert chosen[2] == chosen[4] == chosen[6] == "extrapolate"  # reused and extrapolated on the linear part
    assert chosen[8] == "velocity"  # the line through t = .75, .58 overshoots past the kink
    assert chosen[10] == "extrapolate"  # tie on the flat part: the policy's own mode


def test_round_off_in_the_gram_cannot_flip_the_choice():
    """Micro-batched sums change the Gram at 1e-7 (relative); the policy's own mode keeps ties and near ties,
    and extrapolation with one computed step before j (the same v~ as velocity) is never chosen."""
    model, T = PatternField(kink), 12
    s = session(model, CalibrationConfig(candidates=("search",), holdout_fraction=0.0), T)
    gram = s.truth.search_costs["gram"]
    cached = (1, 2, 4, 6, 8, 10)  # steps 1 and 2 follow computed step 0 alone
    for seed in range(5):
        noise = torch.randn(gram.shape, generator=torch.Generator().manual_seed(seed), dtype=gram.dtype)
        noisy = gram * (1 + 1e-7 * (noise + noise.transpose(-1, -2)) / 2)
        chosen = choose_step_reuse(noisy, s.grid, cached, ["velocity", "extrapolate"], False)
        assert chosen[1] == chosen[2] == "velocity"
        assert chosen[10] == "velocity"  # flat part: both modes exact, the policy's own kept
        assert chosen[4] == chosen[6] == "extrapolate"  # a real gain still switches


@pytest.mark.parametrize("base, other", [("extrapolate", "velocity"), ("velocity", "extrapolate")])
def test_a_policy_of_per_step_modes_samples_as_each_pure_mode(base, other):
    model, T = PatternField(kink), 12
    grid, cached = tuple(time_grid(T, 1.0)), (2, 4, 6, 8, 10)
    noise = seeded_noise(range(3), (1, 4, 4))

    def run(**kw):
        return sample(model, noise, policy=Policy(T, cached, grid, **kw)).x

    assert torch.equal(run(reuse=base, step_reuse={j: other for j in cached}), run(reuse=other))
    assert torch.equal(run(reuse=base, step_reuse={j: base for j in cached}), run(reuse=base))
    mixed = run(reuse=base, step_reuse={8: other})
    assert not torch.equal(mixed, run(reuse=base)) and not torch.equal(mixed, run(reuse=other))


def test_step_reuse_is_validated(tmp_path):
    T, grid = 8, tuple(time_grid(8, 1.0))
    with pytest.raises(ErtaCacheError, match="keeps"):
        Policy(T, (2,), grid, reuse="extrapolate", step_reuse={2: "latent_residual"})
    with pytest.raises(ErtaCacheError, match="not a cached step"):
        Policy(T, (2,), grid, reuse="extrapolate", step_reuse={3: "velocity"})
    with pytest.raises(ErtaCacheError, match="reuse must be one of"):
        Policy(T, (2,), grid, reuse="extrapolate", step_reuse={2: "taylor"})
    with pytest.raises(ErtaCacheError, match="int step"):
        Policy(T, (2,), grid, reuse="extrapolate", step_reuse={"2": "velocity"})
    assert Policy(T, (2, 3), grid, reuse="velocity", step_reuse={2: "velocity", 3: "extrapolate"}).step_reuse \
        == {3: "extrapolate"}  # the policy's own mode is dropped: equal choices, equal policies


def test_step_reuse_round_trips_and_needs_schema_3(tmp_path):
    T, grid = 10, tuple(time_grid(10, 3.0))
    mixed = Policy(T, (2, 3, 6), grid, shift=3.0, reuse="extrapolate", step_reuse={3: "velocity"})
    plain = Policy(T, (2, 3, 6), grid, shift=3.0, reuse="extrapolate")
    back = Policy.load(mixed.save(tmp_path / "mixed.safetensors"))
    assert back.step_reuse == {3: "velocity"} and back.reuse == "extrapolate"
    assert "per-step reuse" in back.summary()
    from ertacache.policy import file as policy_file

    doc, _ = policy_file.decode(tmp_path / "mixed.safetensors")
    assert doc["schema_version"] == 3
    doc, _ = policy_file.decode(plain.save(tmp_path / "plain.safetensors"))
    assert doc["schema_version"] == 2 and "step_reuse" not in doc  # readable by the library before it
    assert mixed.for_steps(20).step_reuse and set(mixed.for_steps(20).step_reuse.values()) == {"velocity"}


def test_the_search_sets_per_step_version_competes_and_wins_where_it_is_exact():
    from ertacache.calibration.sets import Candidate

    model = PatternField(kink)
    config = CalibrationConfig(candidates=("uniform", "search"), rectification="off", timestep_adjustment=False)
    s = session(model, config)
    base = Candidate("search", None, (2, 4, 6, 8, 10), rule="a rule")
    refined = s.proposer.per_step_candidate(base)
    assert refined.step_reuse == {8: "velocity"} and refined.cached_steps == base.cached_steps
    assert refined.as_dict(12)["step_reuse"] == {"8": "velocity"} and refined.rule == "a rule, per-step reuse"
    pure = s.judge.error(Policy(cached_steps=base.cached_steps, **s.base))
    mixed = s.judge.error(Policy(cached_steps=base.cached_steps, step_reuse=refined.step_reuse, **s.base))
    assert pure > 1e-5 and mixed < 1e-6 * pure  # every cached step is now exact
    pol = s.policy(target_speedup=2.0)
    cands = pol.provenance["candidates"]
    searched = [c for c in cands if c["source"] == "search" and "step_reuse" not in c]
    best = min(searched, key=lambda c: c["errors"]["plain"])
    assert all(c["cached_steps"] == best["cached_steps"] for c in cands if "step_reuse" in c)
    unbudgeted = session(model, replace(config, max_passes=None)).policy(target_speedup=2.0).provenance["candidates"]
    searched = [c for c in unbudgeted if c["source"] == "search" and "step_reuse" not in c]
    refined = [c["cached_steps"] for c in unbudgeted if "step_reuse" in c]  # each searched set's, where it has one
    expected = [c["cached_steps"] for c in searched
                if s.proposer.per_step_candidate(Candidate("search", None, tuple(c["cached_steps"]))) is not None]
    assert refined and sorted(refined) == sorted(expected)  # here the search's second set's: the budget skips it
    assert not any(c["cached_steps"] in refined for c in cands if "step_reuse" in c)

    off = session(model, replace(config, step_reuse_choice=False))
    pol = off.policy(target_speedup=2.0)
    assert not pol.step_reuse and all("step_reuse" not in c for c in pol.provenance["candidates"])

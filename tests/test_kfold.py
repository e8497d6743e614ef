"""The k-fold check of sets the schedule search fits to the calibration samples (issue 21, item 3).

Each sample is scored by the set the same recipe makes from the ground truth without the
sample's fold; the error model without a fold is exactly the one a ground truth that never
saw those samples would log; a set's in-sample win that its folds do not reproduce is not kept.
"""

import pytest
import torch

from ertacache import CalibrationConfig
from ertacache.calibration import CoreDriver, GroundTruth, core_session
from ertacache.calibration.distributed import fold_slices, shard
from ertacache.calibration.judge import evaluation_key
from ertacache.calibration.proposals import Proposer
from ertacache.calibration.sketch import ErrorSketch
from ertacache.policy import Policy, uniform_cached_steps

T, N = 10, 6
COND, NULL = torch.tensor([1, 2, 3, 4, 5, 6]), torch.full((N,), 10)


def session(model, config, **kw):
    return core_session(model, COND, range(N), latent_shape=(2, 4, 4), num_inference_steps=T, guidance_scale=2.0,
                        null_cond=NULL, config=config, **kw)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_folds_partition_the_set_and_every_process_holds_a_row_of_each(world):
    for n in range(1, 30):
        for k in (1, 2, 5, 40):
            folds = fold_slices(n, world, k)
            if min(k, n // world) < 2:
                assert folds == []
                continue
            assert len(folds) == min(k, n // world)
            assert [i for f in folds for i in range(n)[f]] == list(range(n))
            for f in folds:
                assert all(shard(range(n)[f], r, world) for r in range(world))


def test_sketch_without_a_fold_is_the_sketch_of_a_ground_truth_that_never_saw_it(tiny):
    """Costs and Gram of ``without(fold)`` equal those logged by a ground truth run on the other samples alone."""
    def logged(seeds, cond):
        driver = CoreDriver(tiny, cond, seeds, (2, 4, 4), T, 3.0, 2.0, torch.full((len(seeds),), 10), "velocity",
                            None, batch_size=2)
        gt = GroundTruth(ErrorSketch())
        driver.run(gt, slice(0, len(seeds)), len(seeds), None)
        return gt.sketch, gt.grid()

    whole, grid = logged(list(range(N)), COND)
    keep = [0, 1, 4, 5]
    alone, _ = logged(keep, COND[keep])
    cut = whole.without(range(2, 4))
    for sketch in (cut, alone):
        assert sketch.knows_samples
    ident = lambda t: t  # noqa: E731  one process
    branches = ("cond", "uncond")
    a = cut.costs(grid, "velocity", ident, True, branches)
    b = alone.costs(grid, "velocity", ident, True, branches)
    for kind in ("raw", "rectified"):
        torch.testing.assert_close(a[kind], b[kind], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(cut.gram(T, branches, ident), alone.gram(T, branches, ident), rtol=1e-9, atol=1e-12)
    # additive: the Gram of the whole is the fold's plus the rest's
    rest = whole.without(range(0, 2)).without(range(4, 6))
    torch.testing.assert_close(cut.gram(T, branches, ident) + rest.gram(T, branches, ident),
                               whole.gram(T, branches, ident), rtol=1e-9, atol=1e-9)


def test_a_fold_that_refits_another_set_is_scored_by_that_set_on_its_own_rows(tiny):
    """Only the folds whose refitted set differs are evaluated, on their rows alone, at the set's NFE."""
    s = session(tiny, CalibrationConfig())
    assert len(s.folds) == 5 and len(s.truth.fold_costs) == 5
    own = Policy(**{**s.base, "cached_steps": uniform_cached_steps(T, 5)})
    other = uniform_cached_steps(T, 6)
    from ertacache.calibration.sets import Candidate

    cand = Candidate("search", None, own.cached_steps,
                     refit=lambda f: (other, {}) if f == 1 else (own.cached_steps, {}))
    s.judge.error(own)
    before = dict(s.cost)
    shift = s.judge.shift(cand, {})
    rows = s.folds[1]
    evaluated = s.cost["k-fold evaluation"]
    assert "k-fold evaluation" not in before and evaluated["passes"] == 1
    assert evaluated["model_calls"] == (T - len(other)) * (rows.stop - rows.start) * 2  # NFE x rows x branches
    assert torch.count_nonzero(shift[:rows.start]) == 0 and torch.count_nonzero(shift[rows.stop:]) == 0
    whole = Policy(**{**s.base, "cached_steps": other})
    s.judge.error(whole)  # the refitted set on every sample: its fold's rows agree with the fold's own evaluation
    expected = s.judge.scores[evaluation_key(whole)][rows] - s.judge.scores[evaluation_key(own)][rows]
    torch.testing.assert_close(shift[rows], expected, rtol=0, atol=1e-5)
    assert cand.cross_validated == {"folds": 5, "refit_differs": 1, "in_sample_errors": {}}


def test_a_candidate_s_k_fold_record_is_never_another_s(tiny):
    """The judge's per-candidate records (refitted sets, k-fold shifts) belong to that candidate even after it is
    dropped: a new candidate at the freed address (CPython reuses it at once) gets its own, not the dead one's."""
    from ertacache.calibration.sets import Candidate

    s = session(tiny, CalibrationConfig())
    own, other = uniform_cached_steps(T, 5), uniform_cached_steps(T, 6)
    dropped = Candidate("search", None, own, refit=lambda f: (other, {}))  # judged over budget, then dropped
    assert len(s.judge.refitted(dropped)) == 5
    address = id(dropped)
    del dropped
    alive = []
    for _ in range(200):  # the next candidates, as the session makes them
        cand = Candidate("search", None, own, refit=lambda f: (own, {}))
        if id(cand) == address:
            break
        alive.append(cand)
    assert s.judge.refitted(cand) == []  # its own recipe refits its own set in every fold


def test_a_win_the_folds_do_not_reproduce_is_not_kept(tiny, monkeypatch):
    """A searched set that every fold would refit to the evenly spaced set scores exactly as that set: no win."""
    def to_uniform(self, rule, max_nfe, forced):
        return lambda fold: (uniform_cached_steps(self.T, max_nfe), {})

    config = CalibrationConfig(rectification="off", step_reuse_choice=False, propagation_candidate=False)
    plain = session(tiny, config).policy(target_speedup=2.0)
    searched = [d for d in plain.provenance["decisions"] if d["decision"].startswith("search set")]
    assert searched and all(d["k_fold"]["refit_differs"] == 0 and d["gain_db"] == d["in_sample_gain_db"]
                            for d in searched if d["kept"])
    monkeypatch.setattr(Proposer, "refit_rule", to_uniform)
    p = session(tiny, config).policy(target_speedup=2.0)
    assert p.cached_steps == uniform_cached_steps(T, 5) and p.provenance["selected"] == "uniform"
    checked = [d for d in p.provenance["decisions"] if "k_fold" in d]
    assert checked and all(not d["kept"] and d["gain_db"] == 0.0 and d["k_fold"]["refit_differs"] == 5
                           for d in checked)
    assert "5-fold, 5 refitted sets differ" in p.summary()
    assert p.provenance["judged_on"] == "every sample (rectification leave-one-out, searched sets checked 5-fold)"


@pytest.mark.parametrize("fresh", [True, False])
def test_one_fold_or_one_sample_judges_in_sample(tiny, fresh):
    """Without folds a fitted set is judged on its samples; its win is checked on fresh noise (test_fresh.py)."""
    s = session(tiny, CalibrationConfig(folds=1, fresh_check=fresh))
    assert s.folds == [] and s.truth.fold_costs == []
    p = s.policy(target_speedup=2.0)
    assert all("k_fold" not in d for d in p.provenance["decisions"])
    assert p.provenance["judged_on"] == "every sample (rectification leave-one-out" + (
        ", a searched set's win checked on fresh noise)" if fresh else ")")


def test_timestep_adjustment_is_judged_on_samples_its_grid_was_not_fitted_to(tiny):
    """Each fold's rows follow the grid the other folds estimate (Eq. 13-14 without them): their k-fold scores
    are exactly what that grid gives them at inference, and the adjusted variant is rated by those scores."""
    from dataclasses import replace

    from ertacache.calibration.passes import AdjustTimesteps
    from ertacache.calibration.sets import Candidate

    s = session(tiny, CalibrationConfig(timestep_adjustment=True, rectification="off"))
    cached = uniform_cached_steps(T, 5)
    plain = Policy(**{**s.base, "cached_steps": cached})
    whole = s.components.adjust(cached)
    k_fold = s.components.adjust_k_fold(cached)
    assert s.cost["timestep adjustment, k-fold"]["passes"] == len(s.folds) == 5
    for rows in s.folds[:2]:
        p = AdjustTimesteps(cached, s.config.phi_denominator, s.truth.changes, exclude=range(rows.start, rows.stop))
        s.driver.run(p, s.judge.all, s.runner.n_fit, s.grid)
        assert p.grid != whole  # the fold moved the estimate
        s.judge.error(replace(plain, adjusted_grid=tuple(p.grid)))  # that grid followed at inference, every sample
        inference = s.judge.scores[evaluation_key(replace(plain, adjusted_grid=tuple(p.grid)))]
        torch.testing.assert_close(k_fold[rows], inference[rows], rtol=0, atol=1e-9)
    s.judge.record(evaluation_key(plain), torch.full_like(k_fold, 10.0))  # the plain set worse than any grid: it helps
    adjusted = s.components.variants(Candidate("uniform", None, cached))["adjusted"]
    assert adjusted.adjusted_grid == tuple(whole)
    assert s.judge.error(adjusted) == pytest.approx(s.judge.geometric(k_fold))  # rated by the k-fold scores
    other = session(tiny, CalibrationConfig(timestep_adjustment=True, rectification="off"))
    other.judge.record(evaluation_key(plain), torch.full_like(k_fold, -100.0))  # better than any grid: no further check
    adjusted = other.components.variants(Candidate("uniform", None, cached))["adjusted"]
    assert "timestep adjustment, k-fold" not in other.cost
    in_sample = other.judge.scores[evaluation_key(adjusted)]
    assert other.judge.error(adjusted) == pytest.approx(other.judge.geometric(in_sample))
    assert other.judge.error(adjusted) != pytest.approx(s.judge.geometric(k_fold))  # its in-sample rating
    p = session(tiny, CalibrationConfig(timestep_adjustment=True)).policy(target_speedup=2.0)
    assert p.provenance["judged_on"] == ("every sample (rectification leave-one-out, searched sets checked 5-fold, "
                                         "timestep adjustment checked 5-fold where it helps)")

import math

import pytest
import torch

from conftest import ConstantField, TimeField
from ertacache import CalibrationConfig, Policy, calibrate, calibrate_many, sample, seeded_noise
from ertacache.calibration import AdjustTimesteps, CoreDriver, GroundTruth, ThresholdSearch, core_session
from ertacache.calibration.judge import evaluation_key
from ertacache.core.grids import shrink_step, time_grid
from ertacache.errors import ErtaCacheError
from ertacache.policy import uniform_cached_steps


def calib_set(model, n=2, reuse="velocity", shape=(1, 2, 2)):
    return CoreDriver(model, None, range(n), shape, 1, 1.0, 1.0, None, reuse, None)


def run(driver, pass_, grid):
    return driver.run(pass_, slice(0, driver.size), driver.size, grid)


def adjust_grid(driver, grid, cached, denominator):
    p = AdjustTimesteps(cached, denominator)
    run(driver, p, grid)
    return p.grid, p.phis


def log_ground_truth(driver, grid):
    p = GroundTruth()
    run(driver, p, grid)
    return p.norms()


def threshold_search(driver, grid, gt_norms, lam):
    p = ThresholdSearch(lam, gt_norms)
    run(driver, p, grid)
    return tuple(p.cached_steps), p.l1_rel


def test_shrink_step_keeps_the_end_and_proportions():
    g = shrink_step([1.0, 0.75, 0.5, 0.25, 0.0], 1, 0.0)
    assert g == pytest.approx([1.0, 0.75, 0.75, 0.375, 0.0])
    g = shrink_step(time_grid(6, 3.0), 2, 0.5)
    assert g[-1] == 0.0 and g[:3] == time_grid(6, 3.0)[:3]
    assert g[3] == pytest.approx(time_grid(6, 3.0)[2] + 0.5 * (time_grid(6, 3.0)[3] - time_grid(6, 3.0)[2]))


def test_phi_closed_form_v2():
    # v = t: at cached step 1 (velocity reuse) v~ = v(t=1) = 1, v = 0.75: phi = 1 - 0.25 / 0.75 = 2/3
    cs = calib_set(TimeField(1.0))
    g, phis = adjust_grid(cs, time_grid(4), (1,), "velocity")
    assert phis[1] == pytest.approx(2 / 3)
    t2 = 0.75 - 0.25 * 2 / 3
    assert g == pytest.approx([1.0, 0.75, t2, t2 / 2, 0.0])


def test_phi_closed_form_v1_velocity_reuse_is_zero():
    # v1 divides by ||v_j - v_{j-1}||, which equals the numerator under plain velocity reuse
    cs = calib_set(TimeField(1.0))
    g, phis = adjust_grid(cs, time_grid(4), (1,), "velocity_change")
    assert phis[1] == 0.0
    assert g == pytest.approx([1.0, 0.75, 0.75, 0.375, 0.0])


def test_phi_is_one_when_cache_is_exact():
    cs = calib_set(ConstantField(0.3))
    g, phis = adjust_grid(cs, time_grid(6), (1, 2, 4), "velocity")
    assert phis == {1: 1.0, 2: 1.0, 4: 1.0}
    assert g == pytest.approx(time_grid(6))


def test_threshold_search_caches_everything_on_constant_field():
    cs = calib_set(ConstantField(0.5), reuse="latent_residual")
    grid = time_grid(8)
    gt = log_ground_truth(cs, grid)
    cached, _ = threshold_search(cs, grid, gt, 0.01)
    # latent residual r = v - x changes with x, velocity does not
    assert cached == ()
    cs = calib_set(ConstantField(0.5), reuse="velocity")
    cached, _ = threshold_search(cs, grid, log_ground_truth(cs, grid), 0.01)
    assert cached == (1, 2, 3, 4, 5, 6)


def test_threshold_search_closed_form_l1_rel():
    # v = t with velocity reuse: l1_rel at step i = |t_c - t_i| / |t_i| where c is the last computed step
    cs = calib_set(TimeField(1.0))
    grid = time_grid(5)  # 1, .8, .6, .4, .2, 0
    gt = log_ground_truth(cs, grid)
    cached, l1_rel = threshold_search(cs, grid, gt, 0.3)
    # step 1: |1-.8|/.8 = .25 < .3 cached; step 2: |1-.6|/.6 = .67 computed; step 3: |.6-.4|/.4 = .5 computed
    assert cached == (1,)
    assert l1_rel[1] == pytest.approx(0.25)
    assert l1_rel[2] == pytest.approx(0.4 / 0.6)


def _calibrate(model, **kw):
    cond = torch.tensor([1, 2, 3, 4, 5, 6])
    args = dict(latent_shape=(2, 4, 4), num_inference_steps=10, guidance_scale=2.0,
                null_cond=torch.full((6,), 10), target_speedup=2.0)
    args.update(kw)
    return calibrate(model, cond, [0, 1, 2, 3, 4, 5], **args)


def test_calibration_is_deterministic_and_meets_target(tiny):
    a = _calibrate(tiny, config=CalibrationConfig.thorough())
    b = _calibrate(tiny, config=CalibrationConfig.thorough())
    assert a.nfe <= 5 and a.cached_steps == b.cached_steps and a.adjusted_grid == b.adjusted_grid
    assert a.rect_a.keys() == b.rect_a.keys()
    for name in a.rect_a:
        assert torch.equal(a.rect_a[name], b.rect_a[name])
    assert a.provenance["seeds"] == [0, 1, 2, 3, 4, 5] and a.provenance["calibration_size"] == 6
    cands = a.provenance["candidates"]
    chosen = cands[a.provenance["chosen"]]
    assert chosen["cached_steps"] == list(a.cached_steps) and chosen.get("step_reuse", {}) == {
        str(k): v for k, v in a.step_reuse.items()}
    base = next(c for c in cands if c["cached_steps"] == list(a.cached_steps))
    assert {"plain", "adjusted", "rectified", "full"} <= set(base["errors"]) or base is not chosen


def test_every_choice_is_a_paired_win_by_more_than_its_standard_error(tiny):
    """A set over the uniform one, and a component over none, are kept only on a paired win > 1 SE."""
    a = _calibrate(tiny, config=CalibrationConfig.thorough())
    cands, decisions = a.provenance["candidates"], a.provenance["decisions"]
    uniform = next(c for c in cands if c["source"] == "uniform" and "rule" not in c)
    chosen = cands[a.provenance["chosen"]]
    for d in decisions:
        assert d["kept"] == (d["gain_db"] > d["se_db"]) and d["n"] == 6
    if chosen["cached_steps"] != uniform["cached_steps"]:
        assert any(d["kept"] and "over uniform" in d["decision"] for d in decisions)
    if a.provenance["variant"] != "plain":
        assert any(d["kept"] and d["decision"].startswith(a.provenance["variant"]) for d in decisions)
    # a margin's measurement is the mean of the paired per-sample dB differences, its error their spread (pooled
    # with the assumed spread as two pseudo-samples) over sqrt(n); with no prior that is the margin
    from ertacache.calibration.evidence import PRIOR_SAMPLES, SPREAD_DB
    session = core_session(tiny, torch.tensor([1, 2, 3, 4, 5, 6]), range(6), latent_shape=(2, 4, 4),
                           num_inference_steps=10, guidance_scale=2.0, null_cond=torch.full((6,), 10))
    u4, u6 = (Policy(**{**session.base, "cached_steps": uniform_cached_steps(10, k)}) for k in (4, 6))
    session.judge.evidence = None
    m = session.judge.margin(u4, u6)
    d = (session.judge.scores[evaluation_key(u4)] - session.judge.scores[evaluation_key(u6)]) * 10 / math.log(10)
    spread2 = (PRIOR_SAMPLES * SPREAD_DB ** 2 + 5 * float(d.var())) / (PRIOR_SAMPLES + 5)
    assert m.gain_db == pytest.approx(float(d.mean())) == pytest.approx(m.measured_db)
    assert m.se_db == pytest.approx(math.sqrt(spread2 / 6)) and m.prior_db is None
    assert m.n == 6 and m.gain_db > 0  # computing more steps of the same spacing is better here


def test_component_check_off_keeps_every_component(tiny):
    p = _calibrate(tiny, config=CalibrationConfig.thorough(component_check=False))
    assert p.adjusted_grid is not None and p.rect_form == "linear"
    assert p.provenance["variant"] == "full"
    q = _calibrate(tiny, config=CalibrationConfig(timestep_adjustment=False, rectification="off"))
    assert q.adjusted_grid is None and q.rect_form == "off"


def test_calibrated_policy_beats_uniform_on_held_out_seeds(tiny):
    policy = _calibrate(tiny, num_inference_steps=12)
    noise = seeded_noise([100, 101, 102, 103], (2, 4, 4))
    cond, null = torch.tensor([1, 3, 5, 7]), torch.full((4,), 10)
    kw = dict(guidance_scale=2.0, null_cond=null)
    ref = sample(tiny, noise, cond, num_inference_steps=12, **kw).x
    uni = Policy.uniform(12, policy.nfe, reuse=policy.reuse, branches=policy.branches, guidance_scale=2.0)
    err_uni = (sample(tiny, noise, cond, policy=uni, **kw).x - ref).square().mean()
    err_pol = (sample(tiny, noise, cond, policy=policy, **kw).x - ref).square().mean()
    assert err_pol < err_uni


def test_threshold_mode_uses_that_lambda(tiny):
    p = _calibrate(tiny, target_speedup=None, threshold=0.3, config=CalibrationConfig(rectification="off"))
    assert p.provenance["threshold"] == 0.3 and p.provenance["selected"] == "threshold"
    assert p.rect_form == "off"


@pytest.mark.parametrize("lam", [0.0, -0.1, math.nan, math.inf, "0.2"])
def test_bad_threshold(tiny, lam):
    with pytest.raises(ErtaCacheError, match="threshold lambda"):
        _calibrate(tiny, target_speedup=None, threshold=lam)
    with pytest.raises(ErtaCacheError, match="threshold lambda"):
        CalibrationConfig(thresholds=(0.1, lam))


@pytest.mark.parametrize("s", [0.5, 11, 6.0, math.nan])
def test_bad_target_speedup(tiny, s):
    with pytest.raises(ErtaCacheError, match="target_speedup"):
        _calibrate(tiny, target_speedup=s)


def test_target_and_threshold_are_exclusive(tiny):
    with pytest.raises(ErtaCacheError, match="exactly one"):
        _calibrate(tiny, threshold=0.2)
    with pytest.raises(ErtaCacheError, match="exactly one"):
        _calibrate(tiny, target_speedup=None)


def test_empty_calibration_set(tiny):
    with pytest.raises(ErtaCacheError, match="calibration set is empty"):
        calibrate(tiny, None, [], latent_shape=(2, 4, 4), num_inference_steps=10, target_speedup=2.0)
    with pytest.raises(ErtaCacheError, match="one seed per condition"):
        calibrate(tiny, torch.tensor([1, 2]), [0], latent_shape=(2, 4, 4), num_inference_steps=10,
                  target_speedup=2.0)


def test_nan_model_output_names_the_step():
    class NaNAt:
        def __call__(self, x, t, cond):
            v = torch.zeros_like(x)
            if float(t[0]) < 0.55:
                v[0, 0, 0, 0] = float("nan")
            return v

    with pytest.raises(ErtaCacheError, match=r"NaN/inf values at step 5 \(t = 0.5000\) during ground truth"):
        calibrate(NaNAt(), None, [0, 1], latent_shape=(1, 2, 2), num_inference_steps=10, target_speedup=2.0,
                  config=CalibrationConfig(reuse="velocity"))


def test_bad_config_values():
    with pytest.raises(ErtaCacheError, match="reuse must be one of"):
        CalibrationConfig(reuse="hidden")  # type: ignore[arg-type]
    with pytest.raises(ErtaCacheError, match="empty sweep"):
        CalibrationConfig(thresholds=())
    for folds in (0, True, 2.5):
        with pytest.raises(ErtaCacheError, match=r"folds must be an int >= 1 \(1: no k-fold check\), got"):
            CalibrationConfig(folds=folds)  # type: ignore[arg-type]


def test_calibrate_many_equals_separate_calls(tiny):
    many = calibrate_many(tiny, torch.tensor([1, 2, 3, 4, 5, 6]), range(6), target_speedups=[1.5, 2.5],
                          latent_shape=(2, 4, 4), num_inference_steps=10, guidance_scale=2.0,
                          null_cond=torch.full((6,), 10))
    for policy, target in zip(many, [1.5, 2.5]):
        alone = _calibrate(tiny, target_speedup=target)
        assert policy.cached_steps == alone.cached_steps and policy.adjusted_grid == alone.adjusted_grid
        assert policy.nfe <= 10 / target


class ScaledField:
    """``v(x, t, c) = c * sin(5 t) * P``: each sample's cached error scales with its condition ``c``."""

    def __init__(self, shape=(1, 3, 3)):
        self.pattern = torch.randn(shape, generator=torch.Generator().manual_seed(1))

    def __call__(self, x, t, cond):
        return (cond * torch.sin(5 * t)).view(-1, *[1] * (x.ndim - 1)) * self.pattern.expand_as(x)


def test_held_out_error_is_the_geometric_mean_of_each_samples_mse():
    """One hard sample must not decide: the error ranks policies as the mean PSNR over samples does."""
    from ertacache.calibration import core_session

    model, T, shape = ScaledField(), 12, (1, 3, 3)
    cond = torch.tensor([1.0, 2.0, 0.5, 1.0, 0.1, 30.0])  # held out (the last half): 0.1 ... 30
    config = CalibrationConfig(candidates=("uniform",), holdout_fraction=0.5)
    s = core_session(model, cond, range(6), latent_shape=shape, num_inference_steps=T, shift=3.0, config=config)
    policy = Policy(cached_steps=(2, 4, 6, 8, 10), **s.base)
    noise = seeded_noise(range(6), shape)[3:]
    kw = dict(num_inference_steps=T, shift=3.0)
    per_sample = (sample(model, noise, cond[3:], policy=policy, **kw).x
                  - sample(model, noise, cond[3:], **kw).x).double().square().flatten(1).mean(1)
    assert per_sample.max() > 1e4 * per_sample.min() > 0
    assert s.judge.error(policy) == pytest.approx(float(per_sample.log().mean().exp()), rel=1e-6)
    assert s.judge.error(policy) < 0.1 * float(per_sample.mean())  # the pooled MSE (before) is the largest sample's


def test_missing_sampler_settings_are_named():
    from ertacache import ErtaCacheError, calibrate, calibrate_many

    with pytest.raises(ErtaCacheError, match="calibrate needs num_inference_steps"):
        calibrate(lambda x, t, c: x, None, [0], target_speedup=2.0, latent_shape=(1, 4, 4))
    with pytest.raises(ErtaCacheError, match="calibrate_many needs latent_shape"):
        calibrate_many(lambda x, t, c: x, None, [0], target_speedups=[2.0], num_inference_steps=10)


def test_propagation_candidate_is_fitted_on_the_judged_sets_and_judged_like_the_others(tiny):
    """With ``propagation_candidate`` (the default) the session fits the propagation slope to every plain set it
    judged and proposes that search's set; the set competes as the others do (judged on every sample); off, nothing
    is fitted."""
    from ertacache.calibration.schedule import fit_propagation

    cond, seeds = torch.tensor([1, 2, 3, 4, 5, 6]), range(6)
    args = dict(latent_shape=(2, 4, 4), num_inference_steps=12, guidance_scale=2.0, null_cond=torch.full((6,), 10))
    session = core_session(tiny, cond, seeds, **args)  # on by default
    policies = session.policies([2.0, 4.0])
    fits = session.proposer.propagation
    assert [f["max_nfe"] for f in fits] == [3, 6]  # smallest budget first
    assert fits[1]["judged_sets"] > fits[0]["judged_sets"] and fits[1]["judged_sets"] >= 3
    assert (fits[0]["beta"] is None) == (fits[0]["judged_sets"] < 3) and fits[1]["beta"] is not None
    # the fit is the library function's on the sets judged before it
    judged = list(session.proposer.judged_sets.items())[:fits[1]["judged_sets"]]
    beta, weighted = fit_propagation(session.proposer.extrapolation_costs()["raw"], session.grid, judged)
    assert beta == fits[1]["beta"]
    assert policies[0].provenance["propagation"] == fits[1]
    proposed = tuple(fits[1]["cached_steps"])
    cands = {tuple(c["cached_steps"]): c for c in policies[0].provenance["candidates"]}
    assert proposed in cands and "plain" in cands[proposed]["errors"]  # judged (or already among the others)
    plain = core_session(tiny, cond, seeds, config=CalibrationConfig(propagation_candidate=False), **args).policy(2.0)
    assert "propagation" not in plain.provenance

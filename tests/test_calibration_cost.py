"""Calibration a user can afford and trust: leave-one-out judging, the cost before and after, the progress bar."""

import math

import pytest
import torch

from ertacache import CalibrationConfig, Policy, calibrate, calibrate_many, sample, seeded_noise
from ertacache.calibration import core_session, estimate, plan
from ertacache.calibration.distributed import check_shards
from ertacache.errors import ErtaCacheError
from ertacache.models.digits import LATENT_SHAPE, NULL_CLASS, load_digits_model

T = 10


@pytest.fixture(scope="module")
def model():
    return load_digits_model()


def kwargs(n, **kw):
    return dict(latent_shape=LATENT_SHAPE, num_inference_steps=T, guidance_scale=3.0, shift=3.0,
                null_cond=torch.full((n,), NULL_CLASS), **kw)


def test_leave_one_out_on_identical_samples_is_the_full_fit(model):
    """Each sample's leave-one-out fit uses the others' statistics; on identical samples that is the full fit,
    so the fitting run's outputs are the policy's own samples and its recorded error is the policy's error."""
    n = 3
    labels = torch.full((n,), 7)
    session = core_session(model, labels, [5] * n, **kwargs(n))
    cached = (2, 4, 6, 7)
    base = Policy(cached_steps=cached, **session.base)
    a, b, enabled, log_mse = session.components.rectify(cached, session.grid, base.branches)
    assert log_mse is not None and bool(enabled.any())
    rectified = Policy(cached_steps=cached, rect_a=a, rect_b=b, rect_enabled=enabled, rect_form="linear",
                       **{k: v for k, v in session.base.items()})
    with torch.no_grad():
        x = sample(model, seeded_noise([5] * n, LATENT_SHAPE), labels, policy=rectified,
                   **{k: v for k, v in kwargs(n).items() if k != "latent_shape"}).x
    own = (x - session.truth.final).double().square().flatten(1).mean(1).log()
    torch.testing.assert_close(log_mse, own, rtol=0, atol=1e-4)


def test_one_sample_cannot_judge_a_fit_so_rectification_stays_off(model):
    from ertacache.calibration.evidence import SPREAD_DB

    policy = calibrate(model, torch.tensor([3]), [0], target_speedup=2.0, **kwargs(1))
    assert policy.provenance["variant"] == "plain" and policy.provenance["calibration_size"] == 1
    # one sample has no spread of its own: the assumed one (less with a prior)
    for d in policy.provenance["decisions"]:
        assert d["n"] == 1 and 0 < d["se_db"] <= SPREAD_DB and d["kept"] == (d["gain_db"] > d["se_db"])
        assert d["measured"]["se_db"] == SPREAD_DB


def test_default_cost_is_at_most_five_passes_and_the_plan_bounds_it(model):
    n = 4
    labels = torch.arange(n)
    generation = n * 2 * T  # model calls of one uncached generation of the set (2 guidance branches)
    one = calibrate(model, labels, range(n), target_speedup=2.0, **kwargs(n))
    assert one.provenance["cost"]["model_calls"] <= 5 * generation
    assert one.provenance["cost"]["model_calls"] <= plan(CalibrationConfig(), T, [2.0], n * 2).model_calls
    targets = [1.5, 2.0, 3.0, 4.0]
    many = calibrate_many(model, labels, range(n), target_speedups=targets, **kwargs(n))
    gt = many[0].provenance["cost"]["ground_truth"]["model_calls"]
    assert gt == generation and all(p.provenance["cost"]["ground_truth"]["model_calls"] == gt for p in many)
    own = [p.provenance["cost"]["target"]["model_calls"] for p in many]
    assert all(c <= 4 * generation for c in own)  # 1 + at most 4 passes per target
    assert sum(own) + gt <= plan(CalibrationConfig(), T, targets, n * 2).model_calls
    assert all(p.provenance["cost"]["model_calls"] == p.provenance["cost"]["target"]["model_calls"] + gt
               for p in many)
    thorough = plan(CalibrationConfig.thorough(), T, [2.0], n * 2)
    assert thorough.model_calls > 3 * plan(CalibrationConfig(), T, [2.0], n * 2).model_calls


def test_estimate_times_one_call_and_runs_no_pass(model):
    calls = []

    def counted(x, t, cond):
        calls.append(x.shape[0])
        return model(x, t, cond)

    p = estimate(counted, torch.arange(4), range(4), target_speedups=[2.0], **kwargs(4))
    assert len(calls) == 4 and set(calls) == {1}  # a warm-up and three timed calls of one row
    assert p.seconds_per_call is not None and p.seconds_per_call > 0
    assert p.seconds == pytest.approx(p.model_calls * p.seconds_per_call)
    assert "whole-set passes" in p.describe() and "estimated wall time" in p.describe()
    with pytest.raises(ErtaCacheError, match="target_speedup"):
        estimate(counted, torch.arange(4), range(4), target_speedups=[9.0], **kwargs(4))


def test_one_progress_bar_over_every_target_ends_at_100_percent(model, capsys):
    n = 2
    session = core_session(model, torch.arange(n), range(n), progress=True, targets=[2.0, 3.0], **kwargs(n))
    session.policy(3.0)
    assert not session.runner.bar.disable  # still open while the next target runs
    session.policy(2.0)
    assert session.runner.bar.n == session.runner.bar.total and session.runner.bar.disable
    err = capsys.readouterr().err
    assert "100%" in err.splitlines()[-1].split("\r")[-1] or "100%" in err[-300:]


def test_uniform_policy_takes_the_calls_guidance_and_calibrations_reuse(model):
    n = 2
    labels = torch.arange(n)
    noise = seeded_noise([9, 10], LATENT_SHAPE)
    args = {k: v for k, v in kwargs(n).items() if k != "latent_shape"}
    uniform = Policy.uniform(T, 5, shift=3.0)
    assert uniform.reuse == CalibrationConfig().reuse == "extrapolate"
    out = sample(model, noise, labels, policy=uniform, **args)  # CFG 3 with two branches: accepted
    assert out.stats.nfe == {"cond": 5, "uncond": 5}
    calibrated = calibrate(model, labels, range(n), target_speedup=2.0, **kwargs(n))
    like = Policy.uniform(T, 5, like=calibrated)
    assert (like.reuse, like.branches, like.guidance_scale, like.grid) == (
        calibrated.reuse, calibrated.branches, calibrated.guidance_scale, calibrated.grid)
    torch.testing.assert_close(sample(model, noise, labels, policy=like, **args).x, out.x, rtol=0, atol=0)
    with pytest.raises(ErtaCacheError, match="guidance_scale"):
        sample(model, noise, labels, policy=like, **{**args, "guidance_scale": 4.0})


def test_any_set_of_at_least_world_size_samples_splits():
    check_shards([range(8), range(8)], 8)
    with pytest.raises(ErtaCacheError, match="at least 8 calibration samples"):
        check_shards([range(5)], 8)


def test_margin_significance_rule():
    from ertacache.calibration import Margin

    assert Margin(0.5, 0.4, 10).significant and not Margin(0.5, 0.6, 10).significant
    assert Margin(0.1, 0.0, 1).significant and not Margin(-0.1, 0.0, 1).significant
    assert math.isclose(Margin(1.0, 0.25, 4).as_dict()["gain_db"], 1.0)


def test_pipeline_estimate_counts_the_calls_guidance_branches(model):
    from ertacache.integrations.diffusers.estimate import estimate_pipeline
    from ertacache.models.digits import digits_flux_pipeline

    pipe = digits_flux_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    n = 3
    labels = torch.arange(n)
    tokens, pooled = model.prompt_embeds(labels)
    null_tokens, null_pooled = model.prompt_embeds(torch.full((n,), NULL_CLASS))
    hooks = (len(pipe.transformer._forward_pre_hooks), len(pipe.transformer._forward_hooks))
    p = estimate_pipeline(pipe, None, num_inference_steps=T, target_speedups=[2.0], prompt_embeds=tokens,
                          pooled_prompt_embeds=pooled, negative_prompt_embeds=null_tokens,
                          negative_pooled_prompt_embeds=null_pooled, true_cfg_scale=3.0, height=16, width=16)
    assert p.model_calls == plan(CalibrationConfig(), T, [2.0], n * 2).model_calls  # true CFG: 2 rows a sample
    assert p.seconds_per_call is not None and p.seconds_per_call > 0
    assert (len(pipe.transformer._forward_pre_hooks), len(pipe.transformer._forward_hooks)) == hooks


def test_summary_gives_each_decision_and_this_targets_cost(model):
    many = calibrate_many(model, torch.arange(3), range(3), target_speedups=[2.0, 3.0], **kwargs(3))
    text = many[0].summary()
    decisions = many[0].provenance["decisions"]
    assert decisions and all(f"{d['gain_db']:+.2f} dB" in text for d in decisions)
    assert "(3 samples " in text and "this target:" in text and "judged on: every sample" in text
    decision = many[0].provenance["decision"]  # the choice against evenly spaced caching, with its interval
    lo, hi = decision["interval_db"]
    assert lo < decision["gain_db"] < hi and decision["over"].startswith("uniform set")
    assert f"decision: {decision['option']} over {decision['over']}: {decision['gain_db']:+.2f} dB" in text
    assert f"80 % interval {lo:+.2f} to {hi:+.2f} dB" in text


def test_the_budget_holds_at_shifted_30_step_targets_and_runner_up_components_compete(model):
    """At T = 30 the 1.5x target evaluates its sets at NFE 20 (2/3 of a pass each): the budget of 4 passes per
    target, beside the shared ground truth, skips what would go over it. Where the budget allows, the runner-up
    set's rectified variant is judged too, and every kept decision is a win by more than its standard error."""
    n, steps = 3, 30
    labels = torch.arange(n)
    generation = n * 2 * steps
    kw = {**kwargs(n), "num_inference_steps": steps}
    many = calibrate_many(model, labels, range(n), target_speedups=[1.5, 2.0, 3.0], **kw)
    for p in many:
        assert p.provenance["cost"]["target"]["model_calls"] <= 4 * generation
    at_3x = many[2].provenance  # evaluations at NFE 10 cost 1/3 of a pass: the runner-up's fit fits too
    rectified = [c for c in at_3x["candidates"] if "rectified" in c["errors"]]
    assert len(rectified) == 2  # the best set and the runner-up (or the evenly spaced set)
    at_2x = many[1].provenance
    chosen = at_2x["candidates"][at_2x["chosen"]]
    uniform = next(c for c in at_2x["candidates"] if c["source"] == "uniform" and "rule" not in c)
    assert chosen["errors"][at_2x["variant"]] <= uniform["errors"]["plain"]
    for d in at_2x["decisions"]:  # a win whose k-fold check did not fit in the budget is not kept
        unchecked = str(d.get("k_fold", "")).startswith("not run")
        assert d["kept"] == (d["gain_db"] > d["se_db"] and not unchecked)
    # more compute never gets a policy the calibration samples rate below a smaller budget's (by construction:
    # the smaller budget's policy is where the larger one starts)
    chosen_errors = [(p.nfe, p.provenance["candidates"][p.provenance["chosen"]]["errors"][p.provenance["variant"]])
                     for p in many]
    chosen_errors.sort()
    assert all(b <= a for (_, a), (_, b) in zip(chosen_errors, chosen_errors[1:]))
    tight = calibrate(model, labels, range(n), target_speedup=2.0, config=CalibrationConfig(max_passes=1.5), **kw)
    assert tight.provenance["cost"]["target"]["model_calls"] <= 1.5 * generation
    assert sum("rectified" in c["errors"] for c in tight.provenance["candidates"]) <= 1
    with pytest.raises(ErtaCacheError, match="max_passes"):
        CalibrationConfig(max_passes=0)

"""One calibration engine: the core Euler loop and a diffusers pipeline's own call give the same policy.

The bundled model, once as a velocity model and once as a ``FluxPipeline`` (true CFG:
two transformer calls a step), with the same conditions and seeds (the same initial
noise on both paths). Every option of the config is varied one at a time from the
defaults; for each, both paths must choose the same cached steps, candidate and
variant, and every variant's adjusted grid and rectification coefficients must agree.
"""

import pytest
import torch

from ertacache import CalibrationConfig, calibrate, calibrate_pipeline, seeded_noise
from ertacache.calibration import CalibrationSession, core_session
from ertacache.calibration.judge import evaluation_key
from ertacache.integrations.diffusers import PipelineDriver
from ertacache.models.digits import LATENT_SHAPE, NULL_CLASS, digits_flux_pipeline, load_digits_model, pack

T = 8
N = 5
GUIDANCE = 3.0
BASE = dict(thresholds=(0.1, 0.3), max_candidates=2, search_candidates=1)  # thorough: also folds=2 (test time)
OPTIONS = {  # every value of every option appears at least once; all but "default" on the thorough competition
    "default": {},  # the cheap default: search and uniform sets, rectification judged leave-one-out
    "thorough": {},  # extrapolate reuse, l1 v1 (gt), phi v1 (velocity change), step granularity, linear
    "latent_residual-l1_current": {"reuse": "latent_residual", "l1_denominator": "current"},
    "block_residual-phi_velocity": {"reuse": "block_residual", "phi_denominator": "velocity"},
    "velocity-channel-sigmoid-all_components-phi_gt-search_uniform": {
        "reuse": "velocity", "granularity": "channel", "rectification": "sigmoid", "component_check": False,
        "phi_denominator": "gt_velocity_change", "candidates": ("search", "uniform")},
}


@pytest.fixture(scope="module")
def model():
    return load_digits_model()


@pytest.fixture(scope="module")
def pipe(model):
    p = digits_flux_pipeline(model)
    p.set_progress_bar_config(disable=True)
    return p


def labels():
    return torch.arange(N) % 10


def pipe_kwargs(model):
    tokens, pooled = model.prompt_embeds(labels())
    null_tokens, null_pooled = model.prompt_embeds(torch.full((N,), NULL_CLASS))
    return dict(prompt_embeds=tokens, pooled_prompt_embeds=pooled, negative_prompt_embeds=null_tokens,
                negative_pooled_prompt_embeds=null_pooled, true_cfg_scale=GUIDANCE, height=16, width=16)


def sessions(model, pipe, config, batch_size=None):
    core = core_session(model, labels(), range(N), latent_shape=LATENT_SHAPE, num_inference_steps=T,
                        guidance_scale=GUIDANCE, null_cond=torch.full((N,), NULL_CLASS), config=config)
    driver = PipelineDriver(pipe, None, range(N), T, config.reuse, pipe_kwargs(model), batch_size=batch_size)
    return core, CalibrationSession(driver, config)


def assert_same_policy(a, b):
    assert (a.provenance["selected"], a.provenance["variant"]) == (b.provenance["selected"], b.provenance["variant"])
    assert [c["cached_steps"] for c in a.provenance["candidates"]] == \
        [c["cached_steps"] for c in b.provenance["candidates"]]
    assert_same_fields(a, b)


def assert_same_fields(a, b):
    assert a.cached_steps == b.cached_steps
    assert a.step_reuse == b.step_reuse
    assert a.branches == b.branches == ("cond", "uncond")
    assert (a.adjusted_grid is None) == (b.adjusted_grid is None)
    if a.adjusted_grid is not None:
        assert a.adjusted_grid == pytest.approx(b.adjusted_grid, abs=1e-4)
    assert a.grid == pytest.approx(b.grid, abs=1e-6)
    assert a.rect_form == b.rect_form
    for name in a.rect_a:
        torch.testing.assert_close(a.rect_a[name], b.rect_a[name], rtol=0, atol=1e-4)
        torch.testing.assert_close(a.rect_b[name], b.rect_b[name], rtol=0, atol=1e-4)
    if a.rect_enabled is not None:
        assert torch.equal(a.rect_enabled, b.rect_enabled)


def test_same_initial_noise_and_ground_truth(model, pipe):
    core, piped = sessions(model, pipe, CalibrationConfig(**BASE))
    assert piped.grid == pytest.approx(core.grid, abs=1e-6)
    assert piped.truth.norms == pytest.approx(core.truth.norms, rel=1e-4)
    x0 = seeded_noise(range(N), LATENT_SHAPE)
    assert x0.shape == (N, *LATENT_SHAPE)
    torch.testing.assert_close(piped.truth.final, pack(core.truth.final), rtol=1e-4, atol=1e-4)
    # the pipeline's rows say which sample they are (two transformer calls a step): the same k-fold error models
    assert len(piped.truth.fold_costs) == len(core.truth.fold_costs) == 5
    for a, b in zip(piped.truth.fold_costs, core.truth.fold_costs):
        torch.testing.assert_close(a["gram"], b["gram"], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("option", list(OPTIONS), ids=list(OPTIONS))
def test_core_and_pipeline_choose_the_same_policy(model, pipe, option):
    config = CalibrationConfig(**BASE) if option == "default" else CalibrationConfig.thorough(**BASE, folds=2,
                                                                                            **OPTIONS[option])
    core, piped = sessions(model, pipe, config)
    for goal in ({"target_speedup": 2.0}, {"threshold": 0.2}):
        a, b = core.policy(**goal), piped.policy(**goal)
        assert_same_policy(a, b)
        assert set(core.variants) == set(piped.variants)
        for name in core.variants:
            assert_same_fields(core.variants[name], piped.variants[name])
        for x, y in zip(a.provenance["candidates"], b.provenance["candidates"]):
            assert x["errors"] == pytest.approx(y["errors"], rel=1e-3, abs=1e-9)


def test_public_entry_points_agree(model, pipe):
    config = CalibrationConfig(**BASE)
    a = calibrate(model, labels(), range(N), latent_shape=LATENT_SHAPE, num_inference_steps=T,
                  guidance_scale=GUIDANCE, null_cond=torch.full((N,), NULL_CLASS), config=config, threshold=0.2)
    b = calibrate_pipeline(pipe, None, num_inference_steps=T, threshold=0.2, seeds=range(N), config=config,
                           **pipe_kwargs(model))
    assert_same_policy(a, b)
    assert b.provenance["pipeline"] == "FluxPipeline" and b.latent_shape == (64, 4)


@pytest.mark.parametrize("reuse", ["velocity", "block_residual"])
def test_pipeline_micro_batches_meet_at_every_step(model, pipe, reuse):
    """Micro-batches of 2 rows run as concurrent pipeline calls whose hooks meet at each step: the same policy."""
    config = CalibrationConfig.thorough(**BASE, folds=2, reuse=reuse, component_check=False)  # every component
    core, piped = sessions(model, pipe, config, batch_size=2)
    a, b = core.policy(target_speedup=2.0), piped.policy(target_speedup=2.0)
    assert b.adjusted_grid is not None and b.rect_form == "linear"
    assert_same_policy(a, b)
    assert b.provenance["cost"]["model_calls"] == a.provenance["cost"]["model_calls"]


def test_the_k_fold_adjustment_is_the_same_through_the_pipeline(model, pipe):
    """Each fold's rows follow the grid the other folds estimate, on the core and inside the pipeline's calls (two
    micro-batches): the same per-sample scores."""
    from dataclasses import replace

    from ertacache.policy import Policy, uniform_cached_steps

    config = CalibrationConfig.thorough(**BASE, folds=2, phi_denominator="velocity")  # phi inside (0, 1) here
    core, piped = sessions(model, pipe, config, batch_size=3)
    cached = uniform_cached_steps(T, 4)
    a, b = core.components.adjust_k_fold(cached), piped.components.adjust_k_fold(cached)
    assert len(core.folds) == 2 and piped.cost["timestep adjustment, k-fold"]["passes"] == 2
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)  # log MSE (measured 3e-6: packed tokens, float32 sums)
    in_sample = replace(Policy(cached_steps=cached, **core.base), adjusted_grid=tuple(core.components.adjust(cached)))
    core.judge.error(in_sample)
    assert (a - core.judge.scores[evaluation_key(in_sample)]).abs().min() > 1e-3  # every fold's grid is its own


def test_pipeline_calibration_resumes_from_its_checkpoint(model, pipe, tmp_path):
    config = CalibrationConfig.thorough(**BASE, folds=2)

    def session(**kw):
        driver = PipelineDriver(pipe, None, range(N), T, config.reuse, pipe_kwargs(model))
        return CalibrationSession(driver, config, checkpoint_dir=tmp_path, **kw)

    class Stop(Exception):
        pass

    def stop(name):
        if name.startswith("policy search"):
            raise Stop

    with pytest.raises(Stop):
        session(callback=stop).policy(target_speedup=2.0)
    resumed = session().policy(target_speedup=2.0)  # ground truth and one search come from the folder
    fresh = CalibrationSession(PipelineDriver(pipe, None, range(N), T, config.reuse, pipe_kwargs(model)),
                               config).policy(target_speedup=2.0)
    assert_same_policy(resumed, fresh)
    assert resumed.provenance["cost"]["resumed_passes"] == 2
    assert resumed.branches == ("cond", "uncond") and resumed.latent_shape == (64, 4)  # restored, not re-recorded

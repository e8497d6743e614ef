"""ERTACache on a diffusers FluxPipeline built around the bundled trained model."""

import pytest
import torch

from conftest import assert_every_reuse_mode_on_pipeline
from ertacache import Policy, PolicyMismatchError, apply_ertacache, calibrate, model_fingerprint, sample, seeded_noise
from ertacache.errors import ErtaCacheError
from ertacache.models.digits import NULL_CLASS, digits_flux_pipeline, load_digits_model, pack, unpack

T = 10


@pytest.fixture(scope="module")
def model():
    return load_digits_model()


@pytest.fixture(scope="module")
def pipe(model, tmp_path_factory):
    from diffusers import FluxPipeline

    folder = tmp_path_factory.mktemp("flux")
    digits_flux_pipeline(model).save_pretrained(folder)
    loaded = FluxPipeline.from_pretrained(folder, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                          tokenizer_2=None)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def run(pipe, model, labels, noise, steps=T, **kwargs):
    tokens, pooled = model.prompt_embeds(labels)
    null_tokens, null_pooled = model.prompt_embeds(torch.full_like(labels, NULL_CLASS))
    out = pipe(prompt_embeds=tokens, pooled_prompt_embeds=pooled, negative_prompt_embeds=null_tokens,
               negative_pooled_prompt_embeds=null_pooled, true_cfg_scale=3.0, latents=pack(noise),
               num_inference_steps=steps, height=16, width=16, output_type="latent", **kwargs).images
    return unpack(out)


@pytest.fixture(scope="module")
def policy(model):
    """A calibrated policy (the schedule search alone: the fewest passes; the default competition is
    test_calibrate_on_the_pipeline's and test_calibration's)."""
    from ertacache.core.config import CalibrationConfig

    labels = torch.arange(10)
    return calibrate(model, labels, range(10), latent_shape=(1, 16, 16), num_inference_steps=T, guidance_scale=3.0,
                     null_cond=torch.full_like(labels, NULL_CLASS), target_speedup=2.0,
                     config=CalibrationConfig(candidates=("search",), component_check=False),  # rectified
                     model_fingerprint=model_fingerprint(model.transformer))


def pipe_policy(policy):
    """The same policy, checked against the transformer's packed input shape."""
    from dataclasses import replace

    return replace(policy, latent_shape=(64, 4))


def test_loaded_pipeline_matches_core_sampler(pipe, model):
    labels, noise = torch.tensor([3, 8]), seeded_noise([5, 6], (1, 16, 16))
    ref = sample(model, noise, labels, num_inference_steps=T, guidance_scale=3.0,
                 null_cond=torch.full_like(labels, NULL_CLASS)).x
    torch.testing.assert_close(run(pipe, model, labels, noise), ref, rtol=1e-4, atol=1e-4)


def test_all_compute_policy_is_exact_and_remove_restores(pipe, model):
    labels, noise = torch.tensor([1, 2]), seeded_noise([7, 8], (1, 16, 16))
    ref = run(pipe, model, labels, noise)
    policy = Policy.all_compute(T, branches=("cond", "uncond"), guidance_scale=3.0)
    with apply_ertacache(pipe, policy) as handle:
        assert torch.equal(run(pipe, model, labels, noise), ref)
        assert handle.forwards() == {"cond": T, "uncond": T}
    assert torch.equal(run(pipe, model, labels, noise), ref)
    assert_every_reuse_mode_on_pipeline(pipe, lambda: run(pipe, model, labels, noise), policy, ref)


def test_caching_policy_counts_and_matches_core(pipe, model, policy):
    labels, noise = torch.tensor([0, 4, 9]), seeded_noise([11, 12, 13], (1, 16, 16))
    calls = []
    hook = pipe.transformer.proj_out.register_forward_hook(lambda *a: calls.append(1))
    ref = run(pipe, model, labels, noise)
    try:
        calls.clear()
        with apply_ertacache(pipe, pipe_policy(policy)) as handle:
            out = run(pipe, model, labels, noise)
            assert handle.forwards() == {"cond": policy.nfe, "uncond": policy.nfe}
        assert len(calls) == 2 * policy.nfe  # real transformer forwards: NFE per branch
    finally:
        hook.remove()
    core = sample(model, noise, labels, guidance_scale=3.0, null_cond=torch.full_like(labels, NULL_CLASS),
                  policy=policy).x
    torch.testing.assert_close(out, core, rtol=1e-4, atol=1e-4)
    assert not torch.equal(out, ref)
    assert torch.equal(run(pipe, model, labels, noise), ref)  # after remove()


def test_policy_refuses_other_settings(pipe, model, policy):
    labels, noise = torch.tensor([1]), seeded_noise([1], (1, 16, 16))
    with apply_ertacache(pipe, pipe_policy(policy)):
        with pytest.raises(PolicyMismatchError, match=f"num_inference_steps: policy {T}, got {T + 4}"):
            run(pipe, model, labels, noise, steps=T + 4)
    with apply_ertacache(pipe, policy, strict=True):  # latent_shape (1, 16, 16) is not the transformer's packed input
        with pytest.raises(PolicyMismatchError, match="latent shape"):
            run(pipe, model, labels, noise)
    from dataclasses import replace

    one_branch = replace(pipe_policy(policy), branches=("uncond",), rect_form="off", rect_a={}, rect_b={},
                         rect_enabled=None)
    with apply_ertacache(pipe, one_branch):
        with pytest.raises(PolicyMismatchError, match="guidance branch 'cond'"):
            run(pipe, model, labels, noise)
    other = load_digits_model()
    with torch.no_grad():
        other.transformer.proj_out.bias.add_(1e-3)
    other_pipe = digits_flux_pipeline(other)
    with pytest.raises(PolicyMismatchError, match="model fingerprint"):
        apply_ertacache(other_pipe, policy)


def test_unknown_pipeline_lists_supported():
    class MyPipeline:
        transformer = None

    with pytest.raises(ErtaCacheError, match="supported: .*FluxPipeline"):
        apply_ertacache(MyPipeline(), Policy.all_compute(4))


def test_calibrate_on_the_pipeline(pipe, model):
    from ertacache.core.config import CalibrationConfig
    from ertacache.integrations.diffusers.calibrate import calibrate_pipeline

    labels = torch.arange(10)
    tokens, pooled = model.prompt_embeds(labels)
    null_tokens, null_pooled = model.prompt_embeds(torch.full_like(labels, NULL_CLASS))
    policy = calibrate_pipeline(
        pipe, None, num_inference_steps=T, target_speedup=2.0, seeds=range(10),
        config=CalibrationConfig.thorough(thresholds=(0.05, 0.1, 0.2, 0.4)),
        prompt_embeds=tokens, pooled_prompt_embeds=pooled, negative_prompt_embeds=null_tokens,
        negative_pooled_prompt_embeds=null_pooled, true_cfg_scale=3.0, height=16, width=16)
    assert policy.nfe <= T // 2 and policy.branches == ("cond", "uncond") and policy.latent_shape == (64, 4)
    assert policy.grid == pytest.approx(tuple(i / T for i in range(T, -1, -1)), abs=1e-6)
    assert policy.model_fingerprint == model_fingerprint(pipe.transformer)
    chosen = policy.provenance["candidates"][policy.provenance["chosen"]]
    assert chosen["cached_steps"] == list(policy.cached_steps)
    assert chosen["errors"][chosen["variant"]] == min(chosen["errors"].values())
    assert all(d["kept"] == (d["gain_db"] > d["se_db"]) for d in policy.provenance["decisions"])
    base = next(c for c in policy.provenance["candidates"] if c["cached_steps"] == list(policy.cached_steps))
    assert set(base["errors"]) == {"plain", "adjusted", "rectified", "full"} or base is not chosen
    labels, noise = torch.tensor([2, 5, 7]), seeded_noise([300, 301, 302], (1, 16, 16))
    ref = run(pipe, model, labels, noise)
    with apply_ertacache(pipe, policy) as handle:
        out = run(pipe, model, labels, noise)
        assert handle.forwards() == {"cond": policy.nfe, "uncond": policy.nfe}
    from ertacache.bench.metrics import psnr

    assert not torch.equal(out, ref) and psnr(out, ref) > 25


def test_pipeline_calibration_refuses_what_it_cannot_honour_before_any_model_call(pipe, monkeypatch):
    from ertacache.core.config import CalibrationConfig
    from ertacache.integrations.diffusers import adapters
    from ertacache.integrations.diffusers.calibrate import calibrate_pipeline

    calls = []
    hook = pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        monkeypatch.setattr(adapters, "diffusers_block_output", lambda cls: None)  # a block diffusers does not know
        with pytest.raises(ErtaCacheError, match="no output layout for block class FluxTransformerBlock"):
            calibrate_pipeline(pipe, ["a"], num_inference_steps=T, target_speedup=2.0,
                               config=CalibrationConfig(reuse="block_residual"))
        with pytest.raises(ErtaCacheError, match="exactly one"):
            calibrate_pipeline(pipe, ["a"], num_inference_steps=T)
        with pytest.raises(ErtaCacheError, match="prompts, or prompt_embeds"):
            calibrate_pipeline(pipe, None, num_inference_steps=T, target_speedup=2.0)
    finally:
        hook.remove()
    assert calls == []


def test_adjusted_grid_goes_in_through_the_scheduler(pipe, model):
    from ertacache.core.config import CalibrationConfig

    labels = torch.arange(10)
    policy = calibrate(model, labels, range(10), latent_shape=(1, 16, 16), num_inference_steps=T, guidance_scale=3.0,
                       null_cond=torch.full_like(labels, NULL_CLASS), target_speedup=2.0,
                       config=CalibrationConfig(component_check=False, phi_denominator="velocity",
                                                candidates=("search",), timestep_adjustment=True),
                       model_fingerprint=model_fingerprint(model.transformer))
    assert policy.adjusted_grid is not None and policy.adjusted_grid != policy.grid
    labels, noise = torch.tensor([1, 6]), seeded_noise([21, 22], (1, 16, 16))
    ref = run(pipe, model, labels, noise)
    with apply_ertacache(pipe, pipe_policy(policy)) as handle:
        out = run(pipe, model, labels, noise)
        assert torch.allclose(pipe.scheduler.sigmas, torch.tensor(policy.adjusted_grid, dtype=torch.float32))
        assert handle.forwards() == {"cond": policy.nfe, "uncond": policy.nfe}
    core = sample(model, noise, labels, guidance_scale=3.0, null_cond=torch.full_like(labels, NULL_CLASS),
                  policy=policy).x
    torch.testing.assert_close(out, core, rtol=1e-4, atol=1e-4)
    assert "set_timesteps" not in pipe.scheduler.__dict__  # remove() restored the scheduler
    assert torch.equal(run(pipe, model, labels, noise), ref)


def test_an_interrupted_call_does_not_break_the_handle(pipe, model, policy):
    labels, noise = torch.tensor([2, 9]), seeded_noise([41, 42], (1, 16, 16))

    def stop(pipe_, i, t, kwargs):
        if i == 3:
            raise KeyboardInterrupt
        return kwargs

    with apply_ertacache(pipe, pipe_policy(policy)) as handle:
        expected = run(pipe, model, labels, noise)
        with pytest.raises(KeyboardInterrupt):
            run(pipe, model, labels, noise, callback_on_step_end=stop)
        assert torch.equal(run(pipe, model, labels, noise), expected)  # the next call starts cleanly
        assert handle.forwards() == {"cond": policy.nfe, "uncond": policy.nfe}  # the last call only


def test_a_two_branch_policy_refuses_a_one_branch_call(pipe, model, policy):
    labels, noise = torch.tensor([4]), seeded_noise([5], (1, 16, 16))
    tokens, pooled = model.prompt_embeds(labels)
    with apply_ertacache(pipe, pipe_policy(policy)):
        with pytest.raises(PolicyMismatchError, match=r"1 time\(s\) at a step \(\['cond'\]\) where 2 calls"):
            pipe(prompt_embeds=tokens, pooled_prompt_embeds=pooled, latents=pack(noise), num_inference_steps=T,
                 height=16, width=16, output_type="latent")  # no negative prompt: no true CFG, one branch


def test_steps_are_matched_by_the_nearest_time_on_a_dense_shifted_grid():
    """T = 50 with shift 5 puts t_1 within bfloat16 tolerance of t_0: an interrupted run at step 0 still restarts."""
    from ertacache import time_grid
    from ertacache.core.engine import Engine, FollowPolicy
    from ertacache.core.reuse import get_reuse
    from ertacache.integrations.diffusers.families import FAMILIES
    from ertacache.integrations.diffusers.run import PipelineRun

    grid = time_grid(50, 5.0)
    run_ = PipelineRun(Engine(FollowPolicy([True] * 50), grid), FAMILIES["wan"], get_reuse("velocity"))
    assert abs(grid[1] - grid[0]) < 1e-4 + 4e-3  # within the matching tolerance
    assert [run_.step_of("u", t) for t in grid[:3]] == [0, 1, 2]
    assert run_.step_of("u", 1.0) == 0  # a new call starts over
    assert run_.step_of("u", grid[1] * (1 + 2 ** -9)) == 1  # a bfloat16-rounded time finds its step


def test_calibration_records_every_step_of_a_dense_shifted_grid(pipe, model):
    """Shift 7 at T = 50 (HunyuanVideo's sampler) spaces t_0..t_5 closer than the bfloat16 tolerance a timestep
    match needs (< 0.0041): calibration reads each step from the micro-batch's scheduler, so the ground truth
    records all 50 times and the policy is followed on the pipeline's own grid, two micro-batches at once."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ertacache.core.config import CalibrationConfig
    from ertacache.integrations.diffusers.calibrate import calibrate_pipeline

    steps = 50
    dense = FlowMatchEulerDiscreteScheduler(shift=7.0)
    dense.set_timesteps(sigmas=[1 - i / steps for i in range(steps)])  # FluxPipeline's own sigmas
    times = (dense.timesteps / 1000).tolist()
    assert min(a - b for a, b in zip(times, times[1:])) < 1e-4 + 4e-3 * times[1]
    original = pipe.scheduler
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    try:
        labels = torch.arange(2)
        tokens, pooled = model.prompt_embeds(labels)
        null_tokens, null_pooled = model.prompt_embeds(torch.full_like(labels, NULL_CLASS))
        policy = calibrate_pipeline(
            pipe, None, num_inference_steps=steps, target_speedup=2.0, seeds=range(2), batch_size=1,
            config=CalibrationConfig(candidates=("search",), component_check=False),
            prompt_embeds=tokens, pooled_prompt_embeds=pooled, negative_prompt_embeds=null_tokens,
            negative_pooled_prompt_embeds=null_pooled, true_cfg_scale=3.0, height=16, width=16)
        assert len(policy.grid) == steps + 1 and policy.grid[:-1] == pytest.approx(times, abs=1e-6)
        with apply_ertacache(pipe, policy) as handle:
            run(pipe, model, labels[:2], seeded_noise([50, 51], (1, 16, 16)), steps=steps)
            assert handle.forwards() == {"cond": policy.nfe, "uncond": policy.nfe}
    finally:
        pipe.scheduler = original


class ScalarReads:
    """Counts ``aten._local_scalar_dense`` (``float(t)``, ``.item()``, ``bool(t)``): a host-device sync on a GPU."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default:
                    outer.count += 1
                return func(*args, **(kwargs or {}))

        self.count, self.mode = 0, Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def test_a_cached_call_reads_no_scalar_the_uncached_call_does_not(pipe, model, policy):
    labels, noise = torch.tensor([3, 5]), seeded_noise([8, 9], (1, 16, 16))
    assert policy.rect_form != "off" and bool(policy.rect_enabled.any())  # rectified cached steps are exercised
    run(pipe, model, labels, noise)  # warm-up
    with ScalarReads() as uncached:
        run(pipe, model, labels, noise)
    with apply_ertacache(pipe, pipe_policy(policy)) as handle:
        run(pipe, model, labels, noise)
        with ScalarReads() as cached:
            run(pipe, model, labels, noise)
        assert handle.forwards() == {"cond": policy.nfe, "uncond": policy.nfe}
    assert cached.count == uncached.count, (cached.count, uncached.count)


def test_one_guidance_rule_for_every_guidance_argument(pipe, model, policy):
    """true_cfg_scale and a distilled guidance_scale are read from the call and checked alike, where they count."""
    from dataclasses import replace

    from ertacache.integrations.diffusers.call import call_settings

    labels, noise = torch.tensor([6]), seeded_noise([3], (1, 16, 16))
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, a: seen.append(call_settings(pipe)))
    try:
        run(pipe, model, labels, noise)
    finally:
        pipe.transformer._forward_pre_hooks.clear()
    assert seen[0] == ({"guidance_scale": 3.5, "true_cfg_scale": 3.0}, {"height": 16, "width": 16})
    calibrated = replace(pipe_policy(policy), guidance=seen[0][0])
    with apply_ertacache(pipe, calibrated) as handle:
        run(pipe, model, labels, noise)
        assert handle.forwards() == {"cond": policy.nfe, "uncond": policy.nfe}
        tokens, pooled = model.prompt_embeds(labels)
        null_tokens, null_pooled = model.prompt_embeds(torch.full_like(labels, NULL_CLASS))
        call = dict(prompt_embeds=tokens, pooled_prompt_embeds=pooled, negative_prompt_embeds=null_tokens,
                    negative_pooled_prompt_embeds=null_pooled, latents=pack(noise), num_inference_steps=T, height=16,
                    width=16, output_type="latent")
        with pytest.raises(PolicyMismatchError, match="true_cfg_scale: policy 3.0, got 4.0"):
            pipe(true_cfg_scale=4.0, **call)
        # this transformer embeds no guidance: FLUX's guidance_scale changes nothing and is not checked
        assert torch.equal(pipe(true_cfg_scale=3.0, guidance_scale=5.0, **call).images,
                           pipe(true_cfg_scale=3.0, guidance_scale=3.5, **call).images)
    from types import SimpleNamespace

    from ertacache.integrations.diffusers.families import FAMILIES, guidance_that_counts

    distilled = SimpleNamespace(transformer=SimpleNamespace(config=SimpleNamespace(guidance_embeds=True)))
    assert guidance_that_counts(distilled, FAMILIES["flux"], ("cond",)) == {"guidance_scale"}  # FLUX.1-dev
    assert guidance_that_counts(pipe, FAMILIES["flux"], ("cond", "uncond")) == {"true_cfg_scale"}
    assert guidance_that_counts(pipe, FAMILIES["flux"], ("cond",)) == set()  # FLUX.1-schnell


def test_block_layouts_come_from_diffusers_registry_where_it_is_unambiguous():
    """FLUX's and CogVideoX's blocks take their layout from diffusers' TransformerBlockRegistry (ours no longer lists
    them); Wan's and LTX's (one tensor out) and SD3's (not in diffusers' registry) from ours."""
    from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    from ertacache.integrations.diffusers.adapters import BLOCK_OUTPUTS, BlockOutput, diffusers_block_output

    assert diffusers_block_output(FluxTransformerBlock) == BlockOutput(hidden=1, encoder=0)
    assert diffusers_block_output(FluxSingleTransformerBlock) == BlockOutput(hidden=1, encoder=0)
    assert diffusers_block_output(CogVideoXBlock) == BlockOutput(hidden=0, encoder=1)
    assert diffusers_block_output(WanTransformerBlock) is None and BLOCK_OUTPUTS["WanTransformerBlock"] == BlockOutput()
    assert not {"FluxTransformerBlock", "FluxSingleTransformerBlock", "CogVideoXBlock"} & set(BLOCK_OUTPUTS)


def test_a_bfloat16_pipeline_caches_in_its_own_dtype(model, policy):
    """The README's FLUX quick start runs in bfloat16 (the docs' stand-in runs float32): all-compute is exact,
    a cached call makes NFE forwards per branch and stays within bfloat16's rounding of the float32 cached call."""
    bf = digits_flux_pipeline(load_digits_model()).to(torch.bfloat16)
    bf.set_progress_bar_config(disable=True)
    labels, noise = torch.tensor([0, 4]), seeded_noise([11, 12], (1, 16, 16))
    tokens, pooled = model.prompt_embeds(labels)
    null_tokens, null_pooled = model.prompt_embeds(torch.full_like(labels, NULL_CLASS))
    embeds = dict(prompt_embeds=tokens, pooled_prompt_embeds=pooled, negative_prompt_embeds=null_tokens,
                  negative_pooled_prompt_embeds=null_pooled)

    def call():
        with torch.no_grad():
            out = bf(**{k: v.bfloat16() for k, v in embeds.items()}, true_cfg_scale=3.0,
                     latents=pack(noise).bfloat16(), num_inference_steps=T, height=16, width=16,
                     output_type="latent").images
        assert out.dtype == torch.bfloat16
        return unpack(out.float())

    ref = call()
    with apply_ertacache(bf, Policy.all_compute(T, branches=("cond", "uncond"), guidance_scale=3.0)):
        assert torch.equal(call(), ref)
    with apply_ertacache(bf, pipe_policy(policy)) as handle:
        cached = call()
        assert handle.forwards() == {"cond": policy.nfe, "uncond": policy.nfe}
    assert torch.equal(call(), ref)  # removed

    def in_float32(policy=None):
        return sample(model, noise, labels, num_inference_steps=T, guidance_scale=3.0,
                      null_cond=torch.full_like(labels, NULL_CLASS), policy=policy).x

    rounding = (ref - in_float32()).abs().max()  # what bfloat16 alone changes (measured 0.026)
    assert (cached - in_float32(policy)).abs().max() <= 2 * rounding and not torch.equal(cached, ref)  # 0.021

"""ERTACache on a tiny diffusers WanPipeline (true CFG: two branches; Wan 2.2: two transformers)."""

import pytest
import torch

from conftest import assert_every_reuse_mode_on_pipeline, assert_not_below_uniform, assert_policy_follows
from ertacache import Policy, PolicyMismatchError, apply_ertacache
from ertacache.core.config import CalibrationConfig
from ertacache.errors import ErtaCacheError
from ertacache.integrations.diffusers.apply import PolicyTravelWarning
from ertacache.integrations.diffusers.calibrate import calibrate_pipeline

T = 8


def tiny_transformer(seed, cls=None, **over):
    """A tiny Wan transformer (``cls``: WanTransformer3DModel or a variant; ``over``: config changes); ``seed``
    None draws its weights from the generator's state as it is."""
    from diffusers import WanTransformer3DModel

    if seed is not None:
        torch.manual_seed(seed)
    config = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                  text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    return (cls or WanTransformer3DModel)(**{**config, **over})


def tiny_vae():
    """A tiny Wan VAE, its weights drawn from seed 0."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)


def tiny_pipe(tmp_path, two_transformers=False):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    vae = tiny_vae()
    extra = dict(transformer_2=tiny_transformer(1), boundary_ratio=0.5) if two_transformers else {}
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=tiny_transformer(0), vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), **extra)
    pipe.save_pretrained(tmp_path)
    loaded = WanPipeline.from_pretrained(tmp_path, tokenizer=None, text_encoder=None)
    loaded.set_progress_bar_config(disable=True)
    return loaded


EMB = torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(0))
NEG = torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(1))
KW = dict(height=16, width=16, num_frames=5, guidance_scale=4.0)


def run(pipe, rows=slice(0, 2), steps=T):
    gens = [torch.Generator().manual_seed(100 + i) for i in range(EMB[rows].shape[0])]
    return pipe(prompt_embeds=EMB[rows], negative_prompt_embeds=NEG[rows], num_inference_steps=steps,
                output_type="latent", generator=gens, **KW).frames


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_pipe(tmp_path_factory.mktemp("wan"))


@pytest.fixture(scope="module")
def policy(pipe):
    return calibrate_pipeline(pipe, None, num_inference_steps=T, target_speedup=2.0, seeds=range(4),
                              config=CalibrationConfig.thorough(thresholds=(0.05, 0.2, 0.5)),
                              prompt_embeds=EMB, negative_prompt_embeds=NEG, **KW)


def test_calibrated_on_the_pipeline(policy):
    assert policy.branches == ("cond", "uncond") and policy.nfe <= T // 2
    # Wan takes no sigmas=: the chosen set's adjusted variants went in through the scheduler
    # (a per-step reuse refinement builds only the winner's variant)
    chosen = policy.provenance["candidates"][policy.provenance["chosen"]]
    base = next(c for c in policy.provenance["candidates"] if c["cached_steps"] == chosen["cached_steps"]
                and not c.get("step_reuse"))
    assert {"plain", "adjusted", "rectified", "full"} <= set(base["errors"])
    assert policy.latent_shape == (4, 2, 2, 2) and policy.guidance_scale == 4.0
    assert policy.grid[0] == pytest.approx(1.0) and policy.grid[-1] == 0.0


def test_all_compute_exact_caching_counts_and_remove(pipe, policy):
    ref = run(pipe)
    every = Policy(T, (), policy.grid, branches=policy.branches, guidance_scale=4.0, latent_shape=policy.latent_shape)
    with apply_ertacache(pipe, every) as handle:
        assert torch.equal(run(pipe), ref)
        assert handle.forwards() == {"cond": T, "uncond": T}
    assert_every_reuse_mode_on_pipeline(pipe, lambda: run(pipe), every, ref)
    calls = []
    hook = pipe.transformer.proj_out.register_forward_hook(lambda *a: calls.append(1))
    try:
        with apply_ertacache(pipe, policy) as handle:
            out = run(pipe)
            assert handle.forwards() == {"cond": policy.nfe, "uncond": policy.nfe}
            assert handle.steps()["cond"]["cached"] == list(policy.cached_steps)
        assert len(calls) == 2 * policy.nfe
    finally:
        hook.remove()
    assert_not_below_uniform(pipe, lambda: run(pipe), policy, out, ref)
    assert torch.equal(run(pipe), ref)


def test_refuses_other_step_count_resolution_and_guidance(pipe, policy):
    assert policy.guidance == {"guidance_scale": 4.0}
    assert policy.sample_size == {"height": 16, "width": 16, "num_frames": 5}
    with apply_ertacache(pipe, policy):
        with pytest.raises(PolicyMismatchError, match="guidance_scale: policy 4.0, got 5.0"):
            pipe(prompt_embeds=EMB[:1], negative_prompt_embeds=NEG[:1], num_inference_steps=T, output_type="latent",
                 height=16, width=16, num_frames=5, guidance_scale=5.0)
        with pytest.raises(PolicyMismatchError, match=f"num_inference_steps: policy {T}, got {T + 2}|grid"):
            run(pipe, steps=T + 2)
    other_size = dict(prompt_embeds=EMB[:1], negative_prompt_embeds=NEG[:1], num_inference_steps=T,
                      output_type="latent", height=32, width=16, num_frames=5, guidance_scale=4.0)
    with apply_ertacache(pipe, policy, strict=True):
        with pytest.raises(PolicyMismatchError, match=r"calibrated at height=16, width=16.*got height=32"):
            pipe(**other_size)
    with apply_ertacache(pipe, policy) as handle:  # by default: followed by step index, with one warning per size
        with pytest.warns(PolicyTravelWarning, match="calibrated at height=16.*at height=32") as seen:
            pipe(**other_size)
            pipe(**other_size)
        assert len(seen) == 1 and handle.forwards() == {"cond": policy.nfe, "uncond": policy.nfe}


def test_wan22_two_transformers_each_get_a_cache(tmp_path):
    pipe = tiny_pipe(tmp_path, two_transformers=True)
    ref = run(pipe, slice(0, 1))
    policy = calibrate_pipeline(pipe, None, num_inference_steps=T, target_speedup=2.0, seeds=range(2),
                                config=CalibrationConfig(timestep_adjustment=False, thresholds=(0.2,)),
                                prompt_embeds=EMB[:2], negative_prompt_embeds=NEG[:2], **KW)
    every = Policy(T, (), policy.grid, branches=policy.branches, guidance_scale=4.0,
                   model_fingerprint=policy.model_fingerprint)
    with apply_ertacache(pipe, every) as handle:
        assert len(handle.modules) == 2
        assert torch.equal(run(pipe, slice(0, 1)), ref)
        assert handle.forwards() == {"cond": T, "uncond": T}  # the steps split between the two transformers
        per_transformer = [sorted(handle.steps(transformer=k)["cond"]["computed"]) for k in range(2)]
        assert per_transformer[0] and per_transformer[1] and sorted(sum(per_transformer, [])) == list(range(T))
    switch = min(per_transformer[1])  # the second transformer's first step: its cache is empty there
    assert switch not in policy.cached_steps
    for candidate in policy.provenance["candidates"]:
        assert switch not in candidate["cached_steps"]
    with apply_ertacache(pipe, policy) as handle:
        for _ in range(2):  # the NFE the policy reports is what runs, call after call
            run(pipe, slice(0, 1))
            assert handle.forwards() == {"cond": policy.nfe, "uncond": policy.nfe}
        # the second expert's guidance is part of the one guidance rule (Wan 2.2 resolves it to guidance_scale)
        assert policy.guidance == {"guidance_scale": 4.0, "guidance_scale_2": 4.0}
        with pytest.raises(PolicyMismatchError, match="guidance_scale_2: policy 4.0, got 6.0"):
            pipe(prompt_embeds=EMB[:1], negative_prompt_embeds=NEG[:1], num_inference_steps=T, output_type="latent",
                 guidance_scale_2=6.0, **KW)
    assert torch.equal(run(pipe, slice(0, 1)), ref)
    # a hand-made policy that caches the switch step would run a forward more than its NFE: refused at apply
    uniform = Policy.uniform(T, 3, like=policy)
    assert switch in uniform.cached_steps
    with pytest.raises(ErtaCacheError, match=f"caches step {switch}, where WanPipeline hands over to transformer_2"):
        apply_ertacache(pipe, uniform)
    assert torch.equal(run(pipe, slice(0, 1)), ref)


def test_wan22_ti2v_per_token_timesteps_calibrate_and_follow(tmp_path):
    """Wan 2.2 TI2V (expand_timesteps): the conditioning frame's tokens have t = 0, the noise tokens t."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

    vae = tiny_vae()
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=tiny_transformer(0),
                                   scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), image_encoder=None,
                                   image_processor=None, expand_timesteps=True)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    kw = dict(image=image, height=16, width=16, num_frames=5, guidance_scale=4.0, output_type="latent")
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k["timestep"]), with_kwargs=True)

    def run_():
        return pipe(prompt_embeds=EMB[:1], negative_prompt_embeds=NEG[:1], num_inference_steps=T,
                    generator=torch.Generator().manual_seed(7), **kw).frames

    ref = run_()
    assert seen[0].ndim == 2 and float(seen[0][0, 0]) == 0.0 and float(seen[0].max()) > 900  # per-token, frame 0 at 0
    policy = calibrate_pipeline(pipe, None, num_inference_steps=T, target_speedup=2.0, seeds=range(2),
                                config=CalibrationConfig(thresholds=(0.05, 0.2, 0.5)),
                                prompt_embeds=EMB[:2], negative_prompt_embeds=NEG[:2], image=image,
                                **{k: v for k, v in kw.items() if k not in ("image", "output_type")})
    assert policy.grid[0] == 1.0 and policy.nfe <= T // 2 and policy.branches == ("cond", "uncond")
    assert_policy_follows(pipe, run_, policy, ref)


def test_wan_image_to_video_calibrates_and_follows():
    """WanImageToVideoPipeline (the image's latents and mask beside the noise: 12 input channels, 4 output)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        WanImageToVideoPipeline,
    )

    vae = tiny_vae()
    transformer = tiny_transformer(None, in_channels=12)
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                   scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), image_encoder=None,
                                   image_processor=None)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))  # one image: diffusers encodes it
    call = dict(image=image, height=16, width=16, num_frames=5, guidance_scale=4.0)  # once per generator

    def i2v():
        return pipe(prompt_embeds=EMB[:1], negative_prompt_embeds=NEG[:1], num_inference_steps=T, output_type="latent",
                    generator=torch.Generator().manual_seed(0), **call).frames

    ref = i2v()
    policy = calibrate_pipeline(pipe, None, num_inference_steps=T, target_speedup=2.0, seeds=range(4),
                                config=CalibrationConfig(candidates=("search", "uniform")), prompt_embeds=EMB,
                                negative_prompt_embeds=NEG, **call)
    assert policy.branches == ("cond", "uncond") and policy.nfe <= T // 2
    assert_policy_follows(pipe, i2v, policy, ref)
    assert torch.equal(i2v(), ref)


def test_wan_vace_calibrates_and_follows_with_its_control_input(tmp_path):
    """WanVACEPipeline: every transformer call also takes the control video's latents (control_hidden_states, here
    the pipeline's own for no control video), whose hints join the blocks; saved and loaded from a folder. It takes
    one generator, so calibration runs its rows as concurrent one-row calls, whose VAE encodes take turns (Wan's
    causal VAE keeps state between the chunks of one encode: concurrent encodes broke it)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanVACEPipeline, WanVACETransformer3DModel

    vae = tiny_vae()
    transformer = tiny_transformer(None, WanVACETransformer3DModel, vace_layers=[0], vace_in_channels=72)
    WanVACEPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                    scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0)).save_pretrained(tmp_path)
    pipe = WanVACEPipeline.from_pretrained(tmp_path, tokenizer=None, text_encoder=None)
    pipe.set_progress_bar_config(disable=True)

    def vace():
        return pipe(prompt_embeds=EMB[:1], negative_prompt_embeds=NEG[:1], num_inference_steps=T, output_type="latent",
                    generator=torch.Generator().manual_seed(0), **KW).frames

    ref = vace()
    policy = calibrate_pipeline(pipe, None, num_inference_steps=T, target_speedup=2.0, seeds=range(4),
                                config=CalibrationConfig(candidates=("search", "uniform")), prompt_embeds=EMB,
                                negative_prompt_embeds=NEG, **KW)
    assert policy.branches == ("cond", "uncond") and policy.nfe <= T // 2
    assert_policy_follows(pipe, vace, policy, ref)
    assert torch.equal(vace(), ref)


"""ERTACache on tiny CogVideoX (DDIM family), LTX-Video and HunyuanVideo pipelines.

Each pipeline is built from a small config with random weights, saved with
``save_pretrained`` and loaded back with ``from_pretrained``; prompt embeddings are
passed directly (no text encoders). Then: calibration on the pipeline itself, an
all-compute policy reproduces the uncached output exactly, a caching policy runs NFE
transformer forwards per branch, and ``remove()`` restores the uncached output.
"""

import warnings
from dataclasses import replace

import pytest
import torch

from conftest import assert_every_reuse_mode_on_pipeline, assert_not_below_uniform
from ertacache import Policy, PolicyMismatchError, apply_ertacache
from ertacache.core.config import CalibrationConfig
from ertacache.fingerprint import model_fingerprint
from ertacache.integrations.diffusers.adapters import pipeline_output
from ertacache.integrations.diffusers.apply import PolicyTravelWarning, SchedulerWarning
from ertacache.integrations.diffusers.calibrate import calibrate_pipeline
from ertacache.integrations.diffusers.families import family_for

T = 8
N = 4
OTHER_MODEL = model_fingerprint(torch.nn.Linear(2, 2))  # the fingerprint of a model no family here builds


def _emb(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def tiny_autoencoder_kl(**over):
    """A tiny AutoencoderKL (4 latent channels, 2x downsampling), its config changed by ``over``."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**{**dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                                   layers_per_block=1, latent_channels=4, norm_num_groups=2, scaling_factor=1.0),
                            **over})


def tiny_hunyuan_video_vae():
    """A tiny AutoencoderKLHunyuanVideo (4 latent channels; 8x space, 4x time), as HunyuanVideo and Kandinsky 5
    text-to-video take it."""
    from diffusers import AutoencoderKLHunyuanVideo

    return AutoencoderKLHunyuanVideo(in_channels=3, out_channels=3, latent_channels=4,
                                     down_block_types=("HunyuanVideoDownBlock3D",) * 4,
                                     up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                     layers_per_block=1, act_fn="silu", norm_num_groups=4, scaling_factor=0.476986,
                                     spatial_compression_ratio=8, temporal_compression_ratio=4,
                                     mid_block_add_attention=True)


def cogvideox():
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    tf = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                     time_embed_dim=2, text_embed_dim=16, num_layers=1, sample_width=2,
                                     sample_height=2, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
                                     max_text_seq_length=8)
    vae = AutoencoderKLCogVideoX(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
                                 up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                 latent_channels=4, layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4)
    none = dict(tokenizer=None, text_encoder=None)
    pipe = CogVideoXPipeline(vae=vae, transformer=tf, scheduler=CogVideoXDDIMScheduler(), **none)
    emb = _emb(0, N, 8, 16)
    kwargs = dict(prompt_embeds=emb, negative_prompt_embeds=emb * 0, height=16, width=16, num_frames=9,
                  guidance_scale=6.0)
    return CogVideoXPipeline, pipe, none, kwargs, ("cond_uncond",)


def ltx():
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    tf = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
                                    attention_head_dim=8, cross_attention_dim=16, num_layers=1, caption_channels=16)
    vae = AutoencoderKLLTXVideo(in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
                                decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
                                decoder_layers_per_block=(1, 1, 1, 1, 1),
                                spatio_temporal_scaling=(True, True, False, False),
                                decoder_spatio_temporal_scaling=(True, True, False, False),
                                decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4,
                                upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1, patch_size_t=1,
                                encoder_causal=True, decoder_causal=False)
    none = dict(tokenizer=None, text_encoder=None)
    pipe = LTXPipeline(vae=vae, transformer=tf, scheduler=FlowMatchEulerDiscreteScheduler(), **none)
    emb, mask = _emb(1, N, 8, 16), torch.ones(N, 8)
    kwargs = dict(prompt_embeds=emb, prompt_attention_mask=mask, negative_prompt_embeds=emb * 0,
                  negative_prompt_attention_mask=mask, height=32, width=32, num_frames=9, guidance_scale=3.0)
    return LTXPipeline, pipe, none, kwargs, ("cond_uncond",)


def qwenimage():
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    tf = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                                     num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                 temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    none = dict(tokenizer=None, text_encoder=None)
    pipe = QwenImagePipeline(vae=vae, transformer=tf, scheduler=FlowMatchEulerDiscreteScheduler(), **none)
    emb, mask = _emb(3, N, 8, 16), torch.ones(N, 8, dtype=torch.long)
    kwargs = dict(prompt_embeds=emb, prompt_embeds_mask=mask, negative_prompt_embeds=emb * 0,
                  negative_prompt_embeds_mask=mask, true_cfg_scale=4.0, height=32, width=32)
    return QwenImagePipeline, pipe, none, kwargs, ("cond", "uncond")


def chroma():
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    tf = ChromaTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                  axes_dims_rope=(4, 6, 6), approximator_num_channels=8, approximator_hidden_dim=32,
                                  approximator_layers=1)
    vae = tiny_autoencoder_kl(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0)
    none = dict(tokenizer=None, text_encoder=None)
    pipe = ChromaPipeline(vae=vae, transformer=tf, scheduler=FlowMatchEulerDiscreteScheduler(), **none)
    emb, mask = _emb(4, N, 8, 16), torch.ones(N, 8, dtype=torch.bool)
    kwargs = dict(prompt_embeds=emb, prompt_attention_mask=mask, negative_prompt_embeds=emb * 0,
                  negative_prompt_attention_mask=mask, guidance_scale=4.0, height=16, width=16)
    return ChromaPipeline, pipe, none, kwargs, ("cond", "uncond")  # its calls set no cache_context


def flux2():
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel

    tf = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                 timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4))
    vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                             latent_channels=4, norm_num_groups=2, use_quant_conv=False, use_post_quant_conv=False)
    none = dict(tokenizer=None, text_encoder=None)
    pipe = Flux2Pipeline(vae=vae, transformer=tf, scheduler=FlowMatchEulerDiscreteScheduler(), **none)
    kwargs = dict(prompt_embeds=_emb(5, N, 8, 16), guidance_scale=4.0, height=16, width=16)
    return Flux2Pipeline, pipe, none, kwargs, ("cond",)  # guidance-distilled: one call a step


def flux2_klein():
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )

    tf = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                 timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
    vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                             latent_channels=4, norm_num_groups=2, use_quant_conv=False, use_post_quant_conv=False)
    none = dict(tokenizer=None, text_encoder=None)
    pipe = Flux2KleinPipeline(vae=vae, transformer=tf, scheduler=FlowMatchEulerDiscreteScheduler(),
                              is_distilled=False, **none)
    emb = _emb(12, N, 8, 16)
    kwargs = dict(prompt_embeds=emb, negative_prompt_embeds=emb * 0, guidance_scale=4.0, height=16, width=16)
    return Flux2KleinPipeline, pipe, none, kwargs, ("cond", "uncond")  # klein base: CFG in two calls


def skyreels_v2():
    from diffusers import SkyReelsV2Pipeline, SkyReelsV2Transformer3DModel, UniPCMultistepScheduler

    from test_diffusers_wan import tiny_vae

    tf = SkyReelsV2Transformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                      in_channels=4, out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32,
                                      num_layers=2, rope_max_seq_len=32)
    none = dict(tokenizer=None, text_encoder=None)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0)
    pipe = SkyReelsV2Pipeline(transformer=tf, vae=tiny_vae(), scheduler=scheduler, **none)
    emb = _emb(11, N, 8, 16)
    kwargs = dict(prompt_embeds=emb, negative_prompt_embeds=emb * 0, guidance_scale=6.0, height=16, width=16,
                  num_frames=5)
    return SkyReelsV2Pipeline, pipe, none, kwargs, ("cond", "uncond")  # Wan's blocks, UniPC with flow sigmas


def zimage():
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    tf = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=1,
                                  n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6],
                                  axes_lens=[64, 32, 32])
    vae = tiny_autoencoder_kl(shift_factor=0.0)
    none = dict(tokenizer=None, text_encoder=None)
    pipe = ZImagePipeline(vae=vae, transformer=tf, scheduler=FlowMatchEulerDiscreteScheduler(), **none)
    embs = [_emb(13 + i, 8, 16) for i in range(N)]  # a list of one (tokens, dim) tensor per row
    kwargs = dict(prompt_embeds=embs, negative_prompt_embeds=[e * 0 for e in embs], guidance_scale=4.0, height=32,
                  width=32)
    return ZImagePipeline, pipe, none, kwargs, ("cond_uncond",)  # rows as lists, CFG batched; time 1 - t


def cogview4():
    from diffusers import CogView4Pipeline, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler

    tf = CogView4Transformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
                                    num_attention_heads=2, text_embed_dim=16, time_embed_dim=8, condition_dim=4,
                                    pos_embed_max_size=16, sample_size=8, rope_axes_dim=(4, 4))
    vae = tiny_autoencoder_kl()
    none = dict(tokenizer=None, text_encoder=None)
    pipe = CogView4Pipeline(vae=vae, transformer=tf, scheduler=FlowMatchEulerDiscreteScheduler(), **none)
    emb = _emb(6, N, 8, 16)
    kwargs = dict(prompt_embeds=emb, negative_prompt_embeds=emb * 0, guidance_scale=4.0, height=16, width=16)
    return CogView4Pipeline, pipe, none, kwargs, ("cond", "uncond")


def sana():
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel

    tf = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                cross_attention_dim=16, caption_channels=16, sample_size=8, patch_size=1)
    none = dict(tokenizer=None, text_encoder=None, vae=None)  # output_type="latent" needs no VAE
    pipe = SanaPipeline(transformer=tf, scheduler=FlowMatchEulerDiscreteScheduler(), **none)
    emb, mask = _emb(7, N, 8, 16), torch.ones(N, 8)
    kwargs = dict(prompt_embeds=emb, prompt_attention_mask=mask, negative_prompt=None, negative_prompt_embeds=emb * 0,
                  negative_prompt_attention_mask=mask, guidance_scale=4.0, height=256, width=256,
                  use_resolution_binning=False)
    return SanaPipeline, pipe, none, kwargs, ("cond_uncond",)  # both CFG halves in one batched call


def lumina2():
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel

    tf = Lumina2Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, hidden_size=32, num_layers=1,
                                   num_refiner_layers=1, num_attention_heads=2, num_kv_heads=2, multiple_of=16,
                                   axes_dim_rope=(4, 6, 6), axes_lens=(32, 32, 32), cap_feat_dim=16)
    vae = tiny_autoencoder_kl()
    none = dict(tokenizer=None, text_encoder=None)
    pipe = Lumina2Pipeline(vae=vae, transformer=tf, scheduler=FlowMatchEulerDiscreteScheduler(), **none)
    emb, mask = _emb(8, N, 8, 16), torch.ones(N, 8, dtype=torch.bool)
    kwargs = dict(prompt_embeds=emb, prompt_attention_mask=mask, negative_prompt_embeds=emb * 0,
                  negative_prompt_attention_mask=mask, guidance_scale=4.0, height=32, width=32)
    return Lumina2Pipeline, pipe, none, kwargs, ("cond", "uncond")  # time reversed (1 - t): read from the scheduler


def hunyuan_video():
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )

    tf = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10,
                                        num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1,
                                        patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
                                        pooled_projection_dim=8, rope_axes_dim=(2, 4, 4))
    vae = tiny_hunyuan_video_vae()
    none = dict(tokenizer=None, text_encoder=None, tokenizer_2=None, text_encoder_2=None)
    pipe = HunyuanVideoPipeline(vae=vae, transformer=tf, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), **none)
    kwargs = dict(prompt_embeds=_emb(2, N, 8, 16), pooled_prompt_embeds=_emb(3, N, 8),
                  prompt_attention_mask=torch.ones(N, 8), height=16, width=16, num_frames=5, guidance_scale=6.0)
    return HunyuanVideoPipeline, pipe, none, kwargs, ("cond",)  # guidance-distilled: one branch


def rows(kwargs, n, family=None):
    """The first ``n`` rows of each per-row argument (its first dimension, or ``family``'s row dimension)."""
    dim = family.row_dim if family is not None else (lambda _: 0)
    return {k: (v.narrow(dim(k), 0, n) if isinstance(v, torch.Tensor) and v.ndim else
                v[:n] if isinstance(v, list) else v) for k, v in kwargs.items()}


def mochi():
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel

    tf = MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                                 pooled_projection_dim=16, in_channels=12, qk_norm="rms_norm", text_embed_dim=16,
                                 time_embed_dim=4, activation_fn="swiglu", max_sequence_length=16)
    vae = AutoencoderKLMochi(latent_channels=12, out_channels=3, encoder_block_out_channels=(32,) * 4,
                             decoder_block_out_channels=(32,) * 4, layers_per_block=(1,) * 5)
    none = dict(tokenizer=None, text_encoder=None)
    pipe = MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True), vae=vae, transformer=tf,
                         **none)
    emb, mask = _emb(7, N, 8, 16), torch.ones(N, 8, dtype=torch.long)
    kwargs = dict(prompt_embeds=emb, prompt_attention_mask=mask, negative_prompt_embeds=emb * 0,
                  negative_prompt_attention_mask=mask, guidance_scale=4.0, height=16, width=16, num_frames=7)
    return MochiPipeline, pipe, none, kwargs, ("cond_uncond",)  # inverted sigmas; CFG batched in one call


FAMILY_BUILDS = [cogvideox, ltx, hunyuan_video, qwenimage, chroma, flux2, flux2_klein, cogview4, sana, lumina2, mochi,
                 skyreels_v2, zimage]


@pytest.mark.parametrize("build", FAMILY_BUILDS, ids=lambda f: f.__name__)
def test_family(build, tmp_path):
    check_build(build, tmp_path)


def check_build(build, tmp_path):
    """One tiny pipeline of a family (``build()``: class, pipeline, components left out, call arguments for N rows,
    branches), saved and loaded back: calibrated at 2x on its N rows, an all-compute policy is bit-exact under every
    reuse mode, the calibrated policy runs NFE forwards per branch and is not below evenly spaced caching, and the
    handle's removal restores the uncached output. ``build.call_rows``: rows a call takes (default 2);
    ``build.loaded(pipe)``: set on the loaded pipeline; ``build.global_rng``: the pipeline draws from torch's global
    generator, seeded before each call here."""
    torch.manual_seed(0)
    cls, pipe, none, kwargs, branches = build()
    pipe.save_pretrained(tmp_path)
    pipe = cls.from_pretrained(tmp_path, **none)
    pipe.set_progress_bar_config(disable=True)
    getattr(build, "loaded", lambda _: None)(pipe)  # what the build sets on the loaded pipeline
    n = getattr(build, "call_rows", 2)
    family = family_for(pipe)

    def run(**extra):
        if getattr(build, "global_rng", False):  # the pipeline draws from torch's global generator too
            torch.manual_seed(0)
        out = pipe(output_type="latent", generator=[torch.Generator().manual_seed(9 + i) for i in range(n)],
                   **rows(kwargs, n, family), **{"num_inference_steps": T, **extra})
        return pipeline_output(out)

    policy = calibrate_pipeline(pipe, None, num_inference_steps=T, target_speedup=2.0, seeds=range(N),
                                config=CalibrationConfig(thresholds=(0.1, 0.3)), **kwargs)
    runs = policy.num_inference_steps  # the steps that run (img2img's strength skips the first ones)
    assert policy.branches == branches and policy.nfe <= runs // 2
    assert runs == (T - int(T - T * kwargs["strength"]) if "strength" in kwargs else T)
    assert list(policy.grid) == sorted(policy.grid, reverse=True) and policy.grid[0] > 0.5 * runs / T  # t from noise
    if build.__name__ == "cogvideox":  # DDIM: no custom grid, so adjustment is off and the policy says why
        assert policy.provenance["timestep_adjustment"].startswith("off: timestep adjustment needs a flow-matching")
    ref = run()
    every = Policy(runs, (), policy.grid, branches=branches, guidance_scale=policy.guidance_scale,
                   latent_shape=policy.latent_shape, model_fingerprint=policy.model_fingerprint)
    with apply_ertacache(pipe, every) as handle:
        assert torch.equal(run(), ref)
        assert handle.forwards() == {b: runs for b in branches}
    assert_every_reuse_mode_on_pipeline(pipe, run, every, ref)
    with apply_ertacache(pipe, policy) as handle:
        with warnings.catch_warnings():  # its own setting: the scheduler's grid and the size are the policy's
            warnings.simplefilter("error", SchedulerWarning)
            warnings.simplefilter("error", PolicyTravelWarning)
            out = run()
        assert handle.forwards() == {b: policy.nfe for b in branches}
        with pytest.raises(PolicyMismatchError, match="num_inference_steps") as refused:
            run(num_inference_steps=T + 2)  # another step count: one line
        assert "\n" not in str(refused.value)
    assert_not_below_uniform(pipe, run, policy, out, ref)
    with pytest.raises(PolicyMismatchError, match="fingerprint") as refused:  # a policy of another model
        apply_ertacache(pipe, replace(policy, model_fingerprint=OTHER_MODEL))
    assert "\n" not in str(refused.value)
    assert torch.equal(run(), ref)


def test_the_pipelines_table_is_the_registry_and_every_row_is_tested():
    """docs/diffusers.md's supported-pipelines table is what scripts/pipelines_table.py makes from the registry
    (every registered class a row, no other row), and the test each row names exists: a build its parametrized
    test runs (FAMILY_BUILDS, BUILDS) or a test function (or file) of tests/."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "scripts"))
    from pipelines_table import BEGIN, END, PAGE, ROWS, table

    text = PAGE.read_text()
    assert text[text.index(BEGIN) + len(BEGIN) + 1:text.index(END) - 1] == table(), \
        "docs/diffusers.md's pipelines table is stale: run python scripts/pipelines_table.py"
    import importlib

    for name, row in ROWS.items():
        file, _, test = row.test.partition("::")
        source = (root / "tests" / file).read_text()
        if test.endswith("]"):  # a parametrized build: an entry of the module's FAMILY_BUILDS or BUILDS
            module = importlib.import_module(file.removesuffix(".py"))
            builds = {b.__name__ for b in getattr(module, "FAMILY_BUILDS", getattr(module, "BUILDS", []))}
            function, _, build = test[:-1].partition("[")
            assert f"def {function}(" in source and build in builds, f"{name}: {test} is not a build of tests/{file}"
        elif test:
            assert f"def {test}(" in source, f"{name}: tests/{row.test} does not exist"
        assert name in source, f"{name}: tests/{file} never builds it"


@pytest.mark.parametrize("name, why", [("SkyReelsV2DiffusionForcingPipeline", "diffusion forcing gives each latent"),
                                       ("CosmosTextToWorldPipeline", "its sampler is EDM's"),
                                       ("Cosmos2TextToImagePipeline", "its scheduler keeps EDM's noise levels"),
                                       ("LTX2Pipeline", "its transformer denoises the video and the audio"),
                                       ("WanAnimatePipeline", "one call denoises its video in segments")])
def test_samplers_the_method_does_not_apply_to_are_refused_with_why(name, why):
    """Diffusion forcing (a timestep per frame), Cosmos' EDM samplers, LTX-2's audio-video transformer and Wan
    Animate's segments: refused before any model exists or runs, at apply and at calibration, with the reason."""
    import diffusers

    from ertacache.errors import ErtaCacheError

    pipe = object.__new__(getattr(diffusers, name))  # the class is what is refused: nothing of it needs building
    policy = Policy.uniform(T, T // 2)
    with pytest.raises(ErtaCacheError, match=f"{name} is not supported: {why}"):
        apply_ertacache(pipe, policy)
    with pytest.raises(ErtaCacheError, match=f"{name} is not supported: {why}"):
        calibrate_pipeline(pipe, ["a prompt"], num_inference_steps=T, target_speedup=2.0, seeds=[0])


@pytest.mark.parametrize("build, truncation, message", [
    (zimage, {"cfg_truncation": 0.5}, r"batch changed from 8 to 4 rows within a call .* cfg_truncation"),
    (lumina2, {"cfg_trunc_ratio": 0.5}, r"calls change from step to step \(\[1, 2\] calls a step"),
], ids=["zimage", "lumina2"])
def test_truncated_guidance_is_refused_in_one_line_at_calibration(build, truncation, message):
    """A guidance branch dropped part-way (Z-Image's batched call shrinks, Lumina 2's negative call stops): one
    line, not a shape error."""
    from ertacache.errors import ErtaCacheError

    _, pipe, _, kwargs, _ = build()
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ErtaCacheError, match=message):
        calibrate_pipeline(pipe, None, num_inference_steps=T, target_speedup=2.0, seeds=range(N), **truncation,
                           **kwargs)


def test_zimage_truncated_guidance_is_refused_under_a_policy_before_the_model_runs():
    from ertacache.errors import ErtaCacheError

    _, pipe, _, kwargs, _ = zimage()
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.transformer.noise_refiner[0].register_forward_pre_hook(lambda *a: calls.append(1))  # the model runs
    with apply_ertacache(pipe, Policy.uniform(T, T // 2)):
        with pytest.raises(ErtaCacheError, match="cfg_truncation=0.5 drops the negative branch"):
            pipe(num_inference_steps=T, output_type="latent", cfg_truncation=0.5, **rows(kwargs, 2))
    assert not calls

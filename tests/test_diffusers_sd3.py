"""ERTACache on a tiny StableDiffusion3Pipeline: no cache_context, both CFG branches in one batched call."""

import pytest
import torch

from conftest import assert_every_reuse_mode_on_pipeline, assert_not_below_uniform
from ertacache import Policy, apply_ertacache
from ertacache.core.config import CalibrationConfig
from ertacache.integrations.diffusers.calibrate import calibrate_pipeline

T = 8
EMB = torch.randn(4, 6, 16, generator=torch.Generator().manual_seed(0))
POOLED = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
KW = dict(height=16, width=16, guidance_scale=5.0)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(0)
    tf = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                               pooled_projection_dim=8, out_channels=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(4,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        layers_per_block=1, norm_num_groups=1)
    none = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                tokenizer_3=None)
    folder = tmp_path_factory.mktemp("sd3")
    StableDiffusion3Pipeline(transformer=tf, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                             **none).save_pretrained(folder)
    loaded = StableDiffusion3Pipeline.from_pretrained(folder, **none)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def run(pipe, rows=slice(0, 2)):
    n = EMB[rows].shape[0]
    return pipe(prompt_embeds=EMB[rows], pooled_prompt_embeds=POOLED[rows], negative_prompt_embeds=EMB[rows] * 0,
                negative_pooled_prompt_embeds=POOLED[rows] * 0, num_inference_steps=T, output_type="latent",
                generator=[torch.Generator().manual_seed(50 + i) for i in range(n)], **KW).images


def test_sd3_calibrate_apply_remove(pipe):
    policy = calibrate_pipeline(pipe, None, num_inference_steps=T, target_speedup=2.0, seeds=range(4),
                                config=CalibrationConfig(timestep_adjustment=False, thresholds=(0.1, 0.3)),
                                prompt_embeds=EMB, pooled_prompt_embeds=POOLED, negative_prompt_embeds=EMB * 0,
                                negative_pooled_prompt_embeds=POOLED * 0, **KW)
    assert policy.branches == ("cond_uncond",) and policy.nfe <= T // 2
    ref = run(pipe)
    every = Policy(T, (), policy.grid, branches=policy.branches, guidance_scale=5.0)
    with apply_ertacache(pipe, every) as handle:
        assert torch.equal(run(pipe), ref)
        assert handle.forwards() == {"cond_uncond": T}
    assert_every_reuse_mode_on_pipeline(pipe, lambda: run(pipe), every, ref)
    with apply_ertacache(pipe, policy) as handle:
        out = run(pipe)
        assert handle.forwards() == {"cond_uncond": policy.nfe}
    assert_not_below_uniform(pipe, lambda: run(pipe), policy, out, ref)
    assert torch.equal(run(pipe), ref)

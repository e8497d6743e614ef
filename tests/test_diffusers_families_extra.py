"""ERTACache on tiny pipelines of the families whose guidance runs through diffusers' guiders (HunyuanVideo 1.5,
HunyuanImage 2.1: a guider object decides the branches and names their cache contexts), Sana-Video and Kandinsky 5
(latents with their channels last, two calls a step with no cache context) and HiDream (its Llama embeddings' rows
on their second dimension).

Each is built from a small config with random weights, saved with ``save_pretrained`` and loaded with
``from_pretrained``, and checked as every family is (:func:`test_diffusers_families.check_build`).
"""

import pytest
import torch

from test_diffusers_families import N, _emb, check_build, tiny_autoencoder_kl, tiny_hunyuan_video_vae


def _two_encoders(seed):
    """The embeddings of the Hunyuan pipelines' two text encoders (8 and 6 tokens), negatives of zeros."""
    emb, mask, emb2, mask2 = _emb(seed, N, 8, 16), torch.ones(N, 8), _emb(seed + 1, N, 6, 8), torch.ones(N, 6)
    return dict(prompt_embeds=emb, prompt_embeds_mask=mask, negative_prompt_embeds=emb * 0,
                negative_prompt_embeds_mask=mask, prompt_embeds_2=emb2, prompt_embeds_mask_2=mask2,
                negative_prompt_embeds_2=emb2 * 0, negative_prompt_embeds_mask_2=mask2)


def hunyuan_video15():
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15Pipeline,
        HunyuanVideo15Transformer3DModel,
    )
    from diffusers.guiders import ClassifierFreeGuidance

    tf = HunyuanVideo15Transformer3DModel(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                          num_layers=1, num_refiner_layers=1, text_embed_dim=16, text_embed_2_dim=8,
                                          image_embed_dim=8, rope_axes_dim=(2, 2, 4), task_type="t2v")
    vae = AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(32, 32, 32), layers_per_block=1,
                                      spatial_compression_ratio=4, temporal_compression_ratio=4)
    none = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    pipe = HunyuanVideo15Pipeline(transformer=tf, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                                  guider=ClassifierFreeGuidance(guidance_scale=6.0), **none)
    kwargs = dict(_two_encoders(30), height=16, width=16, num_frames=5)
    return HunyuanVideo15Pipeline, pipe, none, kwargs, ("pred_cond", "pred_uncond")  # the guider's contexts


def hunyuan_image():
    from diffusers import (
        AutoencoderKLHunyuanImage,
        FlowMatchEulerDiscreteScheduler,
        HunyuanImagePipeline,
        HunyuanImageTransformer2DModel,
    )
    from diffusers.guiders import AdaptiveProjectedMixGuidance

    tf = HunyuanImageTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                        num_layers=1, num_single_layers=1, num_refiner_layers=1, text_embed_dim=16,
                                        text_embed_2_dim=8, rope_axes_dim=(4, 4))
    vae = AutoencoderKLHunyuanImage(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
                                    layers_per_block=1, spatial_compression_ratio=2, sample_size=32,
                                    scaling_factor=1.0)
    none = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    guider = AdaptiveProjectedMixGuidance(guidance_scale=3.5, adaptive_projected_guidance_start_step=3)  # CFG, then APG
    pipe = HunyuanImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, transformer=tf, guider=guider,
                                ocr_guider=None, **none)
    kwargs = dict(_two_encoders(32), height=32, width=32)
    return HunyuanImagePipeline, pipe, none, kwargs, ("pred_cond", "pred_uncond")


def sana_video():
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaVideoPipeline, SanaVideoTransformer3DModel

    from test_diffusers_wan import tiny_vae

    tf = SanaVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                     num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                     cross_attention_dim=16, caption_channels=16, sample_size=8, patch_size=(1, 2, 2),
                                     rope_max_seq_len=32)
    none = dict(tokenizer=None, text_encoder=None)
    pipe = SanaVideoPipeline(vae=tiny_vae(), transformer=tf, scheduler=FlowMatchEulerDiscreteScheduler(), **none)
    emb, mask = _emb(34, N, 8, 16), torch.ones(N, 8)
    kwargs = dict(prompt_embeds=emb, prompt_attention_mask=mask, negative_prompt=None, negative_prompt_embeds=emb * 0,
                  negative_prompt_attention_mask=mask, guidance_scale=4.0, height=32, width=32, frames=5,
                  use_resolution_binning=False)
    return SanaVideoPipeline, pipe, none, kwargs, ("cond_uncond",)  # both CFG halves in one batched call


def _kandinsky5(cls_name, vae, visual_cond=False):
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler, Kandinsky5Transformer3DModel

    tf = Kandinsky5Transformer3DModel(in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4,
                                      patch_size=(1, 2, 2), model_dim=32, ff_dim=64, num_text_blocks=1,
                                      num_visual_blocks=1, axes_dims=(4, 6, 6), visual_cond=visual_cond)
    with torch.no_grad():  # its modulations start at zero (each block the identity): random weights instead
        for param in tf.parameters():
            if not param.any():
                param.normal_(std=0.1)
    none = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    cls = getattr(diffusers, cls_name)
    pipe = cls(transformer=tf, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), **none)
    qwen, clip = _emb(35, N, 8, 16), _emb(36, N, 8)
    cu_seqlens = torch.arange(0, 8 * (N + 1), 8, dtype=torch.int32)  # every prompt 8 tokens
    kwargs = dict(prompt_embeds_qwen=qwen, prompt_embeds_clip=clip, prompt_cu_seqlens=cu_seqlens,
                  negative_prompt_embeds_qwen=qwen * 0, negative_prompt_embeds_clip=clip * 0,
                  negative_prompt_cu_seqlens=cu_seqlens, guidance_scale=5.0, height=32, width=32)
    return cls, pipe, none, kwargs, ("cond", "uncond")  # no cache_context: cond, then uncond


def kandinsky5_t2v(cls_name="Kandinsky5T2VPipeline", visual_cond=False):
    cls, pipe, none, kwargs, branches = _kandinsky5(cls_name, tiny_hunyuan_video_vae(), visual_cond)
    return cls, pipe, none, {**kwargs, "num_frames": 5}, branches


def kandinsky5_i2v():  # the first frame's latents and a mask join the latents as channels (4 + 4 + 1)
    from PIL import Image

    cls, pipe, none, kwargs, branches = kandinsky5_t2v("Kandinsky5I2VPipeline", visual_cond=True)
    images = [Image.new("RGB", (32, 32), (40 * i, 80, 120)) for i in range(N)]
    # 17 frames (5 latent ones): it renormalises the first 4 latent frames by those after them
    return cls, pipe, none, {**kwargs, "image": images, "num_frames": 17}, branches


def kandinsky5_t2i():
    vae = tiny_autoencoder_kl(shift_factor=0.0)
    return _kandinsky5("Kandinsky5T2IPipeline", vae)


def _small_resolutions(pipe):  # the pipeline resizes to one of its 1024-pixel resolutions: a 32 x 32 one here
    pipe.resolutions = [(32, 32)]


kandinsky5_t2i.loaded = _small_resolutions

def hidream():
    from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline
    from diffusers import HiDreamImageTransformer2DModel as Transformer

    tf = Transformer(patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1,
                     attention_head_dim=8, num_attention_heads=2, caption_channels=[16, 8], text_emb_dim=16,
                     num_routed_experts=2, num_activated_experts=1, axes_dims_rope=(4, 2, 2), max_resolution=(32, 32),
                     llama_layers=[0, 1])
    vae = tiny_autoencoder_kl(shift_factor=0.0)
    none = {f"{name}{i}": None for name in ("text_encoder", "tokenizer") for i in ("", "_2", "_3", "_4")}
    pipe = HiDreamImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, transformer=tf, **none)
    t5, llama, pooled = _emb(37, N, 8, 16), _emb(38, 2, N, 8, 8), _emb(39, N, 16)  # llama: (layers, rows, ...)
    kwargs = dict(prompt_embeds_t5=t5, prompt_embeds_llama3=llama, pooled_prompt_embeds=pooled,
                  negative_prompt_embeds_t5=t5 * 0, negative_prompt_embeds_llama3=llama * 0,
                  negative_pooled_prompt_embeds=pooled * 0, guidance_scale=5.0, height=32, width=32)
    return HiDreamImagePipeline, pipe, none, kwargs, ("cond_uncond",)  # CFG batched in one call


def _small_default_area(pipe):  # it rescales every call to its default area (1024 x 1024): 32 x 32 here
    pipe.default_sample_size = 16


hidream.loaded = _small_default_area

BUILDS = [hunyuan_video15, hunyuan_image, sana_video, kandinsky5_t2v, kandinsky5_i2v, kandinsky5_t2i, hidream]


@pytest.mark.parametrize("build", BUILDS, ids=lambda f: f.__name__)
def test_family(build, tmp_path):
    check_build(build, tmp_path)


def test_a_ground_truth_that_is_not_finite_stops_calibration_in_one_line():
    """Kandinsky 5's image-to-video with 2 latent frames renormalises by the standard deviation of none (NaN): the
    uncached pass itself is not finite, and calibration says so before judging anything."""
    from ertacache.core.config import CalibrationConfig
    from ertacache.errors import ErtaCacheError
    from ertacache.integrations.diffusers.calibrate import calibrate_pipeline

    _, pipe, _, kwargs, _ = kandinsky5_i2v()
    pipe.set_progress_bar_config(disable=True)
    with pytest.warns(UserWarning), pytest.raises(ErtaCacheError, match="ground-truth pass returned NaN or inf"):
        calibrate_pipeline(pipe, None, num_inference_steps=4, target_speedup=2.0, seeds=range(N),
                           config=CalibrationConfig(thresholds=(0.1,)), **{**kwargs, "num_frames": 5})

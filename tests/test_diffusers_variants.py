"""ERTACache on the variants of registered families: image-to-image, inpainting, fill, edit and video-to-video
pipelines that call their family's transformer with an input image or video (as latents to start from, as channels
joined to the latents, or as reference tokens).

Each is built from a small config with random weights (or from a tiny family pipeline's components), saved with
``save_pretrained`` and loaded with ``from_pretrained``, and checked as every family is
(:func:`test_diffusers_families.check_build`).
"""

import importlib

import pytest
import torch

from test_diffusers_families import N, _emb, check_build, chroma, qwenimage, tiny_autoencoder_kl, zimage

STRENGTH = 0.75  # img2img and inpainting start a quarter of the way down: 6 of 8 steps run


def _image(n, size, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _mask(n, size):
    m = torch.zeros(n, 1, size, size)
    m[..., size // 4:3 * size // 4, size // 4:3 * size // 4] = 1.0
    return m


def _pil(n, size):
    from PIL import Image

    return [Image.fromarray((_image(1, size, seed=i)[0].permute(1, 2, 0) * 255).byte().numpy()) for i in range(n)]


def _variant(base, name, **inputs):
    import diffusers

    _, pipe, none, kwargs, branches = base()
    cls = getattr(diffusers, name)
    extra = {"processor": None} if "processor" in cls._get_signature_keys(cls)[0] else {}
    return cls, cls.from_pipe(pipe, **extra), {**none, **extra}, {**kwargs, **inputs}, branches


def chroma_img2img():
    return _variant(chroma, "ChromaImg2ImgPipeline", image=_image(N, 16), strength=STRENGTH)


def zimage_img2img():
    return _variant(zimage, "ZImageImg2ImgPipeline", image=_image(N, 32), strength=STRENGTH)


def zimage_inpaint():
    return _variant(zimage, "ZImageInpaintPipeline", image=_image(N, 32), mask_image=_mask(N, 32), strength=STRENGTH)


def qwenimage_img2img():
    return _variant(qwenimage, "QwenImageImg2ImgPipeline", image=_image(N, 32), strength=STRENGTH)


def qwenimage_inpaint():
    return _variant(qwenimage, "QwenImageInpaintPipeline", image=_image(N, 32), mask_image=_mask(N, 32),
                    strength=STRENGTH)


def qwenimage_edit():  # the input image's latents join the call as reference tokens (4 + 4 here)
    return _variant(qwenimage, "QwenImageEditPipeline", image=_pil(N, 32))


def qwenimage_edit_inpaint():
    return _variant(qwenimage, "QwenImageEditInpaintPipeline", image=_pil(N, 32), mask_image=_pil(N, 32),
                    strength=STRENGTH)


def qwenimage_edit_plus():  # one row a call (the pipeline refuses batches); a reference image per row
    return _variant(qwenimage, "QwenImageEditPlusPipeline", image=_pil(N, 32))


qwenimage_edit_plus.call_rows = 1


def _small_qwen_edit_area(monkeypatch):
    """The Qwen-Image edit pipelines resize their input to a 1024 x 1024 area (4096 reference tokens; Edit Plus its
    condition image to 384 x 384): a 32 x 32 area here, so the tiny pipeline runs on a CPU in a second; what the
    transformer is called with keeps its form (latent tokens, then the reference image's)."""
    for module in ("pipeline_qwenimage_edit", "pipeline_qwenimage_edit_inpaint", "pipeline_qwenimage_edit_plus"):
        m = importlib.import_module(f"diffusers.pipelines.qwenimage.{module}")
        dims = m.calculate_dimensions
        monkeypatch.setattr(m, "calculate_dimensions", lambda area, ratio, dims=dims: dims(min(area, 32 * 32), ratio))


def _flux(name, in_channels=16, cfg=True):
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    tf = FluxTransformer2DModel(patch_size=1, in_channels=in_channels, out_channels=16, num_layers=1,
                                num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(4, 6, 6))
    vae = tiny_autoencoder_kl(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0)
    none = dict(tokenizer=None, text_encoder=None, tokenizer_2=None, text_encoder_2=None)
    cls = getattr(diffusers, name)
    pipe = cls(vae=vae, transformer=tf, scheduler=FlowMatchEulerDiscreteScheduler(), **none)
    emb, pooled = _emb(20, N, 8, 16), _emb(21, N, 8)
    kwargs = dict(prompt_embeds=emb, pooled_prompt_embeds=pooled, height=32, width=32)
    if cfg:
        kwargs.update(negative_prompt_embeds=emb * 0, negative_pooled_prompt_embeds=pooled * 0, true_cfg_scale=3.0)
    return cls, pipe, none, kwargs


def flux_inpaint():  # true CFG in two calls with no cache_context: cond, then uncond
    cls, pipe, none, kwargs = _flux("FluxInpaintPipeline")
    return cls, pipe, none, {**kwargs, "image": _image(N, 32), "mask_image": _mask(N, 32),
                             "strength": STRENGTH}, ("cond", "uncond")


def flux_fill():  # FLUX.1 Fill: guidance-distilled; the masked image and the mask join the latents as channels
    cls, pipe, none, kwargs = _flux("FluxFillPipeline", in_channels=48, cfg=False)
    return cls, pipe, none, {**kwargs, "image": _image(N, 32), "mask_image": _mask(N, 32),
                             "guidance_scale": 30.0}, ("cond",)


def wan_video_to_video():
    from diffusers import FlowMatchEulerDiscreteScheduler, WanVideoToVideoPipeline

    from test_diffusers_wan import EMB, NEG, tiny_transformer, tiny_vae

    pipe = WanVideoToVideoPipeline(tokenizer=None, text_encoder=None, transformer=tiny_transformer(0), vae=tiny_vae(),
                                   scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    videos = [_pil(5, 16) for _ in range(N)]  # one clip of 5 frames a row
    kwargs = dict(prompt_embeds=EMB, negative_prompt_embeds=NEG, video=videos, height=16, width=16,
                  guidance_scale=4.0, strength=STRENGTH)
    return WanVideoToVideoPipeline, pipe, dict(tokenizer=None, text_encoder=None), kwargs, ("cond", "uncond")


def flux_control():  # FLUX.1 Depth / Canny: guidance-distilled; the control image's latents join as channels
    cls, pipe, none, kwargs = _flux("FluxControlPipeline", in_channels=32, cfg=False)
    return cls, pipe, none, {**kwargs, "control_image": _image(N, 32), "guidance_scale": 10.0}, ("cond",)


def flux_control_img2img():
    cls, pipe, none, kwargs = _flux("FluxControlImg2ImgPipeline", in_channels=32, cfg=False)
    return cls, pipe, none, {**kwargs, "image": _image(N, 32), "control_image": _image(N, 32, seed=1),
                             "strength": STRENGTH, "guidance_scale": 10.0}, ("cond",)


def flux_control_inpaint():
    cls, pipe, none, kwargs = _flux("FluxControlInpaintPipeline", in_channels=32, cfg=False)
    return cls, pipe, none, {**kwargs, "image": _image(N, 32), "control_image": _image(N, 32, seed=1),
                             "mask_image": _mask(N, 32), "strength": STRENGTH, "guidance_scale": 10.0}, ("cond",)


def flux_kontext_inpaint():  # the reference image's tokens join the latents' (64 + 64)
    cls, pipe, none, kwargs = _flux("FluxKontextInpaintPipeline")
    return cls, pipe, none, {**kwargs, "image": _image(N, 32), "mask_image": _mask(N, 32), "strength": STRENGTH,
                             "max_area": 32 * 32, "_auto_resize": False}, ("cond", "uncond")


def flux2_klein_inpaint():
    from test_diffusers_families import flux2_klein

    return _variant(flux2_klein, "Flux2KleinInpaintPipeline", image=_image(N, 16), mask_image=_mask(N, 16),
                    strength=STRENGTH)


def cogview4_control():  # the control image's latents join as channels (4 + 4)
    from diffusers import CogView4ControlPipeline, CogView4Transformer2DModel

    from test_diffusers_families import cogview4

    _, pipe, none, kwargs, branches = cogview4()
    tf = CogView4Transformer2DModel(patch_size=2, in_channels=8, out_channels=4, num_layers=1, attention_head_dim=8,
                                    num_attention_heads=2, text_embed_dim=16, time_embed_dim=8, condition_dim=4,
                                    pos_embed_max_size=16, sample_size=8, rope_axes_dim=(4, 4))
    control = CogView4ControlPipeline(vae=pipe.vae, transformer=tf, scheduler=pipe.scheduler, **none)
    return CogView4ControlPipeline, control, none, {**kwargs, "control_image": _image(N, 16)}, branches


cogview4_control.global_rng = True  # it encodes the control image with an unseeded VAE sample


def ltx_image_to_video():  # the first frame's tokens at time 0, the others' at the step's time
    from test_diffusers_families import ltx

    return _variant(ltx, "LTXImageToVideoPipeline", image=_pil(N, 32))


def sana_image_to_video():  # one input image for every row
    from test_diffusers_families_extra import sana_video

    return _variant(sana_video, "SanaImageToVideoPipeline", image=_pil(1, 32)[0])


def skyreels_v2_image_to_video():  # a tiny CLIP vision encoder's image embeddings; image latents and mask as channels
    from diffusers import SkyReelsV2ImageToVideoPipeline, SkyReelsV2Transformer3DModel, UniPCMultistepScheduler
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from test_diffusers_wan import EMB, NEG, tiny_vae

    tf = SkyReelsV2Transformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                      in_channels=12, out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32,
                                      num_layers=2, rope_max_seq_len=32, image_dim=16, added_kv_proj_dim=24)
    encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, image_size=32, patch_size=16, projection_dim=16))
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    none = dict(tokenizer=None, text_encoder=None)
    pipe = SkyReelsV2ImageToVideoPipeline(image_encoder=encoder, image_processor=processor, transformer=tf,
                                          vae=tiny_vae(), scheduler=scheduler, **none)
    kwargs = dict(prompt_embeds=EMB, negative_prompt_embeds=NEG, image=_pil(1, 16)[0], guidance_scale=5.0,
                  height=16, width=16, num_frames=5)
    return SkyReelsV2ImageToVideoPipeline, pipe, none, kwargs, ("cond", "uncond")


BUILDS = [chroma_img2img, zimage_img2img, zimage_inpaint, qwenimage_img2img, qwenimage_inpaint, qwenimage_edit,
          qwenimage_edit_inpaint, qwenimage_edit_plus, flux_inpaint, flux_fill, flux_control, flux_control_img2img,
          flux_control_inpaint, flux_kontext_inpaint,
          flux2_klein_inpaint, cogview4_control, ltx_image_to_video, sana_image_to_video, wan_video_to_video,
          skyreels_v2_image_to_video]


@pytest.mark.parametrize("build", BUILDS, ids=lambda f: f.__name__)
def test_variant(build, tmp_path, monkeypatch):
    _small_qwen_edit_area(monkeypatch)
    check_build(build, tmp_path)

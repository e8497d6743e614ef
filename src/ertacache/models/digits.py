"""The bundled model: a class-conditional rectified flow on scikit-learn's digits.

The network is diffusers' :class:`~diffusers.FluxTransformer2DModel`, unchanged, so
every caching hook written for FLUX applies to it. A digit image ``x`` of shape
``(B, 1, 16, 16)`` in [-1, 1] is packed into 2x2 patches, ``(B, 64, 4)``, exactly as
``FluxPipeline`` packs its latents. The class label (0-9, and 10 for the null class
of classifier-free guidance) picks learned text tokens and a pooled vector, which
play the role of FLUX's prompt embeddings.

Time follows the paper (Eq. 1): ``x_t = (1 - t) x_0 + t * noise``, t in [0, 1],
t = 1 is noise; the velocity is ``noise - x_0``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ErtaCacheError

NULL_CLASS = 10
NUM_CLASSES = 10
IMAGE_SIZE = 16
LATENT_SHAPE = (1, IMAGE_SIZE, IMAGE_SIZE)
"""One sample's state shape ``(C, H, W)`` in the core sampler."""
WEIGHTS_NAME = "digits_flux.safetensors"
CONFIG_NAME = "digits_flux.json"

TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 4,
    "num_layers": 2,
    "num_single_layers": 4,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 64,
    "guidance_embeds": False,
    "axes_dims_rope": (8, 12, 12),
}
TEXT_TOKENS = 4


def pack(x: Tensor) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, H/2 * W/2, 4C)``, FluxPipeline's 2x2 patch layout."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, height: int = IMAGE_SIZE, width: int = IMAGE_SIZE) -> Tensor:
    """Inverse of :func:`pack`: ``(B, H/2 * W/2, 4C)`` -> ``(B, C, H, W)``."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_ids(height: int = IMAGE_SIZE, width: int = IMAGE_SIZE) -> Tensor:
    """FLUX's rotary position ids for the packed tokens: ``(H/2 * W/2, 3)``, rows ``[0, row, col]``."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3)


@dataclass
class _Ctx:
    encoder_hidden_states: Tensor
    temb: Tensor


class DigitsFlux(nn.Module):
    """Class-conditional velocity model ``v(x, t, label)`` around a FluxTransformer2DModel.

    Implements both :class:`ertacache.core.model.VelocityFn` (``__call__``) and
    :class:`ertacache.core.model.SplitVelocityModel` (``embed``/``blocks``/``head``).

    Args:
        transformer_config: keyword arguments of ``FluxTransformer2DModel``.
        num_classes: conditioning classes; label ``num_classes`` is the null class of CFG.
        image_size: side of the square images in pixels (a multiple of 2).
    """

    def __init__(self, transformer_config: dict[str, Any] | None = None, num_classes: int = NUM_CLASSES,
                 image_size: int = IMAGE_SIZE) -> None:
        super().__init__()
        self.num_classes, self.null_class, self.image_size = num_classes, num_classes, image_size
        from diffusers import FluxTransformer2DModel

        config = dict(TRANSFORMER_CONFIG if transformer_config is None else transformer_config)
        self.transformer: Any = FluxTransformer2DModel(**config)
        joint = config["joint_attention_dim"]
        self.text_tokens = nn.Embedding(num_classes + 1, TEXT_TOKENS * joint)
        self.pooled = nn.Embedding(num_classes + 1, config["pooled_projection_dim"])
        nn.init.normal_(self.text_tokens.weight, std=0.5)
        nn.init.normal_(self.pooled.weight, std=0.5)
        self.register_buffer("img_ids", image_ids(image_size, image_size), persistent=False)
        self.register_buffer("txt_ids", torch.zeros(TEXT_TOKENS, 3), persistent=False)
        self._rotary: tuple[Tensor, Tensor] | None = None

    def prompt_embeds(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """FLUX-style ``(prompt_embeds (B, 4, 64), pooled_prompt_embeds (B, 64))`` for class labels."""
        labels = labels.long()
        if labels.min() < 0 or labels.max() > self.null_class:
            raise ErtaCacheError(
                f"class labels must be in 0..{self.null_class} ({self.null_class} is the null class); "
                f"got values {labels.min().item()}..{labels.max().item()}"
            )
        tokens = self.text_tokens(labels).view(labels.shape[0], TEXT_TOKENS, -1)
        return tokens, self.pooled(labels)

    def rotary(self) -> tuple[Tensor, Tensor]:
        if self._rotary is None or self._rotary[0].device != self.img_ids.device:
            ids = torch.cat([torch.as_tensor(self.txt_ids), torch.as_tensor(self.img_ids)], dim=0)
            cos, sin = self.transformer.pos_embed(ids)
            self._rotary = (cos, sin)
        return self._rotary

    def embed(self, x: Tensor, t: Tensor, cond: Tensor | None) -> tuple[Tensor, _Ctx]:
        """Input embedding: ``x (B, 1, 16, 16)``, ``t (B,)`` in [0, 1], ``cond (B,)`` labels."""
        tf = self.transformer
        labels = cond if cond is not None else torch.full((x.shape[0],), self.null_class, device=x.device)
        tokens, pooled = self.prompt_embeds(labels)
        h = tf.x_embedder(pack(x))
        temb = tf.time_text_embed(t.to(h.dtype) * 1000, pooled)
        return h, _Ctx(tf.context_embedder(tokens), temb)

    def blocks(self, h: Tensor, ctx: _Ctx) -> Tensor:
        """The 2 double-stream and 4 single-stream FLUX blocks on the image tokens."""
        rotary = self.rotary()
        enc = ctx.encoder_hidden_states
        for block in self.transformer.transformer_blocks:
            enc, h = block(hidden_states=h, encoder_hidden_states=enc, temb=ctx.temb, image_rotary_emb=rotary)
        for block in self.transformer.single_transformer_blocks:
            enc, h = block(hidden_states=h, encoder_hidden_states=enc, temb=ctx.temb, image_rotary_emb=rotary)
        return h

    def head(self, h: Tensor, ctx: _Ctx) -> Tensor:
        """Final norm and projection, unpacked to ``(B, 1, 16, 16)``."""
        tf = self.transformer
        return unpack(tf.proj_out(tf.norm_out(h, ctx.temb)), self.image_size, self.image_size)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        h, ctx = self.embed(x, t, cond)
        return self.head(self.blocks(h, ctx), ctx)

    def transformer_forward(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        """The same velocity through ``FluxTransformer2DModel.forward`` itself.

        Hooks that diffusers registers on the transformer or its blocks (its cache
        methods) see exactly the call a ``FluxPipeline`` makes.
        """
        labels = cond if cond is not None else torch.full((x.shape[0],), self.null_class, device=x.device)
        tokens, pooled = self.prompt_embeds(labels)
        out = self.transformer(hidden_states=pack(x), encoder_hidden_states=tokens, pooled_projections=pooled,
                               timestep=t, img_ids=self.img_ids, txt_ids=self.txt_ids, return_dict=False)[0]
        return unpack(out, self.image_size, self.image_size)


def digits_images(size: int = IMAGE_SIZE) -> tuple[Tensor, Tensor]:
    """scikit-learn's 1,797 bundled digits, ``(N, 1, size, size)`` in [-1, 1], and labels ``(N,)``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp(0, 1) * 2 - 1, torch.tensor(data.target, dtype=torch.long)


def bundled_weights_path() -> Path:
    """Path of the committed weights inside the installed package."""
    return Path(str(resources.files("ertacache.weights").joinpath(WEIGHTS_NAME)))


def load_digits_model(path: str | Path | None = None, device: str | torch.device = "cpu") -> DigitsFlux:
    """Load the bundled trained model (offline, from package data) or weights at ``path``.

    Args:
        path: a ``.safetensors`` file written by ``training.train_digits``;
            ``None`` loads the weights shipped in the package.
        device: where to put the model.

    Raises:
        ErtaCacheError: the file is missing or does not match the architecture.
    """
    from safetensors.torch import load_file

    weights = Path(path) if path is not None else bundled_weights_path()
    if not weights.is_file():
        raise ErtaCacheError(
            f"no weights at {weights}; train them with `python -m training.train_digits --out {weights}`"
        )
    config_path = weights.with_suffix(".json")
    config = TRANSFORMER_CONFIG
    if config_path.is_file():
        config = json.loads(config_path.read_text())["transformer_config"]
    model = DigitsFlux(config)
    try:
        model.load_state_dict(load_file(str(weights)))
    except RuntimeError as exc:
        raise ErtaCacheError(f"weights at {weights} do not fit the digits architecture: {exc}") from exc
    return model.to(device).eval().requires_grad_(False)


def digits_flux_pipeline(model: DigitsFlux) -> Any:
    """The bundled model as a diffusers ``FluxPipeline``: its transformer, a flow-matching Euler
    scheduler on the plain grid (shift 1), and a pass-through VAE (one level: ``vae_scale_factor = 1``,
    unused with ``output_type="latent"``). Text encoders are None: pass ``prompt_embeds`` and
    ``pooled_prompt_embeds`` from :meth:`DigitsFlux.prompt_embeds`, true CFG through
    ``negative_*`` embeddings of the null class and ``true_cfg_scale``.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    channels = model.transformer.config.in_channels // 4
    vae = AutoencoderKL(in_channels=channels, out_channels=channels, latent_channels=channels, block_out_channels=(4,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        layers_per_block=1, norm_num_groups=1)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=model.transformer)


def flux_modulated_input(transformer: Any) -> Callable[[Tensor, Any], Tensor]:
    """The modulated input of FLUX's first double-stream block, ``norm1(h, emb=temb)[0]``: what TeaCache4FLUX
    measures (:mod:`ertacache.peers.teacache`)."""
    block = transformer.transformer_blocks[0]

    def modulated(h: Tensor, ctx: Any) -> Tensor:
        return block.norm1(h, emb=ctx.temb)[0]

    return modulated

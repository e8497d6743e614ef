"""Per-family facts as data: where the transformers and their block stacks are, what they are given.

Adding a family is one :func:`register_family` call; no model code is copied.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...core.rectify import ChannelLayout
from ...errors import ErtaCacheError


@dataclass(frozen=True)
class Family:
    """How one diffusers pipeline family calls its transformer.

    Attributes:
        name: short name, e.g. ``"flux"``.
        pipelines: pipeline class names of the family (subclasses match too).
        transformers: pipeline attributes holding transformers; each gets its own
            cache (Wan 2.2 has ``transformer`` and ``transformer_2``).
        timestep_scale: the transformer's ``timestep`` argument is ``t * timestep_scale``
            (FLUX passes sigma itself: 1; the others pass ``1000 * sigma``); 0: the time is read
            from the scheduler's ``sigmas`` at its step (Lumina 2 passes ``1 - t``).
        default_context: the branch name used when the pipeline sets no
            ``cache_context`` (SD3 batches both CFG branches in one call).
        block_stacks: attributes of the transformer holding its block lists, in the
            order they run; ``block_residual`` reuse caches ``h_out - h_in`` across them.
            (diffusers' hooks know these attribute names as an unordered set; the first
            and the last block of the stack need the order.)
        channels: where the output's channels are (per-channel rectification).
        video: the pipeline returns ``frames`` (written as MP4 by the CLI), not ``images``.
        cfg_scales: the call's arguments that scale classifier-free guidance (they change the output only
            when a negative branch runs).
        embedded_guidance: the call's argument the transformer is given as a guidance embedding (FLUX.1-dev's
            ``guidance_scale``), when its config has ``guidance_embeds``.
        context_free_branches: the branch of the k-th transformer call of a step in the family's pipelines that
            set no ``cache_context`` (FluxImg2ImgPipeline: cond, then uncond with true CFG); the first call of a
            step otherwise is ``default_context``.
        one_generator: pipeline classes of the family that take one ``generator``, not a list of them
            (WanVACEPipeline): calibration calls them one row at a time (micro-batches of one row, which meet at
            every step as any micro-batches do).
        truncation: the pipeline attribute holding the call's guidance truncation ratio (Z-Image's
            ``_cfg_truncation``): below 1 a guidance branch is dropped part-way, and such a call is refused at its
            first transformer call, before the model runs.
        row_dims: call arguments whose rows are another dimension than their first, with that dimension
            (HiDream's ``prompt_embeds_llama3``: ``(layers, rows, tokens, dim)``).
    """

    name: str
    pipelines: tuple[str, ...]
    transformers: tuple[str, ...] = ("transformer",)
    timestep_scale: float = 1000.0
    default_context: str = "cond_uncond"
    block_stacks: tuple[str, ...] = ("transformer_blocks",)
    channels: ChannelLayout = ChannelLayout()
    video: bool = False
    cfg_scales: tuple[str, ...] = ("guidance_scale", "guidance_scale_2")
    embedded_guidance: str | None = None
    context_free_branches: tuple[str, ...] = ()
    one_generator: tuple[str, ...] = ()
    truncation: str | None = None
    row_dims: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if not self.context_free_branches:
            object.__setattr__(self, "context_free_branches", (self.default_context,))

    def row_dim(self, name: str | None) -> int:
        """The dimension of call argument ``name`` that holds its rows: the first, unless :attr:`row_dims` says."""
        return dict(self.row_dims).get(name or "", 0)


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Register (or replace) a family; returns it."""
    FAMILIES[family.name] = family
    return family


register_family(Family("flux", ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxFillPipeline",
                                "FluxControlPipeline", "FluxControlImg2ImgPipeline", "FluxControlInpaintPipeline",
                                "FluxKontextPipeline", "FluxKontextInpaintPipeline"),
                       timestep_scale=1.0,
                       block_stacks=("transformer_blocks", "single_transformer_blocks"),
                       channels=ChannelLayout(dim=-1, group=4),  # packed 2x2 patches, channel-major
                       cfg_scales=("true_cfg_scale",), embedded_guidance="guidance_scale",
                       context_free_branches=("cond", "uncond")))
register_family(Family("chroma", ("ChromaPipeline", "ChromaImg2ImgPipeline"), timestep_scale=1.0,
                       block_stacks=(),  # its single-stream blocks take text and image tokens joined: no one residual
                       channels=ChannelLayout(dim=-1, group=4),  # FLUX's packing
                       cfg_scales=("guidance_scale",),
                       context_free_branches=("cond", "uncond")))  # no cache_context: cond, then uncond
register_family(Family("flux2", ("Flux2Pipeline", "Flux2KleinPipeline", "Flux2KleinInpaintPipeline"),
                       timestep_scale=1.0, block_stacks=(),
                       channels=ChannelLayout(dim=-1), cfg_scales=("guidance_scale",),  # klein base: CFG
                       embedded_guidance="guidance_scale",  # FLUX.2 dev: embedded (guidance-distilled, one call)
                       context_free_branches=("cond",)))  # dev sets no cache_context; klein sets cond / uncond
register_family(Family("zimage", ("ZImagePipeline", "ZImageImg2ImgPipeline", "ZImageInpaintPipeline"),
                       timestep_scale=0.0,  # passes 1 - t: read from the scheduler
                       block_stacks=(), cfg_scales=("guidance_scale",),  # rows as lists; CFG batched in one call
                       truncation="_cfg_truncation"))
register_family(Family("cogview4", ("CogView4Pipeline", "CogView4ControlPipeline"),  # timestep = 1000 t
                       context_free_branches=("cond", "uncond")))  # contexts cond / uncond; Control sets none
register_family(Family("sana", ("SanaPipeline",)))  # batched CFG in one call; timestep = 1000 t (timestep_scale 1)
register_family(Family("lumina2", ("Lumina2Pipeline",), timestep_scale=0.0, block_stacks=(),
                       cfg_scales=("guidance_scale",),  # cond, then uncond, with no cache_context
                       context_free_branches=("cond", "uncond")))  # cfg_trunc_ratio < 1 drops uncond late: refused
register_family(Family("qwenimage", ("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline",
                                     "QwenImageEditPipeline", "QwenImageEditInpaintPipeline",
                                     "QwenImageEditPlusPipeline"), timestep_scale=1.0,
                       channels=ChannelLayout(dim=-1, group=4),  # packed 2x2 patches, channel-major (as FLUX)
                       cfg_scales=("true_cfg_scale",), embedded_guidance="guidance_scale",
                       one_generator=("QwenImageEditPlusPipeline",)))  # Edit Plus refuses batches: one row a call
register_family(Family("wan", ("WanPipeline", "WanImageToVideoPipeline", "WanVideoToVideoPipeline",
                              "WanVACEPipeline"),
                       ("transformer", "transformer_2"), block_stacks=("blocks",), video=True,
                       context_free_branches=("cond", "uncond"),  # video-to-video sets no cache_context
                       one_generator=("WanVACEPipeline",)))  # VACE's control input joins the blocks as hints
register_family(Family("mochi", ("MochiPipeline",), timestep_scale=0.0,  # inverted sigmas: t = 1 - sigma
                       video=True))  # batched CFG in one call; time read from the scheduler
register_family(Family("cogvideox", ("CogVideoXPipeline",), channels=ChannelLayout(dim=2),  # (B, F, C, H, W)
                       video=True))
register_family(Family("hunyuan_video", ("HunyuanVideoPipeline",),
                       block_stacks=("transformer_blocks", "single_transformer_blocks"), video=True,
                       cfg_scales=("true_cfg_scale",), embedded_guidance="guidance_scale"))
register_family(Family("skyreels_v2", ("SkyReelsV2Pipeline", "SkyReelsV2ImageToVideoPipeline"),
                       block_stacks=("blocks",), video=True))  # Wan's blocks
register_family(Family("hunyuan_video15", ("HunyuanVideo15Pipeline",), video=True,  # CFG through its guider
                       cfg_scales=()))  # the guider's scale is the guider's config, not a call argument
register_family(Family("hunyuan_image", ("HunyuanImagePipeline",),  # CFG / APG through its guider
                       block_stacks=("transformer_blocks", "single_transformer_blocks"), cfg_scales=(),
                       embedded_guidance="distilled_guidance_scale"))
register_family(Family("sana_video", ("SanaVideoPipeline", "SanaImageToVideoPipeline"),
                       video=True))  # batched CFG in one call
for _name, _pipelines, _video in (("kandinsky5", ("Kandinsky5T2VPipeline", "Kandinsky5I2VPipeline"), True),
                                  ("kandinsky5_image", ("Kandinsky5T2IPipeline",), False)):
    register_family(Family(_name, _pipelines, block_stacks=("visual_transformer_blocks",),
                           channels=ChannelLayout(dim=-1), video=_video,  # latents (B, F, H, W, C)
                           cfg_scales=("guidance_scale",),
                           context_free_branches=("cond", "uncond")))  # no cache_context: cond, then uncond
register_family(Family("hidream", ("HiDreamImagePipeline",), block_stacks=(),  # batched CFG in one call
                       timestep_scale=0.0,  # its transformer takes `timesteps`: the time is read from the scheduler
                       row_dims=(("prompt_embeds_llama3", 1), ("negative_prompt_embeds_llama3", 1))))
register_family(Family("sd3", ("StableDiffusion3Pipeline",)))
register_family(Family("ltx", ("LTXPipeline", "LTXImageToVideoPipeline"),
                       channels=ChannelLayout(dim=-1), video=True))  # packed (B, L, C)


_DIFFUSION_FORCING = ("diffusion forcing gives each latent frame its own noise level (a timestep per frame, the frames "
                      "stepping asynchronously), so a step of its loop is no single time t on one grid and a step's "
                      "cached output has no place to be reused: run it uncached, or use SkyReelsV2Pipeline")
_EDM = ("its sampler is EDM's (EDMEulerScheduler: Karras sigmas up to 80 and preconditioned model inputs), not flow "
        "matching with t in [0, 1], for which ertacache's grid, timestep adjustment and error model are defined: run "
        "it uncached")
_EDM2 = ("its scheduler keeps EDM's noise levels (Karras sigmas up to 80; the transformer is given sigma / (1 + sigma) "
         "and preconditioned inputs), not flow-matching times in [0, 1], for which ertacache's grid and timestep "
         "adjustment are defined: run it uncached")
_AUDIO_VIDEO = ("its transformer denoises the video and the audio latents in one call and returns both "
                "(AudioVisualModelOutput), where ertacache caches one output a call: run it uncached")
_SEGMENTS = ("one call denoises its video in segments (`segment_frame_length` frames each, a whole denoising loop per "
             "segment conditioned on the last one's frames), where ertacache calibrates and follows one loop a call: "
             "run it uncached")
REFUSED: dict[str, str] = {
    "SkyReelsV2DiffusionForcingPipeline": _DIFFUSION_FORCING,
    "SkyReelsV2DiffusionForcingImageToVideoPipeline": _DIFFUSION_FORCING,
    "SkyReelsV2DiffusionForcingVideoToVideoPipeline": _DIFFUSION_FORCING,
    "CosmosTextToWorldPipeline": _EDM,
    "CosmosVideoToWorldPipeline": _EDM,
    "Cosmos2TextToImagePipeline": _EDM2,
    "Cosmos2VideoToWorldPipeline": _EDM2,
    "WanAnimatePipeline": _SEGMENTS,
    **dict.fromkeys(("LTX2Pipeline", "LTX2ImageToVideoPipeline", "LTX2ConditionPipeline", "LTX2InContextPipeline",
                     "LTX2HDRPipeline", "LTX2DFRPipeline", "LTX2DFRTemporalRefinePipeline"), _AUDIO_VIDEO),
}
"""Pipeline classes refused before the first model call, with why: the method does not apply to their sampler."""


def check_truncation(pipe: Any, family: Family) -> None:
    """Refuse a call whose guidance truncation drops a branch part-way (:attr:`Family.truncation` below 1).

    Raises:
        ErtaCacheError: the ratio is below 1.
    """
    ratio = getattr(pipe, family.truncation, None) if family.truncation else None
    if isinstance(ratio, (int, float)) and ratio < 1:
        raise ErtaCacheError(f"{type(pipe).__name__}: cfg_truncation={ratio} drops the negative branch part-way "
                             "through the call; ertacache needs the same calls at every step: call with "
                             "cfg_truncation=1.0 (no truncation), or run uncached")


def transformers_of(pipe: Any, family: Family) -> list[Any]:
    """The pipeline's transformers that exist (Wan 2.1 has no ``transformer_2``)."""
    return [getattr(pipe, a) for a in family.transformers if getattr(pipe, a, None) is not None]


def guidance_that_counts(pipe: Any, family: Family, branches: tuple[str, ...]) -> set[str]:
    """The guidance arguments that change what the transformer computes or how its outputs combine: the CFG
    scales unless only the conditional branch runs, and the embedded guidance where the transformer embeds it.
    A guidance-distilled FLUX.1-dev counts ``guidance_scale``; FLUX.1-schnell (no embedding) without true CFG
    counts none."""
    counts = set(family.cfg_scales) if tuple(branches) != ("cond",) else set()
    if family.embedded_guidance and any(getattr(getattr(tf, "config", None), "guidance_embeds", False)
                                        for tf in transformers_of(pipe, family)):
        counts.add(family.embedded_guidance)
    return counts


def expert_switch_step(pipe: Any, family: Family, grid: Sequence[float]) -> int | None:
    """The step where Wan 2.2 hands over to ``transformer_2`` (the first ``t * 1000`` below
    ``boundary_ratio * num_train_timesteps``), or None for one transformer. ``grid``: t in [0, 1] per step."""
    ratio = getattr(getattr(pipe, "config", None), "boundary_ratio", None)
    if ratio is None or len(transformers_of(pipe, family)) < 2:
        return None
    boundary = ratio * getattr(pipe.scheduler.config, "num_train_timesteps", 1000)
    return next((i for i, t in enumerate(grid) if t * family.timestep_scale < boundary), None)


def pipeline_fingerprint(pipe: Any, family: Family) -> str:
    """One fingerprint over all of a pipeline's transformers (Wan 2.2 has two)."""
    from ...fingerprint import model_fingerprint

    return model_fingerprint(transformers_of(pipe, family))


def family_for_class(cls: type) -> Family | None:
    """The family of a pipeline class (it or a base class is registered), or None."""
    for base in cls.__mro__:
        for family in FAMILIES.values():
            if base.__name__ in family.pipelines:
                return family
    return None


class DetectedFamilyWarning(UserWarning):
    """A pipeline no family names is cached with what was detected from it (:func:`detect_family`)."""


_WARNED: set[str] = set()


def detect_family(pipe: Any) -> Family | None:
    """A family for a pipeline no registration names, or None where detection cannot decide.

    It needs one transformer (``pipe.transformer``; a second, as Wan 2.2's, cannot be told apart from a branch)
    and a scheduler that keeps its step (``step_index``) and its flow-matching ``sigmas``, from which each call's
    time is read (the ``timestep`` a pipeline passes has a scale of its own). The branches are the calls of a
    step: their ``cache_context`` names, else their order (``call``, ``call1``, ...); calibration refuses a
    pipeline whose number of calls changes from step to step. No block stack is known (``block_residual``
    reuse is refused), and rectification keeps the channels on axis 1.
    """
    import torch

    transformer = getattr(pipe, "transformer", None)
    scheduler = getattr(pipe, "scheduler", None)
    if not isinstance(transformer, torch.nn.Module) or getattr(pipe, "transformer_2", None) is not None:
        return None
    if not hasattr(scheduler, "sigmas") or not hasattr(scheduler, "step_index"):
        return None
    name = type(pipe).__name__
    return Family(f"detected:{name}", (name,), timestep_scale=0.0, default_context="call", block_stacks=())


def family_for(pipe: Any) -> Family:
    """The family of a pipeline instance (its class or any base class is registered), else a detected one
    (:func:`detect_family`, with one :class:`DetectedFamilyWarning` per pipeline class).

    Raises:
        ErtaCacheError: a pipeline whose sampler the method does not apply to (:data:`REFUSED`: diffusion forcing,
            EDM), saying why; an unknown pipeline that detection cannot decide, listing the supported ones and how
            to register one.
    """
    refused = next((REFUSED[c.__name__] for c in type(pipe).__mro__ if c.__name__ in REFUSED), None)
    if refused is not None:
        raise ErtaCacheError(f"{type(pipe).__name__} is not supported: {refused}")
    family = family_for_class(type(pipe))
    if family is not None:
        return family
    detected = detect_family(pipe)
    if detected is not None:
        if detected.name not in _WARNED:
            _WARNED.add(detected.name)
            warnings.warn(
                f"ertacache: {type(pipe).__name__} is not a registered family; detected one transformer and a "
                f"flow-matching scheduler ({type(pipe.scheduler).__name__}): each call's time is read from the "
                "scheduler and its branches from the calls of each step (cache_context names, else call order). "
                "Register the family for certainty: ertacache.integrations.diffusers.register_family(Family(...)) "
                "(docs/diffusers.md, 'A new family is one data entry').", DetectedFamilyWarning, stacklevel=3)
        return detected
    supported = sorted(p for f in FAMILIES.values() for p in f.pipelines)
    raise ErtaCacheError(
        f"no ertacache family for pipeline {type(pipe).__name__}; supported: {', '.join(supported)}. Register one "
        "with ertacache.integrations.diffusers.register_family(Family(name, pipelines=(...), ...)) "
        "(docs/diffusers.md, 'A new family is one data entry')."
    )

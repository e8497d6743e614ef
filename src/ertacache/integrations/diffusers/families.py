"""Per-family facts as data: where the transformers and their block stacks are, what they are given.

Adding a family is one :func:`register_family` call; no model code is copied.
"""

from __future__ import annotations

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
            (FLUX passes sigma itself: 1; the others pass ``1000 * sigma``).
        default_context: the branch name used when the pipeline sets no
            ``cache_context`` (SD3 batches both CFG branches in one call).
        block_stacks: attributes of the transformer holding its block lists, in the
            order they run; ``block_residual`` reuse caches ``h_out - h_in`` across them.
            (diffusers' hooks know these attribute names as an unordered set; the first
            and the last block of the stack need the order.)
        channels: where the output's channels are (per-channel rectification).
        video: the pipeline returns ``frames`` (written as MP4 by the CLI), not ``images``.
    """

    name: str
    pipelines: tuple[str, ...]
    transformers: tuple[str, ...] = ("transformer",)
    timestep_scale: float = 1000.0
    default_context: str = "cond_uncond"
    block_stacks: tuple[str, ...] = ("transformer_blocks",)
    channels: ChannelLayout = ChannelLayout()
    video: bool = False


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Register (or replace) a family; returns it."""
    FAMILIES[family.name] = family
    return family


register_family(Family("flux", ("FluxPipeline", "FluxImg2ImgPipeline"), timestep_scale=1.0,
                       block_stacks=("transformer_blocks", "single_transformer_blocks"),
                       channels=ChannelLayout(dim=-1, group=4)))  # packed 2x2 patches, channel-major
register_family(Family("wan", ("WanPipeline", "WanImageToVideoPipeline"), ("transformer", "transformer_2"),
                       block_stacks=("blocks",), video=True))
register_family(Family("cogvideox", ("CogVideoXPipeline",), channels=ChannelLayout(dim=2),  # (B, F, C, H, W)
                       video=True))
register_family(Family("hunyuan_video", ("HunyuanVideoPipeline",),
                       block_stacks=("transformer_blocks", "single_transformer_blocks"), video=True))
register_family(Family("sd3", ("StableDiffusion3Pipeline",)))
register_family(Family("ltx", ("LTXPipeline",), channels=ChannelLayout(dim=-1), video=True))  # packed (B, L, C)


def transformers_of(pipe: Any, family: Family) -> list[Any]:
    """The pipeline's transformers that exist (Wan 2.1 has no ``transformer_2``)."""
    return [getattr(pipe, a) for a in family.transformers if getattr(pipe, a, None) is not None]


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


def family_for(pipe: Any) -> Family:
    """The family of a pipeline instance (its class or any base class is registered).

    Raises:
        ErtaCacheError: an unknown pipeline, listing the supported ones and how to register one.
    """
    family = family_for_class(type(pipe))
    if family is not None:
        return family
    supported = sorted(p for f in FAMILIES.values() for p in f.pipelines)
    raise ErtaCacheError(
        f"no ertacache family for pipeline {type(pipe).__name__}; supported: {', '.join(supported)}. Register one "
        "with ertacache.integrations.diffusers.register_family(Family(name, pipelines=(...), ...)) "
        "(docs/diffusers.md, 'A new family is one data entry')."
    )

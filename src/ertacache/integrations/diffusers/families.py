"""Per-family facts as data: where the transformer is, what it is given, how branches are named.

Adding a family is one :func:`register_family` call; no model code is copied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ...errors import ErtaCacheError


@dataclass(frozen=True)
class Family:
    """How one diffusers pipeline family calls its transformer.

    Attributes:
        name: short name, e.g. ``"flux"``.
        pipelines: pipeline class names of the family.
        transformers: pipeline attributes holding transformers; each gets its own
            cache (Wan 2.2 has ``transformer`` and ``transformer_2``).
        timestep_scale: the transformer's ``timestep`` argument is ``t * timestep_scale``
            (FLUX passes sigma itself: 1; the others pass ``1000 * sigma``).
        default_context: the branch name used when the pipeline sets no
            ``cache_context`` (SD3 batches both CFG branches in one call).
        grid_argument: how an explicit grid goes in: the pipeline's ``sigmas=`` or
            ``timesteps=`` argument, or ``"scheduler"`` when it has neither.
        output: what the transformer predicts relative to the sampler's latent:
            ``velocity`` (flow matching) or ``v_prediction`` (CogVideoX, DDIM family).
        hidden_states_is_latent: the ``hidden_states`` argument is the sampler's
            latent itself (needed by ``latent_residual`` reuse).
    """

    name: str
    pipelines: tuple[str, ...]
    transformers: tuple[str, ...] = ("transformer",)
    timestep_scale: float = 1000.0
    default_context: str = "cond_uncond"
    grid_argument: Literal["sigmas", "timesteps", "scheduler"] = "sigmas"
    output: Literal["velocity", "v_prediction"] = "velocity"
    hidden_states_is_latent: bool = True


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Register (or replace) a family; returns it."""
    FAMILIES[family.name] = family
    return family


register_family(Family("flux", ("FluxPipeline", "FluxImg2ImgPipeline"), timestep_scale=1.0))
register_family(Family("wan", ("WanPipeline", "WanImageToVideoPipeline"), ("transformer", "transformer_2"),
                       grid_argument="scheduler", hidden_states_is_latent=False))
register_family(Family("cogvideox", ("CogVideoXPipeline",), grid_argument="timesteps", output="v_prediction"))
register_family(Family("hunyuan_video", ("HunyuanVideoPipeline",)))
register_family(Family("sd3", ("StableDiffusion3Pipeline",)))
register_family(Family("ltx", ("LTXPipeline",), grid_argument="timesteps"))


def transformers_of(pipe: Any, family: Family) -> list[Any]:
    """The pipeline's transformers that exist (Wan 2.1 has no ``transformer_2``)."""
    return [getattr(pipe, a) for a in family.transformers if getattr(pipe, a, None) is not None]


def pipeline_fingerprint(pipe: Any, family: Family) -> str:
    """One fingerprint over all of a pipeline's transformers (Wan 2.2 has two)."""
    import hashlib

    from ...fingerprint import model_fingerprint

    prints = [model_fingerprint(m) for m in transformers_of(pipe, family)]
    return prints[0] if len(prints) == 1 else hashlib.sha256("|".join(prints).encode()).hexdigest()[:16]


def family_for(pipe: Any) -> Family:
    """The family of a pipeline instance (its class or any base class is registered).

    Raises:
        ErtaCacheError: an unknown pipeline, listing the supported ones and how to register one.
    """
    name = type(pipe).__name__
    for cls in type(pipe).__mro__:
        for family in FAMILIES.values():
            if cls.__name__ in family.pipelines:
                return family
    supported = sorted(p for f in FAMILIES.values() for p in f.pipelines)
    raise ErtaCacheError(
        f"no ertacache family for pipeline {name}; supported: {', '.join(supported)}. Register one with "
        "ertacache.integrations.diffusers.register_family(Family(name, pipelines=(...), ...)) (README)."
    )

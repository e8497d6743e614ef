"""Where a transformer call's pieces are: its ``timestep``, ``hidden_states``, output, and block stack.

Small public helpers the hooks share. A block's output layout (where its hidden and
encoder states are) comes from diffusers' own ``TransformerBlockRegistry`` where that
names both positions (FLUX, FLUX.2, CogVideoX, HunyuanVideo, Mochi, ... blocks), and from
:data:`BLOCK_OUTPUTS` for the blocks it does not know or leaves ambiguous (a block that
returns one tensor: Wan, LTX; SD3's joint block); a new block type is one
:func:`register_block` call, which wins over diffusers' entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import torch
from torch import Tensor

from ...errors import ErtaCacheError
from .families import Family


@dataclass(frozen=True)
class BlockOutput:
    """How a block returns its states: a tensor (``hidden=None``), or a tuple with these positions."""

    hidden: int | None = None
    encoder: int | None = None

    def hidden_of(self, out: Any) -> Tensor:
        return out if self.hidden is None else out[self.hidden]

    def pack(self, hidden: Tensor, encoder: Tensor | None) -> Any:
        if self.hidden is None:
            return hidden
        items: list[Any] = [None, None]
        items[self.hidden] = hidden
        if self.encoder is not None:
            items[self.encoder] = encoder
        return tuple(items[: max(self.hidden, self.encoder or 0) + 1])


BLOCK_OUTPUTS: dict[str, BlockOutput] = {}


def register_block(class_name: str, output: BlockOutput) -> None:
    """Register how blocks of class ``class_name`` return their hidden (and encoder) states."""
    BLOCK_OUTPUTS[class_name] = output


register_block("JointTransformerBlock", BlockOutput(hidden=1, encoder=0))  # SD3; not in diffusers' registry
register_block("HunyuanVideo15TransformerBlock", BlockOutput(hidden=0, encoder=1))
for _name in ("WanTransformerBlock", "SkyReelsV2TransformerBlock", "LTXVideoTransformerBlock",
              "SanaTransformerBlock", "SanaVideoTransformerBlock", "Kandinsky5TransformerDecoderBlock"):  # one tensor
    register_block(_name, BlockOutput())


def diffusers_block_output(block_class: type) -> BlockOutput | None:
    """The layout diffusers' ``TransformerBlockRegistry`` gives ``block_class``, where it names both the hidden and
    the encoder states' positions in a returned tuple; None where it does not know the class, names one position
    only (a tensor or a tuple: ambiguous), or this diffusers has no such registry."""
    try:
        from diffusers.hooks._helpers import TransformerBlockRegistry
    except ImportError:
        return None
    try:
        meta = TransformerBlockRegistry.get(block_class)
    except ValueError:
        return None
    hidden, encoder = meta.return_hidden_states_index, meta.return_encoder_hidden_states_index
    if not isinstance(hidden, int) or not isinstance(encoder, int):
        return None
    return BlockOutput(hidden=hidden, encoder=encoder)


def block_output(block: torch.nn.Module) -> BlockOutput | None:
    """How ``block`` returns its states: :data:`BLOCK_OUTPUTS` by class name, else diffusers' registry, else None."""
    name = type(block).__name__
    if name in BLOCK_OUTPUTS:
        return BLOCK_OUTPUTS[name]
    return diffusers_block_output(type(block))


def timestep_of(kwargs: dict[str, Any], family: Family) -> float:
    """The call's time t in [0, 1] (t = 1 is noise), from its ``timestep`` keyword.

    Per-token timesteps (Wan 2.2 TI2V, ``expand_timesteps``: shape ``(B, tokens)``, the
    conditioning frame's tokens at 0) are read as the noise tokens' time, their maximum.
    Reading a device tensor syncs with the device: inference finds the step from the
    scheduler instead (:meth:`~.hooks.PipelineRun.index_step`).
    """
    ts = kwargs.get("timestep")
    if ts is None:
        raise ErtaCacheError("the transformer was called without a `timestep` keyword; ertacache needs it to find "
                             "the step")
    return float(torch.as_tensor(ts).detach().flatten().max()) / family.timestep_scale


def hidden_argument(args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """The transformer call's ``hidden_states`` as passed (keyword or first positional), or None."""
    return kwargs.get("hidden_states", args[0] if args else None)


def is_rows(x: Any) -> TypeGuard[Sequence[Tensor]]:
    """Whether ``x`` is a list (or tuple) of one tensor per row, as Z-Image passes its latents and embeddings."""
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(e, Tensor) for e in x)


def pipeline_output(out: Any) -> Any:
    """What a pipeline call returned: its ``frames`` (video), ``images``, or ``image`` (Kandinsky 5's images)."""
    for name in ("frames", "images", "image"):
        if hasattr(out, name):
            return getattr(out, name)
    raise ErtaCacheError(f"{type(out).__name__} has none of frames, images or image; report the pipeline class")


def per_row(value: Any, rows: int, dim: int = 0) -> bool:
    """Whether a call argument has one entry per row of a call of ``rows`` rows: a tensor whose dimension ``dim``
    has that size, or a list of that length."""
    return (isinstance(value, Tensor) and value.ndim > dim and value.shape[dim] == rows) or (
        isinstance(value, list) and len(value) == rows)


def take_rows(value: Tensor | list[Any], order: Sequence[int], dim: int = 0) -> Any:
    """Rows ``order`` of a per-row argument (:func:`per_row`), in that order (a row may repeat)."""
    if isinstance(value, Tensor):
        return value.index_select(dim, torch.tensor(list(order), dtype=torch.long, device=value.device))
    return [value[i] for i in order]


PROMPT_EMBEDS = ("prompt_embeds", "prompt_embeds_qwen", "prompt_embeds_t5")
"""The call arguments whose rows are the calls' prompts when no prompt strings are given (Kandinsky 5's Qwen and
HiDream's T5 embeddings beside the others' ``prompt_embeds``), in this order."""


def embeds_rows(kwargs: dict[str, Any]) -> int | None:
    """The rows of a call given prompt embeddings (:data:`PROMPT_EMBEDS`: a tensor's first dimension, or a list of
    one tensor per row), or None where it has none."""
    for name in PROMPT_EMBEDS:
        embeds = kwargs.get(name)
        if isinstance(embeds, Tensor) and embeds.ndim > 0:
            return int(embeds.shape[0])
        if is_rows(embeds):
            return len(embeds)
    return None


def hidden_states_of(args: Sequence[Any], kwargs: dict[str, Any]) -> Tensor:
    """The ``hidden_states`` argument (keyword or first positional); a list of one tensor per row (Z-Image's
    ``x``) is stacked into a batch.

    Raises:
        ErtaCacheError: no such argument, or rows of different shapes.
    """
    x = hidden_argument(args, kwargs)
    if is_rows(x):
        shapes = sorted({tuple(e.shape) for e in x})
        if len(shapes) > 1:
            raise ErtaCacheError(f"the transformer was called with rows of different shapes ({shapes}); ertacache "
                                 "caches a batch of one shape")
        return torch.stack(list(x))
    if not isinstance(x, Tensor):
        raise ErtaCacheError("the transformer was called without `hidden_states`")
    return x


def encoder_states_of(args: Sequence[Any], kwargs: dict[str, Any]) -> Tensor | None:
    """The ``encoder_hidden_states`` argument of a block (keyword or second positional), or None."""
    e = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    return e if isinstance(e, Tensor) else None


def sample_of(output: Any) -> Tensor:
    """The predicted tensor of a transformer output (a tensor, a tuple, or an output dataclass); a list of one
    tensor per row (Z-Image) stacked into a batch."""
    if not isinstance(output, Tensor):
        output = output[0] if isinstance(output, tuple) else output.sample
    return torch.stack(list(output)) if is_rows(output) else output


def output_like(args: Sequence[Any], kwargs: dict[str, Any], sample: Tensor) -> Any:
    """An output of the form the caller asked for (``return_dict``) holding ``sample``: a list of rows where the
    call's ``hidden_states`` was one."""
    rows: Any = list(sample.unbind(0)) if is_rows(hidden_argument(args, kwargs)) else sample
    if kwargs.get("return_dict", True):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=rows)
    return (rows,)


def latent_of(hidden_states: Tensor, shape: Sequence[int]) -> Tensor:
    """The sampler's latent inside ``hidden_states`` (output shape ``shape``).

    It is ``hidden_states`` itself, or its first channels where a pipeline
    concatenates conditioning channels: after the latent's on dimension 1 (Wan image-to-video), or on the last
    dimension where channels are last (FLUX.1 Fill's packed tokens ``(B, L, C)``, Kandinsky 5's ``(B, F, H, W, C)``).

    Raises:
        ErtaCacheError: no such part.
    """
    if tuple(hidden_states.shape) == tuple(shape):
        return hidden_states
    if hidden_states.ndim == len(shape) and hidden_states.shape[1] > shape[1] and \
            tuple(hidden_states.shape[2:]) == tuple(shape[2:]):
        return hidden_states[:, : shape[1]]
    if hidden_states.ndim == len(shape) and hidden_states.shape[-1] > shape[-1] and \
            tuple(hidden_states.shape[:-1]) == tuple(shape[:-1]):
        return hidden_states[..., : shape[-1]]
    raise ErtaCacheError(f"latent_residual reuse needs the latent in hidden_states {tuple(hidden_states.shape)} "
                         f"to match the output {tuple(shape)}; use reuse='velocity'")


def block_stack(transformer: Any, family: Family) -> list[tuple[torch.nn.Module, BlockOutput]]:
    """The transformer's blocks in running order, each with its output layout.

    Raises:
        ErtaCacheError: the family names no stack the transformer has, or a block class
            has no registered layout (:func:`register_block`).
    """
    blocks: list[tuple[torch.nn.Module, BlockOutput]] = []
    for attr in family.block_stacks:
        for block in getattr(transformer, attr, None) or []:
            output = block_output(block)
            if output is None:
                raise ErtaCacheError(f"block_residual reuse: no output layout for block class {type(block).__name__} "
                                     "(neither ertacache's nor diffusers' TransformerBlockRegistry has one); register "
                                     "one with ertacache.integrations.diffusers.adapters.register_block, or use "
                                     "reuse='velocity'")
            blocks.append((block, output))
    if not blocks:
        raise ErtaCacheError(f"block_residual reuse: {type(transformer).__name__} has no blocks under "
                             f"{family.block_stacks}; use reuse='velocity'")
    return blocks

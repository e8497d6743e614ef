"""The fenced code blocks of README.md and docs/*.md, and a tiny FLUX text-to-image pipeline for hub ids.

Used by tests/test_docs.py. A block is ``(path, line, language, text)``; ``commands`` splits a
shell block into argument lists (continuations joined, ``$`` prompts honoured, output lines
and comments dropped).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(\s*)```(\w*)\s*$")


def blocks(path: Path) -> list[tuple[Path, int, str, str]]:
    """Every fenced block of a Markdown file, its first line number (1-based) and language."""
    out: list[tuple[Path, int, str, str]] = []
    lines = path.read_text().splitlines()
    k = 0
    while k < len(lines):
        m = FENCE.match(lines[k])
        if not m:
            k += 1
            continue
        indent, lang, start = len(m.group(1)), m.group(2), k + 1
        k += 1
        body = []
        while k < len(lines) and not FENCE.match(lines[k]):
            body.append(lines[k][indent:] if lines[k][:indent].strip() == "" else lines[k])
            k += 1
        out.append((path, start + 1, lang, "\n".join(body)))
        k += 1
    return out


def commands(text: str) -> list[list[str]]:
    """The command lines of a shell block as argument lists."""
    lines = text.splitlines()
    prompted = any(line.startswith("$ ") for line in lines)
    joined: list[str] = []
    carry = ""
    for line in lines:
        if prompted and not carry:
            if not line.startswith("$ "):
                continue  # the output of the command above
            line = line[2:]
        if line.rstrip().endswith("\\"):
            carry += line.rstrip()[:-1] + " "
            continue
        joined.append(carry + line)
        carry = ""
    out = []
    for line in joined:
        args = shlex.split(line, comments=True)
        if args:
            out.append(args)
    return out


def tiny_flux_text_pipeline(torch_dtype: Any = None) -> Any:
    """A complete ``FluxPipeline`` (CLIP and T5 text encoders with word-level tokenizers, a guidance-distilled
    transformer, a 32x VAE) with random weights: what a hub id of FLUX.1-dev stands for in the docs' examples."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = "a the red fox in fresh snow lighthouse at dusk bowl of ramen top view city street rain sailing boat " \
            "on calm lake cat"

    def tokenizer(max_length: int) -> Any:
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.train_from_iterator([words], trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "</s>"]))
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                                       model_max_length=max_length)

    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=8, projection_dim=16,
                                        eos_token_id=2))
    t5 = T5EncoderModel(T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                                 relative_attention_num_buckets=8))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    levels = 6  # vae_scale_factor 32: 1024 x 1024 is 16 x 16 tokens
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(4,) * levels,
                        down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels,
                        layers_per_block=1, norm_num_groups=1, scaling_factor=1.0, shift_factor=0.0)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=clip,
                        tokenizer=tokenizer(8), text_encoder_2=t5, tokenizer_2=tokenizer(16), transformer=transformer)
    # FLUX.1-dev's default size is 1024 x 1024 (default_sample_size 128 at its VAE's factor 8); at this VAE's 32 the
    # pipeline's default would be 4096 x 4096
    pipe.default_sample_size = 1024 // pipe.vae_scale_factor
    return pipe if torch_dtype is None else pipe.to(torch_dtype)

"""Train the bundled video model (moving digits, rectified flow, classifier-free guidance).

The committed weights come from exactly::

    python -m training.train_moving_digits --steps 20000 --minutes 44.0 --batch-size 16 \\
        --lr 0.0015 --ema 0.995 --label-dropout 0.1 --seed 0 --threads 1 --save-every 100 --compile --heads 2 \\
        --out src/ertacache/weights/moving_digits_wan.safetensors

(10,735 steps in the 44-minute budget, one thread on a 2-core CPU; the cosine learning
rate follows the larger of step and wall-clock progress, so it decays fully when time
runs out.) ``--patch-size``, ``--num-layers`` and ``--heads`` try other architectures in
the same budget (docs/bundled_models.md's table of what was tried).

The loss, label dropout, EMA and resuming are those of the image model
(:func:`training.train_digits.fit`); each batch is new clips of random digits
moving with random velocities (:func:`~ertacache.models.moving_digits.moving_digits`).
"""

from __future__ import annotations

import argparse

import torch

from ertacache.models.moving_digits import (
    CANVAS,
    FRAMES,
    TRANSFORMER_CONFIG,
    MovingDigitsWan,
    digit_sprites,
    moving_digits,
)

from .train_digits import command_line, fit


def architecture(patch_size: str | None, num_layers: int | None, heads: int | None = None) -> dict:
    """``TRANSFORMER_CONFIG`` with the ``--patch-size T,H,W``, ``--num-layers`` and ``--heads`` overrides.

    ``--heads`` keeps the width (``num_attention_heads * attention_head_dim``) and splits it
    into that many heads; a wider head gives Wan's 3D rotary embedding more frequencies
    per axis (``attention_head_dim // 6`` pairs for height and for width).

    Raises:
        SystemExit: a patch size that is not three positive integers dividing the clip
            ``(8, 32, 32)``, fewer than one block, or a head count that does not divide
            the width into heads of a multiple of 6.
    """
    config = dict(TRANSFORMER_CONFIG)
    if patch_size is not None:
        try:
            patch = tuple(int(p) for p in patch_size.split(","))
        except ValueError:
            patch = ()
        if len(patch) != 3 or any(p < 1 or n % p for p, n in zip(patch, (FRAMES, CANVAS, CANVAS))):
            raise SystemExit(f"--patch-size must be T,H,W dividing the clip ({FRAMES}, {CANVAS}, {CANVAS}); "
                             f"got {patch_size!r}")
        config["patch_size"] = patch
    if num_layers is not None:
        if num_layers < 1:
            raise SystemExit(f"--num-layers must be at least 1; got {num_layers}")
        config["num_layers"] = num_layers
    if heads is not None:
        width = config["num_attention_heads"] * config["attention_head_dim"]
        if heads < 1 or width % heads or (width // heads) % 6:
            raise SystemExit(f"--heads must split the width {width} into heads of a multiple of 6 channels "
                             f"(Wan's rotary embedding needs it); got {heads}")
        config["num_attention_heads"], config["attention_head_dim"] = heads, width // heads
    return config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget; stops early there")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--compile", action="store_true", help="train through torch.compile (about 25%% faster on CPU)")
    default_patch = ",".join(map(str, TRANSFORMER_CONFIG["patch_size"]))
    p.add_argument("--patch-size", default=None, metavar="T,H,W",
                   help=f"override the patch size (default {default_patch}); recorded in the weights' JSON")
    p.add_argument("--num-layers", type=int, default=None,
                   help=f"override the number of blocks (default {TRANSFORMER_CONFIG['num_layers']})")
    p.add_argument("--heads", type=int, default=None,
                   help=f"override the number of attention heads at the same width "
                        f"(default {TRANSFORMER_CONFIG['num_attention_heads']})")
    p.add_argument("--out", default="src/ertacache/weights/moving_digits_wan.safetensors")
    args = p.parse_args(argv)
    transformer_config = architecture(args.patch_size, args.num_layers, args.heads)
    torch.manual_seed(args.seed)
    sprites, labels = digit_sprites()

    def batch(gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, sprites.shape[0], (n,), generator=gen)
        return moving_digits(sprites[idx], gen), labels[idx].clone()

    command = command_line("train_moving_digits", args)
    config = {**transformer_config, "patch_size": list(transformer_config["patch_size"])}
    fit(MovingDigitsWan(transformer_config), batch, args, {
        "transformer_config": config, "command": command,
        "data": "sklearn.datasets.load_digits, bilinear 8x8 -> 16x16 sprites moving 1-3 px/frame and bouncing on a "
                "32x32 canvas, 8 frames, in [-1, 1]",
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

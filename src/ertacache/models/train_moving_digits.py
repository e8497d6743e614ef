"""Train the bundled video model (moving digits, rectified flow, classifier-free guidance).

The committed weights come from exactly::

    python -m ertacache.models.train_moving_digits --steps 8000 --minutes 44.0 --batch-size 32 \\
        --lr 0.0015 --ema 0.995 --label-dropout 0.1 --seed 0 --threads 2 --save-every 100 --compile \\
        --out src/ertacache/weights/moving_digits_wan.safetensors

(4769 steps in the 44-minute budget on 2 CPU cores; the cosine learning rate follows
the larger of step and wall-clock progress, so it decays fully when time runs out.)

The loss, label dropout, EMA and resuming are those of the image model
(:func:`ertacache.models.train_digits.fit`); each batch is new clips of random digits
moving with random velocities (:func:`~ertacache.models.moving_digits.moving_digits`).
"""

from __future__ import annotations

import argparse

import torch

from .moving_digits import TRANSFORMER_CONFIG, MovingDigitsWan, digit_sprites, moving_digits
from .train_digits import fit


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
    p.add_argument("--out", default="src/ertacache/weights/moving_digits_wan.safetensors")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    sprites, labels = digit_sprites()

    def batch(gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, sprites.shape[0], (n,), generator=gen)
        return moving_digits(sprites[idx], gen), labels[idx].clone()

    command = ("python -m ertacache.models.train_moving_digits "
               + " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
                          for k, v in vars(args).items() if k != "out" and v is not None and v is not False)
               + f" --out {args.out}")
    config = {**TRANSFORMER_CONFIG, "patch_size": list(TRANSFORMER_CONFIG["patch_size"])}
    fit(MovingDigitsWan(TRANSFORMER_CONFIG), batch, args, {
        "transformer_config": config, "command": command,
        "data": "sklearn.datasets.load_digits, bilinear 8x8 -> 16x16 sprites moving 1-3 px/frame and bouncing on a "
                "32x32 canvas, 8 frames, in [-1, 1]",
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

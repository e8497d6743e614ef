"""Train the bundled photo video model (a camera panning across photographs; rectified flow, CFG).

The committed weights come from the command recorded in ``moving_photos_wan.json`` beside
them (its ``command`` field), run with one thread on a 2-core CPU inside ``--minutes``.
The loss, label dropout, EMA, wall-clock budget and resuming are those of the digits
model (:func:`training.train_digits.fit`); each batch is new clips
(:func:`~ertacache.models.moving_photos.panning_clips`), the label the photograph.
"""

from __future__ import annotations

import argparse

import torch

from ertacache.models.moving_photos import TRANSFORMER_CONFIG, MovingPhotosWan, panning_clips
from ertacache.models.photos import NUM_CLASSES, photographs

from .train_digits import command_line, fit


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget; stops early there")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--compile", action="store_true", help="train through torch.compile")
    p.add_argument("--num-layers", type=int, default=None,
                   help=f"override the number of blocks (default {TRANSFORMER_CONFIG['num_layers']})")
    p.add_argument("--speed", type=float, nargs=2, default=[1.0, 3.0], metavar=("LO", "HI"),
                   help="pan speed range in px a frame (default 1 3)")
    p.add_argument("--out", default="src/ertacache/weights/moving_photos_wan.safetensors")
    args = p.parse_args(argv)
    config = dict(TRANSFORMER_CONFIG)
    if args.num_layers is not None:
        if args.num_layers < 1:
            raise SystemExit(f"--num-layers must be at least 1; got {args.num_layers}")
        config["num_layers"] = args.num_layers
    lo, hi = args.speed
    if not 0 <= lo <= hi <= 8:
        raise SystemExit(f"--speed must be two speeds in px a frame with 0 <= LO <= HI <= 8; got {lo} {hi}")
    photographs()  # fail before the first step when scikit-image is missing

    def batch(gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
        return panning_clips(labels, gen, (lo, hi)), labels

    command = command_line("train_moving_photos", args)
    fit(MovingPhotosWan(config), batch, args, {
        "transformer_config": {**config, "patch_size": list(config["patch_size"])}, "command": command,
        "data": f"8-frame 32x32 RGB clips of a window panning {lo:g}-{hi:g} px a frame (random direction) across 16 "
                "photographs of scikit-image and scikit-learn at short side 256, 128 or 64 px, in [-1, 1]; "
                "the label is the photograph",
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

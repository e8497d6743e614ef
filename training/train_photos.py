"""Train the bundled photo model (crops of photographs, rectified flow, classifier-free guidance).

The committed weights come from the command recorded in ``photos_flux.json`` beside them
(its ``command`` field), run with one thread on a 2-core CPU inside ``--minutes``.
``--width``, ``--num-layers`` and ``--num-single-layers`` try other architectures in the same
budget (docs/photos.md tabulates what was tried and the regime each reached).

The loss, label dropout, EMA, wall-clock budget and resuming are those of the digits model
(:func:`training.train_digits.fit`); each batch is new random crops of the
photographs (:func:`~ertacache.models.photos.photo_crops`), the label the photograph.
"""

from __future__ import annotations

import argparse

import torch

from ertacache.models.photos import CROP_SIDES, NUM_CLASSES, TRANSFORMER_CONFIG, PhotosFlux, photo_crops, photographs

from .train_digits import command_line, fit


def architecture(width: int | None, num_layers: int | None, num_single_layers: int | None) -> dict:
    """``TRANSFORMER_CONFIG`` with ``--width`` (heads of 32 channels), ``--num-layers``, ``--num-single-layers``.

    Raises:
        SystemExit: a width that is not a positive multiple of 32, or a negative block count.
    """
    config = dict(TRANSFORMER_CONFIG)
    if width is not None:
        if width < 32 or width % 32:
            raise SystemExit(f"--width must be a positive multiple of 32 (heads of 32 channels); got {width}")
        config["num_attention_heads"] = width // 32
    for key, value in (("num_layers", num_layers), ("num_single_layers", num_single_layers)):
        if value is not None:
            if value < 0:
                raise SystemExit(f"--{key.replace('_', '-')} must be at least 0; got {value}")
            config[key] = value
    return config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget; stops early there")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--compile", action="store_true", help="train through torch.compile")
    p.add_argument("--width", type=int, default=None,
                   help=f"override the width (default {32 * TRANSFORMER_CONFIG['num_attention_heads']})")
    p.add_argument("--num-layers", type=int, default=None,
                   help=f"double-stream blocks (default {TRANSFORMER_CONFIG['num_layers']})")
    p.add_argument("--num-single-layers", type=int, default=None,
                   help=f"single-stream blocks (default {TRANSFORMER_CONFIG['num_single_layers']})")
    p.add_argument("--crop-sides", type=int, nargs=2, default=list(CROP_SIDES), metavar=("LO", "HI"),
                   help=f"window side range in px before resizing to 32 (default {CROP_SIDES[0]} {CROP_SIDES[1]}; "
                        "32 32 is full resolution, the most detail per crop)")
    p.add_argument("--out", default="src/ertacache/weights/photos_flux.safetensors")
    args = p.parse_args(argv)
    config = architecture(args.width, args.num_layers, args.num_single_layers)
    lo, hi = args.crop_sides
    if not 8 <= lo <= hi:
        raise SystemExit(f"--crop-sides must be two sides in px with 8 <= LO <= HI; got {lo} {hi}")
    photographs()  # fail before the first step when scikit-image is missing

    def batch(gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
        return photo_crops(labels, gen, sides=(lo, hi)), labels

    command = command_line("train_photos", args)
    fit(PhotosFlux(config), batch, args, {
        "transformer_config": {**config, "axes_dims_rope": list(config["axes_dims_rope"])}, "command": command,
        "data": f"random square crops (side {lo}-{hi} px, log-uniform; short side scaled to 256) and flips of 16 "
                "photographs of scikit-image and scikit-learn, resized to 32x32 RGB (antialiased), in [-1, 1]; "
                "the label is the photograph",
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

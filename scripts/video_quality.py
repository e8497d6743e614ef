"""How well the bundled video model's samples show the requested digit moving smoothly.

    python scripts/video_quality.py [--weights W.safetensors] [--clips 40] [--guidance-scale 4]

Samples ``--clips`` clips (labels 0-9 in turn, seeds 900...) with Wan's sampler (T = 50,
shift 5) and reads every frame back with :func:`ertacache.models.moving_digits.read_clips`
(the nearest training sprite to the window around the bright pixels' centre). Prints the
fraction of frames read as the requested digit, of clips whose majority reading is the
requested digit, and of frame-to-frame moves over 4 px (the training clips move 1-3 px a
frame). The same reader on real clips of 200 held-out sprites comes first, as its ceiling.
"""

from __future__ import annotations

import argparse

import torch

from ertacache import sample, seeded_noise
from ertacache.models.moving_digits import (
    LATENT_SHAPE,
    NULL_CLASS,
    clip_scores,
    digit_sprites,
    load_moving_digits_model,
    moving_digits,
)


def report(name: str, clips: torch.Tensor, labels: torch.Tensor) -> None:
    s = clip_scores(clips, labels)
    print(f"{name}: frames read as the label {s['frames']:.3f}, clips by majority {s['clips']:.3f}, "
          f"moves > 4 px {s['jumps']:.3f}, largest move {s['largest_move']:.1f} px")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--clips", type=int, default=40)
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    sprites, sprite_labels = digit_sprites()
    report("real clips (reader ceiling)", moving_digits(sprites[-200:], torch.Generator().manual_seed(5)),
           sprite_labels[-200:])
    model = load_moving_digits_model(args.weights)
    labels = torch.arange(args.clips) % 10
    noise = seeded_noise(range(900, 900 + args.clips), LATENT_SHAPE)
    x = sample(model, noise, labels, num_inference_steps=50, shift=5.0, guidance_scale=args.guidance_scale,
               null_cond=torch.full_like(labels, NULL_CLASS)).x
    report(f"samples (T = 50, shift 5, CFG {args.guidance_scale:g}, {args.clips} clips)", x, labels)


if __name__ == "__main__":
    main()

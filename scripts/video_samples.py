"""Samples of the bundled video model: an animated GIF and a frame strip, uncached and with a 2x policy.

    python scripts/video_samples.py [--policy P.safetensors] [--out docs]

Writes ``moving_digits.gif`` (digits 0-9, one clip each, uncached; with ``--policy``
a second row follows the policy) and ``moving_digits_frames.png`` (each clip's 8
frames side by side). Sampler: Wan's settings (T = 50, shift 5, CFG 4), seeds 900-909.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ertacache import Policy, sample, seeded_noise
from ertacache.models.moving_digits import LATENT_SHAPE, NULL_CLASS, SAMPLER, load_moving_digits_model


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--policy", default=None)
    parser.add_argument("--out", default="docs")
    args = parser.parse_args()
    from PIL import Image

    model = load_moving_digits_model()
    labels = torch.arange(10)
    noise = seeded_noise(range(900, 910), LATENT_SHAPE)
    kw = dict(num_inference_steps=int(SAMPLER["num_inference_steps"]), shift=SAMPLER["shift"],
              guidance_scale=SAMPLER["guidance_scale"], null_cond=torch.full_like(labels, NULL_CLASS))
    rows = [sample(model, noise, labels, **kw).x]
    if args.policy:
        policy = Policy.load(args.policy)
        kw.pop("num_inference_steps"), kw.pop("shift")
        rows.append(sample(model, noise, labels, policy=policy, **kw).x)
    clips = torch.stack(rows)  # (R, 10, 1, F, H, W)
    r, n, _, f, h, w = clips.shape
    pad = 2
    frames = []
    for k in range(f):
        canvas = torch.full((r * (h + pad) + pad, n * (w + pad) + pad), 255, dtype=torch.uint8)
        for i in range(r):
            for j in range(n):
                canvas[pad + i * (h + pad):pad + i * (h + pad) + h,
                       pad + j * (w + pad):pad + j * (w + pad) + w] = to_uint8(clips[i, j, 0, k])
        frames.append(Image.fromarray(canvas.numpy()).resize((canvas.shape[1] * 3, canvas.shape[0] * 3),
                                                            Image.NEAREST))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frames[0].save(out / "moving_digits.gif", save_all=True, append_images=frames[1:], duration=150, loop=0)
    strip = torch.full((n * (h + pad) + pad, f * (w + pad) + pad), 255, dtype=torch.uint8)
    for j in range(n):
        for k in range(f):
            strip[pad + j * (h + pad):pad + j * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = \
                to_uint8(clips[0, j, 0, k])
    Image.fromarray(strip.numpy()).resize((strip.shape[1] * 3, strip.shape[0] * 3), Image.NEAREST).save(
        out / "moving_digits_frames.png")
    print(f"wrote {out / 'moving_digits.gif'} and {out / 'moving_digits_frames.png'}")


if __name__ == "__main__":
    main()

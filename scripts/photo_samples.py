"""Samples of the photo models beside training data: a PNG grid (``photos``) or a GIF and a frame strip
(``moving-photos``), uncached, at the model's family sampler.

    python scripts/photo_samples.py --model photos --out docs/photos
    python scripts/photo_samples.py --model moving-photos --out docs/photos

``photos``: ``samples.png``, two rows of samples (one per photograph, seeds 900..) over two
rows of training crops of the same photographs, with :func:`~ertacache.models.photos.photo_scores`
printed. ``moving-photos``: ``moving_photos.gif`` (one clip per photograph, samples over
training clips) and ``moving_photos_frames.png`` (the first 8 samples' frames side by side).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ertacache import sample, seeded_noise
from ertacache.models.bundled import bundled_model


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``(..., 3, H, W)`` in [-1, 1] -> ``(..., H, W, 3)`` uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).movedim(-3, -1).numpy()


def tile(images: np.ndarray, cols: int, pad: int = 2) -> np.ndarray:
    """``(N, H, W, 3)`` -> one image of ``ceil(N / cols)`` rows, white gaps."""
    n, h, w, _ = images.shape
    rows = -(-n // cols)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = images[i]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="photos", choices=["photos", "moving-photos"])
    p.add_argument("--out", default="docs/photos")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    from PIL import Image

    torch.set_num_threads(args.threads)
    b = bundled_model(args.model)
    model = b.load(None)
    k = b.num_classes
    labels = torch.arange(k).repeat(1 if b.video else 2)
    noise = seeded_noise(range(900, 900 + labels.numel()), b.latent_shape)
    with torch.no_grad():
        x = sample(model, noise, labels, num_inference_steps=b.num_inference_steps, shift=b.shift,
                   guidance_scale=b.guidance_scale, null_cond=torch.full_like(labels, b.null_class)).x
    gen = torch.Generator().manual_seed(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not b.video:
        from ertacache.models.photos import photo_crops, photo_scores

        real = photo_crops(labels, gen)
        grid = tile(np.concatenate([to_uint8(x), to_uint8(real)]), k)
        Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(out / "samples.png")
        print(json.dumps(photo_scores(x, labels)))
        return
    from ertacache.models.moving_photos import panning_clips

    real = panning_clips(labels, gen)
    both = torch.cat([x, real])  # (2k, 3, F, H, W)
    frames = [tile(to_uint8(both[:, :, f]), k) for f in range(both.shape[2])]
    images = [Image.fromarray(f).resize((f.shape[1] * 3, f.shape[0] * 3), Image.NEAREST) for f in frames]
    images[0].save(out / "moving_photos.gif", save_all=True, append_images=images[1:], duration=150, loop=0)
    strip = tile(to_uint8(x[:8].movedim(2, 1).flatten(0, 1)), both.shape[2])
    Image.fromarray(strip).resize((strip.shape[1] * 3, strip.shape[0] * 3), Image.NEAREST).save(
        out / "moving_photos_frames.png")


if __name__ == "__main__":
    main()

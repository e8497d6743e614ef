"""``ertacache demo``: the whole method on the bundled digits model, offline, on a CPU.

1. Calibrate a policy for a target speedup on calibration classes and seeds.
2. On held-out seeds, sample uncached (``none``) and with uniform caching at the
   same NFE, the offline policy alone, + timestep adjustment, and + rectification
   (full ERTACache, ``ertacache``): the paper's Table 3 ablation.
3. Time the methods interleaved (median of repeats), score PSNR/SSIM against the
   uncached output of the same seed and class, and write ``results.json``,
   ``grid.png`` and ``policy.safetensors``.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._version import __version__
from ..bench import metrics
from ..bench.methods import RunSettings, ablation_ladder
from ..calibration import calibrate_with_variants
from ..core.config import CalibrationConfig
from ..core.euler import sample, seeded_noise
from ..fingerprint import model_fingerprint
from ..io import atomic_write_text
from ..models.bundled import labels_and_seeds
from ..policy import Policy


@dataclass(frozen=True)
class DemoSettings(RunSettings):
    """The demo's :class:`~ertacache.bench.methods.RunSettings` (defaults: the image model's, as ``make demo`` runs
    it), its one target and its seeds."""

    target_speedup: float = 2.0
    calibration_seed_base: int = 0
    heldout_seed_base: int = 10_000
    candidates: tuple[str, ...] = ("search", "uniform")
    """The candidate sources calibration lets compete: the schedule search and the uniform set (no lambda sweep,
    so that ``make demo`` fits in 10 minutes; ``ertacache calibrate`` lets Algorithm 2 compete too)."""

    @classmethod
    def for_model(cls, name: str) -> DemoSettings:
        """A bundled model's family sampler; the video model with 1 calibration and 1 held-out clip per class."""
        from ..models.bundled import bundled_model

        b = bundled_model(name)
        base = cls.sampler_of(b)
        if b.video:
            return cls(**base, calibration_per_class=1, heldout_per_class=1, repeats=2)
        return cls(**base)


def run_methods(model: Any, methods: dict[str, Policy | None], noise: Tensor, labels: Tensor,
                settings: DemoSettings, fingerprint: str | None) -> tuple[dict[str, Tensor], dict[str, list[float]],
                                                                            dict[str, int]]:
    """Sample every method ``settings.repeats`` times, interleaved; return outputs, times and NFE."""
    from ..models.bundled import bundled_model

    null = torch.full_like(labels, bundled_model(settings.model).null_class)
    outputs: dict[str, Tensor] = {}
    times: dict[str, list[float]] = {name: [] for name in methods}
    nfe: dict[str, int] = {}
    for _ in range(settings.repeats):
        for name, policy in methods.items():
            start = time.perf_counter()
            out = sample(model, noise, labels, num_inference_steps=settings.num_inference_steps,
                         shift=settings.shift, guidance_scale=settings.guidance_scale, null_cond=null,
                         policy=policy, model_fingerprint=fingerprint)
            times[name].append(time.perf_counter() - start)
            outputs[name], nfe[name] = out.x, out.stats.nfe["cond"]
    return outputs, times, nfe


def score(outputs: dict[str, Tensor], times: dict[str, list[float]], nfe: dict[str, int]) -> list[dict[str, Any]]:
    """One row per method: NFE, median seconds, speedup against ``none``, PSNR and SSIM against ``none``."""
    ref = outputs["none"]
    base = statistics.median(times["none"])
    rows = []
    for name, x in outputs.items():
        seconds = statistics.median(times[name])
        p = metrics.psnr(x, ref)
        last = metrics.psnr_last_frame(x, ref)
        rows.append({
            "method": name,
            "nfe": nfe[name],
            "seconds": round(seconds, 4),
            "speedup": round(base / seconds, 3),
            "psnr": None if math.isinf(p) else round(p, 3),
            "ssim": round(metrics.ssim(x, ref), 5),
            **({} if last is None else {"psnr_last_frame": None if math.isinf(last) else round(last, 3)}),
        })
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of the rows."""
    video = "psnr_last_frame" in rows[0]
    head = "| method | NFE | seconds | speedup | PSNR (dB) | SSIM |" + (" last-frame PSNR |" if video else "")
    lines = [head, "|---|---|---|---|---|---|" + ("---|" if video else "")]
    for r in rows:
        psnr = "ref" if r["psnr"] is None else f"{r['psnr']:.2f}"
        last = ""
        if video:
            last = " ref |" if r["psnr_last_frame"] is None else f" {r['psnr_last_frame']:.2f} |"
        lines.append(f"| {r['method']} | {r['nfe']} | {r['seconds']:.3f} | {r['speedup']:.2f}x | {psnr} "
                     f"| {r['ssim']:.4f} |{last}")
    return "\n".join(lines)


def save_grid(outputs: dict[str, Tensor], path: Path, columns: int = 10) -> None:
    """Rows: methods (the reference ``none`` first); columns: the first held-out samples (one per class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(outputs)
    wide = next(iter(outputs.values())).ndim == 5
    if wide:
        columns = min(columns, 2)
    fig, axes = plt.subplots(len(names), columns, figsize=(columns * (7.2 if wide else 0.9), len(names) * 1.0 + 0.3),
                             squeeze=False)
    for r, name in enumerate(names):
        for c in range(columns):
            ax = axes[r][c]
            x = outputs[name][c, 0]
            if x.ndim == 3:  # a clip (F, H, W): its frames side by side
                x = torch.cat(list(x), dim=-1)
            ax.imshow(((x.clamp(-1, 1) + 1) / 2).cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    from ..io import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def run_demo(out_dir: str | Path, settings: DemoSettings | None = None, model_path: str | None = None,
             progress: bool = True) -> list[dict[str, Any]]:
    """Run the demo; write ``results.json``, ``results.md``, ``grid.png`` and ``policy.safetensors`` to ``out_dir``."""
    from ..models.bundled import bundled_model

    settings = settings or DemoSettings()
    bundled = bundled_model(settings.model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = bundled.load(model_path)
    fingerprint = model_fingerprint(model)
    cal_labels, cal_seeds = labels_and_seeds(settings.calibration_per_class, settings.calibration_seed_base,
                                             bundled.num_classes)
    policy, variants = calibrate_with_variants(
        model, cal_labels, cal_seeds, latent_shape=bundled.latent_shape,
        num_inference_steps=settings.num_inference_steps,
        shift=settings.shift, guidance_scale=settings.guidance_scale,
        null_cond=torch.full_like(cal_labels, bundled.null_class),
        target_speedup=settings.target_speedup, model_fingerprint=fingerprint, progress=progress,
        config=CalibrationConfig(candidates=settings.candidates, timestep_adjustment=True,  # the whole ladder
                                 max_passes=None),
    )
    policy.save(out / "policy.safetensors")
    calibration_seconds = time.perf_counter() - start
    labels, seeds = labels_and_seeds(settings.heldout_per_class, settings.heldout_seed_base, bundled.num_classes)
    noise = seeded_noise(seeds, bundled.latent_shape)
    outputs, times, nfe = run_methods(model, ablation_ladder(policy, variants), noise, labels, settings, fingerprint)
    rows = score(outputs, times, nfe)
    save_grid(outputs, out / "grid.png")
    atomic_write_text(out / "results.json", json.dumps(rows, indent=2) + "\n")
    meta = {
        "settings": settings.__dict__, "calibration_seconds": round(calibration_seconds, 1),
        "policy": policy.summary(), "candidates": policy.provenance["candidates"],
        "machine": f"{platform.machine()} {platform.processor() or ''} torch threads={torch.get_num_threads()}",
        "ertacache": __version__, "torch": torch.__version__,
    }
    atomic_write_text(out / "run.json", json.dumps(meta, indent=2) + "\n")
    atomic_write_text(out / "results.md", table(rows) + "\n")
    if progress:
        print(policy.summary())
        print(f"calibration: {calibration_seconds:.1f} s on {len(cal_seeds)} samples; "
              f"held out: {len(seeds)} samples, {settings.repeats} interleaved repeats")
        print(table(rows))
        print(f"wrote {out / 'results.json'}, {out / 'grid.png'}, {out / 'policy.safetensors'}")
    return rows

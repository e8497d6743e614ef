"""``ertacache bench``: ERTACache against every peer method on the same model, seeds and conditions.

Protocol: every method samples the same held-out seeds and classes (never used in
any calibration); the uncached output is the reference. Methods are interleaved (in
alternating order from one round to the next) and each is timed ``repeats`` times
(median). Metrics: NFE, seconds, speedup (same run),
peak memory, PSNR, SSIM, and LPIPS where its weights exist locally.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._version import source
from ..core.euler import seeded_noise
from ..fingerprint import model_fingerprint
from ..io import atomic_write_text
from . import methods as m
from . import metrics
from .report import write_report

logger = logging.getLogger(__name__)

__all__ = ["BenchSettings", "run_bench"]
BenchSettings = m.BenchSettings


class PeakMemory:
    """Peak extra memory during a block: CUDA's allocator peak, or resident-set growth on the CPU (Linux)."""

    def __init__(self) -> None:
        self.mb: float | None = None
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int | None:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return None

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        self._base = self._rss() or 0
        self._peak = self._base
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, self._rss() or 0)

    def __exit__(self, *exc: Any) -> None:
        if torch.cuda.is_available():
            self.mb = (torch.cuda.max_memory_allocated() - self._base) / 2**20
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._rss() or 0)
        self.mb = (self._peak - self._base) / 2**20 if self._base else None


def build_methods(ctx: m.Context, log: Any) -> list[m.Method]:
    out: list[m.Method] = []
    stages = [("uncached", m.uncached), ("uniform", m.uniform), ("ERTACache and its ablation", m.ertacache),
              ("peers", m.peers)]
    if ctx.settings.options:
        stages.append(("options", m.options))
    for label, build in stages:
        start = time.perf_counter()
        out += build(ctx)
        log(f"prepared {label} ({time.perf_counter() - start:.1f} s)")
    return out


def measure(methods: list[m.Method], noise: Tensor, labels: Tensor, repeats: int, log: Any) -> list[dict[str, Any]]:
    """Run every method ``repeats`` times, interleaved; score against the ``none`` method's output."""
    outputs: dict[int, Tensor] = {}
    times: dict[int, list[float]] = {i: [] for i in range(len(methods))}
    nfe: dict[int, int] = {}
    memory: dict[int, float | None] = {}
    failed: dict[int, str] = {}
    with torch.no_grad():
        methods[0].run(noise, labels)  # warm-up: first-call allocations are nobody's cost
        for r in range(repeats):
            # alternate the order so that no method always runs first (or last) in a round
            order = list(enumerate(methods)) if r % 2 == 0 else list(enumerate(methods))[::-1]
            for i, method in order:
                if i in failed:
                    continue
                try:
                    with PeakMemory() as mem:
                        start = time.perf_counter()
                        x, n = method.run(noise, labels)
                        times[i].append(time.perf_counter() - start)
                except Exception as exc:  # a peer that cannot run on this model is reported, not fatal
                    failed[i] = f"{type(exc).__name__}: {exc}"[:300]
                    log(f"{method.name} ({method.setting}) failed: {failed[i]}")
                    continue
                outputs[i], nfe[i] = x, n
                memory[i] = mem.mb if memory.get(i) is None else max(memory[i] or 0.0, mem.mb or 0.0)
            log(f"repeat {r + 1}/{repeats} done")
    ref = outputs[0]
    base = statistics.median(times[0])
    rows = []
    for i, method in enumerate(methods):
        if i in failed:
            failed_row: dict[str, Any] = {"method": method.name, "setting": method.setting, "group": "failed",
                                          "error": failed[i],
                                          "nfe": None, "seconds": None, "speedup": None, "psnr": None,
                                          "ssim": None, "lpips": None, "clip": None, "peak_mem_mb": None}
            rows.append(failed_row)
            continue
        seconds = statistics.median(times[i])
        p = metrics.psnr(outputs[i], ref)
        rows.append({
            "method": method.name, "setting": method.setting, "group": method.group,
            "nfe": nfe[i],
            "seconds": round(seconds, 4), "speedup": round(base / seconds, 3),
            "psnr": None if math.isinf(p) else round(p, 3), "ssim": round(metrics.ssim(outputs[i], ref), 5),
            "psnr_last_frame": _finite(metrics.psnr_last_frame(outputs[i], ref)),
            "lpips": metrics.lpips(outputs[i], ref), "clip": metrics.clip_similarity(outputs[i], ref),
            "peak_mem_mb": None if memory[i] is None else round(memory[i] or 0.0, 1),
            "_output": outputs[i],
        })
    return rows


def _finite(p: float | None) -> float | None:
    return None if p is None or math.isinf(p) else round(p, 3)


def run_bench(docs_dir: str | Path, settings: m.BenchSettings, json_path: str | Path | None = None,
              command: str = "ertacache bench", progress: bool = True) -> list[dict[str, Any]]:
    """Run the benchmark on a bundled model (``settings.model``); write the table, plot and grid under ``docs_dir``."""
    from ..models.bundled import bundled_model

    def log(msg: str) -> None:
        if progress:
            logger.info(msg)

    start = time.perf_counter()
    bundled = bundled_model(settings.model)
    model = bundled.load(None)
    ctx = m.Context(model, settings, model_fingerprint(model), bundled)
    methods = build_methods(ctx, log)
    from ..models.bundled import labels_and_seeds

    labels, seeds = labels_and_seeds(settings.heldout_per_class, 10_000, bundled.num_classes)
    noise = seeded_noise(seeds, bundled.latent_shape)
    log(f"{len(methods)} method settings on {labels.numel()} held-out samples, {settings.repeats} repeats")
    rows = measure(methods, noise, labels, settings.repeats, log)
    from .stepcost import step_costs

    costs = step_costs(model, torch.cat([noise, noise]),
                       torch.cat([labels, torch.full_like(labels, bundled.null_class)]),
                       repeats=5 if settings.quick else 20)
    elapsed = time.perf_counter() - start
    header = {
        "command": command,
        "source": f"ertacache {source()}, {time.strftime('%Y-%m-%d')}",
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads, {'CUDA' if torch.cuda.is_available() else 'CPU'}",
        "model": f"bundled {settings.model} ({type(model.transformer).__name__}, ertacache.models.bundled)",
        "protocol": f"T={settings.num_inference_steps}, guidance {settings.guidance_scale}, shift {settings.shift}; "
                    f"calibration: {ctx.cal_labels.numel()} samples (seeds 0..); held out: {labels.numel()} "
                    f"samples (seeds 10000..), {settings.repeats} interleaved repeats, median",
        "seconds_total": round(elapsed, 1),
        "lpips": "available" if rows[0]["lpips"] is not None else "unavailable (no local LPIPS weights)",
        "clip": "available" if rows[0]["clip"] is not None else
                f"unavailable (no local {metrics.CLIP_MODEL} weights)",
    }
    write_report(Path(docs_dir), rows, header, costs)
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(clean, indent=2) + "\n")
    log(f"done in {elapsed:.0f} s; wrote {docs_dir}")
    return clean

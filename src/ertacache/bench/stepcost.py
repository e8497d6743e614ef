"""How much a cached step costs, as a fraction of a computed step (``ertacache step-cost``).

A computed step runs the whole model; a cached step runs what the reuse mode needs
(embedding and head for ``block_residual``, nothing for ``velocity``, an addition
for ``latent_residual``) plus the rectification ``v~ - (a v~ + b)``. Timed on the
same inputs, interleaved, median of repeats. The paper reports +0.45% latency for
rectification on FLUX-dev.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from ..core import rectify
from ..core.euler import compute, rebuild
from ..core.reuse import REUSE_MODES, History


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def step_costs(model: Any, x: torch.Tensor, cond: torch.Tensor | None, repeats: int = 20) -> list[dict[str, Any]]:
    """Median seconds of a computed step and of a cached step for each reuse mode on ``x`` (``(B, ...)``)."""
    t = torch.full((x.shape[0],), 0.5)
    a, b = torch.tensor([0.01]), torch.tensor([0.001])
    rows = []
    for mode in REUSE_MODES.values():
        v, h_res = compute(model, mode, x, t, cond)
        r = mode.keep(v, x, h_res)

        def computed_step(m: Any = mode) -> Any:
            v, h_res = compute(model, m, x, t, cond)
            return m.keep(v, x, h_res)

        history = History(0.4, 0.5, r, 0.6)  # for modes that extrapolate from two computed steps

        def cached_step(m: Any = mode, r: torch.Tensor = r, h: History = history) -> Any:
            return rebuild(model, m, r, x, t, cond, h)

        def rectified_step(m: Any = mode, r: torch.Tensor = r, h: History = history) -> Any:
            return rectify.apply(rebuild(model, m, r, x, t, cond, h), a, b, "linear")

        computed = _median_seconds(computed_step, repeats)
        plain = _median_seconds(cached_step, repeats)
        rect = _median_seconds(rectified_step, repeats)
        rows.append({"reuse": mode.name, "computed_ms": computed * 1e3, "cached_ms": plain * 1e3,
                     "cached_rectified_ms": rect * 1e3, "cached_fraction": plain / computed,
                     "cached_rectified_fraction": rect / computed,
                     "rectification_overhead_of_computed": (rect - plain) / computed})
    return rows


def main(batch_size: int = 40, repeats: int = 20) -> list[dict[str, Any]]:
    """Measure on the bundled digits model (CFG: branches batched, ``2 * batch_size`` rows) and print a table."""
    from ..models.digits import LATENT_SHAPE, load_digits_model

    model = load_digits_model()
    x = torch.randn(2 * batch_size, *LATENT_SHAPE, generator=torch.Generator().manual_seed(0))
    cond = torch.arange(2 * batch_size) % 11
    rows = step_costs(model, x, cond, repeats)
    print(f"bundled digits model, batch {2 * batch_size} rows (cond + uncond), {torch.get_num_threads()} threads, "
          f"median of {repeats}")
    print("| reuse | computed step (ms) | cached step (ms) | cached / computed | + rectification | "
          "rectification / computed |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['reuse']} | {r['computed_ms']:.2f} | {r['cached_ms']:.3f} | {100 * r['cached_fraction']:.2f}% "
              f"| {100 * r['cached_rectified_fraction']:.2f}% | {100 * r['rectification_overhead_of_computed']:.2f}% |")
    return rows

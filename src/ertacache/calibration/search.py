"""Offline policy calibration by residual error profiling (Algorithm 2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..cache import l1
from ..config import L1Denominator
from .calibset import CalibSet, ratio


@dataclass(frozen=True)
class GroundTruth:
    """Algorithm 2 lines 4-7 on one calibration set.

    Attributes:
        r_norms: ``||r_gt_i||_1`` per step, summed over samples and branches (length T).
        x_final: the uncached output at t = 0, ``(N, ...)``.
    """

    r_norms: tuple[float, ...]
    x_final: Tensor


@torch.no_grad()
def log_ground_truth(cs: CalibSet, grid: list[float]) -> GroundTruth:
    """Run the calibration set uncached and log ``||r_gt_i||_1`` per step (Algorithm 2, lines 4-7)."""
    x = cs.noise
    norms = []
    for i in range(len(grid) - 1):
        v, r = cs.compute(x, grid[i], i, "ground-truth logging")
        norms.append(l1(r))
        x = x + (grid[i + 1] - grid[i]) * cs.guide(v)
    return GroundTruth(tuple(norms), x)


@dataclass(frozen=True)
class SearchResult:
    """The cached set S for one threshold, and each step's ``l1_rel`` (Eq. 12; 0 at first/last)."""

    threshold: float
    cached_steps: tuple[int, ...]
    l1_rel: tuple[float, ...]


@torch.no_grad()
def threshold_search(
    cs: CalibSet, grid: list[float], gt: GroundTruth, threshold: float, denominator: L1Denominator = "gt"
) -> SearchResult:
    """Threshold-based policy search for one lambda (Algorithm 2, lines 8-22).

    The model runs at every step, and the trajectory advances as the cached sampler
    would: at a step whose ``l1_rel = ||r~ - r_i||_1 / ||r_gt_i||_1`` (Eq. 12; v2
    divides by ``||r_i||_1``) is below ``threshold`` the stale ``r~`` is used and
    kept; otherwise ``r~`` is refreshed. Norms are summed over the batch and the
    branches, so S is one global set. The first and last steps are always computed.

    Args:
        cs: the calibration samples.
        grid: the ``T + 1`` times.
        gt: :func:`log_ground_truth` of ``cs`` on ``grid``.
        threshold: lambda > 0.
        denominator: ``gt`` (v1) or ``current`` (v2).
    """
    T = len(grid) - 1
    x = cs.noise
    r_cached: Tensor | None = None
    cached: list[int] = []
    rels: list[float] = []
    for i in range(T):
        t = grid[i]
        v, r = cs.compute(x, t, i, f"policy search (lambda={threshold:g})")
        rel = 0.0
        if 0 < i < T - 1 and r_cached is not None:
            rel = ratio(l1(r_cached - r), gt.r_norms[i] if denominator == "gt" else l1(r))
        if 0 < i < T - 1 and r_cached is not None and rel < threshold:
            cached.append(i)
            v = cs.reuse(r_cached, x, t)
        else:
            r_cached = r
        rels.append(rel)
        x = x + (grid[i + 1] - t) * cs.guide(v)
    return SearchResult(threshold, tuple(cached), tuple(rels))


def sweep(
    cs: CalibSet, grid: list[float], gt: GroundTruth, thresholds: tuple[float, ...], denominator: L1Denominator,
    max_nfe: int | None = None, refine: int = 6, known: list[SearchResult] | None = None,
) -> list[SearchResult]:
    """Run :func:`threshold_search` for each lambda (the curve lambda -> |S|).

    With ``max_nfe``, when no lambda of the sweep gives exactly ``max_nfe`` computed
    steps, the bracket around it is bisected (geometrically, ``refine`` times).
    Results in ``known`` (from the same set and grid) are reused, not recomputed.
    """
    T = len(grid) - 1
    results = list(known or [])
    done = {res.threshold for res in results}
    results += [threshold_search(cs, grid, gt, lam, denominator) for lam in sorted(thresholds) if lam not in done]
    if max_nfe is None:
        return results
    for _ in range(refine):
        nfes = {T - len(res.cached_steps) for res in results}
        if max_nfe in nfes:
            break
        above = [res.threshold for res in results if T - len(res.cached_steps) > max_nfe]
        below = [res.threshold for res in results if T - len(res.cached_steps) < max_nfe]
        if not above or not below:
            break
        lam = (max(above) * min(below)) ** 0.5
        results.append(threshold_search(cs, grid, gt, lam, denominator))
    return sorted(results, key=lambda res: res.threshold)

"""A schedule chosen globally under an NFE budget: an error model from the ground-truth pass, and a shortest path.

Algorithm 2 walks the steps once and caches a step when its own relative change is
small. Here the whole cached set is chosen at once (in the spirit of LeMiCa's and
MeanCache's graph formulations, written from their descriptions):

1. **Error model** (logged by the ground-truth pass, no extra model call). At every
   step ``j`` the uncached pass has ``v_j`` and ``x_j`` for each unit. Reusing the cache
   of a computed step ``i < j`` at ``j`` gives ``v~_j(i)`` (``v_i`` for ``velocity``
   reuse; ``x_j + v_i - x_i`` for ``latent_residual``), whose error ``e_ij = v~_j(i) - v_j``
   moves the next state by ``dt_j e_ij`` (Eq. 4). A *segment* computes at ``i``, caches
   ``i+1 .. k-1`` and computes again at ``k``; it leaves the state off by
   ``D(i, k) = sum_j dt_j e_ij``, and its cost is ``Q(i, k) = sum over rows and units of
   ||D(i, k)||_2^2``. With rectification (Eq. 15-21), each ``e_ij`` is first replaced by
   its least-squares residual ``e_ij - (a_ij v~_j(i) + b_ij)``, the fit the rectification
   pass would make for that source (one ``(a, b)`` per step and branch).
2. **Search**. The computed set ``C`` (first and last step, and forced steps, always in
   it) with ``|C| = NFE`` minimising ``sum over consecutive i < k in C of cost(i, k)`` is a
   shortest path with exactly ``NFE - 1`` edges, found by dynamic programming in
   ``O(NFE T^2)``. Two costs: ``Q`` (segments' errors independent: squared norms add)
   and ``sqrt(Q)`` (errors aligned: norms add).

What the model ignores: the error a segment leaves is carried to the end by the flow
(amplified or damped; the model counts it once, as it is made); errors are measured
along the uncached trajectory, not the cached one; guidance branches are added as
separate units, not through the guidance combination; ``block_residual`` reuse is
modelled as ``velocity`` reuse (rebuilding its output needs the model's head). It
is corrected for the way every candidate is: each proposed set is run as the whole
cached sampler (with adjustment and rectification) on the held-out samples, beside
Algorithm 2's and the uniform sets, and the least final-output error wins.

Large latents are kept as a CountSketch: each row's ``n`` entries are hashed into
``dim`` signed buckets (a fixed seed), a linear map whose squared norms and inner
products are unbiased estimates of the true ones. Latents of at most ``dim`` entries
are kept exactly. Memory: ``2 T x rows x units x min(n, dim)`` floats.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..core.engine import UnitCall
from ..core.rectify import RectStats

SKETCH_DIM = 2048
"""Buckets per row of the CountSketch (latents with at most this many entries are kept exactly)."""

RULES = ("rectified, squared norms add", "squared norms add", "rectified, norms add", "norms add")
"""The error model's readings, in the order their sets are proposed (the rectified ones only with rectification)."""


@dataclass
class _Rows:
    v: list[Tensor] = field(default_factory=list)
    x: list[Tensor] = field(default_factory=list)


class ErrorSketch:
    """What the ground-truth pass keeps for the schedule search: per step and unit, the fitting rows' ``v`` and ``x``.

    Args:
        dim: sketch buckets per row (:data:`SKETCH_DIM`).
        seed: the hash's seed (fixed, so every process and every driver sketches alike).
    """

    def __init__(self, dim: int = SKETCH_DIM, seed: int = 0) -> None:
        self.dim, self.seed = dim, seed
        self.rows: dict[tuple[int, Hashable], _Rows] = {}
        self.branch: dict[Hashable, str] = {}
        self.n: int | None = None
        self._hash: tuple[Tensor, Tensor] | None = None

    def _sketch(self, y: Tensor) -> Tensor:
        """``(R, n) -> (R, min(n, dim))`` float64: the identity when ``n <= dim``, else the CountSketch."""
        y = y.detach().double().flatten(1).cpu()
        n = y.shape[1]
        if self.n is None:
            self.n = n
        if n <= self.dim:
            return y
        if self._hash is None:
            gen = torch.Generator().manual_seed(self.seed)
            bucket = torch.randint(0, self.dim, (n,), generator=gen)
            sign = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
            self._hash = (bucket, sign)
        bucket, sign = self._hash
        return torch.zeros(y.shape[0], self.dim, dtype=torch.float64).index_add_(1, bucket, y * sign)

    def ones(self) -> Tensor:
        """The sketch of one row of ones, ``(min(n, dim),)``."""
        return self._sketch(torch.ones(1, self.n or 1))[0]

    def observe(self, step: int, calls: Sequence[UnitCall]) -> None:
        """Keep the fitting rows of each computed unit of ``step`` (micro-batches append in their order)."""
        for c in calls:
            if c.v is None or not bool(c.fit.any()):
                continue
            rows = self.rows.setdefault((step, c.unit), _Rows())
            rows.v.append(self._sketch(c.v[c.fit]))
            rows.x.append(self._sketch(c.x[c.fit]))
            self.branch[c.unit] = c.branch

    def costs(self, grid: Sequence[float], reuse: str, reduce: Callable[[Tensor], Tensor],
              rectified: bool, branches: Sequence[str]) -> dict[str, Tensor]:
        """Segment costs ``Q (T, T)`` (``Q[i, k]``, ``i < k``: compute at i and k, cache between), over processes.

        Args:
            grid: the ``T + 1`` times of the ground truth (``dt_j = grid[j+1] - grid[j]``).
            reuse: the reuse mode (``block_residual`` is modelled as ``velocity``).
            reduce: sums a tensor over processes.
            rectified: also the costs with each error replaced by its rectification residual.
            branches: the guidance branches (one fit each), the same on every process.

        Returns:
            ``{"raw": Q}`` and, with ``rectified``, ``{"rectified": Q}``; ``inf`` where a
            unit is missing at one end (a segment across Wan 2.2's expert switch).
        """
        T = len(grid) - 1
        dt = torch.tensor([grid[j + 1] - grid[j] for j in range(T)], dtype=torch.float64)
        latent = reuse == "latent_residual"
        units = sorted({u for (_, u) in self.rows}, key=repr)
        branches = list(branches)
        stacked = {}
        for u in units:
            steps = [j for j in range(T) if (j, u) in self.rows]
            v = torch.stack([torch.cat(self.rows[(j, u)].v) for j in steps]) if steps else None
            x = torch.stack([torch.cat(self.rows[(j, u)].x) for j in steps]) if steps else None
            stacked[u] = (steps, v, x)
        both = torch.zeros(T, T)  # some unit has a cache at i and runs at k (not across an expert switch)
        for steps, _, _ in stacked.values():
            present = torch.zeros(T, dtype=torch.bool)
            present[steps] = True
            both += (present[:, None] & present[None, :]).float()
        blocked = reduce(both.double()) == 0  # every process calls reduce, even one without fitting rows
        ones = self.ones()

        def cached(u: Hashable, i: int) -> tuple[Tensor, Tensor, Tensor]:
            """``(v~_j(i), e_ij, js)`` for the unit's steps ``j > i``: ``(J, R, D)`` each."""
            steps, v, x = stacked[u]
            pos = {j: p for p, j in enumerate(steps)}
            later = [p for p, j in enumerate(steps) if j > i]
            js = torch.tensor([steps[p] for p in later], dtype=torch.long)
            vt = v[pos[i]].expand(len(later), -1, -1)  # type: ignore[index]
            if latent:
                vt = vt + x[later] - x[pos[i]]  # type: ignore[index]
            return vt, vt - v[later], js  # type: ignore[index]

        # per (i, j, branch) least-squares fits of e on v~ (Eq. 17), as the rectification pass would make them
        fits: dict[str, tuple[Tensor, Tensor]] = {}
        if rectified:
            stats = torch.zeros(len(branches), T, T, 5, dtype=torch.float64)
            n = float(self.n or 1)
            for u in units:
                steps, v, _ = stacked[u]
                k = branches.index(self.branch[u])
                for i in steps:
                    vt, e, js = cached(u, i)
                    if not len(js):
                        continue
                    # exact sums through the sketch of the ones row (exact when unsketched, unbiased otherwise)
                    stats[k, i, js, 0] += n * vt.shape[1]
                    stats[k, i, js, 1] += (vt @ ones).sum(1)
                    stats[k, i, js, 2] += (e @ ones).sum(1)
                    stats[k, i, js, 3] += (vt * vt).sum((1, 2))
                    stats[k, i, js, 4] += (vt * e).sum((1, 2))
            stats = reduce(stats)
            for k, b in enumerate(branches):
                s = RectStats(*(stats[k, ..., m].reshape(-1) for m in range(5)))
                a, bb = s.solve()
                fits[b] = (a.double().view(T, T), bb.double().view(T, T))
        out: dict[str, Tensor] = {}
        for kind in ("raw", "rectified") if rectified else ("raw",):
            q = torch.zeros(T, T, dtype=torch.float64)
            for u in units:
                steps = stacked[u][0]
                for i in steps:
                    vt, e, js = cached(u, i)
                    if not len(js):
                        continue
                    if kind == "rectified":
                        fit_a, fit_b = fits[self.branch[u]]
                        e = e - fit_a[i, js].view(-1, 1, 1) * vt - fit_b[i, js].view(-1, 1, 1) * ones
                    drift = torch.cumsum(dt[js].view(-1, 1, 1) * e, dim=0)  # D(i, j + 1) for each j in js
                    ends = js + 1
                    keep = ends < T
                    q[i, ends[keep]] += drift[keep].square().sum((1, 2))
            q = reduce(q)
            q[blocked] = torch.inf
            out[kind] = q
        return out


def shortest_schedule(cost: Tensor, nfe: int, forced: Sequence[int] = ()) -> tuple[int, ...] | None:
    """The cached steps of the computed set with ``nfe`` steps and the least summed segment cost.

    Args:
        cost: ``(T, T)``; ``cost[i, k]`` for ``i < k`` is the cost of computing at i and k
            and caching the steps between (``cost[i, i+1]`` is 0 in practice).
        nfe: computed steps, first (0) and last (T - 1) included, in [2, T].
        forced: steps that must be computed.

    Returns:
        The cached steps (sorted), or None when no set of ``nfe`` steps holds the
        first, the last and the forced steps.
    """
    T = cost.shape[0]
    if nfe >= T:
        return ()
    need = {0, T - 1, *forced}
    if nfe < len(need) or nfe < 2:
        return None
    idx = torch.arange(T)
    valid = idx[:, None] < idx[None, :]
    for s in forced:  # a segment may not skip a forced step
        valid &= ~((idx[:, None] < s) & (s < idx[None, :]))
    c = torch.where(valid, cost.double(), torch.full_like(cost, torch.inf, dtype=torch.float64))
    f = torch.full((T,), torch.inf, dtype=torch.float64)
    f[0] = 0.0
    parents = []
    for _ in range(nfe - 1):  # f[k]: least cost of a path from 0 to k with m edges
        total = f[:, None] + c
        f, parent = total.min(0)
        parents.append(parent)
    if not torch.isfinite(f[T - 1]):
        return None
    computed, k = [T - 1], T - 1
    for parent in reversed(parents):
        k = int(parent[k])
        computed.append(k)
    return tuple(sorted(set(range(T)) - set(computed)))


def propose(costs: dict[str, Tensor], nfe: int, forced: Sequence[int], limit: int) -> list[tuple[str, tuple[int, ...]]]:
    """Up to ``limit`` distinct cached sets for ``nfe`` computed steps, one per reading of the error model.

    Returns:
        ``[(rule, cached_steps)]`` in the order of :data:`RULES` (readings whose cost is absent are skipped).
    """
    out: list[tuple[str, tuple[int, ...]]] = []
    seen: set[tuple[int, ...]] = set()
    for rule in RULES:
        q = costs.get("rectified" if rule.startswith("rectified") else "raw")
        if q is None:
            continue
        cost = q if "squared" in rule else q.clamp_min(0).sqrt()
        cached = shortest_schedule(cost, nfe, forced)
        if cached is not None and cached not in seen:
            seen.add(cached)
            out.append((rule, cached))
        if len(out) >= limit:
            break
    return out

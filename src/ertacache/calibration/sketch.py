"""The schedule search's error model, logged by the ground-truth pass (docs/method.md; :mod:`.schedule` item 1).

At every step the uncached pass has ``v_j`` and ``x_j`` for each unit; :class:`ErrorSketch`
keeps them (per row and unit) and turns them into the segment costs ``Q(i, k)`` and the
Gram matrices the search reads.

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
from ..core.reuse import get_reuse

SKETCH_DIM = 2048
"""Buckets per row of the CountSketch (latents with at most this many entries are kept exactly)."""

_Stacked = tuple[list[int], "Tensor | None", "Tensor | None"]
"""A unit's logged steps and its ``v``, ``x`` at them (``(S, R, D)`` each; None without steps)."""


def _cached(unit: _Stacked, i: int, latent: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(v~_j(i), e_ij, js)`` for the unit's steps ``j > i``: ``(J, R, D)`` each (``latent``: latent-residual
    reuse, ``v~_j = x_j + v_i - x_i``)."""
    steps, v, x = unit
    pos = {j: p for p, j in enumerate(steps)}
    later = [p for p, j in enumerate(steps) if j > i]
    js = torch.tensor([steps[p] for p in later], dtype=torch.long)
    vt = v[pos[i]].expand(len(later), -1, -1)  # type: ignore[index]
    if latent:
        vt = vt + x[later] - x[pos[i]]  # type: ignore[index]
    return vt, vt - v[later], js  # type: ignore[index]


@dataclass
class _Rows:
    v: list[Tensor] = field(default_factory=list)
    x: list[Tensor] = field(default_factory=list)
    samples: list[Tensor] = field(default_factory=list)


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
        self.knows_samples = True
        """Every observed row came with its calibration sample (:attr:`UnitCall.samples`): :meth:`without` works."""

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
            if c.samples is None:
                self.knows_samples = False
            else:
                rows.samples.append(c.samples[c.fit].long().cpu())
            self.branch[c.unit] = c.branch

    def without(self, samples: range) -> ErrorSketch:
        """The sketch of every row but those of calibration samples ``samples`` (a fold left out for k-fold
        choice); the rows are shared, not copied. :meth:`costs` and :meth:`gram` of it are those of a ground truth
        that never saw those samples.

        Raises:
            ValueError: a row was observed without its sample (:attr:`knows_samples` is False).
        """
        if not self.knows_samples:
            raise ValueError("the sketch does not know which sample each row belongs to")
        out = ErrorSketch(self.dim, self.seed)
        out.n, out._hash, out.branch = self.n, self._hash, dict(self.branch)
        for key, rows in self.rows.items():
            ids = torch.cat(rows.samples)
            keep = (ids < samples.start) | (ids >= samples.stop)
            v, x = torch.cat(rows.v), torch.cat(rows.x)
            out.rows[key] = _Rows([v[keep]], [x[keep]], [ids[keep]])
        return out

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
        latent = get_reuse(reuse).keeps == "v - x"  # v~_j = x_j + (v_i - x_i)
        stacked = self._stacked(T)
        both = torch.zeros(T, T)  # some unit has a cache at i and runs at k (not across an expert switch)
        for steps, _, _ in stacked.values():
            present = torch.zeros(T, dtype=torch.bool)
            present[steps] = True
            both += (present[:, None] & present[None, :]).float()
        blocked = reduce(both.double()) == 0  # every process calls reduce, even one without fitting rows
        fits = self._rect_fits(stacked, T, latent, reduce, list(branches)) if rectified else {}
        ones = self.ones()
        out: dict[str, Tensor] = {}
        for kind in ("raw", "rectified") if rectified else ("raw",):
            q = torch.zeros(T, T, dtype=torch.float64)
            for u, (steps, _, _) in stacked.items():
                for i in steps:
                    vt, e, js = _cached(stacked[u], i, latent)
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

    def _stacked(self, T: int) -> dict[Hashable, _Stacked]:
        """Per unit (in a fixed order): its logged steps, and its ``v`` and ``x`` at them, ``(S, R, D)`` each."""
        stacked: dict[Hashable, _Stacked] = {}
        for u in sorted({u for (_, u) in self.rows}, key=repr):
            steps = [j for j in range(T) if (j, u) in self.rows]
            v = torch.stack([torch.cat(self.rows[(j, u)].v) for j in steps]) if steps else None
            x = torch.stack([torch.cat(self.rows[(j, u)].x) for j in steps]) if steps else None
            stacked[u] = (steps, v, x)
        return stacked

    def _rect_fits(self, stacked: dict[Hashable, _Stacked], T: int, latent: bool, reduce: Callable[[Tensor], Tensor],
                   branches: list[str]) -> dict[str, tuple[Tensor, Tensor]]:
        """Per branch, the ``(T, T)`` least-squares fits ``(a, b)`` of e on v~ for each (i, j) (Eq. 17), as the
        rectification pass would make them."""
        stats = torch.zeros(len(branches), T, T, 5, dtype=torch.float64)
        n = float(self.n or 1)
        ones = self.ones()
        for u, (steps, _, _) in stacked.items():
            k = branches.index(self.branch[u])
            for i in steps:
                vt, e, js = _cached(stacked[u], i, latent)
                if not len(js):
                    continue
                # exact sums through the sketch of the ones row (exact when unsketched, unbiased otherwise)
                stats[k, i, js, 0] += n * vt.shape[1]
                stats[k, i, js, 1] += (vt @ ones).sum(1)
                stats[k, i, js, 2] += (e @ ones).sum(1)
                stats[k, i, js, 3] += (vt * vt).sum((1, 2))
                stats[k, i, js, 4] += (vt * e).sum((1, 2))
        stats = reduce(stats)
        fits: dict[str, tuple[Tensor, Tensor]] = {}
        for k, b in enumerate(branches):
            a, bb = RectStats(*(stats[k, ..., m].reshape(-1) for m in range(5))).solve()
            fits[b] = (a.double().view(T, T), bb.double().view(T, T))
        return fits

    def gram(self, T: int, branches: Sequence[str], reduce: Callable[[Tensor], Tensor]) -> Tensor:
        """Per branch, inner products of the fitting rows' outputs over the steps, summed over rows and units.

        Returns:
            ``(n_branches, T + 1, T + 1)`` float64, over processes: entry ``[b, a, c]`` is
            ``sum over rows of <v_a, v_c>`` for steps ``a, c < T``; index ``T`` stands for the
            all-ones vector (``[b, a, T] = sum <v_a, 1>``, ``[b, T, T]`` = entries counted).
            Exact for latents of at most ``dim`` entries, unbiased otherwise.
        """
        branches = list(branches)
        g = torch.zeros(len(branches), T + 1, T + 1, dtype=torch.float64)
        counted = torch.zeros(len(branches), T, dtype=torch.float64)  # entries per branch and step
        ones = self.ones()
        units = sorted({u for (_, u) in self.rows}, key=repr)
        for u in units:
            steps = [j for j in range(T) if (j, u) in self.rows]
            if not steps:
                continue
            v = torch.stack([torch.cat(self.rows[(j, u)].v) for j in steps])  # (S, R, D)
            k = branches.index(self.branch[u])
            idx = torch.tensor(steps)
            g[k, idx[:, None], idx[None, :]] += torch.einsum("ard,crd->ac", v, v)
            o = (v @ ones).sum(1)
            g[k, idx, T] += o
            g[k, T, idx] += o
            counted[k, idx] += float(v.shape[1] * (self.n or 1))
        g[:, T, T] = counted.max(1).values
        return reduce(g)

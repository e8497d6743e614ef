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

3. **Extrapolation** (``extrapolate`` reuse, not in the paper). A cached step's ``v~``
   depends on the last *two* computed steps, so a segment's cost is ``Q(h, i, k)``:
   compute at h, i and k, cache between i and k, each ``v~_j`` on the line through
   ``v_h`` and ``v_i``. ``v~`` and the rectification residual are linear in the logged
   outputs, so ``Q(h, i, k)`` is a quadratic form in each branch's Gram matrix
   (:meth:`ErrorSketch.gram`, :func:`extrapolation_costs`), and the best computed set is
   a shortest path whose state is the last two computed steps (:func:`shortest_schedule`
   with a ``(T, T, T)`` cost, ``O(NFE T^3)``). Kept for ``T <= 200`` (memory ``T^3``);
   above it the search models ``extrapolate`` as ``velocity``.
4. **Per-step reuse** (not in the paper). For a chosen schedule, each cached step ``j``
   (reusing computed step ``i``, ``h`` the computed step before it) may rebuild ``v~``
   with any mode that keeps what the policy's mode keeps: ``velocity`` (``v_i``) or
   ``extrapolate`` (``v_i + (v_i - v_h)(t_j - t_i)/(t_i - t_h)``). Both are linear in the
   logged outputs, so their errors (raw, or the residual after the step's
   rectification fit) follow from one Gram matrix of each branch's outputs over the
   steps (:meth:`ErrorSketch.gram`), and :func:`choose_step_reuse` takes the mode of
   least error at each step. It ignores what :math:`Q` ignores, and also that the
   choice at one step changes the errors' sum over a segment (each step is chosen on
   its own error); the held-out check keeps the choice only where it helps.

Large latents are kept as a CountSketch: each row's ``n`` entries are hashed into
``dim`` signed buckets (a fixed seed), a linear map whose squared norms and inner
products are unbiased estimates of the true ones. Latents of at most ``dim`` entries
are kept exactly. Memory: ``2 T x rows x units x min(n, dim)`` floats.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..core.engine import UnitCall
from ..core.rectify import RectStats
from ..core.reuse import get_reuse

SKETCH_DIM = 2048
"""Buckets per row of the CountSketch (latents with at most this many entries are kept exactly)."""

RULES = ("rectified, squared norms add", "squared norms add", "rectified, norms add", "norms add")
"""The error model's readings, in the order their sets are proposed (the rectified ones only with rectification)."""


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


MAX_TRIPLE_STEPS = 200
"""Above this T the schedule search models ``extrapolate`` as ``velocity`` (its exact cost tensor is ``T^3``)."""


def extrapolation_costs(gram: Tensor, grid: Sequence[float], rectified: bool, reuse: str = "extrapolate") -> Tensor:
    """Segment costs of a reuse mode that rebuilds from the last two computed steps, ``Q (T, T, T)``:
    ``Q[h, i, k]`` for ``h < i < k``.

    ``Q[h, i, k] = sum over branches of ||sum_{i<j<k} dt_j r_j||^2`` with ``r_j`` the error of
    the mode's ``v~_j = a v_i + b v_h`` (:meth:`~ertacache.core.reuse.Reuse.weights`; for
    ``extrapolate``, ``v_i + (v_i - v_h)(t_j - t_i)/(t_i - t_h)``), with ``rectified`` its
    residual after the step's least-squares fit. ``Q[0, 0, k]`` is the first segment, which
    has no earlier computed step. Everything else is ``inf``.

    Args:
        gram: :meth:`ErrorSketch.gram`, ``(n_branches, T + 1, T + 1)``.
        grid: the ``T + 1`` times.
        reuse: the reuse mode's name.
    """
    mode = get_reuse(reuse)
    T = gram.shape[-1] - 1
    t = torch.tensor([float(x) for x in grid], dtype=torch.float64)
    dt = t[1:] - t[:-1]
    q = torch.full((T, T, T), torch.inf, dtype=torch.float64)
    ones = torch.zeros(T + 1, dtype=torch.float64)
    ones[T] = 1.0
    eye = torch.eye(2, dtype=torch.float64)
    for i in range(T - 1):  # every earlier computed step h at once: (H, J, T + 1) coefficient tensors
        js = torch.arange(i + 1, T)
        hs: list[int | None] = list(range(i)) if i > 0 else [None]
        w = torch.zeros(len(hs), len(js), T + 1, dtype=torch.float64)  # v~_j as coefficients
        for k, h in enumerate(hs):
            a, b = mode.weights(t[js], float(t[i]), None if h is None else float(t[h]))
            w[k, :, i] = a
            if h is not None:
                w[k, :, h] += b
        c = w.clone()
        c[:, torch.arange(len(js)), js] -= 1.0  # e_j = v~_j - v_j
        total = torch.zeros(len(hs), len(js), dtype=torch.float64)
        for g in gram:
            r = c
            if rectified:  # per step: least squares of e on (v~, 1), r = e - a v~ - b
                basis = torch.stack([w, ones.expand_as(w)], dim=2)  # (H, J, 2, T+1)
                m = basis @ g @ basis.transpose(-1, -2)  # (H, J, 2, 2)
                rhs = (basis @ g @ c[..., None])[..., 0]  # (H, J, 2)
                m = m + 1e-12 * m.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-300)[..., None, None] * eye
                coef = torch.linalg.solve(m, rhs[..., None])[..., 0]
                r = c - coef[..., :1] * w - coef[..., 1:] * ones
            drift = torch.cumsum(dt[js][None, :, None] * r, dim=1)  # D(i, j + 1)
            total = total + ((drift @ g) * drift).sum(-1)
        ends = js + 1
        keep = ends < T
        for k, h in enumerate(hs):
            q[i if h is None else h, i, ends[keep]] = total[k, keep]
            q[i if h is None else h, i, i + 1] = 0.0
    return q


def _reuse_coefficients(grid: Sequence[float], mode: str, h: int | None, i: int, j: int, T: int) -> Tensor:
    """``v~_j`` as coefficients over the Gram basis (steps, then ones), from the mode's
    :meth:`~ertacache.core.reuse.Reuse.weights`."""
    a, b = get_reuse(mode).weights(grid[j], grid[i], None if h is None else grid[h])
    w = torch.zeros(T + 1, dtype=torch.float64)
    w[i] = float(a)
    if h is not None:
        w[h] += float(b)
    return w


def reuse_error(gram: Tensor, grid: Sequence[float], mode: str, h: int | None, i: int, j: int,
                rectified: bool) -> float:
    """Squared error ``sum ||v~_j - v_j||^2`` of rebuilding step j from computed step i (h before it), all branches.

    With ``rectified``, the residual after each branch's least-squares fit
    ``e ~ a v~ + b`` (Eq. 17, one ``(a, b)`` per step and branch).

    Args:
        gram: :meth:`ErrorSketch.gram`, ``(n_branches, T + 1, T + 1)``.
        grid: the ``T + 1`` times.
        mode: ``velocity`` or ``extrapolate``.
    """
    T = gram.shape[-1] - 1
    w = _reuse_coefficients(grid, mode, h, i, j, T)
    c = w.clone()
    c[j] -= 1.0  # e = v~_j - v_j
    total = 0.0
    for g in gram:
        err = float(c @ g @ c)
        if rectified:
            basis = torch.stack([w, torch.zeros(T + 1, dtype=torch.float64).index_fill_(0, torch.tensor([T]), 1.0)])
            m = basis @ g @ basis.T  # normal equations of (a, b)
            rhs = basis @ g @ c
            coef = torch.linalg.lstsq(m, rhs[:, None]).solution[:, 0] if bool(m.abs().sum() > 0) else torch.zeros(2)
            err = max(0.0, err - float(coef @ rhs))
        total += err
    return total


SWITCH_MARGIN = 1e-3
"""Relative modelled-error gain a mode needs to replace the policy's own at a step."""
SWITCH_FLOOR = 1e-6
"""...and absolute, as a fraction of the step's ``sum ||v_j||^2`` (both errors may be round-off)."""


def choose_step_reuse(gram: Tensor, grid: Sequence[float], cached_steps: Sequence[int], modes: Sequence[str],
                      rectified: bool) -> dict[int, str]:
    """Each cached step's reuse mode of least modelled error (:func:`reuse_error`), among ``modes``.

    Args:
        gram: :meth:`ErrorSketch.gram`.
        grid: the ``T + 1`` times.
        cached_steps: the schedule's cached steps.
        modes: modes that keep ``v`` (``velocity``, ``extrapolate``), the policy's own first.
            Another mode replaces it only where its modelled error is lower by more than
            ``SWITCH_MARGIN`` (relative) plus ``SWITCH_FLOOR`` (of ``sum ||v_j||^2``), so
            round-off in the Gram (micro-batching, the order of a sum) cannot flip a tie;
            where a mode rebuilds ``v~_j`` with the same coefficients as the first
            (extrapolation with one computed step before j), the first is kept.

    Returns:
        ``{cached step: mode}`` for every cached step.
    """
    T = len(grid) - 1
    cached = set(cached_steps)
    computed = [k for k in range(T) if k not in cached]
    out: dict[int, str] = {}
    for j in sorted(cached):
        before = [k for k in computed if k < j]
        i = before[-1]
        h = before[-2] if len(before) > 1 else None
        own = _reuse_coefficients(grid, modes[0], h, i, j, T)
        energy = float(gram[:, j, j].sum())  # sum ||v_j||^2: the scale of round-off in the errors
        best, best_error = modes[0], reuse_error(gram, grid, modes[0], h, i, j, rectified)
        for m in modes[1:]:
            if torch.equal(_reuse_coefficients(grid, m, h, i, j, T), own):
                continue
            err = reuse_error(gram, grid, m, h, i, j, rectified)
            if err < best_error * (1 - SWITCH_MARGIN) - SWITCH_FLOOR * energy:
                best, best_error = m, err
        out[j] = best
    return out


def shortest_schedule(cost: Tensor, nfe: int, forced: Sequence[int] = ()) -> tuple[int, ...] | None:
    """The cached steps of the computed set with ``nfe`` steps and the least summed segment cost.

    Args:
        cost: ``(T, T)``, ``cost[i, k]`` for ``i < k`` the cost of computing at i and k
            and caching the steps between (``cost[i, i+1]`` is 0 in practice); or
            ``(T, T, T)``, ``cost[h, i, k]`` the same segment when h is the computed
            step before i (``cost[0, 0, k]``: the first segment), as
            :func:`extrapolation_costs` gives.
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
    inf = torch.full((), torch.inf, dtype=torch.float64)
    if cost.ndim == 3:
        return _pair_path(torch.where(valid[None], cost.double(), inf), nfe, T)
    c = torch.where(valid, cost.double(), inf)
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


def _pair_path(c: Tensor, nfe: int, T: int) -> tuple[int, ...] | None:
    """The DP of :func:`shortest_schedule` whose state is the last two computed steps ``(h, i)``."""
    f = torch.full((T, T), torch.inf, dtype=torch.float64)
    f[0, 1:] = c[0, 0, 1:]  # one edge: 0 -> i
    parents = []
    for _ in range(nfe - 2):  # f[i, k]: least cost of a path from 0 ending h=i -> k, one more edge each time
        total = f[:, :, None] + c  # (h, i, k)
        f, parent = total.min(0)
        parents.append(parent)
    last = f[:, T - 1]
    if not bool(torch.isfinite(last).any()):
        return None
    i = int(last.argmin())
    computed = [T - 1, i]
    k = T - 1
    for parent in reversed(parents):
        h = int(parent[i, k])
        computed.append(h)
        i, k = h, i
    return tuple(sorted(set(range(T)) - set(computed)))


def schedule_for(costs: dict[str, Tensor], rule: str, nfe: int, forced: Sequence[int]) -> tuple[int, ...] | None:
    """The cached set one reading of the error model (``rule``, of :data:`RULES`) gives for ``nfe`` computed steps;
    None when its cost is absent or no set fits beside ``forced``."""
    q = costs.get("rectified" if rule.startswith("rectified") else "raw")
    if q is None:
        return None
    return shortest_schedule(q if "squared" in rule else q.clamp_min(0).sqrt(), nfe, forced)


def propose(costs: dict[str, Tensor], nfe: int, forced: Sequence[int], limit: int) -> list[tuple[str, tuple[int, ...]]]:
    """Up to ``limit`` distinct cached sets for ``nfe`` computed steps, one per reading of the error model.

    Returns:
        ``[(rule, cached_steps)]`` in the order of :data:`RULES` (readings whose cost is absent are skipped).
    """
    out: list[tuple[str, tuple[int, ...]]] = []
    seen: set[tuple[int, ...]] = set()
    for rule in RULES:
        cached = schedule_for(costs, rule, nfe, forced)
        if cached is not None and cached not in seen:
            seen.add(cached)
            out.append((rule, cached))
        if len(out) >= limit:
            break
    return out


def _segments(cost: Tensor, cached_steps: Sequence[int]) -> list[tuple[int, float]]:
    """``(k, cost)`` of each segment of a cached set: the computed step it ends at and its cost (clamped at 0)."""
    T = cost.shape[0]
    skip = set(cached_steps)
    computed = [i for i in range(T) if i not in skip]
    out = []
    for m in range(1, len(computed)):
        i, k = computed[m - 1], computed[m]
        c = cost[i, k] if cost.ndim == 2 else cost[computed[m - 2] if m >= 2 else i, i, k]
        out.append((k, max(float(c), 0.0)))
    return out


def path_cost(cost: Tensor, cached_steps: Sequence[int]) -> float:
    """The summed segment cost of one cached set under ``cost`` (``(T, T)`` or ``(T, T, T)``, as
    :func:`shortest_schedule` takes it; the first segment of a ``(T, T, T)`` cost is ``cost[0, 0, k]``)."""
    return sum(c for _, c in _segments(cost, cached_steps))


BETAS = tuple(x / 10 for x in range(-20, 61))
"""The propagation slopes :func:`fit_propagation` tries (gains ``exp(beta t)``, t in [0, 1])."""


def fit_propagation(cost: Tensor, grid: Sequence[float], judged: Sequence[tuple[Sequence[int], float]]
                    ) -> tuple[float, Tensor] | None:
    """Segment costs weighted by how a drift arriving at step k carries to t = 0, fitted to measured errors.

    The schedule search counts a segment's drift once, as it is made; an error made near noise
    reaches the output amplified, one made near data damped (docs/photos.md, "The error model
    where it is weakest"). Here each segment ending at computed step ``k`` is weighted by
    ``exp(beta t_k)``, and ``beta`` is the slope (of :data:`BETAS`) under which the modelled
    costs of the sets calibration has already judged best explain their measured errors
    (least squares of ``log measured - log modelled``, a free scale). No model call.

    Args:
        cost: segment costs, ``(T, T)`` or ``(T, T, T)`` (:func:`extrapolation_costs`).
        grid: the ``T + 1`` times (t in [0, 1], t = 1 is noise).
        judged: ``(cached_steps, measured error)`` of each judged set (errors > 0).

    Returns:
        ``(beta, weighted cost)``, or None with fewer than 3 distinct judged sets (nothing to fit).
    """
    sets = {tuple(sorted(c)): float(e) for c, e in judged if e > 0}
    if len(sets) < 3:
        return None
    T = cost.shape[0]
    t = torch.tensor([float(x) for x in grid[:T]], dtype=torch.float64)
    measured = torch.tensor([math.log(e) for e in sets.values()], dtype=torch.float64)
    segments = [_segments(cost, c) for c in sets]  # the sets' segments, once; each beta reweighs them
    best: tuple[float, float] | None = None
    for beta in BETAS:
        w = torch.exp(beta * t)
        modelled = torch.tensor([math.log(max(sum(c * float(w[k]) for k, c in seg), 1e-300)) for seg in segments],
                                dtype=torch.float64)
        spread = float((measured - modelled).var(unbiased=False))
        if best is None or spread < best[0] - 1e-12:
            best = (spread, beta)
    assert best is not None
    w = torch.exp(best[1] * t)
    return best[1], cost.double() * (w if cost.ndim == 2 else w[None, None, :])

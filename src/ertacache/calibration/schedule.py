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
   (:meth:`~.sketch.ErrorSketch.gram`, :func:`extrapolation_costs`), and the best computed set is
   a shortest path whose state is the last two computed steps (:func:`shortest_schedule`
   with a ``(T, T, T)`` cost, ``O(NFE T^3)``). Kept for ``T <= 200`` (memory ``T^3``);
   above it the search models ``extrapolate`` as ``velocity``.
4. **Per-step reuse** (not in the paper). For a chosen schedule, each cached step ``j``
   (reusing computed step ``i``, ``h`` the computed step before it) may rebuild ``v~``
   with any mode that keeps what the policy's mode keeps: ``velocity`` (``v_i``) or
   ``extrapolate`` (``v_i + (v_i - v_h)(t_j - t_i)/(t_i - t_h)``). Both are linear in the
   logged outputs, so their errors (raw, or the residual after the step's
   rectification fit) follow from one Gram matrix of each branch's outputs over the
   steps (:meth:`~.sketch.ErrorSketch.gram`), and :func:`choose_step_reuse` takes the mode of
   least error at each step. It ignores what :math:`Q` ignores, and also that the
   choice at one step changes the errors' sum over a segment (each step is chosen on
   its own error); the held-out check keeps the choice only where it helps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..core.reuse import get_reuse

RULES = ("rectified, squared norms add", "squared norms add", "rectified, norms add", "norms add")
"""The error model's readings, in the order their sets are proposed (the rectified ones only with rectification)."""


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

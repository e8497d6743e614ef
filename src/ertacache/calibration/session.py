"""One calibration session: ground truth, Algorithm 2's candidates, their variants, the held-out choice.

The session is the method, once; a driver walks the trajectories (the core Euler
loop, :class:`~ertacache.calibration.drive.CoreDriver`, or a diffusers pipeline's own
``__call__``). Stages (NOTES.md sections 2-4): ground-truth logging and the threshold
search of Algorithm 2 give candidate cached-step sets S; for each candidate the
timestep adjustment (Eq. 13-14) and the rectification fit (Eq. 15-21) are estimated,
and the candidate whose whole cached sampler has the least final-output error on the
held-out part of the set wins.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor

from ..config import CalibrationConfig
from ..errors import ErtaCacheError
from ..policy import Policy, provenance
from .distributed import check_shards
from .drive import Driver
from .passes import AdjustTimesteps, FitRectification, GroundTruth, ThresholdSearch
from .select import Candidate, SearchResult, check_goal, select_candidates, sweep


class CalibrationSession:
    """One calibration set on one model: its fit/held-out split, ground truth and lambda sweep.

    Build it once, then ask for policies at several targets; ground truth and every
    threshold search already run are reused.

    Args:
        driver: walks trajectories of the calibration set.
        config: the calibration options.
        log: progress messages (``print``-like) or None.

    Attributes:
        variants: the component variants of the cached set chosen by the latest
            :meth:`policy` call (see :func:`~ertacache.calibration.calibrate_with_variants`).
        grid: the ``T + 1`` times the driver's trajectories follow.
    """

    def __init__(self, driver: Driver, config: CalibrationConfig | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.driver, self.config = driver, config or CalibrationConfig()
        self.T, n = driver.num_inference_steps, driver.size
        self.n_hold = round(n * self.config.holdout_fraction) if n >= 2 else 0
        self.n_fit = n - self.n_hold
        self.all, self.fit = slice(0, n), slice(0, self.n_fit)
        self.hold = slice(self.n_fit, n) if self.n_hold else self.all
        check_shards([range(n)[self.fit], range(n)[self.hold]], getattr(driver, "world_size", 1))
        self.log = log or (lambda msg: None)
        self.log(f"ground truth on {self.n_fit} fitting and {self.n_hold} held-out samples")
        gt = GroundTruth()
        self.gt_final = driver.run(gt, self.all, self.n_fit, None)
        if len(gt.times) != self.T:
            raise ErtaCacheError(f"the sampler ran {len(gt.times)} steps, not num_inference_steps={self.T}")
        self.grid, self.gt_norms = gt.grid(), gt.norms()
        self.calls_per_step = dict(gt.calls_per_step)
        self.base = dict(driver.policy_fields(self.grid), config=self.config)
        self.searched: list[SearchResult] = []
        self.variants: dict[str, Policy] = {}

    def search(self, threshold: float) -> SearchResult:
        """Algorithm 2's search for one lambda on the fitting rows."""
        self.log(f"policy search at lambda={threshold:g}")
        p = ThresholdSearch(threshold, self.gt_norms, self.config.l1_denominator)
        self.driver.run(p, self.fit, self.n_fit, self.grid)
        return SearchResult(threshold, tuple(p.cached_steps), tuple(p.l1_rel.get(i, 0.0) for i in range(self.T)))

    @torch.no_grad()
    def policy(self, target_speedup: float | None = None, threshold: float | None = None) -> Policy:
        """The policy for a target speedup or a threshold (exactly one); see :func:`~ertacache.calibrate`."""
        max_nfe = check_goal(target_speedup, threshold, self.T)
        candidates = self._candidates(threshold, max_nfe)
        best: tuple[float, Policy, Candidate] | None = None
        for cand in candidates:
            self.log(f"evaluating {cand.source} candidate, NFE {self.T - len(cand.cached_steps)}")
            variants = self._variants(cand)
            cand.errors = {name: self.error(p) for name, p in variants.items()}
            cand.variant = (min(cand.errors, key=cand.errors.__getitem__) if self.config.component_check
                            else list(variants)[-1])
            if best is None or cand.errors[cand.variant] < best[0]:
                best = (cand.errors[cand.variant], variants[cand.variant], cand)
                self.variants = variants
        if best is None:  # pragma: no cover - _candidates never returns an empty list
            raise ErtaCacheError("calibration produced no candidate policy")
        chosen = best[2]
        info = provenance(
            calibration_size=self.driver.size, holdout_size=self.n_hold, target_speedup=target_speedup,
            threshold=chosen.threshold, selected=chosen.source, variant=chosen.variant,
            candidates=[c.as_dict(self.T) for c in candidates],
            timestep_adjustment=("on" if self.config.timestep_adjustment else "off (config)")
            if self.driver.adjustment_off is None else f"off: {self.driver.adjustment_off}",
            **self.driver.provenance(),
        )
        return replace(best[1], provenance=info)

    def _candidates(self, threshold: float | None, max_nfe: int) -> list[Candidate]:
        if threshold is not None:
            return [Candidate("threshold", threshold, self.search(threshold).cached_steps)]
        if max_nfe >= self.T:
            return [Candidate("all_compute", None, ())]
        self.log(f"policy search over {len(self.config.thresholds)} thresholds (target NFE <= {max_nfe})")
        self.searched = sweep(self.search, self.T, self.config.thresholds, max_nfe=max_nfe, known=self.searched)
        return select_candidates(self.searched, self.T, max_nfe, self.config)

    def _variants(self, cand: Candidate) -> dict[str, Policy]:
        """The candidate's policies, from fewest components to all that the config asks for."""
        config = self.config
        plain = Policy(cached_steps=cand.cached_steps, **self.base)  # type: ignore[arg-type]
        out = {"plain": plain}
        if not cand.cached_steps:
            return out
        adjusted: list[float] | None = None
        if config.timestep_adjustment and self.driver.adjustment_off is None:
            adjust = AdjustTimesteps(cand.cached_steps, config.phi_denominator)
            self.driver.run(adjust, self.fit, self.n_fit, self.grid)
            adjusted = adjust.grid
            out["adjusted"] = replace(plain, adjusted_grid=tuple(adjusted))
        if config.rectification != "off":
            grids: list[tuple[str, list[float]]] = [("rectified", self.grid)]
            if adjusted is not None:
                grids = (grids if config.component_check else []) + [("full", adjusted)]
            for name, g in grids:
                fit = FitRectification(cand.cached_steps, config.rectification, config.granularity,
                                       has_holdout=self.n_hold > 0, layout=self.driver.layout)
                self.driver.run(fit, self.all, self.n_fit, g)
                a, b, enabled = fit.tensors(plain.branches, self.T)
                out[name] = replace(out["adjusted"] if name == "full" else plain, rect_a=a, rect_b=b,
                                    rect_enabled=enabled, rect_form=config.rectification)
        return out

    def error(self, policy: Policy) -> float:
        """Mean squared error at t = 0 of ``policy`` against the uncached run, on the held-out rows."""
        final = self.driver.run(policy.follower(self.driver.layout), self.hold, self.n_fit, policy.sampling_grid)
        where = {i: k for k, i in enumerate(self.driver.local(self.all))}
        ref: Tensor = self.gt_final[[where[i] for i in self.driver.local(self.hold)]]
        sums = torch.stack([(final - ref).double().square().sum(), torch.tensor(float(final.numel()),
                                                                                 dtype=torch.float64)])
        total = self.driver.reduce(sums)
        return float(total[0] / total[1])


def logger(enabled: bool, prefix: str = "calibrate") -> Callable[[str], None] | None:
    """A ``print`` logger for progress messages, or None."""
    if not enabled:
        return None

    def log(msg: str) -> None:
        print(f"[{prefix}] {msg}", flush=True)

    return log


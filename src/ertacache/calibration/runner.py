"""Calibration's passes room: running a pass, keeping it in a checkpoint, counting its cost, the budget, progress.

Every pass a calibration makes goes through one :class:`PassRunner`: it is run by the
driver, counted (model calls, wall time) for the policy's provenance, kept in a
checkpoint folder as it finishes (so a killed calibration resumes), charged against
the current target's :attr:`~ertacache.core.config.CalibrationConfig.max_passes`, and shown
on the progress bar.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..core.engine import Pass
from .checkpoint import Checkpoint
from .drive import Driver

PassCallback = Callable[[str], None]
"""Called with a pass' name after it has finished (and been kept, with a checkpoint folder)."""
Kept = tuple[dict[str, Any], dict[str, Tensor]]
"""A finished pass as a checkpoint keeps it: its JSON result and its tensors."""


class PassRunner:
    """Runs, keeps, counts and charges the passes of one calibration session.

    Args:
        driver: walks the trajectories.
        n_fit: rows ``< n_fit`` of the calibration set are fitting rows (the others held out).
        checkpoint: where finished passes are kept and found again, or None.
        callback: called with each finished pass' key (tests stop a calibration with it).
        max_passes: whole-set passes one target may spend (None: no budget).

    Attributes:
        cost: per pass kind, ``{"passes", "model_calls", "seconds"}`` (this process' calls,
            passes kept by a checkpoint included).
        resumed: passes found in the checkpoint instead of run.
        bar: the tqdm progress bar in model calls, or None.
    """

    def __init__(self, driver: Driver, n_fit: int, checkpoint: Checkpoint | None = None,
                 callback: PassCallback | None = None, max_passes: float | None = None) -> None:
        self.driver, self.n_fit, self.checkpoint, self.callback = driver, n_fit, checkpoint, callback
        self.max_passes = max_passes
        self.cost: dict[str, dict[str, float]] = {}
        self.resumed = 0
        self.bar: Any = None
        self._last: dict[str, Any] = {"kind": "", "model_calls": 0, "seconds": 0.0}  # the latest pass' cost
        self._charged: set[str] = set()  # passes charged to a target's budget (each once per session)
        self._spent = 0.0  # whole-set passes the current target has spent

    # ----- running and keeping ---------------------------------------------------
    def run(self, kind: str, pass_: Pass, rows: slice, grid: Sequence[float] | None,
            driver: Driver | None = None) -> Tensor:
        """Run ``pass_`` over this process' part of ``rows`` on ``grid``; counted under ``kind`` even when it
        stops early (:class:`~ertacache.core.engine.StopPass`). Returns x at t = 0 of those rows.

        ``driver``: another set's driver (the fresh-noise check's, :mod:`.fresh`), whose rows all judge."""
        if self.bar is not None:
            self.bar.set_description(f"calibration: {kind}")
            pass_.progress = self.tick
        start = time.perf_counter()
        walker = self.driver if driver is None else driver
        walker.last_model_calls = 0
        try:
            return walker.run(pass_, rows, self.n_fit if driver is None else 0, grid)
        finally:
            self._last = {"kind": kind, "model_calls": walker.last_model_calls,
                          "seconds": time.perf_counter() - start}
            self._count(self._last)

    def done(self, key: str, result: dict[str, Any], tensors: dict[str, Tensor] | None = None) -> None:
        """Keep the pass just run under ``key`` (with its cost, for a resumed calibration); call the callback."""
        if self.checkpoint is not None:
            self.checkpoint.put(key, {**result, "_cost": self._last}, tensors)
        if self.callback is not None:
            self.callback(key)

    def kept(self, key: str) -> Kept | None:
        """The pass ``key`` as a checkpoint kept it (its cost counted again), or None."""
        hit = None if self.checkpoint is None else self.checkpoint.get(key)
        if hit is not None:
            self.resumed += 1
            spent = hit[0].get("_cost")
            if spent:  # the calls made before the interrupt are part of this calibration's cost
                self._count(spent)
                self.tick(int(spent["model_calls"]))
        return hit

    def _count(self, spent: dict[str, Any]) -> None:
        c = self.cost.setdefault(spent["kind"], {"passes": 0, "model_calls": 0, "seconds": 0.0})
        c["passes"] += 1
        c["model_calls"] += spent["model_calls"]
        c["seconds"] += spent["seconds"]

    # ----- the budget --------------------------------------------------------------
    def new_target(self) -> None:
        """Start counting a new target's budget."""
        self._spent = 0.0

    def charge(self, key: str, passes: float) -> None:
        """Count ``passes`` against the current target's budget, once per key in the session.

        The count depends only on what is asked for, not on what a checkpoint already holds,
        so that a resumed calibration takes the same decisions on every process."""
        if key not in self._charged:
            self._charged.add(key)
            self._spent += passes

    def charged(self, key: str) -> bool:
        """Whether ``key`` was charged already (in this session, to any target)."""
        return key in self._charged

    def affords(self, passes: float) -> bool:
        """Whether ``passes`` more fit in the current target's budget."""
        return self.max_passes is None or self._spent + passes <= self.max_passes + 1e-9

    # ----- progress ------------------------------------------------------------------
    def open_bar(self, total: int) -> None:
        """Show one tqdm bar of ``total`` model calls (an estimate, :func:`~.plan.plan`)."""
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="call", unit_scale=True, desc="calibration", mininterval=1.0)

    def resize_bar(self, total: int) -> None:
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def close_bar(self) -> None:
        """End the bar at 100 % (the plan is an upper bound)."""
        if self.bar is not None:
            self.resize_bar(self.bar.n)
            self.bar.close()

    def tick(self, calls: int) -> None:
        if self.bar is not None and calls:
            self.bar.update(min(calls, max(0, self.bar.total - self.bar.n)))

    # ----- cost -----------------------------------------------------------------------
    def snapshot(self) -> dict[str, dict[str, float]]:
        """A copy of :attr:`cost`, to measure what later passes cost (:meth:`summary`)."""
        return {k: dict(v) for k, v in self.cost.items()}

    def summary(self, before: dict[str, dict[str, float]], ground_truth: dict[str, dict[str, float]],
                per_generation: int) -> dict[str, Any]:
        """A policy's cost: the ground truth (shared by every target of the session) and the passes run for its
        own target since ``before``; model calls summed over processes, also in uncached generations of the set
        (``per_generation`` calls each)."""
        def part(costs: dict[str, dict[str, float]]) -> dict[str, Any]:
            kinds = sorted(k for k in costs if costs[k]["passes"])
            calls = self.driver.reduce(torch.tensor([costs[k]["model_calls"] for k in kinds] or [0.0],
                                                    dtype=torch.float64))
            by_pass = {k: {"passes": int(costs[k]["passes"]), "model_calls": int(calls[i]),
                           "seconds": round(costs[k]["seconds"], 2)} for i, k in enumerate(kinds)}
            total = int(sum(v["model_calls"] for v in by_pass.values()))
            return {"by_pass": by_pass, "passes": sum(v["passes"] for v in by_pass.values()), "model_calls": total,
                    "seconds": round(sum(costs[k]["seconds"] for k in kinds), 2),
                    "uncached_generations": round(total / per_generation, 2)}

        fields = ("passes", "model_calls", "seconds")
        own = {k: {m: v[m] - before.get(k, {}).get(m, 0) for m in fields}
               for k, v in self.cost.items() if k != "ground truth"}
        gt, target = part(ground_truth), part(own)
        both = {k: dict(v) for k, v in own.items()}
        for k, v in ground_truth.items():
            both[k] = {m: both.get(k, {}).get(m, 0) + v[m] for m in fields}
        return {**part(both), "ground_truth": {k: gt[k] for k in ("passes", "model_calls", "uncached_generations")},
                "target": {k: target[k] for k in ("passes", "model_calls", "seconds", "uncached_generations")},
                "resumed_passes": self.resumed}

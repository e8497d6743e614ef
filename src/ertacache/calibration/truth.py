"""The ground truth of a calibration set: its uncached trajectories and what calibration reads from them.

One uncached pass over every sample records the final states (the reference every
policy's error is measured against), the grid, Algorithm 2's norms, the velocity
changes Eq. 13-14 divides by, the steps that must be computed (an expert switch), and
the schedule search's error model (all samples, and without each fold's samples).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..core.config import CalibrationConfig
from ..errors import ErtaCacheError
from .drive import Driver
from .passes import GroundTruth
from .runner import PassRunner
from .sketch import ErrorSketch

KEY = "ground truth"


@dataclass
class Truth:
    """What the ground-truth pass recorded.

    Attributes:
        final: x at t = 0 of this process' rows, ``(n_local, *latent_shape)``.
        grid: the ``T + 1`` times the driver's trajectories follow, 1 -> 0.
        norms: per step, the mean norm of the model output (Algorithm 2's denominators).
        changes: per step, the mean velocity change (Eq. 13-14's denominators).
        switch_steps: steps that must be computed (e.g. Wan 2.2's expert switch).
        search_costs: the schedule search's ``(T, T)`` segment costs and its Gram matrix, or empty.
        fold_costs: the same without each fold's samples (empty without folds).
    """

    final: Tensor
    grid: list[float]
    norms: tuple[float, ...]
    changes: tuple[float, ...]
    switch_steps: list[int]
    search_costs: dict[str, Tensor]
    fold_costs: list[dict[str, Tensor]] = field(default_factory=list)


def record_truth(runner: PassRunner, driver: Driver, config: CalibrationConfig, folds: Sequence[slice],
                 log: object = None) -> Truth:
    """Run (or resume from the checkpoint) the ground-truth pass over every sample.

    Raises:
        ErtaCacheError: the sampler ran another step count than ``driver.num_inference_steps``.
    """
    hit = runner.kept(KEY)
    if hit is not None:
        result, tensors = hit
        driver.restore(result["driver"])
        return Truth(tensors["x"], list(result["grid"]), tuple(result["norms"]), tuple(result["changes"]),
                     list(result["switch_steps"]),
                     {k[7:]: v for k, v in tensors.items() if k.startswith("search.")},
                     [{k[len(f"fold{f}."):]: v for k, v in tensors.items() if k.startswith(f"fold{f}.")}
                      for f in range(int(result.get("folds", 0)))])
    T = driver.num_inference_steps
    gt = GroundTruth(ErrorSketch() if "search" in config.candidates else None)
    final = runner.run(KEY, gt, slice(0, driver.size), None)
    if len(gt.times) != T:
        raise ErtaCacheError(f"the sampler ran {len(gt.times)} steps, not num_inference_steps={T}")
    if not bool(torch.isfinite(final).all()):
        raise ErtaCacheError("the uncached ground-truth pass returned NaN or inf (the model or pipeline itself, with "
                             "no cache on): check the calibration inputs and dtype, and that the model samples them "
                             "uncached")
    truth = Truth(final, gt.grid(), gt.norms(), gt.velocity_changes(), gt.switch_steps(), {})
    branches = driver.policy_fields(truth.grid)["branches"]
    if gt.sketch is not None:
        truth.search_costs = sketch_costs(gt.sketch, truth.grid, config, driver, branches)
        if gt.sketch.knows_samples:
            truth.fold_costs = [sketch_costs(gt.sketch.without(range(driver.size)[f]), truth.grid, config, driver,
                                             branches) for f in folds]
    folded = {f"fold{f}.{k}": v for f, costs in enumerate(truth.fold_costs) for k, v in costs.items()}
    runner.done(KEY, {"grid": truth.grid, "norms": list(truth.norms), "changes": list(truth.changes),
                      "switch_steps": truth.switch_steps, "driver": driver.recorded(),
                      "folds": len(truth.fold_costs)},
                {"x": final, **{f"search.{k}": v for k, v in truth.search_costs.items()}, **folded})
    return truth


def sketch_costs(sketch: ErrorSketch, grid: Sequence[float], config: CalibrationConfig, driver: Driver,
                 branches: Sequence[str]) -> dict[str, Tensor]:
    """The schedule search's error model from a ground-truth sketch: segment costs and the Gram matrix."""
    return {**sketch.costs(grid, config.reuse, driver.reduce, config.rectification != "off", branches),
            "gram": sketch.gram(driver.num_inference_steps, branches, driver.reduce)}

"""Calibration's fresh-noise room: a set fitted to the samples, checked on noise it was not fitted to.

With two or more samples per process, a set the schedule search fitted to the calibration
samples is checked k-fold (:meth:`~.judge.Judge.shift`). With one sample there is no fold
to leave out: the set is judged on the very trajectory it was fitted to, and its in-sample
win can be large and false (docs/calibration.md, "Error rates over many draws": on the
photo model one sample rated a per-step-reuse set +10.7 dB that was 6.0 dB *below* evenly
spaced caching on held-out seeds). The fresh check runs the same conditions with other
noise seeds (:func:`~.drive.fresh_seeds`), and, where the set has a null condition (CFG's negative
or empty prompt), as many rows of that unconditional prompt under other fresh seeds: their
uncached ground truth once per session, then the two policies of a comparison. A fitted
set's win is kept only where its mean gain over those rows is positive (docs/method.md
section 2.8): fresh noise exposes a set fitted to one trajectory's luck, the unconditional
prompt one fitted to its prompt (on the photo model, a set that gained 7.5 to 12.7 dB on fresh
noise of its own class lost 15 to 20 dB on the unconditional prompt and 6.0 dB on held-out seeds).

The check costs one uncached pass of its rows (twice the set's with the unconditional rows; shared by every
target) and one evaluation of them per policy compared; it runs outside ``max_passes``, as the ground truth
does, and is counted in the policy's cost under ``fresh ground truth`` and ``fresh evaluation``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..policy import Policy
from .drive import Driver
from .evidence import DB
from .judge import sample_log_mse
from .passes import GroundTruth
from .runner import PassRunner


def twin_of(driver: Driver) -> tuple[Driver | None, str | None]:
    """The driver of the same calibration set under fresh noise, or ``(None, why not)``.

    A driver offers one with a ``twin()`` method (the core loop and the pipeline driver do); a
    pipeline call that passes its own ``latents`` has no other noise to draw."""
    make = getattr(driver, "twin", None)
    if make is None:
        return None, f"{type(driver).__name__} cannot draw other noise"
    twin = make()
    if twin is None:
        return None, getattr(driver, "twin_off", None) or "the driver cannot draw other noise"
    return twin, None


class FreshCheck:
    """Scores of policies on the calibration set's conditions under fresh noise (:func:`~.drive.fresh_seeds`).

    Args:
        runner: the session's runner (counts the passes, keeps them in its checkpoint).
        twin: the driver of the same set with fresh seeds (:func:`twin_of`).

    Attributes:
        scores: per evaluation key, each fresh sample's log MSE at t = 0 against its uncached run.
    """

    def __init__(self, runner: PassRunner, twin: Driver) -> None:
        self.runner, self.twin = runner, twin
        self.scores: dict[str, Tensor] = {}
        self._reference: Tensor | None = None

    @property
    def seeds(self) -> list[int]:
        return list(getattr(self.twin, "seeds", []))

    def reference(self) -> Tensor:
        """x at t = 0 of the uncached run under fresh noise (this process' rows), run once."""
        if self._reference is None:
            key = "fresh ground truth"
            hit = self.runner.kept(key)
            if hit is not None:
                self._reference = hit[1]["x"]
            else:
                self._reference = self.runner.run(key, GroundTruth(None), slice(0, self.twin.size), None,
                                                  driver=self.twin)
                self.runner.done(key, {}, {"x": self._reference})
        return self._reference

    def score(self, key: str, policy: Policy) -> Tensor:
        """Each fresh sample's log MSE at t = 0 of ``policy`` (evaluation key ``key``), run once per key."""
        if key not in self.scores:
            ref = self.reference()
            kept_key = f"fresh {key}"
            hit = self.runner.kept(kept_key)
            if hit is not None:
                self.scores[key] = hit[1]["log_mse"]
            else:
                final = self.runner.run("fresh evaluation", policy.follower(self.twin.layout),
                                        slice(0, self.twin.size), policy.sampling_grid, driver=self.twin)
                log_mse = sample_log_mse(final, ref)
                self.runner.done(kept_key, {}, {"log_mse": log_mse})
                self.scores[key] = log_mse
        return self.scores[key]

    def gain(self, old: tuple[str, Policy], new: tuple[str, Policy]) -> dict[str, Any]:
        """``new``'s gain over ``old`` (each ``(evaluation key, policy)``) on the fresh samples: the mean over
        samples of ``10 log10(MSE_old / MSE_new)`` (dB, every process' rows), the samples counted; where the twin
        has them, the mean over the rows of the unconditional prompt alone (``unconditional``) and over the rows of
        other conditions (``other``), and then ``other_prompts``: the mean gain per prompt the set was not fitted
        to (the unconditional prompt counted once, each other condition once)."""
        d = (self.score(*old) - self.score(*new)) * DB
        size = self.twin.size
        n_other = getattr(self.twin, "other_rows", 0)
        n_null = getattr(self.twin, "unconditional_rows", 0)
        rows = self.twin.local(slice(0, size))
        null = torch.tensor([size - n_other - n_null <= i < size - n_other for i in rows], dtype=torch.bool)
        other = torch.tensor([i >= size - n_other for i in rows], dtype=torch.bool)
        sums = self.twin.reduce(torch.stack([d.sum(), d.new_tensor(float(d.numel())), d[null].sum(),
                                             d.new_tensor(float(int(null.sum()))), d[other].sum(),
                                             d.new_tensor(float(int(other.sum())))]))
        n, n_null, n_other = int(sums[1]), int(sums[3]), int(sums[5])
        out: dict[str, Any] = {"gain_db": round(float(sums[0]) / max(n, 1), 3), "samples": n, "seeds": self.seeds}
        if n_null:
            out["unconditional"] = {"gain_db": round(float(sums[2]) / n_null, 3), "samples": n_null}
        if n_other:
            out["other"] = {"gain_db": round(float(sums[4]) / n_other, 3), "samples": n_other}
            prompts = n_other + (1 if n_null else 0)
            total = float(sums[4]) + (float(sums[2]) / n_null if n_null else 0.0)
            out["other_prompts"] = {"gain_db": round(total / prompts, 3), "prompts": prompts}
        return out

    @staticmethod
    def holds(got: dict[str, Any]) -> bool:
        """The check's rule (docs/method.md section 2.8): the mean gain over every fresh row is positive, and, where
        there are rows of other conditions, so is the mean gain per prompt the set was not fitted to."""
        return got["gain_db"] > 0.0 and ("other_prompts" not in got or got["other_prompts"]["gain_db"] > 0.0)

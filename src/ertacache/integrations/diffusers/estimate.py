"""What calibrating a pipeline would cost, before it runs: one 2-step call timed, the passes counted."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from ...calibration import check_goal
from ...calibration.plan import plan
from ...core.config import CalibrationConfig
from ...errors import ErtaCacheError
from .adapters import hidden_argument, is_rows, per_row, take_rows
from .calibrate import set_size
from .families import family_for, transformers_of
from .scheduler import model_steps


def estimate_pipeline(pipe: Any, prompts: Sequence[str] | None, *, num_inference_steps: int,
                      target_speedups: Sequence[float], config: CalibrationConfig | None = None,
                      seeds: Sequence[int] | None = None, check_prompts: Sequence[str] | None = None,
                      **pipe_kwargs: Any) -> Any:
    """What :func:`calibrate_pipeline` would cost, without running it (a dry run).

    Runs the pipeline once on the first prompt for 2 steps, timing each transformer forward
    and counting its rows (guidance branches per sample), then counts the passes and
    model calls of ``config`` (:func:`ertacache.calibration.plan`, an upper bound), the rows of
    ``check_prompts`` included.

    Returns:
        A :class:`~ertacache.calibration.Plan` with ``seconds_per_call`` (one row of one forward).

    Raises:
        ErtaCacheError: an empty set, an invalid target, a pipeline of no registered family.
    """
    config = config or CalibrationConfig()
    for s in target_speedups:
        check_goal(s, None, num_inference_steps)
    n = set_size(prompts, pipe_kwargs)
    if n == 0:
        raise ErtaCacheError("the calibration set is empty: give at least one prompt")
    family = family_for(pipe)
    seed = 0 if not seeds else int(list(seeds)[0])
    timings: list[tuple[float, int]] = []
    started: list[float] = []

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def before(module: Any, args: Any, kwargs: Any) -> None:
        sync()
        started.append(time.perf_counter())

    def after(module: Any, args: Any, kwargs: Any, output: Any) -> None:
        sync()
        x = hidden_argument(args, kwargs)
        rows = len(x) if is_rows(x) else int(x.shape[0]) if isinstance(x, Tensor) else 1
        timings.append((time.perf_counter() - started.pop(), rows))

    handles = []
    for tf in transformers_of(pipe, family):
        handles.append(tf.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(tf.register_forward_hook(after, with_kwargs=True))
    one = {k: take_rows(v, [0], family.row_dim(k)) if per_row(v, n, family.row_dim(k)) else v
           for k, v in pipe_kwargs.items()}
    try:
        with torch.no_grad():
            pipe(**({"prompt": [prompts[0]]} if prompts is not None else {}), num_inference_steps=2,
                 generator=torch.Generator().manual_seed(seed), output_type="latent", **one)
    finally:
        for h in handles:
            h.remove()
    if not timings:
        raise ErtaCacheError(f"{type(pipe).__name__} ran no transformer forward in a 2-step call")
    calls = model_steps(pipe.scheduler, 2)  # transformer calls per branch of the 2-step call (Heun's: 3)
    rows_per_sample = max(1, round(sum(r for _, r in timings) / calls))
    later = timings[len(timings) // 2:] or timings  # the second step's forwards: past first-call set-up
    seconds_per_row = min(s / r for s, r in later)
    T = model_steps(pipe.scheduler, num_inference_steps)  # a policy's steps: the calls per branch
    return replace(plan(config, T, target_speedups, n * rows_per_sample, n, len(check_prompts or ())),
                   seconds_per_call=seconds_per_row)

"""The pipeline driver's fresh rows (:mod:`ertacache.calibration.fresh`): the calibration set under fresh noise, the
unconditional prompt, and other prompts the set was not fitted to.

A twin is a driver of the same pipeline and call whose rows are: the set's own rows under fresh noise seeds; then,
where the call has an unconditional prompt (the negative prompt, or ``""``; with embeddings, each ``negative_*``
tensor in place of its row), as many rows of it under other fresh seeds; then the ``check_prompts`` (other prompts,
each with its own seed, the call's other arguments those of the set's first row).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ...calibration.drive import fresh_seeds, other_seeds
from ...errors import ErtaCacheError
from .adapters import PROMPT_EMBEDS, per_row, take_rows


def check_prompts_valid(check_prompts: Sequence[str] | None, prompts: Sequence[str] | None,
                        local_rows: bool) -> list[str] | None:
    """``check_prompts`` as a list, validated against the call that calibrates.

    Raises:
        ErtaCacheError: not a non-empty list of strings, a call without prompt strings (``prompt_embeds`` alone: other
            prompts would need their own embeddings), or ``local_rows`` (each process' rows are its own there).
    """
    if check_prompts is None:
        return None
    if isinstance(check_prompts, str) or not all(isinstance(p, str) for p in check_prompts) or not check_prompts:
        raise ErtaCacheError(f"check_prompts must be a non-empty list of prompt strings, got {check_prompts!r}")
    if prompts is None:
        raise ErtaCacheError("check_prompts needs a calibration set of prompt strings; this one passes prompt_embeds "
                             "(other prompts would need embeddings of their own): pass prompts, or leave "
                             "check_prompts out")
    if local_rows:
        raise ErtaCacheError("check_prompts with local_rows=True is not supported (each process passes its own "
                             "rows): pass the whole set on every process, or leave check_prompts out")
    return list(check_prompts)


def null_rows(driver: Any) -> tuple[list[str] | None, dict[str, Any]] | None:
    """``(prompts, kwargs)`` of the driver's rows (this process') followed by as many rows of the unconditional
    prompt, or None where the call has none (embeddings without ``negative_prompt_embeds``)."""
    n = driver.rows_here
    if driver.prompts is None and not any(driver._per_row(driver.kwargs.get(f"negative_{name}"), f"negative_{name}")
                                          for name in PROMPT_EMBEDS):
        return None
    kwargs: dict[str, Any] = {}
    for key, value in driver.kwargs.items():
        if not driver._per_row(value, key):
            kwargs[key] = value
            continue
        other = driver.kwargs.get(f"negative_{key}")
        null: Any = other if driver._per_row(other, f"negative_{key}") and type(other) is type(value) else value
        kwargs[key] = torch.cat([value, null.to(value)], dim=driver.family.row_dim(key)) \
            if isinstance(value, Tensor) else value + null
    prompts = None
    if driver.prompts is not None:
        negative = driver.kwargs.get("negative_prompt")
        null_prompts = negative if isinstance(negative, list) and len(negative) == n else \
            [negative if isinstance(negative, str) else ""] * n
        prompts = driver.prompts + null_prompts
    return prompts, kwargs


def with_other_rows(prompts: list[str], kwargs: dict[str, Any], size: int,
                    others: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """``prompts`` (``size`` rows) followed by ``others``; each per-row argument extended by its first row."""
    order = list(range(size)) + [0] * len(others)
    out = {key: take_rows(value, order) if per_row(value, size) else value for key, value in kwargs.items()}
    return prompts + list(others), out


def fresh_twin(driver: Any) -> Any:
    """The driver's twin for the fresh check (module docstring), a driver of the same class; its
    ``unconditional_rows`` and ``other_rows`` say where its rows of each kind are."""
    null = null_rows(driver)
    seeds = fresh_seeds(driver.seeds)
    # with local_rows too: each process' rows are its own then its unconditional ones, so that global row i
    # (process i % W's local row i // W) is the set's row i, then row i - N's unconditional one
    prompts, kwargs = (driver.prompts, driver.kwargs) if null is None else null
    seeds = seeds + ([] if null is None else fresh_seeds(seeds))
    others = driver.check_prompts or []
    if others and prompts is not None:  # check prompts come with prompt strings (check_prompts_valid)
        prompts, kwargs = with_other_rows(prompts, kwargs, len(seeds), others)
        seeds = seeds + other_seeds(driver.seeds, len(others))
    twin = type(driver)(driver.pipe, prompts, seeds, driver.call_steps, driver.reuse.name, kwargs,
                        driver.batch_size, driver.local_rows)
    twin.unconditional_rows = 0 if null is None else driver.size
    twin.other_rows = len(others)
    return twin

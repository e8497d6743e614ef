"""Calibration over many processes with ``torch.distributed``: shards of the set, summed statistics.

Each rank walks its shard of the calibration rows (row ``i`` belongs to rank
``i % world_size``); every per-step statistic is all-reduced before a pass decides, so
every rank reaches the same decisions and the same policy. gloo serves CPU tensors,
NCCL GPU ones.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import ErtaCacheError


def rank_and_size() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, or ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(t: Tensor) -> Tensor:
    """The sum of ``t`` over all ranks (a copy; ``t`` itself on one process)."""
    return _all_reduce(t, "sum")


def all_reduce_max(t: Tensor) -> Tensor:
    """The elementwise maximum of ``t`` over all ranks (a copy; ``t`` itself on one process)."""
    return _all_reduce(t, "max")


def _all_reduce(t: Tensor, op: str) -> Tensor:
    import torch.distributed as dist

    if rank_and_size()[1] == 1:
        return t
    out = t.detach().clone()
    if dist.get_backend() == "nccl":
        out = out.to(f"cuda:{torch.cuda.current_device()}")
    dist.all_reduce(out, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return out.to(t.device)


def same_on_every_rank(value: int) -> bool:
    """Whether every rank holds the same ``value`` (an int below 2**62; True on one process)."""
    both = all_reduce_max(torch.tensor([value, -value], dtype=torch.int64))
    return int(both[0]) == -int(both[1])


def rows_over_processes(n: int) -> int:
    """The calibration set's size when each process passes its own ``n`` rows (:func:`ertacache.calibrate_pipeline`
    with ``local_rows=True``): ``n`` times the world size.

    Raises:
        ErtaCacheError: the processes pass different numbers of rows.
    """
    world = rank_and_size()[1]
    if world == 1:
        return n
    if not same_on_every_rank(n):
        raise ErtaCacheError(f"with local_rows=True every process must pass as many calibration rows; this one "
                             f"passes {n}, another a different number: give each process the same number of prompts")
    return n * world


def init_from_env() -> bool:
    """Initialise the default process group when ``torchrun`` started this process (``WORLD_SIZE`` > 1).

    Returns:
        True when this call initialised it.
    """
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def finish(initialised: bool) -> None:
    """Wait for every rank (rank 0 writes the policy), then tear the process group down, if this process made it.

    Ranks that leave while another still holds the group can abort at exit (gloo).
    """
    import torch.distributed as dist

    if initialised and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard(rows: range, rank: int, world_size: int) -> list[int]:
    """The global row indices of ``rows`` that rank ``rank`` walks."""
    return [i for i in rows if i % world_size == rank]


def check_shards(parts: Sequence[range], world_size: int) -> None:
    """Every rank must hold at least one row of every part (all samples; with a held-out split, each side),
    or the ranks' passes diverge. Checked before the first model call.

    Raises:
        ErtaCacheError: naming the part, its size and the minimum.
    """
    for part in parts:
        if len(part) and min(len(shard(part, r, world_size)) for r in range(world_size)) == 0:
            raise ErtaCacheError(
                f"{world_size} processes need at least {world_size} calibration samples (one each), but a part of "
                f"the set has {len(part)}; give at least {world_size} samples (prompts), or run fewer processes"
            )


def fold_slices(n: int, world_size: int, folds: int) -> list[slice]:
    """The k folds of ``n`` calibration rows for k-fold checks: contiguous, each starting at a multiple of
    ``world_size`` and at least that long, so that every rank holds a row of every fold. ``k`` is ``folds``
    capped at ``n // world_size``; fewer than 2 folds: ``[]`` (no check).
    """
    blocks = n // max(world_size, 1)
    k = min(folds, blocks)
    if k < 2:
        return []
    bounds = [world_size * (f * blocks // k) for f in range(k)] + [n]
    return [slice(bounds[f], bounds[f + 1]) for f in range(k)]

"""What the command line writes: a calibrated policy, on the first process only."""

from __future__ import annotations

from typing import Any

from ..calibration.distributed import rank_and_size


def write_policy(policy: Any, out: str) -> int:
    """Save a calibrated policy at ``out`` and print its summary, on rank 0 only (every rank reached the same
    policy); the exit status."""

    if rank_and_size()[0] != 0:
        return 0
    path = policy.save(out)
    print(policy.summary())
    print(f"wrote {path}")
    return 0

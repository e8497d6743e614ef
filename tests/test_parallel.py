"""Context parallelism (diffusers' enable_parallelism, Ulysses) with the cache applied before or after it."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path


def test_context_parallel_in_either_order_matches_one_process(tmp_path):
    out = tmp_path / "cp.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    worker = Path(__file__).with_name("dist_cp_worker.py")
    for attempt in range(2):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                               "--master-port", "29561", str(worker), str(out)], capture_output=True, text=True,
                               env=env, timeout=600)
        # once in a loaded `make test` (2026-12-08) a rank aborted inside gloo ("terminate called without an active
        # exception", SIGABRT) and passed when run again; a second abort, or any other failure, fails the test
        if done.returncode == 0 or "Signal 6 (SIGABRT)" not in done.stderr:
            break
        warnings.warn(f"context-parallel worker aborted (attempt {attempt + 1}); running it again", stacklevel=1)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = json.loads(out.read_text())
    assert len(ranks) == 2 and len(ranks[0]) == 4  # (velocity, block_residual) x (after, before)
    for a, b in zip(*ranks):
        assert a["steps"] == b["steps"], a  # both ranks cache the same steps
        assert a["forwards"] == {"cond": a["nfe"], "uncond": a["nfe"]}, a
        for r in (a, b):
            assert r["max_abs_diff"] < 1e-4, r  # the single-process output, up to the split attention's rounding

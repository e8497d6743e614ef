"""Fuzzed policy files: every mutation either loads as a valid policy or raises ErtaCacheError, nothing else."""

import json
import math
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from ertacache import Policy
from ertacache.errors import ErtaCacheError
from test_policy import rich_policy

BASE = rich_policy()
BLOB = st_save(BASE._tensors(), metadata={"ertacache.policy": json.dumps(BASE._header())})
HEADER = BASE._header()
TENSORS = BASE._tensors()
CASES = 2000

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def deep(n: int) -> str:
    return "[" * n + "]" * n


@st.composite
def byte_mutation(draw):
    blob = bytearray(BLOB)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert"]))
        pos = draw(st.integers(0, max(len(blob) - 1, 0)))
        if kind == "flip" and blob:
            blob[pos] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del blob[pos:]
        else:
            blob[pos:pos] = draw(st.binary(min_size=1, max_size=8))
    return bytes(blob)


@st.composite
def header_mutation(draw):
    header = json.loads(json.dumps(HEADER))
    key = draw(st.sampled_from(sorted(header) + ["config.thresholds", "config.reuse", "cached_steps.0", "grid.3"]))
    kind = draw(st.sampled_from(["value", "delete", "deep"]))
    target, name = header, key
    if "." in key:
        outer, inner = key.split(".")
        target = header[outer]
        name = int(inner) if isinstance(target, list) else inner
    if kind == "delete":
        if isinstance(target, dict):
            target.pop(name, None)
        else:
            target.pop(name)
        text = json.dumps(header)
    elif kind == "deep":
        target[name] = "@DEEP@"
        text = json.dumps(header).replace('"@DEEP@"', deep(draw(st.sampled_from([10, 1000, 100_000]))))
    else:
        target[name] = draw(json_values)
        text = json.dumps(header)  # allow_nan: NaN and Infinity literals reach the reader
    return st_save(TENSORS, metadata={"ertacache.policy": text})


@st.composite
def tensor_mutation(draw):
    tensors = dict(TENSORS)
    key = draw(st.sampled_from(sorted(tensors) + ["extra"]))
    kind = draw(st.sampled_from(["delete", "shape", "dtype", "value"]))
    if kind == "delete":
        tensors.pop(key, None)
    elif kind == "shape":
        shape = draw(st.lists(st.integers(0, 9), min_size=0, max_size=3))
        tensors[key] = torch.zeros(shape)
    elif kind == "dtype":
        dtype = draw(st.sampled_from([torch.float16, torch.float64, torch.int64, torch.uint8, torch.bool]))
        tensors[key] = tensors.get(key, torch.zeros(8, 2)).to(dtype)
    else:
        t = tensors.get(key, torch.zeros(8, 2)).clone()
        values = [2, 7, 255] if t.dtype == torch.uint8 else [math.nan, math.inf, -math.inf, 1e30, 2.0, 7.0]
        value = draw(st.sampled_from(values))
        t.view(-1)[draw(st.integers(0, max(t.numel() - 1, 0)))] = value
        tensors[key] = t
    return st_save(tensors, metadata={"ertacache.policy": json.dumps(HEADER)})


@settings(max_examples=CASES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(blob=st.one_of(byte_mutation(), header_mutation(), tensor_mutation()))
def test_mutated_files_raise_only_the_library_error(blob):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "p.safetensors"
        path.write_bytes(blob)
        try:
            policy = Policy.load(path)
        except ErtaCacheError:
            return
        # what loads is a usable policy: finite coefficients, a summary, a follower, and it saves again
        for coeffs in (*policy.rect_a.values(), *policy.rect_b.values()):
            assert bool(torch.isfinite(coeffs).all())
        assert f"T={policy.num_inference_steps}, NFE={policy.nfe} per branch" in policy.summary()
        policy.follower()
        again = Policy.load(policy.save(Path(folder) / "again.safetensors"))
        assert (again.cached_steps, again.sampling_grid, again.reuse) == (
            policy.cached_steps, policy.sampling_grid, policy.reuse)

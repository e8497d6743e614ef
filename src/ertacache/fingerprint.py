"""A cheap identity for a model's weights, stored in a policy and checked when it is used."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

COMPILE_PREFIX = "_orig_mod."
"""What ``torch.compile`` puts before the names of the wrapped module's weights."""


def model_fingerprint(model: nn.Module, values_per_tensor: int = 64) -> str:
    """SHA-256 (first 16 hex digits) of every parameter's and buffer's name, shape and first values.

    Reading only the first ``values_per_tensor`` values keeps this fast on
    multi-billion-parameter models while still telling two checkpoints of one
    architecture apart. The same weights give the same fingerprint on any device, in
    float32, bfloat16 or float16 (values are compared rounded to bfloat16), and under
    ``torch.compile`` (its ``_orig_mod.`` name prefix is dropped): a policy calibrated in
    one precision fits the model in another.
    """
    h = hashlib.sha256()
    for name, tensor in sorted((k.replace(COMPILE_PREFIX, ""), v) for k, v in model.state_dict().items()):
        h.update(f"{name}|{tuple(tensor.shape)}|".encode())
        head = tensor.detach().reshape(-1)[:values_per_tensor].to("cpu")
        if head.is_floating_point():
            head = head.to(torch.bfloat16)
        h.update(head.to(torch.float64).numpy().tobytes())
    return h.hexdigest()[:16]

"""A cheap identity for a model's weights, stored in a policy and checked when it is used."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def model_fingerprint(model: nn.Module, values_per_tensor: int = 64) -> str:
    """SHA-256 (first 16 hex digits) of every parameter's and buffer's name, shape, dtype and first values.

    Reading only the first ``values_per_tensor`` values keeps this fast on
    multi-billion-parameter models while still telling two checkpoints of one
    architecture apart. Moving the model between devices does not change it; casting
    its dtype does (a policy calibrated in bf16 is checked against bf16).
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        head = tensor.detach().reshape(-1)[:values_per_tensor].to("cpu", torch.float64)
        h.update(head.numpy().tobytes())
    return h.hexdigest()[:16]

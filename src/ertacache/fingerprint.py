"""A model's identity, stored in a policy and checked when the policy is used: the checkpoint, not its state.

A fingerprint reads, for every weight (parameter or buffer), its name and shape and its first values, wherever
those values live: on the device, on the meta device behind accelerate's offload hooks (their ``weights_map``),
or in the files of diffusers' group offloading to disk. It is the same for a checkpoint in float32, bfloat16
or float16, offloaded or not, compiled or not, with or without LoRA adapters (peft's ``base_layer`` is read as
the weight it wraps; the adapters' own weights are left out), and different for another checkpoint of the same
architecture.

The string is ``fp2-<structure>-<values>``: a hash of the names and shapes (16 hex digits), then
the first :data:`HEAD` values of every floating tensor (float32, URL-safe base64; at most :data:`SAMPLED`,
taken evenly). Two
fingerprints name the same model when the structures are equal and the values agree within the rounding of
the coarsest precision (:data:`REL_TOL`: bfloat16 keeps 8 significant bits, so rounding to it moves a value by
at most 2^-8 of it, and float32 -> float16 -> bfloat16 by at most 2^-8 + 2^-11; two copies in any of the three
precisions differ by less than 2^-7). A fingerprint of
16 hex digits (before the values were stored) is an exact hash of bfloat16-rounded heads, compared exactly.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ErtaCacheError

COMPILE_PREFIX = "_orig_mod."
"""What ``torch.compile`` puts before the names of the wrapped module's weights."""
HEAD = 2
"""Values read from the start of each tensor."""
SAMPLED = 4096
"""Values a fingerprint stores at most (evenly from all heads: about 1,300 tensors on FLUX.1, 2,600 values)."""
REL_TOL = 2.0**-7
"""Relative tolerance of one value (two copies' roundings, 2^-8 + 2^-8 + 2^-11 at worst, stay below it)."""
ABS_TOL = 1e-6
"""Absolute tolerance (float16's subnormals are 6e-8 apart)."""
MAX_DISAGREE = 0.0
"""The share of values that may disagree beyond the tolerance (none: rounding alone stays within it)."""
_ADAPTER = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)(\.|$)")
_LEGACY = re.compile(r"^[0-9a-f]{16}$")


def adapters_of(model: nn.Module) -> dict[str, bool]:
    """The peft adapters on ``model`` (LoRA by diffusers' ``load_lora_weights`` or peft's ``inject_adapter``):
    name -> fused into the base weights (``fuse_lora``, ``merge_adapter``)."""
    found: dict[str, bool] = {}
    module: Any
    for module in model.modules():
        if hasattr(module, "base_layer") and hasattr(module, "merged_adapters"):
            for name in getattr(module, "lora_A", {}):
                found[name] = found.get(name, False) or name in module.merged_adapters
    return found


def _offloaded_files(model: nn.Module) -> dict[int, tuple[str, str]]:
    """Tensors that diffusers' group offloading keeps in files: ``id(tensor) -> (file, key)``."""
    files: dict[int, tuple[str, str]] = {}
    for module in model.modules():
        registry = module.__dict__.get("_diffusers_hook")
        for hook in getattr(registry, "hooks", {}).values():
            group: Any = getattr(hook, "group", None)
            if group is not None and getattr(group, "offload_to_disk_path", None) and group.tensor_to_key:
                for tensor, key in group.tensor_to_key.items():
                    files[id(tensor)] = (group.safetensors_file_path, key)
    return files


def _accelerate_value(module: nn.Module, name: str) -> Tensor | None:
    """A weight that accelerate's offload hook keeps off the module (the module holds a meta tensor)."""
    hook = getattr(module, "_hf_hook", None)
    for h in [hook, *getattr(hook, "hooks", [])]:
        weights = getattr(h, "weights_map", None)
        if weights is not None and name in weights:
            return weights[name]
    return None


def weight_heads(model: nn.Module, head: int = HEAD) -> Iterator[tuple[str, tuple[int, ...], Tensor]]:
    """Every weight's name (adapter-free), shape and first ``head`` values (on the CPU, its own dtype), sorted by name.

    Raises:
        ErtaCacheError: a weight whose values cannot be found (on the meta device with no offload hook holding it).
    """
    files = _offloaded_files(model)
    rows = []
    for module_name, module in model.named_modules(remove_duplicate=False):
        own = [*module._parameters.items(),
               *((k, v) for k, v in module._buffers.items() if k not in module._non_persistent_buffers_set)]
        for local, tensor in own:
            if tensor is None:
                continue
            name = f"{module_name}.{local}" if module_name else local
            name = name.replace(COMPILE_PREFIX, "").replace(".base_layer.", ".")
            if _ADAPTER.search(name):
                continue
            rows.append((name, module, local, tensor))
    seen: set[str] = set()
    for name, module, local, tensor in sorted(rows, key=lambda r: r[0]):
        if name in seen:  # tied or shared weights appear once
            continue
        seen.add(name)
        yield name, tuple(tensor.shape), _head(tensor, module, local, files, head, name)


def _head(tensor: Tensor, module: nn.Module, local: str, files: dict[int, tuple[str, str]], head: int,
          name: str) -> Tensor:
    if id(tensor) in files:
        from safetensors import safe_open

        path, key = files[id(tensor)]
        with safe_open(path, framework="pt", device="cpu") as f:
            return f.get_tensor(key).reshape(-1)[:head]
    if tensor.is_meta:
        value = _accelerate_value(module, local)
        if value is None:
            raise ErtaCacheError(f"the weight {name!r} is on the meta device and no offload hook holds its values: "
                                 "load the model's weights, or apply with check_fingerprint=False")
        tensor = value
    return tensor.detach().reshape(-1)[:head].to("cpu")


def model_fingerprint(model: nn.Module | Sequence[nn.Module]) -> str:
    """The fingerprint of a model, or of several (Wan 2.2's two transformers) as one: ``fp2-<structure>-<values>``.

    Reads ``HEAD`` values of every weight, so it is fast on multi-billion-parameter models. Compare two with
    :func:`same_model`, not ``==``: the values are the model's own, in its own precision.

    Raises:
        ErtaCacheError: a weight whose values cannot be found.
    """
    models = [model] if isinstance(model, nn.Module) else list(model)
    structure = hashlib.sha256()
    heads = []
    for k, m in enumerate(models):
        for name, shape, values in weight_heads(m):
            structure.update(f"{k}|{name}|{shape}|{values.is_floating_point()}|".encode())
            if values.is_floating_point():
                heads.append(values.to(torch.float32))
            else:
                structure.update(values.to(torch.int64).numpy().tobytes())
    flat = torch.cat(heads) if heads else torch.zeros(0)
    if flat.numel() > SAMPLED:
        flat = flat[torch.linspace(0, flat.numel() - 1, SAMPLED).round().long()]
    encoded = base64.urlsafe_b64encode(flat.contiguous().numpy().tobytes()).decode()
    return f"fp2-{structure.hexdigest()[:16]}-{encoded}"


def fingerprint_id(fingerprint: str) -> str:
    """The short form to show: ``fp2-<structure>`` (or a 16-digit fingerprint as it is)."""
    return "-".join(fingerprint.split("-")[:2])


def _values(fingerprint: str) -> Tensor:
    import numpy as np

    raw = base64.urlsafe_b64decode(fingerprint.split("-", 2)[2].encode())
    return torch.from_numpy(np.frombuffer(raw, dtype=np.float32).copy())


def disagreement(a: str, b: str) -> float:
    """The share of two fingerprints' values that differ beyond rounding (1.0 for other structures)."""
    if fingerprint_id(a) != fingerprint_id(b):
        return 1.0
    if _LEGACY.match(a):
        return 0.0
    x, y = _values(a), _values(b)
    if x.shape != y.shape:
        return 1.0
    finite = x.isfinite() & y.isfinite()  # float16 overflows to inf above 65504
    off = (x - y).abs() > REL_TOL * torch.maximum(x.abs(), y.abs()) + ABS_TOL
    return float((off & finite).sum()) / max(1, int(finite.sum()))


def same_model(stored: str, model: nn.Module | Sequence[nn.Module] | str) -> bool:
    """Whether ``model`` (a module, several, or a fingerprint) is the checkpoint the ``stored`` fingerprint names."""
    if _LEGACY.match(stored):
        got = model if isinstance(model, str) else legacy_fingerprint(model)
        return got == stored
    got = model if isinstance(model, str) else model_fingerprint(model)
    if _LEGACY.match(got):
        return False
    return disagreement(stored, got) <= MAX_DISAGREE


def legacy_fingerprint(model: nn.Module | Sequence[nn.Module], values_per_tensor: int = 64) -> str:
    """The 16-digit fingerprint of policies written before the values were stored (exact, bfloat16-rounded)."""
    models = [model] if isinstance(model, nn.Module) else list(model)
    prints = []
    for m in models:
        h = hashlib.sha256()
        for name, shape, values in weight_heads(m, values_per_tensor):
            h.update(f"{name}|{shape}|".encode())
            if values.is_floating_point():
                values = values.to(torch.bfloat16)
            h.update(values.to(torch.float64).numpy().tobytes())
        prints.append(h.hexdigest()[:16])
    return prints[0] if len(prints) == 1 else hashlib.sha256("|".join(prints).encode()).hexdigest()[:16]

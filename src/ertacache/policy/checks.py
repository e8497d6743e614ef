"""The checks of a policy's fields (each declared with its field in :class:`~ertacache.policy.Policy`).

Each check takes the value and the fields declared before it, and returns the value
normalised; it raises :class:`~ertacache.errors.ErtaCacheError` naming the field, what
was received and what is allowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, get_args

import torch
from torch import Tensor

from ..core import grids
from ..core.config import CalibrationConfig
from ..core.rectify import Rectification
from ..core.reuse import get_reuse
from ..errors import ErtaCacheError
from .fields import is_int

MAX_STEPS = 10_000
MAX_COEFFICIENT = 1e3
"""Largest |a| or |b| a policy may hold: fitted coefficients are O(1); larger means a corrupted file."""
RECT_FORMS: tuple[str, ...] = get_args(Rectification)


def check_steps(T: object, _: Mapping[str, Any]) -> int:
    if not is_int(T) or not 1 <= T <= MAX_STEPS:  # type: ignore[operator]
        raise ErtaCacheError(f"num_inference_steps must be an int in 1..{MAX_STEPS}, got {T!r}")
    return int(T)  # type: ignore[call-overload]


def check_cached(value: object, earlier: Mapping[str, Any]) -> tuple[int, ...]:
    T = earlier["num_inference_steps"]
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__") or not all(is_int(i) for i in value):
        raise ErtaCacheError(f"cached_steps must be a list of int step indices, got {value!r}")
    cached = tuple(sorted(int(i) for i in value))
    if len(set(cached)) != len(cached) or any(not 0 < i < T - 1 for i in cached):
        raise ErtaCacheError(f"cached_steps must be distinct steps in 1..T-2 = 1..{T - 2} (the first and last steps "
                             f"are always computed), got {list(value)}")
    return cached


def check_grid(value: object, earlier: Mapping[str, Any]) -> tuple[float, ...] | None:
    return None if value is None else tuple(grids.check_grid(value, earlier["num_inference_steps"]))  # type: ignore[arg-type]


def check_reuse(value: object, _: Mapping[str, Any]) -> str:
    if not isinstance(value, str):
        raise ErtaCacheError(f"reuse must be a reuse-mode name, got {value!r}")
    get_reuse(value)
    return value


def check_branches(value: object, _: Mapping[str, Any]) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)) or not value \
            or not all(isinstance(b, str) and b for b in value) or len(set(value)) != len(value):
        raise ErtaCacheError(f"branches must be distinct guidance branch names, e.g. ['cond', 'uncond'], "
                             f"got {value!r}")
    return tuple(value)


def check_coefficients(value: object, earlier: Mapping[str, Any]) -> dict[str, Tensor]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in value.items()):
        raise ErtaCacheError("rect_a and rect_b must map branch names to tensors")
    unknown = set(value) - set(earlier["branches"])
    if unknown:
        raise ErtaCacheError(f"rectification coefficients for unknown branches {sorted(unknown)}; "
                             f"the policy's branches are {list(earlier['branches'])}")
    return value


def check_rect_form(value: object, _: Mapping[str, Any]) -> str:
    if not isinstance(value, str) or value not in RECT_FORMS:
        raise ErtaCacheError(f"rect_form must be {', '.join(RECT_FORMS[:-1])} or {RECT_FORMS[-1]}, got {value!r}")
    return value


def check_latent_shape(shape: object, _: Mapping[str, Any]) -> tuple[int, ...] | None:
    if shape is None:
        return None
    if isinstance(shape, (str, bytes)) or not isinstance(shape, (tuple, list)) or not 1 <= len(shape) <= 8 \
            or not all(is_int(s) and 0 < s <= 1 << 24 for s in shape):
        raise ErtaCacheError(f"latent_shape must be a list of positive ints, got {shape!r}")
    return tuple(int(s) for s in shape)


def check_fingerprint(value: object, _: Mapping[str, Any]) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ErtaCacheError(f"model_fingerprint must be a string or null, got {value!r}")
    return value


def check_config(value: object, _: Mapping[str, Any]) -> CalibrationConfig:
    if not isinstance(value, CalibrationConfig):
        raise ErtaCacheError(f"config must be a CalibrationConfig, got {type(value).__name__}")
    return value


def check_schema(value: object, _: Mapping[str, Any]) -> int:
    if not is_int(value) or value < 1:  # type: ignore[operator]
        raise ErtaCacheError(f"schema_version must be an int >= 1, got {value!r}")
    return int(value)  # type: ignore[call-overload]


def step_reuse_from_json(value: Any) -> dict[int, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and k.isdigit() for k in value):
        raise ErtaCacheError(f"step_reuse must map step numbers to reuse modes, got {value!r}")
    return {int(k): v for k, v in value.items()}



def check_rectification(policy: Any) -> None:
    """A policy's rectification coefficients: shapes and range, where rectification is on (a check across fields).

    Raises:
        ErtaCacheError: a missing or misshaped coefficient, a value out of range, or a misshaped mask.
    """
    T = policy.num_inference_steps
    if policy.rect_form == "off":
        return
    widths = set()
    for name in policy.branches:
        for label, coeffs in (("rect_a", policy.rect_a), ("rect_b", policy.rect_b)):
            c = coeffs.get(name)
            if c is None or c.ndim != 2 or c.shape[0] != T or c.shape[1] < 1 or not c.is_floating_point():
                raise ErtaCacheError(f"{label} for branch {name!r} must be a float (T={T}, C) tensor, got "
                                     f"{None if c is None else (tuple(c.shape), str(c.dtype))}")
            if not bool(torch.isfinite(c).all()) or float(c.abs().max()) > MAX_COEFFICIENT:
                raise ErtaCacheError(f"{label} for branch {name!r} holds non-finite or out-of-range values "
                                     f"(|a|, |b| <= {MAX_COEFFICIENT:g}); the file is corrupted, recalibrate")
            widths.add(c.shape[1])
    if len(widths) != 1:
        raise ErtaCacheError(f"rectification coefficients must have one channel count C, got {sorted(widths)}")
    enabled = policy.rect_enabled
    if not isinstance(enabled, Tensor) or tuple(enabled.shape) != (len(policy.branches), T) \
            or enabled.dtype != torch.bool:
        raise ErtaCacheError(f"rect_enabled must be a ({len(policy.branches)}, {T}) bool tensor")


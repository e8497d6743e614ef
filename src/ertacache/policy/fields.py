"""How a policy field is declared once: its check, its JSON form in the file header, and its summary line.

A :class:`~ertacache.policy.Policy` field carries a :class:`FieldSpec` in its dataclass
metadata (:func:`spec`); validation (``__post_init__``), the file header and its
reading, :meth:`~ertacache.policy.Policy.summary`, ``Policy.uniform(like=)`` and the
schema version a file is written with all follow from these declarations. The
checks here are free of the class they serve: each takes the value and the fields
already checked (in declaration order).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass
from typing import Any

from ..errors import ErtaCacheError

Check = Callable[[Any, Mapping[str, Any]], Any]
"""``check(value, earlier)``: the validated (normalised) value; ``earlier`` holds the fields declared before it."""


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class FieldSpec:
    """What a policy field is, besides its type and default.

    Attributes:
        check: validates and normalises the value (:data:`Check`), or None.
        to_json: the value as the file header holds it.
        from_json: the header's value back (before ``check``); it raises
            :class:`~ertacache.errors.ErtaCacheError` on a value of the wrong JSON type.
        where: ``header`` (JSON), ``tensors`` (safetensors, handled by the policy), or ``none``
            (not written: the schema version, computed).
        optional: a file may omit it (the default is used).
        omit_default: the header leaves it out at its default (a field newer readers add).
        schema: the schema a file needs when this field is not at its default.
        like: ``Policy.uniform(like=)`` copies it (the calibrated settings, not the decisions).
        show: ``show(value, policy)``, its line in :meth:`~ertacache.policy.Policy.summary` (None, or
            returning None: no line).
    """

    check: Check | None = None
    to_json: Callable[[Any], Any] = _same
    from_json: Callable[[Any], Any] = _same
    where: str = "header"
    optional: bool = False
    omit_default: bool = False
    schema: int = 1
    like: bool = False
    show: Callable[[Any, Any], str | None] | None = None


def spec(**kwargs: Any) -> dict[str, FieldSpec]:
    """Dataclass field metadata holding one :class:`FieldSpec`."""
    return {"ertacache": FieldSpec(**kwargs)}


def spec_of(f: Any) -> FieldSpec:
    """The :class:`FieldSpec` of a dataclass field (a plain one where none was declared)."""
    found: FieldSpec = f.metadata.get("ertacache", FieldSpec())
    return found


# ----- checks ------------------------------------------------------------------------------
def is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def finite(x: object, name: str, positive: bool = False) -> float:
    """A finite number with ``|x| <= 1e6`` (``> 0`` with ``positive``), as float."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ErtaCacheError(f"{name} must be a number, got {x!r}")
    try:
        value = float(x)
    except OverflowError as exc:
        raise ErtaCacheError(f"{name} is out of range: {x!r}") from exc
    if not math.isfinite(value) or (positive and value <= 0) or abs(value) > 1e6:
        raise ErtaCacheError(f"{name} must be a finite number{' > 0' if positive else ''} (|x| <= 1e6), got {x!r}")
    return value


def named_numbers(d: object, name: str, kind: type) -> dict[str, Any]:
    """A ``{name: number}`` map: positive ints (``kind=int``) or finite floats."""
    if not isinstance(d, dict):
        raise ErtaCacheError(f"{name} must map names to numbers, got {type(d).__name__}")
    out: dict[str, Any] = {}
    for key, value in d.items():
        if not isinstance(key, str):
            raise ErtaCacheError(f"{name} keys must be names, got {key!r}")
        if kind is int:
            if not is_int(value) or not 0 < value <= 1 << 24:
                raise ErtaCacheError(f"{name}[{key!r}] must be a positive int, got {value!r}")
            out[key] = int(value)
        else:
            out[key] = finite(value, f"{name}[{key!r}]")
    return out


def check_json(value: object, name: str) -> dict[str, Any]:
    """A JSON object (finite numbers, no deep nesting)."""
    if not isinstance(value, dict):
        raise ErtaCacheError(f"{name} must be an object, got {type(value).__name__}")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ErtaCacheError(f"{name} must hold JSON values only (finite numbers, no deep nesting): "
                             f"{type(exc).__name__}") from exc
    return value


# ----- JSON forms ------------------------------------------------------------------------------
def json_list(name: str, nullable: bool = False) -> Callable[[Any], Any]:
    """Reads a JSON list as a tuple (or null, where ``nullable``)."""
    def read(value: Any) -> Any:
        if value is None and nullable:
            return None
        if not isinstance(value, list):
            raise ErtaCacheError(f"{name} must be a list{' or null' if nullable else ''}, got {type(value).__name__}")
        return tuple(value)
    return read


def listed(value: Any) -> Any:
    """A tuple as a JSON list (None stays null)."""
    return None if value is None else list(value)


def json_object(name: str) -> Callable[[Any], Any]:
    def read(value: Any) -> Any:
        if not isinstance(value, dict):
            raise ErtaCacheError(f"{name} must be an object, got {type(value).__name__}")
        return dict(value)
    return read


def is_default(f: Field[Any], value: Any) -> bool:
    """Whether ``value`` is the field's default."""
    if f.default is not MISSING:
        return bool(value == f.default)
    if f.default_factory is not MISSING:
        return bool(value == f.default_factory())
    return False


def at_default(policy: Any, f: Field[Any]) -> bool:
    return is_default(f, getattr(policy, f.name))

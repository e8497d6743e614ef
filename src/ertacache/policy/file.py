"""The policy file: one ``.safetensors`` file whose metadata holds the JSON header.

Schema 2 (this library writes it): the tensors (rectification coefficients and the
``rect_enabled`` mask) are the file's tensors, and the header (every other field) is
the JSON string under the metadata key ``ertacache.policy``. One file is atomic as
written (:func:`~ertacache.io.atomic_write`) and stays whole when renamed or copied.

Schema 1 (read only): a JSON file naming a ``.safetensors`` file beside it, with the
tensors' SHA-256.

Nothing here unpickles: safetensors holds raw tensors, JSON holds the rest. Every
decode error is an :class:`~ertacache.errors.ErtaCacheError`; the fields themselves
are validated where a :class:`~ertacache.policy.Policy` is built.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import ErtaCacheError

FORMAT_NAME = "ertacache.policy"
METADATA_KEY = "ertacache.policy"


def encode(header: dict[str, Any], tensors: dict[str, Tensor]) -> bytes:
    """One safetensors blob: ``tensors`` plus ``header`` (JSON, strict: no NaN) as metadata."""
    from safetensors.torch import save as st_save

    text = json.dumps(header, allow_nan=False, sort_keys=True)
    return st_save({k: v.contiguous() for k, v in tensors.items()}, metadata={METADATA_KEY: text})


def _strict_json(text: str, where: str) -> Any:
    def refuse_constant(name: str) -> Any:
        raise ErtaCacheError(f"{where} holds the non-finite number {name}; the file is corrupted or hand-edited")

    try:
        return json.loads(text, parse_constant=refuse_constant)
    except ErtaCacheError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as exc:
        raise ErtaCacheError(f"{where} is not valid JSON (truncated or corrupted?): {type(exc).__name__}: "
                             f"{str(exc)[:200]}") from exc


def _safetensors(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    """The metadata and tensors of a safetensors file, read by safetensors itself.

    Raises:
        ErtaCacheError: the file is not a readable safetensors file (truncated, corrupted, another format).
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:  # type: ignore[no-untyped-call]
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for any malformed file
        raise ErtaCacheError(f"{path} is not a readable safetensors file (truncated or corrupted?): "
                             f"{type(exc).__name__}: {str(exc)[:200]}") from exc
    return meta, tensors


def decode(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(header, tensors)`` of the policy file at ``path``, either schema.

    Raises:
        ErtaCacheError: not a policy, truncated or corrupted bytes, a missing or
            mismatched schema-1 tensors file.
    """
    with open(path, "rb") as f:
        start = f.read(64)
    if start.lstrip()[:1] == b"{":  # schema 1: JSON naming its tensors file
        header = _strict_json(path.read_bytes().decode("utf-8", errors="replace"), f"policy file {path}")
        _check_format(header, path)
        return header, _schema1_tensors(header, path)
    if len(start) < 8:
        raise ErtaCacheError(f"{path} is too short to be a policy file ({len(start)} bytes)")
    meta, tensors = _safetensors(path)
    if METADATA_KEY not in meta:
        raise ErtaCacheError(f"{path} is a safetensors file without an ertacache policy (metadata key "
                             f"{METADATA_KEY!r} missing): is it model weights? Pass a file written by Policy.save")
    header = _strict_json(meta[METADATA_KEY], f"the policy header of {path}")
    _check_format(header, path)
    return header, tensors


def _check_format(header: Any, path: Path) -> None:
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise ErtaCacheError(f"{path} is not an ertacache policy (format {FORMAT_NAME!r} missing)")


def _schema1_tensors(header: dict[str, Any], path: Path) -> dict[str, Tensor]:
    name, sha = header.get("tensors"), header.get("tensors_sha256")
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ErtaCacheError(f"policy {path} names no valid tensors file (got {name!r})")
    if sha is not None and not isinstance(sha, str):
        raise ErtaCacheError(f"policy {path}: tensors_sha256 must be a string, got {type(sha).__name__}")
    tensors_path = path.with_name(name)
    if not tensors_path.is_file():
        raise ErtaCacheError(f"the policy's tensors file {tensors_path} is missing; copy it beside the JSON file "
                             "(schema-1 policies are two files; saving it again writes one)")
    blob = tensors_path.read_bytes()
    if sha is not None and hashlib.sha256(blob).hexdigest() != sha:
        raise ErtaCacheError(
            f"{tensors_path} does not match its policy JSON (SHA-256 differs): the file is truncated, corrupted, "
            "or from another policy. Recalibrate or restore both files together."
        )
    return _safetensors(tensors_path)[1] if blob else {}

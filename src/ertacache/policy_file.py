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
import struct
from pathlib import Path
from typing import Any

from torch import Tensor

from .errors import ErtaCacheError

FORMAT_NAME = "ertacache.policy"
METADATA_KEY = "ertacache.policy"
MAX_HEADER_BYTES = 16 << 20  # a policy header is a few kB; refuse absurd lengths before reading them


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


def _metadata(blob: bytes, path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (its documented layout: u64 length, JSON header)."""
    if len(blob) < 8:
        raise ErtaCacheError(f"{path} is too short to be a policy file ({len(blob)} bytes)")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > min(MAX_HEADER_BYTES, len(blob) - 8):
        raise ErtaCacheError(f"{path} is not a readable safetensors file (header length {n} exceeds the file)")
    try:
        text = blob[8:8 + n].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ErtaCacheError(f"{path} is not a readable safetensors file (its header is not UTF-8)") from exc
    header = _strict_json(text, f"the safetensors header of {path}")
    if not isinstance(header, dict):
        raise ErtaCacheError(f"{path} is not a readable safetensors file (its header is not an object)")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ErtaCacheError(f"{path}: safetensors metadata must be an object, got {type(meta).__name__}")
    return meta


def _tensors(blob: bytes, path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load as st_load

    try:
        return st_load(blob)
    except Exception as exc:  # safetensors raises its own error types for any malformed blob
        raise ErtaCacheError(f"{path} is not a readable safetensors file: {type(exc).__name__}: "
                             f"{str(exc)[:200]}") from exc


def decode(blob: bytes, path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(header, tensors)`` of a policy file's bytes, either schema.

    Raises:
        ErtaCacheError: not a policy, truncated or corrupted bytes, a missing or
            mismatched schema-1 tensors file.
    """
    if blob.lstrip()[:1] == b"{":  # schema 1: JSON naming its tensors file
        header = _strict_json(blob.decode("utf-8", errors="replace"), f"policy file {path}")
        _check_format(header, path)
        return header, _schema1_tensors(header, path)
    meta = _metadata(blob, path)
    if METADATA_KEY not in meta:
        raise ErtaCacheError(f"{path} is a safetensors file without an ertacache policy (metadata key "
                             f"{METADATA_KEY!r} missing): is it model weights? Pass a file written by Policy.save")
    text = meta[METADATA_KEY]
    if not isinstance(text, str):
        raise ErtaCacheError(f"{path}: the policy header must be a JSON string, got {type(text).__name__}")
    header = _strict_json(text, f"the policy header of {path}")
    _check_format(header, path)
    return header, _tensors(blob, path)


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
    return _tensors(blob, tensors_path) if blob else {}

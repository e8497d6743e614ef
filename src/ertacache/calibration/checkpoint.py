"""Resumable calibration: every finished pass kept in a folder (JSON + safetensors, atomic writes).

A calibration killed part way and started again with the same arguments and the same
``checkpoint_dir`` skips every pass already done and ends with the identical policy.
Started with other arguments (model, calibration set, settings, process count), it
refuses, naming what differs. Nothing is unpickled: results are JSON, tensors safetensors.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import ErtaCacheError
from ..io import atomic_write, atomic_write_text

FORMAT = "ertacache.calibration-checkpoint"
VERSION = 1


def digest(*parts: Any) -> str:
    """A short SHA-256 of JSON-able parts and tensors (their dtype, shape and bytes)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Tensor):
            t = part.detach().to("cpu").contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


class Checkpoint:
    """One calibration's finished passes, in ``folder/rank-R-of-W/``.

    Args:
        folder: the checkpoint folder (created when missing).
        identity: everything that determines the passes' results (model fingerprint,
            calibration set, settings, process count); JSON-able.
        rank, world_size: this process and the process count.

    Raises:
        ErtaCacheError: the folder holds a checkpoint of another calibration, naming
            every entry of ``identity`` that differs.
    """

    def __init__(self, folder: str | Path, identity: Mapping[str, Any], rank: int = 0, world_size: int = 1) -> None:
        self.folder = Path(folder) / f"rank-{rank}-of-{world_size}"
        self.identity = json.loads(json.dumps(dict(identity), default=str))
        manifest = self.folder / "manifest.json"
        if manifest.is_file():
            try:
                doc = json.loads(manifest.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ErtaCacheError(f"{manifest} is not valid JSON (damaged?); delete the folder to start over"
                                     ) from exc
            if not isinstance(doc, dict) or doc.get("format") != FORMAT:
                raise ErtaCacheError(f"{self.folder} is not an ertacache calibration checkpoint")
            old = doc.get("identity", {})
            diffs = [f"{k}: checkpoint {old.get(k)!r}, now {self.identity.get(k)!r}"
                     for k in sorted(set(old) | set(self.identity)) if old.get(k) != self.identity.get(k)]
            if diffs:
                raise ErtaCacheError(
                    f"the checkpoint in {self.folder} is of another calibration: " + "; ".join(diffs)
                    + ". Use another --checkpoint-dir, or delete it to start over.")
        else:
            atomic_write_text(manifest, json.dumps({"format": FORMAT, "version": VERSION,
                                                    "identity": self.identity}, indent=1) + "\n")
        results = self.folder / "results.json"
        self.results: dict[str, Any] = json.loads(results.read_text(encoding="utf-8")) if results.is_file() else {}

    def get(self, key: str) -> tuple[dict[str, Any], dict[str, Tensor]] | None:
        """A finished pass' ``(result, tensors)``, or None when it has not run."""
        if key not in self.results:
            return None
        entry = self.results[key]
        tensors: dict[str, Tensor] = {}
        if entry.get("tensors"):
            from safetensors.torch import load_file

            path = self.folder / entry["tensors"]
            if not path.is_file():
                return None
            tensors = load_file(str(path))
        return entry["result"], tensors

    def put(self, key: str, result: dict[str, Any], tensors: Mapping[str, Tensor] | None = None) -> None:
        """Keep a finished pass (tensors first, then the index that names them, each atomically)."""
        name = None
        if tensors:
            from safetensors.torch import save

            name = f"{digest(key)}.safetensors"
            blob = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
            atomic_write(self.folder / name, lambda tmp: tmp.write_bytes(blob))
        self.results[key] = {"result": result, "tensors": name}
        atomic_write_text(self.folder / "results.json", json.dumps(self.results) + "\n")

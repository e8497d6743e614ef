"""Policies kept per setting: in memory and as ordinary policy files in a cache directory, written atomically,
calibrated under a file lock (the one-line modes of :func:`ertacache.apply_ertacache` and :func:`ertacache.sample`).

The directory is ``cache_dir``, else ``$ERTACACHE_CACHE``, else ``$XDG_CACHE_HOME/ertacache`` (``~/.cache/ertacache``).
A file that cannot be read is replaced (one warning); an unwritable directory keeps policies in memory (one warning).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .policy import Policy

LOGIC_VERSION = 2
"""The calibration logic's version in a cache key: raised when a change makes older policies worth redoing."""


def cache_home() -> Path:
    """``$ERTACACHE_CACHE``, else ``$XDG_CACHE_HOME/ertacache``, else ``~/.cache/ertacache``."""
    if os.environ.get("ERTACACHE_CACHE"):
        return Path(os.environ["ERTACACHE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ertacache"


@dataclass
class PolicyCache:
    """Policies by setting: in memory, and as files in ``directory`` (None: memory only)."""

    directory: Path | None
    memory: dict[str, Policy] = field(default_factory=dict)
    unwritable: bool = False

    def path(self, key: str) -> Path | None:
        return None if self.directory is None or self.unwritable else self.directory / f"{key}.safetensors"

    def load(self, key: str) -> Policy | None:
        if key in self.memory:
            return self.memory[key]
        path = self.path(key)
        if path is None or not path.is_file():
            return None
        try:
            policy = Policy.load(path)
        except Exception as exc:  # noqa: BLE001 - a damaged file is replaced, whatever the damage
            warnings.warn(f"ertacache: the cached policy {path} cannot be read ({type(exc).__name__}: {exc}); "
                          "calibrating again and replacing it", RuntimeWarning, stacklevel=4)
            return None
        self.memory[key] = policy
        return policy

    def store(self, key: str, policy: Policy) -> None:
        self.memory[key] = policy
        path = self.path(key)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            policy.save(path)
        except OSError as exc:
            self.unwritable = True
            warnings.warn(f"ertacache: cannot write the policy cache at {self.directory} ({exc}); keeping "
                          "policies in memory for this process (set cache_dir= or $ERTACACHE_CACHE)",
                          RuntimeWarning, stacklevel=4)

    def lock(self, key: str) -> Any:
        """A file lock for calibrating ``key`` (another process waits, then loads), or a no-op."""
        path = self.path(key)
        if path is None:
            return contextlib.nullcontext()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            from filelock import FileLock

            return FileLock(str(path) + ".lock")
        except OSError:
            return contextlib.nullcontext()

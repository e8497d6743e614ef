"""What every results script writes: its table (Markdown, ending with the command and the commit that made it)
and its rows (JSON beside it), atomically, and the commit itself."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ertacache._version import commit as _commit
from ertacache.io import atomic_write_text


def commit() -> str:
    """The repository's commit (``-dirty`` with uncommitted changes under the package), or ``unknown``."""
    return _commit() or "unknown"


def write_results(out: str | Path, lines: list[str], rows: list[Any], command: str) -> str:
    """Write ``out`` (the table ``lines`` and a line naming ``command``, the commit and the date) and its rows as
    ``out`` with a ``.json`` suffix, each atomically; return the table's text."""
    text = "\n".join([*lines, f"\nMade by `{command}` at commit {commit()}, {time.strftime('%Y-%m-%d')}."]) + "\n"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, text)
    atomic_write_text(out.with_suffix(".json"), json.dumps(rows, indent=1) + "\n")
    return text

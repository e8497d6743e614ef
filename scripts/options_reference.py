"""The reference tables of docs/options.md, made from the code: every ``CalibrationConfig`` field (its default, in
the default and the ``thorough()`` configuration, and its docstring line) and every CLI flag (its commands,
default and help). ``tests/test_docs.py`` checks that the page holds exactly these tables.

    python scripts/options_reference.py            # rewrite the tables in docs/options.md
"""

from __future__ import annotations

import argparse
import re
from dataclasses import fields
from pathlib import Path

from ertacache import CalibrationConfig
from ertacache.app.cli import _build_parser

PAGE = Path(__file__).resolve().parents[1] / "docs" / "options.md"
BEGIN, END = "<!-- reference: begin (scripts/options_reference.py) -->", "<!-- reference: end -->"


def _attribute_docs() -> dict[str, str]:
    """The first sentence of each ``Attributes:`` entry of ``CalibrationConfig``'s docstring."""
    doc = CalibrationConfig.__doc__ or ""
    body = doc.split("Attributes:", 1)[1]
    out: dict[str, str] = {}
    for m in re.finditer(r"^\s{8}(\w+): (.*?)(?=^\s{8}\w+: |\Z)", body, re.S | re.M):
        text = " ".join(m.group(2).split())
        first = re.split(r"\.\s+(?=[A-Z(])", text)[0].rstrip(".")
        out[m.group(1)] = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", first).replace("``", "`")
    return out


def _cell(value: object) -> str:
    return f"`{value!r}`".replace("|", "\\|")


def config_table() -> str:
    docs, default, thorough = _attribute_docs(), CalibrationConfig(), CalibrationConfig.thorough()
    lines = ["| field | default | `thorough()` | what it does |", "|---|---|---|---|"]
    for f in fields(CalibrationConfig):
        lines.append(f"| `{f.name}` | {_cell(getattr(default, f.name))} | {_cell(getattr(thorough, f.name))} | "
                     f"{docs.get(f.name, '').replace('|', '/')} |")
    return "\n".join(lines)


def cli_table() -> str:
    parser = _build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    rows: dict[str, dict[str, object]] = {}
    for command, p in sub.choices.items():
        for action in p._actions:
            flags = [o for o in action.option_strings if o.startswith("--") and o != "--help"]
            if not flags:
                continue
            row = rows.setdefault(", ".join(flags), {"commands": [], "default": action.default,
                                                      "help": " ".join((action.help or "").split())})
            row["commands"].append(command)  # type: ignore[union-attr]
    lines = ["| flag | commands | default | what it does |", "|---|---|---|---|"]
    for flag in sorted(rows):
        r = rows[flag]
        default = "" if r["default"] in (None, False, argparse.SUPPRESS) else _cell(r["default"])
        lines.append(f"| `{flag}` | {', '.join(r['commands'])} | {default} | "  # type: ignore[arg-type]
                     f"{str(r['help']).replace('|', '/')} |")
    return "\n".join(lines)


def reference() -> str:
    return (f"{BEGIN}\n\n### `CalibrationConfig`\n\n{config_table()}\n\n### Command-line flags\n\n{cli_table()}\n\n"
            f"{END}")


def main() -> None:
    text = PAGE.read_text()
    if BEGIN in text:
        text = text[:text.index(BEGIN)] + reference() + text[text.index(END) + len(END):]
    else:
        intro = "\n\n## Reference\n\nEvery field and flag, made from the code.\n\n"
        text = text.rstrip("\n") + intro + reference() + "\n"
    PAGE.write_text(text)


if __name__ == "__main__":
    main()

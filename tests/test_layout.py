"""The package's layers, checked from the source: a lower layer never imports a higher one.

core (pure torch) <- calibration, policy <- integrations, models, peers <- bench, app. ``config``,
``errors``, ``io``, ``metrics``, ``fingerprint`` and ``_version`` are shared leaves.
"""

import ast
from pathlib import Path

import pytest

import ertacache

ROOT = Path(ertacache.__file__).parent
# what each part may import from the package (besides itself and the shared leaves)
ALLOWED = {
    "core": set(),
    "config": {"core"},
    "policy": {"core", "config"},
    "calibration": {"core", "config", "policy"},
    "integrations": {"core", "config", "policy", "calibration"},
    "models": {"core"},
    "peers": {"core", "models"},
    "bench": {"core", "config", "policy", "calibration", "integrations", "models", "peers", "app"},
    "app": {"core", "config", "policy", "calibration", "integrations", "models", "peers", "bench"},
}
LEAVES = {"errors", "io", "metrics", "fingerprint", "_version"}


def _part(module: str) -> str:
    return module.split(".")[0]


def _imports(path: Path) -> set[str]:
    """The package-relative top-level parts ``path`` imports (absolute ``ertacache.x`` or relative)."""
    package = path.relative_to(ROOT).parts[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                names = (node.module.split(".") if node.module else [])
                target = base + names
                if not target:  # `from . import x` at the root
                    out.update(alias.name for alias in node.names)
                else:
                    out.add(target[0])
            elif node.module and node.module.startswith("ertacache."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("ertacache."))
    return out


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_no_layer_imports_a_higher_one(part):
    files = [ROOT / f"{part}.py"] if (ROOT / f"{part}.py").is_file() else sorted((ROOT / part).rglob("*.py"))
    assert files
    for path in files:
        wrong = {m for m in _imports(path) if m != part and m not in LEAVES and m not in ALLOWED[part]}
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"

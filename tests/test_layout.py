"""The package's layout, checked from the source: layers import only downward, no import circle, small rooms.

core (pure torch, with the calibration config) <- policy <- calibration <- integrations, models, peers <- bench
<- app. ``errors``, ``io``, ``fingerprint`` and ``_version`` are shared leaves. Every import counts, also one inside
a function: a lazy import hides a circle, it does not remove it.
"""

import ast
from pathlib import Path

import pytest

import ertacache

ROOT = Path(ertacache.__file__).parent
# what each part may import from the package (besides itself and the shared leaves)
ALLOWED = {
    "core": set(),
    "policy": {"core"},
    "calibration": {"core", "policy"},
    "integrations": {"core", "policy", "calibration"},
    "models": {"core"},
    "peers": {"core", "models"},
    "bench": {"core", "policy", "calibration", "integrations", "models", "peers"},
    "app": {"core", "policy", "calibration", "integrations", "models", "peers", "bench"},
}
LEAVES = {"errors", "io", "fingerprint", "_version"}
OUTSIDE = {"__main__": "the entry point (python -m ertacache)", "weights": "the bundled weights (data)"}
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 450, 70


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _package(path: Path) -> list[str]:
    name = _name(path).split(".")
    return name if path.name == "__init__.py" else name[:-1]


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node, but those under ``if TYPE_CHECKING:`` (annotations only: never imported at run time)."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return out


def _imports(path: Path) -> set[str]:
    """The package's modules ``path`` imports (absolute or relative, anywhere in the file), by dotted name."""
    out: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = _package(path)
                base = pkg[: len(pkg) - node.level + 1] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "ertacache":
                base = node.module.split(".")
            else:
                continue
            target = ".".join(base)
            for alias in node.names:  # `from . import x`: the submodule x where it is one
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in MODULES else target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "ertacache")
    return {m for m in out if m in MODULES}


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def _part(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_no_layer_imports_a_higher_one(part):
    mine = [m for m in MODULES if _part(m) == part]
    assert mine
    for module in mine:
        wrong = {_part(m) for m in GRAPH[module]} - {part} - LEAVES - ALLOWED[part] - {""}
        assert not wrong, f"{module} imports {sorted(wrong)}"


def test_every_part_is_a_known_layer_or_leaf():
    assert {_part(m) for m in MODULES} - {""} <= set(ALLOWED) | LEAVES | set(OUTSIDE)


def test_the_import_graph_has_no_circle():
    """Tarjan's strongly connected components: a component of two or more modules is a circle. A package's
    ``__init__`` that re-exports its modules counts only toward what it imports, never back."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if MODULES[w].name == "__init__.py" and v.startswith(w + "."):
                continue  # a module reading its own package's re-exports
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_rooms_stay_small():
    """No module over 450 lines and no function over 70, with no allow-list."""
    big = [f"{name} ({n} lines)" for name, path in MODULES.items()
           if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES]
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name} ({n} lines)")
    assert not big and not long, f"modules over {MAX_MODULE_LINES} lines: {big}; functions over " \
                                 f"{MAX_FUNCTION_LINES}: {long}"


def test_no_print_outside_the_command_line_s_output():
    """Progress and messages go through ``logging`` (one logger per module) and tqdm; ``print`` is the CLI's and the
    benchmark's report output only."""
    allowed = {"ertacache.app.cli", "ertacache.app.pipeline_cli", "ertacache.app.output", "ertacache.app.demo",
               "ertacache.bench.stepcost"}
    printing = sorted(name for name, path in MODULES.items() if name not in allowed and any(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"
        for n in ast.walk(ast.parse(path.read_text()))))
    assert not printing, f"print outside the CLI: {printing}"

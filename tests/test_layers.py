"""The package's layers, read from the source: no module imports from a layer above its own, and no import cycle.

Every import counts, those inside functions too (ktchat imports heavy things lazily, and a lazy upward import is
still an upward dependency). Pure AST reading: nothing of ktchat is imported here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ktchat"

# Bottom to top; a unit may import units of lower rank only. Units of one rank are independent of each other.
LAYERS = (
    ("errors",),
    ("runtime", "formats"),
    ("config",),
    ("adapter",),
    ("experts",),
    ("engine",),
    ("model",),
    ("generate", "tinymodels"),
    ("serve", "integrations"),
    ("cli",),
)
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = ("ktchat", *path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def imports(name: str, path: Path) -> set[str]:
    """The ktchat modules `name` imports, absolute; `from . import x` counts as importing the package and x."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    known = modules()
    return {m for m in found if m in known and m != name}


def unit(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the ktchat package itself (version, lazy public names)


def test_every_unit_has_a_layer():
    units = {unit(m) for m in modules()} - {None}
    assert units == set(RANK), f"place these in LAYERS: {sorted(units - set(RANK))}; gone: {sorted(set(RANK) - units)}"


def test_no_module_imports_from_a_layer_above_or_beside_its_own():
    bad = []
    for name, path in modules().items():
        own = unit(name)
        for target in imports(name, path):
            other = unit(target)
            if own is None or other is None or other == own:
                continue
            if RANK[other] >= RANK[own]:
                bad.append(f"{name} -> {target} ({own} is layer {RANK[own]}, {other} layer {RANK[other]})")
    assert not bad, "\n".join(bad)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in graph:
        if root in state:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def _package_of(name: str, all_modules) -> set[str]:
    """A module's enclosing packages: importing a.b.c runs a and a.b first, which is no dependency of c's."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))} & set(all_modules)


def test_no_import_cycle():
    """Between modules, a package's __init__ re-exporting its own modules aside (that is the package, not a cycle)."""
    all_modules = modules()
    graph = {name: imports(name, path) - _package_of(name, all_modules) for name, path in all_modules.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


@pytest.mark.parametrize("graph, cyclic", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, False),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
    ({"a": {"a"}}, True),
])
def test_the_cycle_finder_finds_cycles(graph, cyclic):
    assert (_cycle(graph) is not None) == cyclic


def test_the_layer_check_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    """The checks read imports inside functions and relative ones: the serve <-> cli cycle main once had."""
    root = tmp_path / "ktchat"
    (root / "serve").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "serve" / "__init__.py").write_text("")
    (root / "serve" / "app.py").write_text("def f():\n    from ..cli import open_session\n")
    (root / "cli.py").write_text("from .serve import app\n")
    monkeypatch.setattr(__import__(__name__), "SRC", root)
    assert imports("ktchat.serve.app", root / "serve" / "app.py") == {"ktchat.cli"}
    graph = {n: imports(n, p) - _package_of(n, modules()) for n, p in modules().items()}
    assert _cycle(graph) is not None


# ---------------------------------------------------------------------------------------------------------------
# tests/ and bench/: bench scripts import the tests' harness (tests/servers.py, reference.py, tolerances.py) by
# putting tests/ on sys.path; no test imports a bench script or puts bench/ on sys.path (running one as a program,
# as test_serve does with load_test.py, is no import).

TESTS = SRC.parents[1] / "tests"
BENCH = SRC.parents[1] / "bench"


def bench_imports(path: Path) -> list[str]:
    """Where `path` imports a bench/ module or puts bench/ on sys.path: 'file:line: source' each, in line order."""
    bench_modules = {p.stem for p in BENCH.glob("*.py")}
    source = path.read_text(encoding="utf-8")
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        elif isinstance(node, ast.Call) and "sys.path" in ast.unparse(node.func):
            names = ["bench"] if "bench" in ast.unparse(node) else []
        else:
            continue
        if any(n.split(".")[0] in bench_modules | {"bench"} for n in names):
            found.append((node.lineno, f"{path.name}:{node.lineno}: {ast.get_source_segment(source, node)}"))
    return [hit for _, hit in sorted(found)]


def test_no_test_imports_from_bench():
    assert TESTS.is_dir() and BENCH.is_dir()
    found = [hit for path in sorted(TESTS.rglob("*.py")) for hit in bench_imports(path)]
    assert not found, "\n".join(found)


def test_the_bench_check_sees_imports_and_path_changes(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('import sys\nsys.path.insert(0, str(REPO / "bench"))\ndef f():\n    from load_test import x\n'
                     "import servers, json\n")
    assert [hit.split(":")[1] for hit in bench_imports(probe)] == ["2", "4"]

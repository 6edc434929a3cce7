"""The layout's rules, read from the source (every import, at any depth in a file):

- imports point one way: stages and the project's entry points (`pipeline_lib.params`, `promote`, `retrain`) ->
  tracks (`pipeline_lib.vision`, `pipeline_lib.text`) -> `pipeline_lib.core`; no track imports the other;
- nothing imports in a cycle: at every level of the tree, the siblings (modules and subpackages of one package)
  import one another without a cycle, so neither two modules nor two packages depend on each other.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "pipeline_lib"
TRACKS = ("pipeline_lib.vision", "pipeline_lib.text")
CORE = "pipeline_lib.core"


def _modules() -> dict[str, Path]:
    """Every module of the library and of `stages`, by dotted name (a package by its `__init__`)."""
    found = {}
    for top in (LIBRARY, ROOT / "stages"):
        for path in top.rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module an import names: the longest dotted prefix that is a module (None: not ours)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in MODULES:
            return ".".join(parts[:end])
    return None


def _imports(module: str) -> Iterator[tuple[str, int]]:
    """(imported project module, line) for every import in `module`'s file, top level or inside a function."""
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name)
            if target is not None and target != module:
                yield target, node.lineno


def _layer(module: str) -> int:
    """0 core, 1 a track, 2 what sits above the tracks (stages, params, promote, retrain)."""
    if module == CORE or module.startswith(CORE + "."):
        return 0
    if any(module == track or module.startswith(track + ".") for track in TRACKS):
        return 1
    return 2


def _track(module: str) -> str | None:
    return next((track for track in TRACKS if module == track or module.startswith(track + ".")), None)


EDGES = sorted({(module, target, line) for module in MODULES for target, line in _imports(module)})


def test_the_tree_has_a_core_and_both_tracks() -> None:
    assert {CORE, *TRACKS} <= set(MODULES)
    assert all(_layer(name) < 2 for name in MODULES if name.startswith("pipeline_lib.") and name.count(".") > 1)


def test_imports_point_from_stages_to_tracks_to_core() -> None:
    wrong = [f"{MODULES[module].relative_to(ROOT)}:{line} imports {target}" for module, target, line in EDGES
             if _layer(target) > _layer(module) or (_track(module) and _track(target) not in (None, _track(module)))]
    assert not wrong, "imports against the layers (stages -> tracks -> core, no track imports the other):\n" + (
        "\n".join(wrong))


def _sibling_edges() -> dict[tuple[str, str], str]:
    """Edges between siblings: an import from a to b is an edge between the children of their deepest common
    package that hold a and b (a module or a subpackage); `__init__` files stay out of it."""
    edges: dict[tuple[str, str], str] = {}
    for module, target, line in EDGES:
        a, b = module.split("."), target.split(".")
        common = 0
        while common < min(len(a), len(b)) and a[common] == b[common]:
            common += 1
        if common == len(a) or common == len(b):  # a package and what it contains: not siblings
            continue
        parent = ".".join(a[:common])
        edge = (f"{parent}.{a[common]}".lstrip("."), f"{parent}.{b[common]}".lstrip("."))
        edges.setdefault(edge, f"{MODULES[module].relative_to(ROOT)}:{line} imports {target}")
    return edges


def _find_cycle(edges: dict[tuple[str, str], str]) -> list[str] | None:
    graph: dict[str, list[str]] = {}
    for a, b in edges:
        graph.setdefault(a, []).append(b)
    state: dict[str, int] = {}  # 1 on the path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, [])):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_module_or_package_imports_in_a_cycle() -> None:
    edges = _sibling_edges()
    cycle = _find_cycle(edges)
    assert cycle is None, "import cycle " + " -> ".join(cycle) + ":\n" + "\n".join(
        edges[(a, b)] for a, b in itertools.pairwise(cycle))


@pytest.mark.parametrize(("edges", "cycle"), [
    ({("p.a", "p.b"): "", ("p.b", "p.a"): ""}, ["p.a", "p.b", "p.a"]),
    ({("p.a", "p.b"): "", ("p.b", "p.c"): ""}, None),
])
def test_the_cycle_finder_finds_cycles(edges: dict[tuple[str, str], str], cycle: list[str] | None) -> None:
    assert _find_cycle(edges) == cycle

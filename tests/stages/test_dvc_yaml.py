"""dvc.yaml itself: every stage depends on each library file its script imports, so a code change reruns it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _module_file(name: str) -> Path | None:
    base = ROOT / name.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _project_imports(path: Path) -> set[Path]:
    """Files of `pipeline_lib` and `stages` that `path` imports (at any depth in the file, not transitively)."""
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] in ("pipeline_lib", "stages") and (file := _module_file(name)):
                found.add(file)
    return found


def _closure(start: Path) -> set[Path]:
    seen, todo = set(), [start]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(_project_imports(path))
    return {p for p in seen if p.name != "__init__.py" or p.stat().st_size > 100}  # empty package markers aside


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_depends_on_every_file_it_imports(stage: str) -> None:
    spec = STAGES[stage].get("do", STAGES[stage])  # a foreach stage: its template (deps name no ${item})
    module = re.search(r"python -m (stages\.\w+)", spec["cmd"]).group(1)
    deps = [ROOT / dep for dep in spec["deps"] if "${" not in dep]
    missing = [str(path.relative_to(ROOT)) for path in sorted(_closure(_module_file(module)))
               if not any(path == dep or dep in path.parents for dep in deps)]
    assert not missing, f"stage {stage} imports files it does not list in deps: {missing}"

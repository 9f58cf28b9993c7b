"""The house rules of the code's layout: the method stands alone, no import circles, the README's
public imports work."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("craft", "search", "cluster", "spaces")


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports (a module, or a package whose ``__init__`` it runs)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found.update(c for c in candidates if c in known and c != name)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    modules = _modules()
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    assert graph["craft.harness.job"] >= {"craft.harness.trainer", "craft.factors"}  # the graph is read
    assert _cycles(graph) == []


def test_the_method_imports_neither_the_harness_nor_the_search():
    modules = _modules()
    for name, path in modules.items():
        if name.startswith("craft") and not name.startswith("craft.harness"):
            imported = _imports(name, path, set(modules))
            assert not [m for m in imported if m.startswith(("craft.harness", "search", "cluster"))], name
            source = path.read_text()
            assert "import ray" not in source and "import mlflow" not in source, name


@pytest.mark.parametrize(
    "code",
    [
        "import craft, sys; craft.get_craft_model; craft.CraftModel.from_pretrained;"
        " assert not {'craft.harness', 'datasets', 'ray', 'mlflow'} & set(sys.modules), sorted(sys.modules)",
        "import craft; craft.run_job; craft.load_run_config; craft.train; from craft import RunConfig, load_task",
        "import search, sys; search.load_sweep; search.pareto_front; search.export_configs; search.run_sweep;"
        " assert 'ray' not in sys.modules",
    ],
)
def test_public_imports_of_the_readme(code):
    """In a fresh interpreter: the method alone imports no harness, data library, Ray or MLflow;
    the harness's names are still ``craft.*``; ``search`` imports Ray only when a sweep starts."""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]

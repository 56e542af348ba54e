"""The code's shape: ``dreamcache/`` is the library under the jobs and imports nothing outside itself, no module
imports itself back through others, and nothing edits ``sys.path``."""

import ast
from pathlib import Path

from conftest import ROOT

# Which top-level packages each package may import from the project.
ALLOWED = {"dreamcache": {"dreamcache"}, "manifests": {"dreamcache", "manifests"},
           "pipeline": {"dreamcache", "manifests", "pipeline", "prompts", "world"},
           "training": {"dreamcache", "manifests", "training"},
           "world": {"dreamcache", "world"}}  # the small world: its scenes, judge and base; the pipeline's stage reads it
PROJECT = {"dreamcache", "manifests", "pipeline", "training", "benchmarks", "prompts", "world"}


def project_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & PROJECT


def test_the_library_imports_no_job_and_the_jobs_import_no_arrow_back_up():
    wrong = [f"{path.relative_to(ROOT)} imports {sorted(project_imports(path) - allowed)}"
             for package, allowed in ALLOWED.items() for path in sorted((ROOT / package).rglob("*.py"))
             if project_imports(path) - allowed]
    assert not wrong, wrong


def test_no_module_edits_sys_path():
    edits = [str(p.relative_to(ROOT)) for folder in (*ALLOWED, "benchmarks", "tests")
             for p in sorted((ROOT / folder).rglob("*.py")) if "sys.path." in p.read_text() and p.name != "test_layout.py"]
    assert not edits, edits


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules ``path`` imports, at the top or inside a function: ``from a.b import c`` counts as
    ``a.b.c`` when that is a module, else ``a.b``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                      for a in node.names}
    return found & modules


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), or of one that imports itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_circle():
    paths = [p for package in (*ALLOWED, "benchmarks", "prompts") for p in sorted((ROOT / package).rglob("*.py"))]
    modules = {module_name(p) for p in paths}
    graph = {module_name(p): module_imports(p, modules) - {module_name(p)} for p in paths}
    assert not import_cycles(graph)


def test_the_circle_finder_finds_circles():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []

"""The code's shape: ``dreamcache/`` is the library under the jobs, and nothing edits ``sys.path``."""

import ast
from pathlib import Path

from conftest import ROOT

# Which top-level packages each package may import from the project.
# prompts/ is data (the caption vocabulary), which the tiny LLM's tokenizer is built from.
ALLOWED = {"dreamcache": {"dreamcache", "prompts"}, "manifests": {"dreamcache", "manifests"},
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

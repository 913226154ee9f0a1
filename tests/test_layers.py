"""The house rules of the layout: data flows data → train.py → run directory → dashboard, the dashboard never loads
training code, ``core`` never imports Streamlit, no ``core`` module imports another that imports it back, and no
``core`` module outgrows one job."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from core.data import PROJECT_ROOT

TRAINING_MODULES = {"core.fit", "core.training", "core.distributed", "core.evaluation", "core.cv", "core.augment",
                    "core.losses", "core.sampler"}
# runs.py owns every run file's reader and writer (external sets and site profiles joined them); issue #32 found
# that 300 pushed helpers into odd homes.
MAX_CORE_LINES = 400


def test_the_dashboard_does_not_import_training_code() -> None:
    """Asked of a fresh interpreter: this one has imported everything already."""
    probe = ("import sys\nimport dashboard.loaders, dashboard.state, dashboard.gallery, core.predictor\n"
             "print(' '.join(sorted(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = set(done.stdout.split())
    assert "core.inference" in loaded
    assert not loaded & TRAINING_MODULES, sorted(loaded & TRAINING_MODULES)


def test_core_never_imports_streamlit() -> None:
    for path in (PROJECT_ROOT / "core").glob("*.py"):
        imported = {name.split(".")[0] for node in ast.walk(ast.parse(path.read_text()))
                    for name in ([a.name for a in node.names] if isinstance(node, ast.Import)
                                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])}
        assert "streamlit" not in imported, path.name


def core_imports(path: Path) -> set[str]:
    """The ``core`` modules a module imports, at the top level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "core":
            found |= {f"core.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("core."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("core.")}
    return found


def test_core_has_no_import_cycle() -> None:
    graph = {f"core.{p.stem}": core_imports(p) for p in (PROJECT_ROOT / "core").glob("*.py") if p.stem != "__init__"}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        if state.get(module) == "done":
            return
        if state.get(module) == "open":
            cycle = path[path.index(module):] + [module]
            pytest.fail(f"import cycle: {' → '.join(cycle)}")
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            visit(target, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])


def test_no_core_module_outgrows_one_job() -> None:
    sizes = {p.name: len(p.read_text().splitlines()) for p in (PROJECT_ROOT / "core").glob("*.py")}
    assert not {name: n for name, n in sizes.items() if n > MAX_CORE_LINES}


def test_pages_are_scripts_not_an_installed_package() -> None:
    """``pages/`` is run by path through ``st.navigation``; installed as a package it would claim the name
    ``pages`` in site-packages for every project in the environment."""
    assert not (PROJECT_ROOT / "pages" / "__init__.py").exists()
    assert '"pages"' not in (PROJECT_ROOT / "pyproject.toml").read_text().split("packages =")[1].split("\n")[0]

"""The house rules of the layout: data flows data → train.py → run directory → dashboard, the dashboard never loads
training code, neither do the audits, ``core`` never imports Streamlit, a prediction does not load the CAM library,
and no ``core`` module imports another that imports it back. (A line cap per module once stood for "one job"; it
pushed helpers into odd homes, issue #32, and the boundaries above say more.)"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from core.data import PROJECT_ROOT

TRAINING_MODULES = {"core.fit", "core.training", "core.distributed", "core.evaluation", "core.cv", "core.augment",
                    "core.losses", "core.sampler"}


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


def loaded_by(*modules: str) -> set[str]:
    """Every module a fresh interpreter has loaded after importing ``modules``."""
    probe = f"import sys\nimport {', '.join(modules)}\nprint(' '.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return set(done.stdout.split())


def test_the_audits_do_not_import_training_code() -> None:
    """The Grad-CAM audit and both stress tests read trained runs; they never need the training loop."""
    loaded = loaded_by("core.audit", "core.stress", "core.acquisition", "core.ood", "core.shift", "core.sites")
    assert not loaded & TRAINING_MODULES, sorted(loaded & TRAINING_MODULES)


def test_a_prediction_does_not_import_the_cam_library() -> None:
    """pytorch-grad-cam is loaded when a CAM is asked for, not with every Predictor: the corner geometry the corner
    check needs lives in ``core.corners``, apart from ``core.explain``."""
    loaded = loaded_by("core.predictor", "core.interventions", "core.corners")
    assert "core.predictor" in loaded
    assert not {name for name in loaded if name.split(".")[0] in ("pytorch_grad_cam", "core.explain")}
    assert "core.explain" not in loaded


def test_pages_are_scripts_not_an_installed_package() -> None:
    """``pages/`` is run by path through ``st.navigation``; installed as a package it would claim the name
    ``pages`` in site-packages for every project in the environment."""
    assert not (PROJECT_ROOT / "pages" / "__init__.py").exists()
    assert '"pages"' not in (PROJECT_ROOT / "pyproject.toml").read_text().split("packages =")[1].split("\n")[0]

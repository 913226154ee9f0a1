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


def module_name(path: Path) -> str:
    """``core/audit/stress.py`` → ``core.audit.stress`` (a package's ``__init__.py`` → the package)."""
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


CORE_FILES = sorted((PROJECT_ROOT / "core").rglob("*.py"))
AUDIT_MODULES = [module_name(p) for p in CORE_FILES if p.parent.name == "audit" and p.stem != "__init__"]


def training_code(modules: set[str]) -> set[str]:
    """The training package and the evaluation that ``fit`` ends with: what reading a run never needs."""
    return {m for m in modules if m == "core.train" or m.startswith("core.train.") or m == "core.evaluation"}


def test_the_dashboard_does_not_import_training_code() -> None:
    """Asked of a fresh interpreter: this one has imported everything already."""
    probe = ("import sys\nimport dashboard.loaders, dashboard.state, dashboard.gallery, core.predictor\n"
             "print(' '.join(sorted(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = set(done.stdout.split())
    assert "core.inference" in loaded
    assert not training_code(loaded), sorted(training_code(loaded))


def test_core_never_imports_streamlit() -> None:
    for path in CORE_FILES:
        imported = {name.split(".")[0] for node in ast.walk(ast.parse(path.read_text()))
                    for name in ([a.name for a in node.names] if isinstance(node, ast.Import)
                                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])}
        assert "streamlit" not in imported, module_name(path)


def core_imports(path: Path) -> set[str]:
    """The ``core`` modules a module imports, at the top level or inside functions (``from core.train import fit``
    counts as ``core.train.fit``)."""
    modules = {module_name(p) for p in CORE_FILES}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and (node.module + ".").startswith("core."):
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("core.")}
    return found


def test_core_has_no_import_cycle() -> None:
    graph = {module_name(p): core_imports(p) for p in CORE_FILES}
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
    """Every module of ``core/audit`` (Grad-CAM, both stress tests, the OOD guard, the shift check) reads trained
    runs; none needs the training loop, directly or through what it imports."""
    assert len(AUDIT_MODULES) >= 8
    for path in CORE_FILES:
        if module_name(path) in AUDIT_MODULES:
            assert not training_code(core_imports(path)), module_name(path)
    loaded = loaded_by(*AUDIT_MODULES, "core.sites")
    assert not training_code(loaded), sorted(training_code(loaded))


def test_a_prediction_does_not_import_the_cam_library() -> None:
    """pytorch-grad-cam is loaded when a CAM is asked for, not with every Predictor: the corner geometry the corner
    check needs lives in ``core.audit.corners``, apart from ``core.audit.explain``."""
    loaded = loaded_by("core.predictor", "core.audit.interventions", "core.audit.corners")
    assert "core.predictor" in loaded
    assert not {name for name in loaded if name.split(".")[0] == "pytorch_grad_cam"}
    assert "core.audit.explain" not in loaded


def test_pages_are_scripts_not_an_installed_package() -> None:
    """``pages/`` is run by path through ``st.navigation``; installed as a package it would claim the name
    ``pages`` in site-packages for every project in the environment."""
    assert not (PROJECT_ROOT / "pages" / "__init__.py").exists()
    assert '"pages"' not in (PROJECT_ROOT / "pyproject.toml").read_text().split("packages =")[1].split("\n")[0]

"""Shared fixtures. Tests that need the real HAM10000 folder skip without it, except in CI (REQUIRE_DATA=1),
where a missing folder is a failure: data-dependent tests must run there."""
from __future__ import annotations

import os
from collections.abc import Iterator

# Under pytest-xdist (`make test` runs two workers) each worker and every process it starts gets its share of the
# cores: two workers each running torch on every core spin against each other. Set before torch is first imported.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))
from pathlib import Path

import pandas as pd
import pytest

from core.config import RunConfig
from core.data import DEFAULT_SPLIT_FILE, PROJECT_ROOT, DataError, read_ham10000, resolve_data_dir
from tests.helpers import ARTIFACTS, SMALL_SPLIT, TINY, DashboardServer, streamlit_server


@pytest.fixture(scope="session")
def ham_dir() -> Path:
    try:
        return resolve_data_dir()
    except DataError as err:
        if os.environ.get("REQUIRE_DATA") == "1":
            pytest.fail(f"REQUIRE_DATA=1 but the HAM10000 folder is missing: {err}")
        pytest.skip(f"HAM10000 not available: {err}")


@pytest.fixture(scope="session")
def ham(ham_dir: Path) -> pd.DataFrame:
    return read_ham10000(ham_dir)


@pytest.fixture(scope="session")
def small_split(ham_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    split = pd.read_csv(PROJECT_ROOT / DEFAULT_SPLIT_FILE, dtype={"image_id": str, "lesion_id": str})
    parts = []
    for name, n in SMALL_SPLIT.items():
        rows = split[split["split"] == name]
        if name == "train":
            parts.append(rows.sample(n, random_state=0))
        else:
            parts += [rows[rows["label"] == label].sample(n // 2, random_state=0) for label in (0, 1)]
    path = tmp_path_factory.mktemp("split") / "small_split.csv"
    pd.concat(parts).to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def tiny_config(ham_dir: Path, small_split: Path):
    """The run factory's config: ``tiny_config(**overrides)`` is :data:`TINY` on the small split, overridden."""
    def make(**overrides) -> RunConfig:
        return RunConfig(data_dir=str(ham_dir), split_file=str(small_split), **{**TINY, **overrides})
    return make


@pytest.fixture(scope="session")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DashboardServer]:
    """One `streamlit run` for every end-to-end test (browser, load, serving): each start costs seconds of imports
    and a model load, and what these tests check (sessions kept apart, no files written, bounded memory) must hold
    on a server that has already been used."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with streamlit_server(ARTIFACTS / "streamlit.log", tmp_path_factory.mktemp("server_tmp")) as server:
        yield server


@pytest.fixture(scope="session")
def external_run(ham_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A copy of the shipped run under ``runs/`` (where the dashboard server finds runs) with one labelled set
    evaluated on it, ``clinic_x``: 24 malignant and 24 benign test images as an ``image,label`` CSV in a folder of
    their own. Removed afterwards."""
    import shutil

    import train
    from core.runs import DEFAULT_RUN, read_predictions
    from tests.helpers import run_main

    run = PROJECT_ROOT / "runs" / f"e2e_external_{os.getpid()}"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(DEFAULT_RUN, run, ignore=shutil.ignore_patterns("cams_*", "stress_*", "attention_*"))
    folder = tmp_path_factory.mktemp("clinic_x")
    (folder / "images").mkdir()
    test = read_predictions(DEFAULT_RUN, "test")
    chosen = pd.concat([test[test["label"] == label].sample(24, random_state=0) for label in (1, 0)])
    for image_id in chosen["image_id"]:
        shutil.copy(ham_dir / "images" / f"{image_id}.jpg", folder / "images")
    pd.DataFrame({"image": chosen["image_id"] + ".jpg", "label": chosen["label"]}).to_csv(folder / "clinic_x.csv",
                                                                                         index=False)
    try:
        code, _, err = run_main(train.main, "evaluate", "--run", str(run), "--data", str(folder / "clinic_x.csv"),
                                "--images", str(folder / "images"), "--device", "cpu")
        assert code == 0, err
        yield run
    finally:
        shutil.rmtree(run, ignore_errors=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that fits a model (all do through the small split) carries the ``train`` marker."""
    for item in items:
        if "small_split" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.train)


# The modules that use the one dashboard server: under xdist they go to one worker, so there is one server.
SERVER_MODULES = {"test_browser", "test_dashboard", "test_load"}


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`make test` runs two xdist workers; each gets whole modules, so a module's fixtures (a real split
    regeneration, tiny fits) are built once, and the modules of `SERVER_MODULES` go together."""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "dashboard server" if Path(module).stem in SERVER_MODULES else module

    return ModuleScheduling(config, log)

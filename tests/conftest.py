"""Shared fixtures. Tests that need the real HAM10000 folder skip without it, except in CI (REQUIRE_DATA=1),
where a missing folder is a failure: data-dependent tests must run there."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from core.config import TrainConfig
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
    def make(**overrides) -> TrainConfig:
        return TrainConfig(data_dir=str(ham_dir), split_file=str(small_split), **{**TINY, **overrides})
    return make


@pytest.fixture(scope="session")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DashboardServer]:
    """One `streamlit run` for every end-to-end test (browser, load, serving): each start costs seconds of imports
    and a model load, and what these tests check (sessions kept apart, no files written, bounded memory) must hold
    on a server that has already been used."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with streamlit_server(ARTIFACTS / "streamlit.log", tmp_path_factory.mktemp("server_tmp")) as server:
        yield server


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that fits a model (all do through the small split) carries the ``train`` marker."""
    for item in items:
        if "small_split" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.train)


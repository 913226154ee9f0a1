"""Shared fixtures. Tests that need the real HAM10000 folder skip without it, except in CI (REQUIRE_DATA=1),
where a missing folder is a failure: data-dependent tests must run there."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from core.data import DataError, read_ham10000, resolve_data_dir


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


def write_image(path: Path, size: tuple[int, int] = (64, 48), seed: int = 0) -> Path:
    """A small random RGB image the test owns (never a copy of the licensed data)."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path

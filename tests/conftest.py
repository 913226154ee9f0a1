"""Shared fixtures. Tests that need the real HAM10000 folder skip without it, except in CI (REQUIRE_DATA=1),
where a missing folder is a failure: data-dependent tests must run there."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from core.data import PROJECT_ROOT, DataError, read_ham10000, resolve_data_dir


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


@contextmanager
def streamlit_server(log: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """`streamlit run dashboard/app.py` (what `make dashboard` runs) on a free localhost port, until it answers its
    health check; yields the base URL and stops the server afterwards. Its output goes to ``log``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with log.open("w") as out:
        server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "dashboard/app.py", "--server.port",
                                   str(port), "--server.address", "127.0.0.1"], cwd=PROJECT_ROOT, stdout=out,
                                  stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).close()
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"streamlit did not come up: {log.read_text()}")
                    time.sleep(0.5)
            yield f"http://127.0.0.1:{port}"
        finally:
            server.terminate()
            server.wait(timeout=30)

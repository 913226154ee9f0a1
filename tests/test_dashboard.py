"""The dashboard starts and renders: in Streamlit's AppTest, and as a real server (what `make dashboard` runs)."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.data import PROJECT_ROOT

APP = str(PROJECT_ROOT / "dashboard" / "app.py")


def test_data_page_shows_the_split(ham_dir: Path) -> None:
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception and not at.error
    assert at.title[0].value == "Data & split"
    table = at.dataframe[0].value
    assert table.loc["all", "images"] == 10015 and set(table.index) == {"train", "val", "test", "all"}
    assert any("not a medical device" in c.value for c in at.sidebar.caption)
    assert any(str(ham_dir) in c.value for c in at.caption)


def test_missing_images_give_a_message_not_a_traceback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HAM10000_DIR", str(tmp_path / "nowhere"))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert "Images not found" in at.warning[0].value and "nowhere" in at.warning[0].value
    assert len(at.dataframe) == 1  # the split table does not need the images


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_streamlit_server_serves_the_app() -> None:
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", APP, "--server.port", str(port),
                               "--server.address", "127.0.0.1"], cwd=PROJECT_ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as response:
                    assert response.read() == b"ok"
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"streamlit did not come up: {server.stdout.read().decode(errors='replace')}")
                time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
            assert response.status == 200 and b"<html" in response.read().lower()
    finally:
        server.terminate()
        server.wait(timeout=20)

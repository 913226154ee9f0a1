"""Helpers the test modules share (fixtures live in ``conftest.py``): small synthetic data the tests own, the
tiny-fit settings, a Streamlit server for the end-to-end tests, and the committed stress test read at a threshold."""
from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from benchmarks.load_dashboard import free_port, start_server
from core.audit.interventions import CORNER_CHECK, corner_dependent
from core.audit.stress import wide
from core.data import PROJECT_ROOT
from core.runs import DEFAULT_RUN, read_predictions, read_stress

ARTIFACTS = Path(os.environ.get("E2E_ARTIFACTS", PROJECT_ROOT / "tests" / "artifacts"))  # screenshots, server log


def run_main(main: Callable[[list[str]], int | None], *argv: str) -> tuple[int, str, str]:
    """A command line (``train.main``, a benchmark's ``main``) run in this process: exit code, stdout, stderr.

    What a subprocess would check, without a new interpreter importing torch for ~7 s per call. The thread count a
    benchmark sets is put back, so it cannot slow the tests after it.
    """
    out, err, threads = io.StringIO(), io.StringIO(), torch.get_num_threads()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(list(argv)) or 0
        except SystemExit as exit_:  # argparse's refusals, a benchmark's sys.exit
            code = exit_.code if isinstance(exit_.code, int) else 1
        finally:
            torch.set_num_threads(threads)
    return code, out.getvalue(), err.getvalue()


# What every tiny fit trains and evaluates on: a subset of the committed (lesion-wise) split, half of each class in
# val and test so that AUROC and thresholds exist, instead of predicting the full 1,501 + 1,500 images.
SMALL_SPLIT = {"train": 64, "val": 48, "test": 48}
# A fit small enough for a CPU in seconds: 64 px, two epochs, the first head-only.
TINY = dict(input_size=64, epochs=2, batch_size=16, eval_batch_size=256, head_warmup_epochs=1, ema_decay=0.0,
            amp=False, device="cpu")

ROWS = [("HAM_1", "ISIC_1", "mel"), ("HAM_1", "ISIC_2", "mel"), ("HAM_2", "ISIC_3", "nv"), ("HAM_3", "ISIC_4", "bcc")]


def write_image(path: Path, size: tuple[int, int] = (64, 48), seed: int = 0) -> Path:
    """A small random RGB image the test owns (never a copy of the licensed data)."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def make_ham(root: Path, rows: list[tuple[str, str, str]], images: list[str] | None = None) -> Path:
    """A tiny HAM10000-shaped folder: rows of (lesion_id, image_id, dx)."""
    (root / "images").mkdir(parents=True)
    frame = pd.DataFrame([{"lesion_id": lesion, "image_id": i, "dx": dx, "dx_type": "histo", "age": 50.0,
                           "sex": "male", "localization": "back"} for lesion, i, dx in rows])
    frame.to_csv(root / "HAM10000_metadata.csv", index=False)
    for k, image_id in enumerate(images if images is not None else frame["image_id"]):
        write_image(root / "images" / f"{image_id}.jpg", seed=k)
    return root


def l_shaped_mask(height: int = 150, width: int = 200) -> np.ndarray:
    """An asymmetric, off-centre shape: any flip, rotation or shift of one but not the other shows."""
    mask = np.zeros((height, width), dtype=bool)
    mask[30:110, 60:85] = True
    mask[90:110, 60:140] = True
    return mask


def corner_dependence(threshold: float) -> pd.DataFrame:
    """The shipped model's test split with each decision's corner dependence at ``threshold``, from the committed
    stress test."""
    frame = read_predictions(DEFAULT_RUN, "test").merge(wide(read_stress(DEFAULT_RUN, "test")), on="image_id")
    checked = {name: frame[f"p_{name}"] for name in CORNER_CHECK}
    return frame.assign(dependent=corner_dependent(frame["probability"], checked, threshold))


class DashboardServer(NamedTuple):
    url: str  # the base URL, no trailing slash
    pid: int  # for the load test's memory samples
    tmp: Path  # the server's TMPDIR: uploads must not land there (or anywhere else on disk)


@contextmanager
def streamlit_server(log: Path, tmp: Path) -> Iterator[DashboardServer]:
    """The load benchmark's `streamlit run` (what `make dashboard` runs) on a free localhost port with ``tmp`` as
    its TMPDIR; yields it once it answers and stops it afterwards. Output goes to ``log``."""
    port = free_port()
    with log.open("w") as out:
        try:
            server = start_server(port, out, env={**os.environ, "TMPDIR": str(tmp)})
        except RuntimeError as err:
            pytest.fail(f"{err}: {log.read_text()}")
        try:
            yield DashboardServer(f"http://127.0.0.1:{port}", server.pid, tmp)
        finally:
            server.terminate()
            server.wait(timeout=30)

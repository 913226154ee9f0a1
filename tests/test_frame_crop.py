"""A run trained on the whole 4:3 frame (``crop: frame``) end to end: fit, evaluation, Predictor, Grad-CAM audit,
the stored CAMs and the dashboard pages all use the frame's (H, W), never a square."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

import train
from core import runs
from core.audit import attention as audit
from core.config import RunConfig
from core.data import PROJECT_ROOT
from core.images import open_rgb
from core.inference import load_splits, preload_images
from core.predictor import Predictor
from core.train.fit import fit
from core.transforms import view_shape
from dashboard import loaders
from tests.helpers import SMALL_SPLIT

SIZE = 64
SHAPE = view_shape(SIZE, "frame")  # (64, 88)
APP = str(PROJECT_ROOT / "dashboard" / "app.py")


@pytest.fixture(scope="module")
def frame_run(tiny_config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = tiny_config(input_size=SIZE, crop="frame", train_limit=32, epochs=1, head_warmup_epochs=0)
    run = fit(cfg, tmp_path_factory.mktemp("runs") / "frame")
    assert train.main(["explain", "--run", str(run), "--split", "test", "--limit", "12"]) == 0
    return run


def test_fit_trains_and_evaluates_on_the_whole_frame(frame_run: Path) -> None:
    cfg = RunConfig.from_yaml(frame_run / "config.yaml")
    assert cfg.crop == "frame" and SHAPE == (64, 88)
    images = preload_images(load_splits(cfg)["test"]["path"].head(3).tolist(), cfg.input_size, cfg.crop)
    assert images.shape == (3, 3, *SHAPE)
    report = runs.read_metrics(frame_run)
    assert 0 <= report.test.auroc <= 1
    assert len(pd.read_csv(frame_run / "predictions_test.csv")) == SMALL_SPLIT["test"]


def test_predictor_sees_and_explains_the_frame(frame_run: Path, ham: pd.DataFrame) -> None:
    test_ids = set(pd.read_csv(frame_run / "predictions_test.csv")["image_id"])
    row = ham[ham["image_id"].isin(test_ids)].iloc[0]
    result = Predictor.load(frame_run).predict(row["path"], explain=True)
    assert result.model_input.shape == (*SHAPE, 3) and result.cam.shape == SHAPE
    stored = pd.read_csv(frame_run / "predictions_test.csv").set_index("image_id")["probability"]
    assert result.probability == pytest.approx(stored[row["image_id"]], abs=1e-5)  # what evaluation saw
    # the model view of a 200×150 photo is the whole photo, resized: its first and last columns survive
    whole = np.asarray(open_rgb(row["path"]).resize(SHAPE[::-1]), dtype=float)
    assert np.abs(result.model_input.astype(float) - whole).mean() < 8


def test_stored_cams_keep_the_frame_aspect(frame_run: Path) -> None:
    store = np.load(frame_run / "cams_test.npz")
    long_side = audit.CAM_STORE_SIZE
    assert store["cam"].shape == (12, round(long_side * SHAPE[0] / SHAPE[1]), long_side)
    table = pd.read_csv(frame_run / "attention_test.csv")
    assert table["corner_fraction"].between(0, 1).all() and table["outside_lesion_fraction"].notna().all()


def test_dashboard_pages_show_the_frame_run(frame_run: Path, ham_dir: Path) -> None:
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["run"] = frame_run
    at.run()
    photo = next((ham_dir / "images").glob("*.jpg"))
    at.file_uploader[0].upload(photo.name, photo.read_bytes(), "image/jpeg").run()
    assert not at.exception and not at.error
    captions = [c for element in at.get("image") for c in element.captions]
    assert "as the model sees it (whole 4:3 frame, resized)" in captions
    at.switch_page(str(PROJECT_ROOT / "pages" / "browse.py")).run()
    opened = next(b for b in at.button if b.label == "Open")
    opened.click().run()
    assert not at.exception and not at.error
    assert any(opened.key.removeprefix("open-") in s.value for s in at.subheader)
    at.switch_page(str(PROJECT_ROOT / "pages" / "training.py")).run()
    assert not at.exception and any("64×88 px (whole 4:3 frame, resized)" in m.value for m in at.markdown)


def test_frame_and_square_views_of_one_photo(ham: pd.DataFrame) -> None:
    path = ham["path"][0]
    assert loaders.model_view(path, SIZE, "frame").shape == (*SHAPE, 3)
    assert loaders.model_view(path, SIZE).shape == (SIZE, SIZE, 3)
    mask_path = ham["mask_path"].dropna().iloc[0]
    assert loaders.model_view_mask(mask_path, SIZE, "frame").shape == SHAPE

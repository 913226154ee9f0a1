"""The one loaded-run object (core.run): what every reader of a trained run predicts with."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from core.inference import FLIP_DIMS, Preprocess, load_run, predict_probabilities, preload_images
from core.run import Predictions, load
from core.runs import DEFAULT_RUN, read_metrics, read_predictions


def test_a_loaded_run_predicts_as_evaluation_did(ham) -> None:
    run = load(DEFAULT_RUN)
    assert run.thresholds == read_metrics(DEFAULT_RUN).thresholds
    stored = read_predictions(DEFAULT_RUN, "test").head(6)
    frame = ham.set_index("image_id").loc[stored["image_id"]].reset_index()
    predicted, predictions = run.predict_frame(frame, features=True)
    np.testing.assert_allclose(predicted["probability"], stored["probability"], atol=1e-5)
    penultimate, style = predictions.features
    assert len(penultimate) == len(style) == 6 and penultimate.shape[1] > style.shape[1] > 0
    # The same numbers by hand, through the low-level function the object wraps.
    cfg, model = load_run(DEFAULT_RUN)
    images = preload_images(frame["path"].tolist(), cfg.input_size, cfg.crop)
    by_hand = predict_probabilities(model, images, Preprocess(cfg), torch.device("cpu"), 32, cfg.tta_views, cfg.amp,
                                    cfg.calibration)
    np.testing.assert_allclose(predictions.probability, by_hand, atol=1e-6)
    # Uncalibrated, the per-view probabilities average to the uncalibrated TTA probability (up to mixed precision).
    views = np.mean([run.view_probabilities(images, dims) for dims in FLIP_DIMS[:cfg.tta_views]], axis=0)
    np.testing.assert_allclose(run.predict(images, calibrated=False).probability, views, atol=2e-3)


def test_predictions_without_features_say_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="features=True"):
        _ = Predictions(np.zeros(2)).features
    run_dir = tmp_path / "run"
    shutil.copytree(DEFAULT_RUN, run_dir, ignore=shutil.ignore_patterns("metrics*.json", "*.csv", "cams_*"))
    assert load(run_dir).thresholds == {}  # not evaluated yet

"""Platt scaling (core/calibration.py, ``train.py calibrate``): fitted on the raw val probabilities, applied by
every prediction path, changing no decision at the val-chosen thresholds, and writing nothing when it fails."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from sklearn.metrics import log_loss

import train
from core import runs
from core.calibration import IDENTITY, apply_platt, fit_platt
from core.config import RunConfig
from core.data import PROJECT_ROOT, resolve_data_dir
from core.evaluation import calibrate_run, evaluate_run
from core.predictor import Predictor
from core.runs import RunError


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def test_fit_recovers_a_known_miscalibration() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 40_000)
    labels = rng.random(z.size) < sigmoid(2.0 * z - 1.0)  # true P = σ(2z − 1); the "model" says σ(z)
    a, b = fit_platt(labels, sigmoid(z))
    assert a == pytest.approx(2.0, abs=0.08) and b == pytest.approx(-1.0, abs=0.06)


def test_apply_is_monotone_and_the_identity_is_free() -> None:
    probs = torch.tensor([0.01, 0.2, 0.5, 0.77, 0.999], dtype=torch.float64)
    calibrated = apply_platt(probs, (1.7, -0.4))
    assert torch.allclose(calibrated, torch.sigmoid(1.7 * torch.logit(probs) - 0.4), atol=1e-12)
    assert torch.all(calibrated.diff() > 0)  # monotone: the ranking, hence AUROC, is kept
    assert apply_platt(probs, IDENTITY) is probs


@pytest.mark.parametrize("labels, match", [
    (np.zeros(50), "both classes"),
    (np.r_[np.ones(25), np.zeros(25)], "no better than chance"),  # the probabilities rise while the labels fall
    (np.r_[np.zeros(25), np.ones(25)], "separate the classes perfectly"),  # the MLE slope is infinite
    (np.r_[np.zeros(42), np.ones(8)][np.random.default_rng(0).permutation(50)], "at least 10 images of each"),
], ids=["one-class", "reversed", "separable", "too-few"])
def test_fit_refuses_what_it_cannot_calibrate(labels: np.ndarray, match: str) -> None:
    probs = np.linspace(0.05, 0.95, 50)
    with pytest.raises(ValueError, match=match):
        fit_platt(labels, probs)


@pytest.fixture(scope="module")
def small_default_run(ham, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped run on 40 val + 40 test images (a split-file subset), evaluated: a real model, seconds to run."""
    run = tmp_path_factory.mktemp("cal") / "run"
    shutil.copytree(PROJECT_ROOT / "models" / "default", run,
                    ignore=shutil.ignore_patterns("cams_*", "attention_*", "index.*", "ood_*"))  # another split
    split = pd.read_csv(PROJECT_ROOT / "splits" / "ham10000.csv")
    parts = [split[(split["split"] == s) & (split["label"] == y)].head(20) for s in ("val", "test") for y in (0, 1)]
    pd.concat(parts).to_csv(run / "split.csv", index=False)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "split_file": str(run / "split.csv")}, sort_keys=False))
    evaluate_run(run, "cpu")
    return run


def test_calibrate_run_fits_on_val_and_keeps_decisions(small_default_run: Path) -> None:
    run = small_default_run
    before = runs.read_metrics(run)
    val_before = pd.read_csv(run / "predictions_val.csv")
    test_before = pd.read_csv(run / "predictions_test.csv")
    _, after = calibrate_run(run, "cpu")
    val_after = pd.read_csv(run / "predictions_val.csv")
    test_after = pd.read_csv(run / "predictions_test.csv")
    # Maximum likelihood on val: never worse than what it started from.
    assert log_loss(val_after["label"], val_after["probability"]) <= log_loss(val_before["label"],
                                                                            val_before["probability"]) + 1e-9
    assert after.run is not None
    assert after.run.calibration == yaml.safe_load((run / "config.yaml").read_text())["calibration"]
    assert after.test.auroc == pytest.approx(before.test.auroc, abs=1e-9)
    for name in ("youden", "sens95"):  # thresholds re-chosen on the calibrated val: the same cases either side
        decided_before = test_before["probability"] >= before.thresholds[name]
        decided_after = test_after["probability"] >= after.thresholds[name]
        assert (decided_before == decided_after).all(), name
    # The Predictor applies the same calibration as evaluation did.
    image = pd.read_csv(run / "split.csv").query("split == 'test'")["image_id"].iloc[0]
    predictor = Predictor.load(run)
    got = predictor.predict(resolve_data_dir() / "images" / f"{image}.jpg").probability
    assert got == pytest.approx(test_after.set_index("image_id").loc[image, "probability"], abs=2e-3)
    # Fitted on the raw probabilities: calibrating again gives the same (a, b), never a stacked one.
    _, again = calibrate_run(run, "cpu")
    assert again.run is not None and again.run.calibration == pytest.approx(after.run.calibration, abs=1e-9)


def test_a_failed_calibration_writes_nothing(small_default_run: Path) -> None:
    run = small_default_run
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    broken = {**cfg, "split_file": str(run / "no_such_split.csv")}  # evaluation cannot find its images
    (run / "config.yaml").write_text(yaml.safe_dump(broken, sort_keys=False))
    files = {name: (run / name).read_bytes() for name in ("config.yaml", "metrics.json", "predictions_val.csv")}
    assert train.main(["calibrate", "--run", str(run), "--device", "cpu"]) == 2
    assert {name: (run / name).read_bytes() for name in files} == files
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def test_cli_explains_what_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert train.main(["calibrate", "--run", str(tmp_path)]) == 2
    assert "is not a run directory: it needs config.yaml" in capsys.readouterr().err
    with pytest.raises(RunError, match="is not a run directory"):
        calibrate_run(tmp_path)


def test_config_refuses_a_malformed_calibration() -> None:
    for bad in ([1.0], [0.0, 0.1], [-1.0, 0.0], [1.0, float("nan")]):
        with pytest.raises(ValueError, match="calibration"):
            RunConfig(calibration=bad)


@pytest.mark.parametrize("resume", [False, True], ids=["new", "resumed"])
def test_training_goes_on_uncalibrated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture, resume: bool) -> None:
    """A calibration is fitted to one run's weights: neither `fit --config <a calibrated run's config>` nor
    `fit --resume <a calibrated run>` (a later epoch may replace the best weights) may keep it."""
    from core.train import fit

    started = []
    monkeypatch.setattr(fit, "_fit", lambda cfg, run_dir, resume: started.append(cfg))
    fit.fit(RunConfig(calibration=[1.8, -0.4]), tmp_path / "run", resume=resume)
    assert started[0].calibration == list(IDENTITY)
    assert "belongs to other weights" in capsys.readouterr().err


def test_the_dashboard_reloads_the_model_when_the_config_changes(small_default_run: Path) -> None:
    """`train.py calibrate` rewrites config.yaml but not the weights; the shared Predictor must follow it."""
    from dashboard import loaders

    first = loaders.predictor(small_default_run)
    assert loaders.predictor(small_default_run) is first
    config = small_default_run / "config.yaml"
    later = config.stat().st_mtime + 5
    os.utime(config, (later, later))
    assert loaders.predictor(small_default_run) is not first

"""The engine end to end on real images, small enough for a CPU: fit, checkpoint, evaluate, predict, resume."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import train
from core import checkpoint
from core.config import TrainConfig
from core.engine import Preprocess, fit, load_run, load_splits, predict_probabilities, preload_images
from core.predictor import Predictor

TINY = dict(input_size=64, train_limit=64, epochs=2, batch_size=16, eval_batch_size=256, head_warmup_epochs=1,
            ema_decay=0.0, amp=False, device="cpu")


@pytest.fixture(scope="module")
def tiny_run(ham_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = TrainConfig(data_dir=str(ham_dir), **TINY)
    return fit(cfg, tmp_path_factory.mktemp("runs") / "tiny")


def test_run_directory_holds_everything(tiny_run: Path) -> None:
    for name in ("config.yaml", "model.safetensors", "history.csv", "metrics.json", "predictions_val.csv",
                 "predictions_test.csv", "last.safetensors", "last.json"):
        assert (tiny_run / name).is_file(), name
    history = pd.read_csv(tiny_run / "history.csv")
    assert list(history["epoch"]) == [1, 2]
    assert {"train_loss", "val_loss", "val_auroc", "lr", "seconds"} <= set(history.columns)
    assert TrainConfig.from_yaml(tiny_run / "config.yaml").input_size == 64


def test_predictions_and_metrics_are_consistent(tiny_run: Path) -> None:
    report = json.loads((tiny_run / "metrics.json").read_text())
    test = pd.read_csv(tiny_run / "predictions_test.csv")
    assert list(test.columns[:5]) == ["image_id", "lesion_id", "dx", "label", "probability"]
    assert len(test) == 1500 and test["probability"].between(0, 1).all()
    from sklearn.metrics import roc_auc_score
    assert report["test"]["auroc"] == pytest.approx(roc_auc_score(test["label"], test["probability"]))
    assert set(report["thresholds"]) == {"0.5", "youden", "sens95"}


def test_checkpoint_round_trips_to_identical_predictions(tiny_run: Path, ham_dir: Path) -> None:
    cfg, model = load_run(tiny_run)
    frame = load_splits(cfg)["test"].head(40)
    images = preload_images(frame["path"].tolist(), cfg.input_size)
    first = predict_probabilities(model, images, Preprocess(cfg), torch.device("cpu"))
    _, again = load_run(tiny_run)
    second = predict_probabilities(again, images, Preprocess(cfg), torch.device("cpu"))
    np.testing.assert_array_equal(first, second)
    saved = pd.read_csv(tiny_run / "predictions_test.csv").set_index("image_id")["probability"]
    np.testing.assert_allclose(first, saved.loc[frame["image_id"]].to_numpy(), atol=2e-6)
    predictor = Predictor.load(tiny_run)
    assert predictor.predict(frame["path"][0]).probability == pytest.approx(first[0], abs=1e-5)
    assert predictor.predict(Path(frame["path"][1]).read_bytes()).probability == pytest.approx(first[1], abs=1e-5)


def test_loss_falls_when_overfitting_a_few_images(ham_dir: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(data_dir=str(ham_dir), **{**TINY, "epochs": 6, "head_warmup_epochs": 0, "lr": 3e-3,
                                                "rotation": 0.0, "jitter": 0.0})
    fit(cfg, tmp_path / "overfit")
    losses = pd.read_csv(tmp_path / "overfit" / "history.csv")["train_loss"].to_numpy()
    assert losses[-1] < 0.6 * losses[0]


def test_predict_command_writes_one_row_per_image(tiny_run: Path, ham: pd.DataFrame, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for path in ham["path"].head(3):
        (folder / Path(path).name).write_bytes(Path(path).read_bytes())
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.jpg").write_bytes(b"garbage")
    out = tmp_path / "p.csv"
    assert train.main(["predict", "--run", str(tiny_run), "--images", str(folder), "--out", str(out)]) == 0
    frame = pd.read_csv(out)
    assert sorted(frame["image"]) == sorted(Path(p).name for p in ham["path"].head(3))
    assert frame["probability"].between(0, 1).all()


def test_evaluate_command_on_an_external_labelled_csv(tiny_run: Path, ham: pd.DataFrame, tmp_path: Path) -> None:
    rows = ham.groupby("label").head(10)
    (tmp_path / "labels.csv").write_text("image,label\n" + "".join(f"{i},{l}\n" for i, l in
                                                                    zip(rows["image_id"], rows["label"])))
    images = Path(rows["path"].iloc[0]).parent
    assert train.main(["evaluate", "--run", str(tiny_run), "--data", str(tmp_path / "labels.csv"),
                       "--images", str(images), "--device", "cpu"]) == 0
    report = json.loads((tiny_run / "metrics_labels.json").read_text())
    assert report["n"] == 20 and 0 <= report["auroc"] <= 1


def test_bad_run_directory_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert train.main(["evaluate", "--run", str(tmp_path), "--device", "cpu"]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_corrupt_weights_are_reported(tiny_run: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text((tiny_run / "config.yaml").read_text())
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(checkpoint.CheckpointError, match="not a readable safetensors"):
        Predictor.load(broken)


def test_resume_after_interruption_matches_an_uninterrupted_run(ham_dir: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 tiny_run: Path) -> None:
    """Interrupt after epoch 1 (Ctrl-C), resume: same history and the very same weights as the run without a stop."""
    import core.engine

    real = core.engine.train_one_epoch

    def interrupted(*args, **kwargs):
        if args[11] == 1:  # the epoch argument: stop before the second epoch trains
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    cfg = TrainConfig(data_dir=str(ham_dir), **TINY)
    monkeypatch.setattr(core.engine, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, tmp_path / "resumed")
    assert list(pd.read_csv(tmp_path / "resumed" / "history.csv")["epoch"]) == [1]  # epoch 1 intact on disk
    monkeypatch.setattr(core.engine, "train_one_epoch", real)
    assert train.main(["fit", "--resume", str(tmp_path / "resumed")]) == 0
    ours = pd.read_csv(tmp_path / "resumed" / "history.csv")
    theirs = pd.read_csv(tiny_run / "history.csv")
    pd.testing.assert_frame_equal(ours[["epoch", "train_loss", "val_auroc"]], theirs[["epoch", "train_loss", "val_auroc"]])
    from safetensors.torch import load_file
    a, b = load_file(str(tmp_path / "resumed" / "last.safetensors")), load_file(str(tiny_run / "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("model."))


def test_predictor_names_unreadable_input(tiny_run: Path) -> None:
    from core.data import DataError
    predictor = Predictor.load(tiny_run)
    with pytest.raises(DataError, match="uploaded bytes: cannot read image"):
        predictor.predict(b"definitely not an image")
    from PIL import Image
    rgba = Image.new("RGBA", (300, 200), (120, 60, 40, 128))
    result = predictor.predict(rgba)
    assert 0 <= result.probability <= 1 and result.model_input.shape == (64, 64, 3)
    assert set(result.thresholds) == {"0.5", "youden", "sens95"}


def test_explain_command_on_twenty_images(tiny_run: Path) -> None:
    assert train.main(["explain", "--run", str(tiny_run), "--split", "test", "--limit", "20"]) == 0
    table = pd.read_csv(tiny_run / "attention_test.csv")
    assert len(table) == 20 and table["image_id"].is_unique
    for column in ("corner_fraction", "border_fraction", "outside_lesion_fraction", "background_lesion_ratio",
                   "flag", "dark_corner_score", "deletion_blur_change", "deletion_remove_change", "correct"):
        assert column in table.columns, column
    assert table["corner_fraction"].between(0, 1).all() and table["outside_lesion_fraction"].notna().all()
    store = np.load(tiny_run / "cams_test.npz")
    assert store["cam"].shape == (20, 56, 56) and store["cam"].dtype == np.uint8
    assert list(store["image_id"]) == table["image_id"].tolist()
    summary = json.loads((tiny_run / "attention_summary.json").read_text())
    assert summary["n"] == 20 and {"flagged", "by_correctness", "by_dx", "auroc", "deletion_top20_change",
                                   "background_lesion_ratio_by_dx", "corner_vs_dark_corners_spearman"} <= set(summary)


def test_predictor_explains(tiny_run: Path, ham: pd.DataFrame) -> None:
    result = Predictor.load(tiny_run).predict(ham["path"][0], explain=True)
    assert result.cam.shape == (64, 64) and 0 <= result.cam.min() and result.cam.max() <= 1
    assert {"corner_fraction", "flag", "dark_corner_score"} <= set(result.attention)

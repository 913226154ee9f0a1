"""`train.py cv`: fold files validated, fold splits built right, a tiny real 3-fold run summarised and resumable."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

import train
from core import metrics, runs
from core.config import RunConfig
from core.data import PROJECT_ROOT, DataError
from core.split import read_folds, read_split
from core.train import cv

TINY = dict(input_size=64, epochs=1, batch_size=16, eval_batch_size=256, head_warmup_epochs=0, ema_decay=0.0,
            amp=False, device="cpu")


def _small_folds(n_folds: int = 3) -> pd.DataFrame:
    """Whole lesions of the committed fold file, 10 malignant and 14 benign images per fold."""
    folds = read_folds(PROJECT_ROOT / "splits" / "ham10000_folds5.csv")
    parts = []
    for k in range(n_folds):
        part = folds[folds["fold"] == k]
        for label, n in ((1, 10), (0, 14)):
            lesions = part[part["label"] == label]["lesion_id"].drop_duplicates().head(n)
            parts.append(part[part["lesion_id"].isin(lesions)])
    return pd.concat(parts, ignore_index=True)


@pytest.mark.parametrize(("text", "message"), [
    ("image_id,lesion_id,dx,label\nA,L1,nv,0\n", "missing column"),
    ("image_id,lesion_id,dx,label,fold\nA,L1,nv,0,0\nB,L1,nv,0,1\nC,L2,mel,1,1\n", "more than one fold.*L1"),
    ("image_id,lesion_id,dx,label,fold\nA,L1,nv,0,0\nC,L2,mel,1,0\n", "at least 2 folds"),
    ("image_id,lesion_id,dx,label,fold\nA,L1,nv,0,x\nC,L2,mel,1,0\n", "non-integer fold for A"),
])
def test_fold_file_problems_are_named(tmp_path: Path, text: str, message: str) -> None:
    bad = tmp_path / "folds.csv"
    bad.write_text(text)
    with pytest.raises(DataError, match=message):
        read_folds(bad)


def test_fold_split_holds_out_one_fold_and_keeps_the_test_split() -> None:
    folds = _small_folds()
    split = read_split(PROJECT_ROOT / "splits" / "ham10000.csv")
    test = split[split["split"] == "test"]
    for k in range(3):
        made = cv.fold_split(folds, test, k)
        assert set(made.loc[made["split"] == "val", "image_id"]) == set(folds.loc[folds["fold"] == k, "image_id"])
        assert set(made.loc[made["split"] == "train", "image_id"]) == set(folds.loc[folds["fold"] != k, "image_id"])
        assert set(made.loc[made["split"] == "test", "image_id"]) == set(test["image_id"])
    with pytest.raises(DataError, match="both the fold file and the test split"):
        cv.fold_split(folds, folds.assign(split="test"), 0)


@pytest.mark.train
def test_three_fold_cv_end_to_end(ham_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folds_file = tmp_path / "folds.csv"
    _small_folds().to_csv(folds_file, index=False)
    split = read_split(PROJECT_ROOT / "splits" / "ham10000.csv")
    small_split = tmp_path / "split.csv"
    test = split[split["split"] == "test"]
    pd.concat([test[test["label"] == 1].head(15), test[test["label"] == 0].head(25)]).to_csv(small_split, index=False)
    out = tmp_path / "cv"
    code = train.main(["cv", "--out", str(out), "--folds-file", str(folds_file), "--split-file", str(small_split),
                       "--data-dir", str(ham_dir), *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]])
    assert code == 0
    table = pd.read_csv(out / "cv_folds.csv")
    assert list(table["fold"]) == [0, 1, 2]
    for k in range(3):  # each fold is a full run directory, evaluated on its own held-out fold
        report = runs.read_metrics(out / f"fold{k}")
        assert report.val.n == (_small_folds()["fold"] == k).sum() and report.test.n == 40
        assert table.loc[k, "test_auroc"] == pytest.approx(report.test.auroc, abs=1e-6)
    summary = pd.read_csv(out / "cv_summary.csv").set_index("metric")
    assert summary.loc["test_auroc", "mean"] == pytest.approx(table["test_auroc"].mean(), abs=1e-6)
    assert summary.loc["test_auroc", "sd"] == pytest.approx(table["test_auroc"].std(ddof=1), abs=1e-6)
    assert RunConfig.from_yaml(out / "cv_config.yaml").input_size == 64

    def no_training(*args, **kwargs):
        raise AssertionError("a finished fold was trained again")

    monkeypatch.setattr(cv, "fit", no_training)  # running it again reuses the finished folds
    assert cv.cross_validate(RunConfig.from_yaml(out / "cv_config.yaml"), out, folds_file).shape[0] == len(summary)


def test_source_split_holds_out_every_image_of_the_source() -> None:
    split = pd.DataFrame({"image_id": list("ABCDEFG"), "lesion_id": ["L1", "L1", "L2", "L3", "L4", "L5", "L6"],
                          "dx": "nv", "label": 0, "split": ["train", "train", "val", "test", "train", "test", "val"]})
    sources = pd.Series({"A": "x", "B": "y", "C": "y", "D": "y", "E": "x", "F": "x", "G": "x"})
    fold = cv.source_split(split, sources, "y").set_index("image_id")
    # B, C, D are y's; A shares lesion L1 with B, so it goes with it; F is another source's test image: left out.
    assert fold["split"].to_dict() == {"E": "train", "G": "val", "A": "test", "B": "test", "C": "test", "D": "test"}
    with pytest.raises(DataError, match="no image of the split comes from source 'z'"):
        cv.source_split(split, sources, "z")
    with pytest.raises(DataError, match="have no source"):
        cv.source_split(split, sources.drop("G"), "y")


def test_leave_one_source_out_end_to_end(ham_dir: Path, ham: pd.DataFrame, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny real fold: trained without Rosendahl, tested on every Rosendahl image of the split, its row in
    cv_sources.csv; run again, the finished fold is reused."""
    split = read_split(PROJECT_ROOT / "splits" / "ham10000.csv").merge(ham[["image_id", "source"]], on="image_id")
    parts = [split[(split["source"] == source) & (split["label"] == label) & (split["split"] == name)].head(n)
             for source in ("rosendahl", "vidir_modern") for label in (0, 1)
             for name, n in (("train", 8), ("val", 5), ("test", 4))]
    small = pd.concat(parts).drop(columns="source")
    small_split = tmp_path / "split.csv"
    small.to_csv(small_split, index=False)
    out = tmp_path / "loso"
    code = train.main(["cv", "--by", "source", "--hold-out", "rosendahl", "--out", str(out), "--split-file",
                       str(small_split), "--data-dir", str(ham_dir),
                       *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]])
    assert code == 0
    fold = read_split(out / "without_rosendahl" / "split.csv").merge(ham[["image_id", "source"]], on="image_id")
    assert (fold[fold["split"] == "test"]["source"] == "rosendahl").all()
    assert not (fold[fold["split"] != "test"]["source"] == "rosendahl").any()
    assert (fold["split"] == "test").sum() == 2 * (8 + 5 + 4)  # every Rosendahl image of the split
    report = runs.read_metrics(out / "without_rosendahl")
    assert report.test.n == 34 and report.val.n == 10
    table = pd.read_csv(out / "cv_sources.csv")
    assert list(table["held_out"]) == ["rosendahl"] and table.loc[0, "test_n"] == 34
    assert table.loc[0, "test_auroc"] == pytest.approx(report.test.auroc, abs=1e-6)
    assert table.loc[0, "test_malignant_share"] == pytest.approx(0.5)
    # Its images of the original test split alone, to set beside a model trained on every source.
    predictions = pd.read_csv(out / "without_rosendahl" / "predictions_test.csv", dtype={"image_id": str})
    own = predictions[predictions["image_id"].isin(small[small["split"] == "test"]["image_id"])]
    assert table.loc[0, "own_test_n"] == len(own) == 8
    assert table.loc[0, "own_test_auroc"] == pytest.approx(metrics.auroc(own["label"], own["probability"]), abs=1e-6)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished fold was trained again")

    monkeypatch.setattr(cv, "fit", no_training)
    again = cv.leave_source_out(RunConfig.from_yaml(out / "cv_config.yaml"), out, ["rosendahl"])
    pd.testing.assert_frame_equal(again, table, check_exact=False, atol=1e-6, check_dtype=False)
    assert train.main(["cv", "--hold-out", "rosendahl", "--out", str(out)]) == 2  # --hold-out without --by source
    with pytest.raises(DataError, match="no image of the split comes from 'rosendhal'"):  # a typo: refused up front
        cv.leave_source_out(RunConfig.from_yaml(out / "cv_config.yaml"), out, ["rosendahl", "rosendhal"])

"""Lesion-wise k-fold cross-validation (``train.py cv``): how much do one split's numbers move with the split?

Each fold trains on the other folds of train+val, chooses its thresholds on its own held-out fold, and is tested on
the same held-out test split, so the spread across folds is the spread a single 70/15/15 run hides.

``--by source`` is the in-house stand-in for a new clinic (:func:`leave_source_out`): each fold trains on the other
sources' train split, chooses its thresholds on their val split, and is tested on every image of the held-out
source, so its sensitivity at its own val threshold is what a new clinic would get without labels of its own.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd

from core import metrics, runs
from core.config import RunConfig
from core.data import DataError, project_path, read_dataset
from core.io import atomic_write
from core.run_files import Metrics
from core.split import SPLIT_COLUMNS, read_folds, read_split, write_csv
from core.train.fit import fit

RATES = ("sensitivity", "specificity", "balanced_accuracy", "macro_f1", "ppv", "npv")


def fold_split(folds: pd.DataFrame, test: pd.DataFrame, k: int) -> pd.DataFrame:
    """The split file of fold ``k``: its fold is val, the other folds train, and the held-out test split stays."""
    if overlap := set(folds["lesion_id"]) & set(test["lesion_id"]):
        raise DataError(f"lesion(s) in both the fold file and the test split: {', '.join(sorted(overlap)[:5])}")
    dev = folds.assign(split=(folds["fold"] == k).map({True: "val", False: "train"}))
    return pd.concat([dev[SPLIT_COLUMNS], test[SPLIT_COLUMNS]], ignore_index=True)


def source_split(split: pd.DataFrame, sources: pd.Series, held_out: str) -> pd.DataFrame:
    """The split file of a leave-one-source-out fold: every image of a lesion photographed at ``held_out`` (in any
    split) becomes test; the other sources keep their train and val images, and their test images are left out.
    ``sources`` maps image_id → source."""
    source = split["image_id"].map(sources)
    if source.isna().any():
        raise DataError(f"{source.isna().sum()} image(s) of the split have no source (e.g. "
                        f"{', '.join(split['image_id'][source.isna()].head(3))}); --by source needs one for each")
    if held_out not in set(source):
        raise DataError(f"no image of the split comes from source {held_out!r}; sources: "
                        f"{', '.join(sorted(set(source)))}")
    held = split["lesion_id"].isin(split.loc[source == held_out, "lesion_id"])  # a lesion never straddles the cut
    rest = split[~held & split["split"].isin(["train", "val"])]
    return pd.concat([rest, split[held].assign(split="test")], ignore_index=True)[SPLIT_COLUMNS]


def fold_row(report: Metrics, k: int | str, key: str = "fold") -> dict:
    """One fold's metrics.json as a flat row: AUROC of val and test, and the rates at each val-chosen threshold."""
    row: dict = {key: k}
    for split, part in (("val", report.val), ("test", report.test)):
        row[f"{split}_auroc"] = part.auroc
        for name, at in part.at_threshold.items():
            row.update({f"{split}_{name}_{rate}": getattr(at, rate) for rate in RATES})
    return row


def cross_validate(cfg: RunConfig, out_dir: str | Path, folds_file: str | Path,
                   only_folds: list[int] | None = None) -> pd.DataFrame:
    """Train and evaluate every fold (``out_dir/fold<k>``), then write ``cv_folds.csv`` (one row per fold) and
    ``cv_summary.csv`` (mean and sd of each metric). A finished fold is reused and an interrupted one resumed, so
    the command can simply be run again."""
    out_dir = Path(out_dir)
    folds = read_folds(folds_file)
    split = read_split(project_path(cfg.split_file))
    test = split[split["split"] == "test"]
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.to_yaml(out_dir / "cv_config.yaml")  # the resolved config the folds share (each fold differs in split_file)
    rows = []
    for k in sorted(folds["fold"].unique()) if only_folds is None else only_folds:
        run = out_dir / f"fold{k}"
        if not (run / runs.METRICS_FILE).is_file():
            run.mkdir(parents=True, exist_ok=True)
            split_path = run / "split.csv"
            write_csv(fold_split(folds, test, k), split_path)
            fit(replace(cfg, split_file=str(split_path.resolve())), run, resume=(run / runs.STATE_FILE).is_file())
        rows.append(fold_row(runs.read_metrics(run), k))
    table = pd.DataFrame(rows)
    metrics = table.drop(columns="fold")
    summary = pd.DataFrame({"mean": metrics.mean(), "sd": metrics.std(ddof=1), "min": metrics.min(),
                            "max": metrics.max()}).rename_axis("metric").reset_index()
    atomic_write(out_dir / "cv_folds.csv", lambda tmp: table.to_csv(tmp, index=False, float_format="%.6f"))
    atomic_write(out_dir / "cv_summary.csv", lambda tmp: summary.to_csv(tmp, index=False, float_format="%.6f"))
    return summary


def own_test_rates(run: Path, split: pd.DataFrame, threshold: float) -> dict:
    """The fold's test images that were in the *original* test split (the held-out source's, and the few images of
    its lesions taken elsewhere): the figures to set beside a model trained on every source, tested on the same
    images."""
    predictions = runs.read_predictions(run, "test")
    own = predictions[predictions["image_id"].isin(split.loc[split["split"] == "test", "image_id"])]
    if not 0 < own["label"].sum() < len(own):
        return {"own_test_n": len(own)}
    at = metrics.binary_metrics(own["label"], own["probability"], threshold)
    return {"own_test_n": len(own), "own_test_auroc": metrics.auroc(own["label"], own["probability"]),
            "own_test_youden_sensitivity": at["sensitivity"], "own_test_youden_specificity": at["specificity"]}


def leave_source_out(cfg: RunConfig, out_dir: str | Path, held_out: list[str] | None = None) -> pd.DataFrame:
    """Train and evaluate one fold per held-out source (``out_dir/without_<source>``; default: every source), then
    write ``cv_sources.csv``: per held-out source its test size and malignant share, the in-source val AUROC, AUROC
    and rates at the val thresholds on the held-out source, and the same on its images of the original test split
    (``own_test_*``). Finished folds are reused, interrupted ones resumed."""
    out_dir = Path(out_dir)
    data = read_dataset(cfg.data_dir)
    if "source" not in data or data["source"].isna().all():
        raise DataError("--by source needs each image's source: the metadata has no dataset/source/site column")
    sources = data.set_index("image_id")["source"].dropna().astype(str)
    split = read_split(project_path(cfg.split_file))
    known = set(split["image_id"].map(sources).dropna())
    held_out = sorted(known) if held_out is None else held_out
    if unknown := [source for source in held_out if source not in known]:  # before hours of training, not after
        raise DataError(f"no image of the split comes from {', '.join(map(repr, unknown))}; sources: "
                        f"{', '.join(sorted(known))}")
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.to_yaml(out_dir / "cv_config.yaml")
    rows = []
    for source in held_out:
        fold = source_split(split, sources, source)
        run = out_dir / f"without_{runs.check_name(source, 'source')}"
        if not (run / runs.METRICS_FILE).is_file():
            run.mkdir(parents=True, exist_ok=True)
            split_path = run / "split.csv"
            write_csv(fold, split_path)
            fit(replace(cfg, split_file=str(split_path.resolve())), run, resume=(run / runs.STATE_FILE).is_file())
        test = fold[fold["split"] == "test"]
        report = runs.read_metrics(run)
        rows.append({**fold_row(report, source, "held_out"), "test_n": len(test),
                     "test_malignant_share": float(test["label"].mean()),
                     "train_n": int((fold["split"] == "train").sum()),
                     **own_test_rates(run, split, report.thresholds["youden"])})
    table = pd.DataFrame(rows)
    atomic_write(out_dir / "cv_sources.csv", lambda tmp: table.to_csv(tmp, index=False, float_format="%.6f"))
    return table

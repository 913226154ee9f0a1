"""Lesion-wise k-fold cross-validation (``train.py cv``): how much do one split's numbers move with the split?

Each fold trains on the other folds of train+val, chooses its thresholds on its own held-out fold, and is tested on
the same held-out test split, so the spread across folds is the spread a single 70/15/15 run hides.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd

from core import runs
from core.config import TrainConfig
from core.data import DataError, project_path
from core.fit import fit
from core.io import atomic_write
from core.split import SPLIT_COLUMNS, read_folds, read_split, write_csv

RATES = ("sensitivity", "specificity", "balanced_accuracy", "macro_f1", "ppv", "npv")


def fold_split(folds: pd.DataFrame, test: pd.DataFrame, k: int) -> pd.DataFrame:
    """The split file of fold ``k``: its fold is val, the other folds train, and the held-out test split stays."""
    if overlap := set(folds["lesion_id"]) & set(test["lesion_id"]):
        raise DataError(f"lesion(s) in both the fold file and the test split: {', '.join(sorted(overlap)[:5])}")
    dev = folds.assign(split=(folds["fold"] == k).map({True: "val", False: "train"}))
    return pd.concat([dev[SPLIT_COLUMNS], test[SPLIT_COLUMNS]], ignore_index=True)


def fold_row(report: dict, k: int) -> dict:
    """One fold's metrics.json as a flat row: AUROC of val and test, and the rates at each val-chosen threshold."""
    row: dict = {"fold": k}
    for split in ("val", "test"):
        row[f"{split}_auroc"] = report[split]["auroc"]
        for name, at in report[split]["at_threshold"].items():
            row.update({f"{split}_{name}_{rate}": at[rate] for rate in RATES})
    return row


def cross_validate(cfg: TrainConfig, out_dir: str | Path, folds_file: str | Path,
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

"""What the pages call things: metric and column keys of ``core`` (``balanced_accuracy``) as people read them."""
from __future__ import annotations

import pandas as pd

METRIC_LABELS = {
    "auroc": "AUROC", "val_auroc": "val AUROC", "test_auroc": "test AUROC",
    "test_auroc_ci_low": "test AUROC CI low", "test_auroc_ci_high": "test AUROC CI high",
    "test_balanced_accuracy_youden": "test balanced accuracy (Youden)",
    "sensitivity": "sensitivity", "specificity": "specificity", "ppv": "PPV", "npv": "NPV",
    "balanced_accuracy": "balanced accuracy", "f1": "F1", "macro_f1": "macro-F1", "accuracy": "accuracy",
    "input_size": "input size", "ema_decay": "EMA decay", "tta_views": "TTA views",
}


def label(key: str) -> str:
    """The human name of a metric or column key (the key itself, spaced out, if it has none)."""
    return METRIC_LABELS.get(key, key.replace("_", " "))


def readable(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with its known metric columns renamed for display; other columns keep their names."""
    return frame.rename(columns={key: name for key, name in METRIC_LABELS.items() if key in frame.columns})

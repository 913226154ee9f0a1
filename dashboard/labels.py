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
# The per-image columns of the case tables (Case browser, Error audit, a case's details).
COLUMN_LABELS = {
    "image_id": "image", "lesion_id": "lesion", "dx": "diagnosis", "dx_type": "how diagnosed", "source": "source",
    "probability": "P(malignant)", "outcome": "outcome", "mistake_confidence": "how sure of the mistake",
    "out_of_distribution": "unlike training", "unlike_in_content": "unlike training in content",
    "ood_score": "distance to training", "style_score": "style distance", "corner_dependent": "depends on corners",
    "p_corner_fill": "P, corners covered", "p_vignette": "P, vignette added", "corner_delta_p": "largest corner |Δp|",
    "corner_fraction": "CAM share in corners", "border_fraction": "CAM share in border",
    "outside_lesion_fraction": "CAM share outside lesion", "background_lesion_ratio": "CAM background / lesion",
    "dark_corner_score": "dark-corner score", "flag": "CAM corner-focused", "age": "age", "sex": "sex",
    "localization": "localization",
}


def label(key: str) -> str:
    """The human name of a metric or column key (the key itself, spaced out, if it has none)."""
    return METRIC_LABELS.get(key, key.replace("_", " "))


def readable(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with its known metric and case columns renamed for display; other columns keep their names."""
    names = METRIC_LABELS | COLUMN_LABELS
    return frame.rename(columns={key: name for key, name in names.items() if key in frame.columns})


def readable_index(row: pd.Series) -> pd.Series:
    """A case's details (one row as a column of values) with its keys named as in the tables."""
    return row.rename(index=lambda key: COLUMN_LABELS.get(key, label(key)))

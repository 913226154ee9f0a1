"""Evaluation metrics for the binary classifier (label 1 = malignant, score = probability of malignancy).

Everything is scikit-learn underneath; this module fixes the conventions so every report agrees:

* A case is called positive iff ``prob >= threshold`` (the same rule as ``sklearn.metrics.roc_curve``).
* A ratio whose denominator is zero (PPV with no positive calls, specificity with no benign cases, …) is ``nan``,
  never 0: it is undefined, and a 0 would read as "every call was wrong". ``json.dumps`` writes it as ``NaN``.
* Thresholds are chosen on the validation split and applied to test, never chosen on test:
  :func:`choose_thresholds` sees one split, :func:`threshold_report` only ever passes it the validation split.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score, roc_curve

from core.run_files import ThresholdMetrics, parse

AGE_BANDS = ("<30", "30-44", "45-59", "60-74", "75+", "unknown")
SUBGROUP_COLUMNS = ["group", "value", "n", "n_malignant", "auroc"]


def _check(labels: ArrayLike, probs: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Labels as 0/1 ints and probabilities as floats in [0, 1], of equal non-zero length, or a ValueError."""
    y = np.asarray(labels)
    p = np.asarray(probs, dtype=float)
    if y.ndim != 1 or p.ndim != 1 or len(y) != len(p) or len(y) == 0:
        raise ValueError(f"labels and probs must be non-empty 1-D arrays of one length, got {y.shape}, {p.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got {sorted(set(np.unique(y).tolist()) - {0, 1})[:5]}")
    if not (np.isfinite(p).all() and p.min() >= 0 and p.max() <= 1):
        raise ValueError("probs must be finite and within [0, 1]")
    return y.astype(np.int64), p


def _both_classes(y: np.ndarray) -> bool:
    return 0 < y.sum() < len(y)


def _check_both_classes(labels: ArrayLike, probs: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """As :func:`_check`, and both classes present: a threshold chosen on one class means nothing."""
    y, p = _check(labels, probs)
    if not _both_classes(y):
        raise ValueError("need both benign (0) and malignant (1) labels to choose a threshold")
    return y, p


def auroc(labels: ArrayLike, probs: ArrayLike) -> float:
    """Area under the ROC curve; ``nan`` when only one class is present (AUROC is undefined there)."""
    y, p = _check(labels, probs)
    return float(roc_auc_score(y, p)) if _both_classes(y) else float("nan")


def _counts(draws: np.ndarray, n: int) -> np.ndarray:
    """How often each of ``n`` items was drawn, per row of ``draws`` (B, k): a resample as weights."""
    offsets = draws + n * np.arange(len(draws))[:, None]
    return np.bincount(offsets.ravel(), minlength=n * len(draws)).reshape(len(draws), n)


def _resample_counts(rng: np.random.Generator, n: int, n_boot: int, row_length: int) -> Iterator[np.ndarray]:
    """``n_boot`` bootstrap resamples of ``n`` items (``n`` draws with replacement each) as draw counts, in chunks
    of rows whose weights, ``row_length`` long, stay within ~4 M values: memory bounded for large splits."""
    chunk = max(1, 4_000_000 // row_length)
    for start in range(0, n_boot, chunk):
        yield _counts(rng.integers(0, n, (min(chunk, n_boot - start), n)), n)


def _weighted_auroc_rows(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of one scored set under every row of ``weights`` (B, n) at once: what ``roc_auc_score(labels, probs,
    sample_weight=row)`` gives for each row (a tie counts half). A bootstrap resample is its draw counts as weights;
    ``roc_auc_score`` takes one sample per call, too slow for thousands of resamples.

    The scores are sorted once; per row, each distinct score's positive weight meets the negative weight below it.
    Rows without both classes give ``nan``.
    """
    order = np.argsort(probs, kind="stable")
    sorted_probs, positive = probs[order], labels[order] == 1
    starts = np.flatnonzero(np.r_[True, np.diff(sorted_probs) != 0])  # one block per distinct score
    w = weights[:, order].astype(np.float64)
    pos = np.add.reduceat(np.where(positive, w, 0.0), starts, axis=1)
    neg = np.add.reduceat(np.where(positive, 0.0, w), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    total = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (pos * (below + 0.5 * neg)).sum(axis=1) / total, np.nan)


def bootstrap_auroc_ci(labels: ArrayLike, probs: ArrayLike, n_boot: int = 2000, alpha: float = 0.05,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap ``(1 - alpha)`` CI of the AUROC, resampling images with replacement.

    Resamples holding one class only are skipped (their AUROC is undefined); ``(nan, nan)`` when the data hold one
    class only.
    """
    y, p = _check(labels, probs)
    if not _both_classes(y):
        return float("nan"), float("nan")
    resamples = _resample_counts(np.random.default_rng(seed), len(y), n_boot, len(y))
    aucs = np.concatenate([_weighted_auroc_rows(y, p, counts) for counts in resamples])
    aucs = aucs[~np.isnan(aucs)]
    low, high = np.quantile(aucs, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def paired_auroc_gain(labels: ArrayLike, probs_new: ArrayLike, probs_old: ArrayLike, groups: ArrayLike | None = None,
                      n_boot: int = 2000, alpha: float = 0.10, seed: int = 0) -> tuple[float, float, float]:
    """AUROC(new) − AUROC(old) on the same images, with its percentile bootstrap ``(1 - alpha)`` CI.

    Both models are scored on each resample (paired), which cancels the images' shared difficulty. With ``groups``
    (e.g. lesion ids) whole groups are resampled: images of one lesion are near-copies, and resampling them one by
    one would make the interval too narrow. Resamples holding one class only are skipped.
    """
    y, new = _check(labels, probs_new)
    _, old = _check(labels, probs_old)
    if not _both_classes(y):
        raise ValueError("the paired AUROC gain needs both classes")
    group_index = np.unique(np.asarray(groups), return_inverse=True)[1] if groups is not None else np.arange(len(y))
    if len(group_index) != len(y):
        raise ValueError(f"{len(y)} labels but {len(group_index)} groups")
    n_groups = group_index.max() + 1
    gains = []
    for counts in _resample_counts(np.random.default_rng(seed), n_groups, n_boot, len(y)):
        weights = counts[:, group_index]  # an image weighs what its lesion was drawn
        gains.append(_weighted_auroc_rows(y, new, weights) - _weighted_auroc_rows(y, old, weights))
    every = np.concatenate(gains)
    low, high = np.quantile(every[~np.isnan(every)], [alpha / 2, 1 - alpha / 2])
    return auroc(y, new) - auroc(y, old), float(low), float(high)


def paired_stratified_auroc_gain(labels: ArrayLike, probs_new: ArrayLike, probs_old: ArrayLike, strata: ArrayLike,
                                 groups: ArrayLike | None = None, n_boot: int = 2000, alpha: float = 0.10,
                                 seed: int = 0) -> tuple[float, float, float]:
    """Stratified AUROC(new) − stratified AUROC(old) (the mean of the within-stratum AUROCs, over the strata with
    both classes, as :func:`source_report`), with its paired percentile bootstrap ``(1 - alpha)`` CI: groups (e.g.
    lesions) are resampled whole, within their stratum, so each source keeps its size."""
    y, new = _check(labels, probs_new)
    _, old = _check(labels, probs_old)
    strata = np.asarray(strata)
    groups = np.asarray(groups) if groups is not None else np.arange(len(y))
    if len(strata) != len(y) or len(groups) != len(y):
        raise ValueError(f"{len(y)} labels but {len(strata)} strata and {len(groups)} groups")
    rng = np.random.default_rng(seed)
    point, rows = [], []
    for stratum in np.unique(strata):
        mine = strata == stratum
        if not _both_classes(y[mine]):
            continue
        index = np.unique(groups[mine], return_inverse=True)[1]
        counts = np.concatenate(list(_resample_counts(rng, index.max() + 1, n_boot, int(mine.sum()))))[:, index]
        point.append(auroc(y[mine], new[mine]) - auroc(y[mine], old[mine]))
        rows.append(_weighted_auroc_rows(y[mine], new[mine], counts) - _weighted_auroc_rows(y[mine], old[mine], counts))
    if not rows:
        raise ValueError("the stratified AUROC gain needs a stratum with both classes")
    per_stratum = np.stack(rows)
    gains = per_stratum[:, ~np.isnan(per_stratum).any(axis=0)].mean(axis=0)  # every stratum scored, as the point
    low, high = np.quantile(gains, [alpha / 2, 1 - alpha / 2])
    return float(np.mean(point)), float(low), float(high)


def _roc(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``roc_curve`` at every distinct score, without its leading ``inf`` threshold (no case is called positive)."""
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    return fpr[1:], tpr[1:], thresholds[1:]


def youden_threshold(labels: ArrayLike, probs: ArrayLike) -> float:
    """Threshold maximising Youden's J = sensitivity + specificity − 1 (the highest one, on ties)."""
    fpr, tpr, thresholds = _roc(*_check_both_classes(labels, probs))
    return float(thresholds[np.argmax(tpr - fpr)])


def sensitivity_threshold(labels: ArrayLike, probs: ArrayLike, min_sensitivity: float = 0.95) -> float:
    """Highest threshold whose sensitivity on these data is ≥ ``min_sensitivity``: the best specificity that keeps it.

    Screening wants a bounded miss rate first; Youden's J may trade misses for specificity.
    """
    if not 0 < min_sensitivity <= 1:
        raise ValueError(f"min_sensitivity must be in (0, 1], got {min_sensitivity}")
    _, tpr, thresholds = _roc(*_check_both_classes(labels, probs))
    # tpr rises as the threshold falls and reaches 1 at the lowest score, so a first index always exists.
    return float(thresholds[np.argmax(tpr >= min_sensitivity)])


def exact_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Clopper–Pearson interval of a proportion: exact, so it holds for the small counts of a site's sample."""
    from scipy import stats

    interval = stats.binomtest(int(successes), int(n)).proportion_ci(level, method="exact")
    return float(interval.low), float(interval.high)


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else float("nan")


def binary_metrics(labels: ArrayLike, probs: ArrayLike, threshold: float) -> dict[str, float | int]:
    """Confusion matrix and the usual rates at one threshold (positive iff ``prob >= threshold``; undefined → nan).

    Counted with numpy rather than five scikit-learn calls: the dashboard recomputes this on every threshold move
    (a test checks it against scikit-learn).
    """
    y, p = _check(labels, probs)
    predicted = p >= threshold
    positive = y == 1
    tp = int(np.count_nonzero(predicted & positive))
    fp = int(np.count_nonzero(predicted & ~positive))
    fn = int(np.count_nonzero(~predicted & positive))
    tn = len(y) - tp - fp - fn
    sensitivity, specificity = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    f1_positive, f1_negative = _ratio(2 * tp, 2 * tp + fp + fn), _ratio(2 * tn, 2 * tn + fn + fp)
    return {
        "threshold": float(threshold),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "balanced_accuracy": (sensitivity + specificity) / 2 if _both_classes(y) else float("nan"),
        "f1": f1_positive,
        "macro_f1": float(np.nanmean([f1_positive, f1_negative])) if not (np.isnan(f1_positive) and np.isnan(
            f1_negative)) else float("nan"),
        "accuracy": _ratio(tp + tn, len(y)),
        "tn": tn, "fp": fp, "fn": fn, "tp": tp,
    }


def at_thresholds(labels: ArrayLike, probs: ArrayLike, thresholds: dict[str, float]) -> dict[str, ThresholdMetrics]:
    """:func:`binary_metrics` at each named threshold (the run's val-chosen ones), as the run files hold them."""
    return parse(dict[str, ThresholdMetrics], {k: binary_metrics(labels, probs, t) for k, t in thresholds.items()})


def calibration(labels: ArrayLike, probs: ArrayLike, n_bins: int = 10) -> dict[str, float | list]:
    """Expected calibration error and reliability curve over ``n_bins`` equal-width bins (empty bins left out).

    ECE = Σ (bin count / n) · |observed fraction positive − mean predicted prob|. The counts come from the same
    bin rule as ``sklearn.calibration.calibration_curve``, so they line up with its (non-empty) bins.
    """
    y, p = _check(labels, probs)
    fraction_positive, mean_predicted = calibration_curve(y, p, n_bins=n_bins, strategy="uniform")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], p), minlength=n_bins)
    counts = counts[counts > 0]
    ece = float(np.sum(counts / len(y) * np.abs(fraction_positive - mean_predicted)))
    return {"ece": ece, "mean_predicted": mean_predicted.tolist(), "fraction_positive": fraction_positive.tolist(),
            "count": counts.tolist()}


def age_band(age: pd.Series) -> pd.Series:
    """Ages in clinical bands (``<30``, ``30-44``, ``45-59``, ``60-74``, ``75+``), ``unknown`` where missing."""
    bands = pd.cut(age, bins=[-np.inf, 30, 45, 60, 75, np.inf], right=False, labels=list(AGE_BANDS[:-1]))
    return bands.cat.add_categories("unknown").fillna("unknown").cat.set_categories(AGE_BANDS, ordered=True)


def subgroup_auroc(frame: pd.DataFrame, prob_col: str = "probability", label_col: str = "label",
                   by: Sequence[str] = ("sex", "age_band", "localization", "dx_type"),
                   min_count: int = 20) -> pd.DataFrame:
    """AUROC per value of each metadata column, to spot groups the model serves worse.

    ``age_band`` is derived from ``age`` when the frame has no such column. Grouping columns the frame lacks are
    skipped (ISIC and plain ``image,label`` CSVs carry no metadata). AUROC is ``nan`` for a group with fewer than
    ``min_count`` images or with one class only; missing values form their own ``"nan"`` group.
    """
    if "age_band" in by and "age_band" not in frame and "age" in frame:
        frame = frame.assign(age_band=age_band(frame["age"]))
    missing = [c for c in (prob_col, label_col) if c not in frame]
    if missing:
        raise ValueError(f"subgroup_auroc: frame has no column(s) {missing}; it has {list(frame.columns)}")
    rows = []
    for column in (c for c in by if c in frame):
        for value, group in frame.groupby(column, dropna=False, observed=True, sort=True):
            labels = group[label_col].to_numpy()
            score = auroc(labels, group[prob_col].to_numpy()) if len(group) >= min_count else float("nan")
            rows.append({"group": column, "value": str(value), "n": len(group),
                         "n_malignant": int(labels.sum()), "auroc": score})
    return pd.DataFrame(rows, columns=SUBGROUP_COLUMNS)


def choose_thresholds(labels: ArrayLike, probs: ArrayLike, min_sensitivity: float = 0.95) -> dict[str, float]:
    """The operating points, chosen on one split (the validation split): fixed 0.5, Youden, and ``sens{pct}``."""
    return {"0.5": 0.5,
            "youden": youden_threshold(labels, probs),
            f"sens{min_sensitivity * 100:g}": sensitivity_threshold(labels, probs, min_sensitivity)}


def _split_report(labels: ArrayLike, probs: ArrayLike, thresholds: dict[str, float], n_boot: int,
                  seed: int) -> dict:
    y, p = _check_both_classes(labels, probs)
    return {"n": len(y), "n_malignant": int(y.sum()), "auroc": auroc(y, p),
            "auroc_ci": list(bootstrap_auroc_ci(y, p, n_boot=n_boot, seed=seed)),
            "at_threshold": {name: binary_metrics(y, p, t) for name, t in thresholds.items()}}


def threshold_report(val_labels: ArrayLike, val_probs: ArrayLike, test_labels: ArrayLike, test_probs: ArrayLike,
                     min_sensitivity: float = 0.95, n_boot: int = 2000, seed: int = 0) -> dict:
    """Thresholds chosen on validation, then metrics at each of them on validation and on test. JSON-ready.

    The test split never reaches :func:`choose_thresholds`, so its numbers are an honest estimate of what the
    chosen operating points will do on unseen data.
    """
    thresholds = choose_thresholds(val_labels, val_probs, min_sensitivity)
    return {"min_sensitivity": float(min_sensitivity), "thresholds": thresholds,
            "val": _split_report(val_labels, val_probs, thresholds, n_boot, seed),
            "test": _split_report(test_labels, test_probs, thresholds, n_boot, seed)}



OUTCOMES = ("TP", "FP", "FN", "TN")


def outcomes(labels: ArrayLike, probs: ArrayLike, threshold: float) -> np.ndarray:
    """Each case's cell of the confusion matrix at ``threshold`` (positive iff ``prob >= threshold``, as in
    ``binary_metrics``): ``"TP"``, ``"FP"``, ``"FN"`` or ``"TN"``."""
    y, p = _check(labels, probs)
    predicted = p >= threshold
    return np.where(predicted, np.where(y == 1, "TP", "FP"), np.where(y == 1, "FN", "TN"))


def source_report(frame: pd.DataFrame, thresholds: dict[str, float], n_boot: int = 1000) -> dict:
    """Per source (``source`` column): n, malignant cases, AUROC with its bootstrap CI and the rates at the run's
    val thresholds; the **source-stratified AUROC** (the mean of the within-source AUROCs, over the sources with
    both classes: a pooled AUROC can be carried by one easy source, or by sources whose malignant shares differ);
    and P(malignant) by diagnosis × source (median, mean, n), where a camera shows as nevi scored apart."""
    per_source: dict[str, dict[str, Any]] = {}
    for source, part in frame.groupby("source", sort=True):
        labels, probs = part["label"].to_numpy(), part["probability"].to_numpy()
        both = _both_classes(labels)
        per_source[str(source)] = {
            "n": len(part), "n_malignant": int(labels.sum()),
            "auroc": auroc(labels, probs) if both else None,
            "auroc_ci": list(bootstrap_auroc_ci(labels, probs, n_boot)) if both else None,
            "at_threshold": {name: {key: binary_metrics(labels, probs, t)[key] for key in ("sensitivity",
                                                                                           "specificity")}
                             for name, t in thresholds.items()}}
    scored = [float(row["auroc"]) for row in per_source.values() if row["auroc"] is not None]
    by_dx = frame.groupby(["dx", "source"], dropna=False)["probability"].agg(["median", "mean", "size"]).reset_index()
    return {"sources": per_source,
            "stratified_auroc": float(np.mean(scored)) if scored else None,
            "stratified_over": [name for name, row in per_source.items() if row["auroc"] is not None],
            "pooled_auroc": auroc(frame["label"], frame["probability"]) if _both_classes(
                frame["label"].to_numpy()) else None,
            "p_by_dx_source": [{"dx": None if pd.isna(row["dx"]) else str(row["dx"]), "source": str(row["source"]),
                                "n": int(row["size"]), "median": float(row["median"]), "mean": float(row["mean"])}
                               for _, row in by_dx.iterrows()]}

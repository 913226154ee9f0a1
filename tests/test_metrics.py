"""Metrics agree with scikit-learn and with hand computation; thresholds come from val only."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from core import metrics


def _scores(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Imperfect classifier scores, ~20 % malignant, rounded so that ties occur."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.2).astype(int)
    return labels, np.round(np.clip(0.35 * labels + 0.65 * rng.random(n), 0, 1), 2)


@pytest.fixture
def scores() -> tuple[np.ndarray, np.ndarray]:
    return _scores(1500)


def test_binary_metrics_by_hand() -> None:
    labels = [1, 1, 1, 1, 1, 0, 0, 0]
    probs = [0.9, 0.8, 0.5, 0.4, 0.3, 0.6, 0.2, 0.1]
    m = metrics.binary_metrics(labels, probs, threshold=0.5)  # predicted 1 1 1 0 0 | 1 0 0  (0.5 ≥ 0.5 is positive)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 2, 1, 2)
    assert m["sensitivity"] == pytest.approx(3 / 5) and m["specificity"] == pytest.approx(2 / 3)
    assert m["ppv"] == pytest.approx(3 / 4) and m["npv"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 2))
    assert m["macro_f1"] == pytest.approx((6 / 9 + 4 / 7) / 2)
    assert m["balanced_accuracy"] == pytest.approx((3 / 5 + 2 / 3) / 2) and m["accuracy"] == pytest.approx(5 / 8)
    assert all(type(m[k]) is int for k in ("tn", "fp", "fn", "tp"))


def test_undefined_ratios_are_nan_not_zero() -> None:
    m = metrics.binary_metrics([1, 0, 0], [0.2, 0.1, 0.3], threshold=0.9)  # nothing called positive
    assert math.isnan(m["ppv"]) and m["sensitivity"] == 0.0 and m["npv"] == pytest.approx(2 / 3)
    assert math.isnan(metrics.binary_metrics([0, 0], [0.2, 0.7], 0.5)["sensitivity"])  # no malignant case
    assert math.isnan(metrics.auroc([1, 1], [0.2, 0.7]))


def test_bad_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="0 or 1"):
        metrics.auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="within"):
        metrics.auroc([0, 1], [0.1, 1.2])
    with pytest.raises(ValueError, match="both"):
        metrics.youden_threshold([1, 1], [0.1, 0.2])


def test_metrics_agree_with_scikit_learn(scores) -> None:
    labels, probs = scores
    for threshold in (0.0, 0.3, 0.4, 0.55, 1.01):
        m = metrics.binary_metrics(labels, probs, threshold)
        predicted = (probs >= threshold).astype(int)
        nan = float("nan")
        assert m["sensitivity"] == pytest.approx(recall_score(labels, predicted, zero_division=nan), nan_ok=True)
        assert m["specificity"] == pytest.approx(recall_score(labels, predicted, pos_label=0, zero_division=nan),
                                                 nan_ok=True)
        assert m["ppv"] == pytest.approx(precision_score(labels, predicted, zero_division=nan), nan_ok=True)
        assert m["npv"] == pytest.approx(precision_score(labels, predicted, pos_label=0, zero_division=nan),
                                         nan_ok=True)
        assert m["accuracy"] == pytest.approx(accuracy_score(labels, predicted))
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predicted))
        assert m["macro_f1"] == pytest.approx(f1_score(labels, predicted, average="macro", zero_division=nan),
                                              nan_ok=True)
        assert m["f1"] == pytest.approx(f1_score(labels, predicted, zero_division=nan), nan_ok=True)
        assert [m["tn"], m["fp"], m["fn"], m["tp"]] == confusion_matrix(labels, predicted).ravel().tolist()
    assert metrics.auroc(labels, probs) == pytest.approx(roc_auc_score(labels, probs))


def test_vectorised_auroc_agrees_with_scikit_learn(scores) -> None:
    labels, probs = scores
    idx = np.random.default_rng(3).integers(0, len(labels), size=(20, len(labels)))
    expected = [roc_auc_score(labels[i], probs[i]) for i in idx]  # a resample's AUROC is its draw counts' weights'
    np.testing.assert_allclose(metrics._weighted_auroc_rows(labels, probs, metrics._counts(idx, len(labels))),
                               expected, rtol=1e-12)


def test_bootstrap_ci(scores) -> None:
    labels, probs = scores
    low, high = metrics.bootstrap_auroc_ci(labels, probs, seed=1)
    assert low < metrics.auroc(labels, probs) < high < 1
    assert (low, high) == metrics.bootstrap_auroc_ci(labels, probs, seed=1)
    assert (low, high) != metrics.bootstrap_auroc_ci(labels, probs, seed=2)
    assert metrics.bootstrap_auroc_ci(labels, probs, alpha=0.5, seed=1)[1] < high  # a 50 % CI is narrower
    big_low, big_high = metrics.bootstrap_auroc_ci(*_scores(6000, seed=1), seed=1)
    assert big_high - big_low < 0.7 * (high - low)  # width shrinks like 1/sqrt(n): 4× data, about half as wide
    # 10 items, 1 malignant: many resamples have one class and must be skipped, not counted as nan or crash
    tiny_low, tiny_high = metrics.bootstrap_auroc_ci([1] + [0] * 9, np.linspace(0.9, 0, 10), n_boot=200)
    assert tiny_low == tiny_high == 1.0
    assert all(map(math.isnan, metrics.bootstrap_auroc_ci([0, 0, 0], [0.1, 0.2, 0.3])))


def test_paired_gain_of_a_model_against_itself_is_exactly_zero(scores) -> None:
    labels, probs = scores
    assert metrics.paired_auroc_gain(labels, probs, probs, n_boot=200) == (0.0, 0.0, 0.0)


def test_paired_gain_point_estimate_and_interval(scores) -> None:
    labels, probs = scores
    better = np.clip(probs + 0.1 * labels, 0, 1)  # every malignant case scored higher: a real gain
    gain, low, high = metrics.paired_auroc_gain(labels, better, probs, n_boot=400)
    assert gain == pytest.approx(roc_auc_score(labels, better) - roc_auc_score(labels, probs))
    assert 0 < low <= gain <= high
    one, other = (np.clip(probs + np.random.default_rng(seed).normal(0, 0.05, len(probs)), 0, 1) for seed in (1, 2))
    gain, low, high = metrics.paired_auroc_gain(labels, one, other, n_boot=400)
    assert low < 0 < high  # two equally good models: a noise-level difference is not called a gain


def test_paired_gain_resamples_whole_groups() -> None:
    """Five near-copies per lesion: resampling images one by one pretends there are five times as many cases."""
    labels, probs = _scores(200, seed=3)
    noise = np.clip(probs + np.random.default_rng(2).normal(0, 0.05, 200), 0, 1)
    copies = lambda a: np.repeat(a, 5)  # noqa: E731
    lesions = np.repeat(np.arange(200), 5)
    _, low_i, high_i = metrics.paired_auroc_gain(copies(labels), copies(noise), copies(probs), n_boot=300)
    _, low_g, high_g = metrics.paired_auroc_gain(copies(labels), copies(noise), copies(probs), groups=lesions,
                                                 n_boot=300)
    assert high_g - low_g > 1.8 * (high_i - low_i)  # ≈ √5 wider


def test_weighted_auroc_rows_match_scikit_learn_with_sample_weights(scores) -> None:
    """The grouped bootstrap's vectorised AUROC is scikit-learn's weighted one, ties included, row by row."""
    labels, probs = scores
    weights = np.random.default_rng(4).integers(0, 3, (25, len(labels)))
    weights[0] = np.where(labels == 1, 0, 1)  # a resample without a malignant case: undefined
    fast = metrics._weighted_auroc_rows(labels, probs, weights)
    assert math.isnan(fast[0])
    assert fast[1:] == pytest.approx([roc_auc_score(labels, probs, sample_weight=w) for w in weights[1:]], abs=1e-12)


def test_paired_gain_rejects_mismatched_input(scores) -> None:
    labels, probs = scores
    with pytest.raises(ValueError, match="one length"):
        metrics.paired_auroc_gain(labels, probs, probs[:-1])
    with pytest.raises(ValueError, match="groups"):
        metrics.paired_auroc_gain(labels, probs, probs, groups=np.arange(3))


def test_youden_threshold(scores) -> None:
    labels, probs = scores
    fpr, tpr, thresholds = roc_curve(labels, probs)
    assert metrics.youden_threshold(labels, probs) == thresholds[np.argmax(tpr - fpr)]
    separable_labels, separable_probs = [0, 0, 0, 1, 1], [0.1, 0.3, 0.45, 0.6, 0.8]
    t = metrics.youden_threshold(separable_labels, separable_probs)
    m = metrics.binary_metrics(separable_labels, separable_probs, t)
    assert m["sensitivity"] == m["specificity"] == 1.0 and 0.45 < t <= 0.6
    assert 0 <= metrics.youden_threshold([0, 1], [1.0, 0.0]) <= 1  # useless ranking: still a finite threshold


@pytest.mark.parametrize("min_sensitivity", [0.95, 0.8])
def test_sensitivity_threshold_is_the_highest_that_keeps_it(scores, min_sensitivity: float) -> None:
    labels, probs = scores
    t = metrics.sensitivity_threshold(labels, probs, min_sensitivity)
    assert t in probs
    assert metrics.binary_metrics(labels, probs, t)["sensitivity"] >= min_sensitivity
    next_up = np.min(probs[probs > t])
    assert metrics.binary_metrics(labels, probs, next_up)["sensitivity"] < min_sensitivity


def test_thresholds_depend_on_val_only(scores) -> None:
    labels, probs = scores
    val, test = slice(0, 750), slice(750, None)
    a = metrics.threshold_report(labels[val], probs[val], labels[test], probs[test], n_boot=200)
    b = metrics.threshold_report(labels[val], probs[val], 1 - labels[test], probs[test] ** 2, n_boot=200)
    assert a["thresholds"] == b["thresholds"] == metrics.choose_thresholds(labels[val], probs[val])
    assert set(a["thresholds"]) == {"0.5", "youden", "sens95"}
    assert a["test"]["auroc"] != b["test"]["auroc"] and a["val"] == b["val"]
    for split, y, p in (("val", labels[val], probs[val]), ("test", labels[test], probs[test])):
        assert a[split]["auroc"] == pytest.approx(roc_auc_score(y, p))
        for name, t in a["thresholds"].items():
            assert a[split]["at_threshold"][name] == metrics.binary_metrics(y, p, t)
    assert a["val"]["at_threshold"]["sens95"]["sensitivity"] >= 0.95
    assert json.loads(json.dumps(a, allow_nan=False)) == a  # plain types only (a tuple would come back a list)


def test_calibration_error() -> None:
    # ten bins, 20 images each at the bin centre, with exactly that fraction malignant: perfectly calibrated
    centres = np.arange(0.05, 1, 0.1)
    probs = np.repeat(centres, 20)
    labels = np.concatenate([np.arange(20) < round(c * 20) for c in centres]).astype(int)
    calibrated = metrics.calibration(labels, probs)
    assert calibrated["ece"] == pytest.approx(0, abs=1e-12) and calibrated["count"] == [20] * 10
    overconfident = metrics.calibration(labels, np.clip(probs + 0.3, 0, 1))
    assert overconfident["ece"] > 0.2
    # half malignant, always 0.9: one bin, ECE = |0.5 - 0.9|
    constant = metrics.calibration([0, 1] * 50, [0.9] * 100)
    assert constant["ece"] == pytest.approx(0.4) and constant["count"] == [100]
    assert constant["mean_predicted"] == pytest.approx([0.9]) and constant["fraction_positive"] == [0.5]


def test_calibration_bins_match_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    probs = np.concatenate([rng.random(500) ** 3, [0.0, 0.1, 0.2, 1.0]])  # skewed, empty bins, values on edges
    labels = (rng.random(len(probs)) < probs).astype(int)
    curve = metrics.calibration(labels, probs, n_bins=15)
    fraction, mean = calibration_curve(labels, probs, n_bins=15)
    assert curve["fraction_positive"] == fraction.tolist() and curve["mean_predicted"] == mean.tolist()
    assert sum(curve["count"]) == len(probs) and len(curve["count"]) == len(fraction)
    assert curve["ece"] == pytest.approx(np.sum(np.array(curve["count"]) / len(probs) * np.abs(fraction - mean)))


def test_age_band() -> None:
    bands = metrics.age_band(pd.Series([0.0, 29.9, 30, 44, 45, 60, 74.5, 75, 90, np.nan]))
    assert bands.astype(str).tolist() == ["<30", "<30", "30-44", "30-44", "45-59", "60-74", "60-74", "75+", "75+",
                                          "unknown"]


def test_subgroups() -> None:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"label": [0, 1] * 20 + [0] * 25 + [0, 1] * 5,
                          "probability": np.concatenate([rng.random(40), [0.5] * 25, rng.random(10)]),
                          "sex": ["female"] * 40 + ["male"] * 25 + ["unknown"] * 10,
                          "age": [20.0] * 40 + [np.nan] * 25 + [80.0] * 10})
    table = metrics.subgroup_auroc(frame, by=("sex", "age_band", "localization")).set_index(["group", "value"])
    assert list(table.columns) == ["n", "n_malignant", "auroc"]
    female = frame[frame["sex"] == "female"]
    assert table.loc[("sex", "female"), "auroc"] == pytest.approx(roc_auc_score(female["label"], female["probability"]))
    assert table.loc[("age_band", "<30"), "auroc"] == table.loc[("sex", "female"), "auroc"]
    assert np.isnan(table.loc[("sex", "male"), "auroc"])  # one class only
    assert np.isnan(table.loc[("sex", "unknown"), "auroc"]) and table.loc[("sex", "unknown"), "n_malignant"] == 5
    assert table.loc[("age_band", "unknown"), "n"] == 25 and table.loc[("age_band", "75+"), "n"] == 10
    assert "localization" not in table.index.get_level_values("group")  # absent column: skipped
    small = metrics.subgroup_auroc(frame, by=("sex",), min_count=5).set_index("value")
    assert not np.isnan(small.loc["unknown", "auroc"])


def test_source_report_by_hand() -> None:
    frame = pd.DataFrame({"source": ["a"] * 4 + ["b"] * 4 + ["c"] * 2,
                          "dx": ["mel", "nv", "nv", "mel"] * 2 + ["nv"] * 2,
                          "label": [1, 0, 0, 1, 1, 0, 0, 1, 0, 0],
                          "probability": [0.9, 0.2, 0.6, 0.4, 0.8, 0.1, 0.3, 0.7, 0.05, 0.5]})
    report = metrics.source_report(frame, {"t": 0.5}, n_boot=50)
    a, b, c = (report["sources"][k] for k in "abc")
    assert a["auroc"] == pytest.approx(0.75) and b["auroc"] == pytest.approx(1.0) and c["auroc"] is None
    assert report["stratified_auroc"] == pytest.approx((0.75 + 1.0) / 2) and report["stratified_over"] == ["a", "b"]
    assert a["at_threshold"]["t"] == {"sensitivity": 0.5, "specificity": 0.5}
    assert report["pooled_auroc"] == pytest.approx(metrics.auroc(frame["label"], frame["probability"]))
    cell = next(r for r in report["p_by_dx_source"] if r["dx"] == "nv" and r["source"] == "a")
    assert cell["n"] == 2 and cell["median"] == pytest.approx(0.4)


def test_the_paired_stratified_gain_is_the_mean_within_source_gain_with_an_interval_around_it() -> None:
    from core.metrics import auroc, paired_stratified_auroc_gain

    rng = np.random.default_rng(0)
    n = 400
    strata = np.repeat(["a", "b"], n // 2)
    labels = rng.integers(0, 2, n)
    old_score = labels * 0.5 + rng.normal(0, 0.5, n)
    old, new = 1 / (1 + np.exp(-old_score)), 1 / (1 + np.exp(-(labels * 0.8 + rng.normal(0, 0.5, n))))
    gain, low, high = paired_stratified_auroc_gain(labels, new, old, strata, n_boot=300)
    expected = np.mean([auroc(labels[strata == s], new[strata == s]) - auroc(labels[strata == s], old[strata == s])
                        for s in ("a", "b")])
    assert gain == pytest.approx(expected) and low < gain < high and low > 0
    # A model that only moves each source's scores by a constant ranks each source as before: no stratified gain.
    shifted = 1 / (1 + np.exp(-(old_score + np.where(strata == "a", 2.0, -2.0))))
    gain, low, high = paired_stratified_auroc_gain(labels, shifted, old, strata, n_boot=100)
    assert gain == 0 and low == 0 and high == 0
    with pytest.raises(ValueError, match="strata"):
        paired_stratified_auroc_gain(labels, new, old, strata[:-1])

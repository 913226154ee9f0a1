"""Is this image like the training data? An out-of-distribution score on the run's embedding index, with a
threshold calibrated on in-distribution images only (the val split), and ``train.py index`` that builds both.

Two scores on the index (``core.embedding``), both larger = farther from training:

* ``knn``: the distance to the k-th nearest training image (Sun et al., ICML 2022) on L2-normalised features, in
  the index's PCA space plus the residual outside it;
* ``mahalanobis``: the smallest class-conditional Mahalanobis distance with one shared, Ledoit-Wolf-shrunk
  covariance (Lee et al., NeurIPS 2018), in the PCA space.

They are compared in ``benchmarks/ood_scores.py`` (numbers in benchmarks/RESULTS.md); the index records which one a
run uses. The threshold is the val split's ``percentile``-th score, so by construction (100 − percentile) % of val
is flagged; the test split's rate, reported beside it, says whether that holds on unseen in-distribution images.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

from core import metrics
from core.embedding import EmbeddingIndex, run_fingerprint
from core.run import Run, load
from core.run_files import FlaggedPart, FlaggedReport, OODSummary, parse
from core.runs import (
    INDEX_FILE,
    OOD_SCORES,
    STYLE_INDEX_FILE,
    read_metrics,
    read_predictions,
    write_csv,
    write_ood_summary,
)

DEFAULT_DIMS = 256
DEFAULT_K = 10
DEFAULT_PERCENTILE = 95.0
SIMILAR_CASES = 6


class OODScore:
    """Skeleton: ``fit`` on the index's training features, then ``__call__`` gives one distance per image."""

    name = "score"

    def fit(self, train: EmbeddingIndex, labels: np.ndarray) -> OODScore:
        raise NotImplementedError

    def __call__(self, coords: np.ndarray, residuals: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class KNNDistance(OODScore):
    name = "knn"

    def __init__(self, k: int = DEFAULT_K) -> None:
        self.k = k

    def fit(self, train, labels):
        self.index = train
        return self

    def __call__(self, coords, residuals):
        return np.partition(self.index.distances(coords, residuals), self.k - 1, axis=1)[:, self.k - 1]


class Mahalanobis(OODScore):
    name = "mahalanobis"

    def fit(self, train, labels):
        features = train.features.astype(np.float64)
        classes = np.unique(labels)  # both, except in a tiny training set
        self.means = np.stack([features[labels == c].mean(0) for c in classes])
        centred = features - self.means[np.searchsorted(classes, labels)]
        self.precision = LedoitWolf(assume_centered=True).fit(centred).precision_
        return self

    def __call__(self, coords, residuals):
        features = np.atleast_2d(coords).astype(np.float64)
        gaps = features[:, None, :] - self.means[None]
        return np.sqrt(np.einsum("nci,ij,ncj->nc", gaps, self.precision, gaps).min(1).clip(0))


def union_percentile(first: np.ndarray, second: np.ndarray, percentile: float = DEFAULT_PERCENTILE) -> float:
    """The val percentile q at which "either score above its own q-th percentile" flags ``100 − percentile`` % of
    val, as one score alone does at ``percentile`` (bisection: the union's rate falls as q rises)."""
    target, low, high = 1 - percentile / 100, percentile, 100.0
    for _ in range(50):
        q = (low + high) / 2
        rate = np.mean((first > np.percentile(first, q)) | (second > np.percentile(second, q)))
        low, high = (q, high) if rate > target else (low, q)
    return high


def create_score(method: str, k: int = DEFAULT_K) -> OODScore:
    if method == "knn":
        return KNNDistance(k)
    if method == "mahalanobis":
        return Mahalanobis()
    raise ValueError(f"unknown OOD score {method!r}; choose 'knn' or 'mahalanobis'")


class OODGuard:
    """A run's index with its fitted score and val-calibrated threshold, and (in indexes built since) the index of
    the training images' style statistics with its own threshold: what the Predictor asks per image. An image is
    flagged when either distance is above its threshold."""

    def __init__(self, index: EmbeddingIndex, style: EmbeddingIndex | None = None) -> None:
        self.index, self.style = index, style
        meta = index.meta
        self.threshold = float(meta["threshold"])
        self.score_fn = create_score(meta["method"], meta.get("k", DEFAULT_K)).fit(index, index.labels)
        if style is not None:
            self.style_threshold = float(meta["style_threshold"])
            self.style_fn = KNNDistance(meta.get("k", DEFAULT_K)).fit(style, style.labels)

    @classmethod
    def load(cls, run_dir: str | Path, cfg) -> OODGuard:
        fingerprint = run_fingerprint(run_dir, cfg)
        index = EmbeddingIndex.load(run_dir)
        index.check(fingerprint, run_dir)
        style = None
        if "style_threshold" in index.meta:
            style = EmbeddingIndex.load(run_dir, STYLE_INDEX_FILE)
            style.check(fingerprint, run_dir, STYLE_INDEX_FILE)
        return cls(index, style)

    @classmethod
    def load_if_built(cls, run_dir: str | Path, cfg) -> OODGuard | None:
        """The run's guard, or None for a run without an index; one built for another run is refused (RunError)."""
        return cls.load(run_dir, cfg) if (Path(run_dir) / INDEX_FILE).is_file() else None

    def score(self, features: np.ndarray) -> np.ndarray:
        """Distances to the training images for raw penultimate features ``(N, D)``."""
        return self.score_fn(*self.index.project(features))

    def assess(self, features: list[np.ndarray]) -> pd.DataFrame:
        """Per image, from the two arrays ``predict_probabilities(features=…)`` gives: ``ood_score`` (penultimate
        distance), ``style_score`` (style distance; NaN without a style index), ``out_of_distribution`` (either
        above its threshold) and ``unlike_in_content`` (the penultimate one)."""
        content = self.score(features[0])
        style = (self.style_fn(*self.style.project(features[1])) if self.style is not None
                 else np.full(len(content), np.nan))
        unlike_in_content = content > self.threshold
        flagged = unlike_in_content | (style > self.style_threshold if self.style is not None else False)
        return pd.DataFrame({"ood_score": content, "style_score": style, "out_of_distribution": flagged,
                             "unlike_in_content": unlike_in_content})

    def similar(self, features: np.ndarray, k: int = SIMILAR_CASES) -> pd.DataFrame:
        """One image's ``k`` most similar training cases, by the penultimate features."""
        return self.index.nearest(*self.index.project(features[:1]), k)[0]


def split_features(run: Run, frame: pd.DataFrame) -> list[np.ndarray]:
    """Raw penultimate and style features of a split's images, from the forward passes that predict them."""
    return run.predict(run.load_images(frame["path"].tolist()), features=True).features


def build_index(run_dir: str | Path, device_name: str = "auto", method: str = "knn", dims: int = DEFAULT_DIMS,
                k: int = DEFAULT_K, percentile: float = DEFAULT_PERCENTILE) -> OODSummary:
    """Features of train, val and test in one pass each; the index of train (penultimate features, and style
    statistics where the model has them); the thresholds on val: both distances at the val percentile q at which
    "either above" flags ``100 − percentile`` % of val. Writes ``index.safetensors``, ``index_style.safetensors``,
    ``ood_scores.csv`` (val and test) and ``ood_summary.json``, all or nothing."""
    run_dir = Path(run_dir)
    create_score(method, k)  # refuses an unknown method before minutes of features
    thresholds = read_metrics(run_dir).thresholds  # the decision the mistakes are judged at
    run = load(run_dir, device_name)
    cfg, frames = run.config, run.splits()
    raw = {name: split_features(run, frames[name]) for name in ("train", "val", "test")}
    meta = {"fingerprint": run_fingerprint(run_dir, cfg), "method": method, "k": k, "dims": dims,
            "percentile": percentile, "raw_dims": int(raw["train"][0].shape[1])}
    index = EmbeddingIndex.fit(raw["train"][0], frames["train"], dims, meta)
    scorer = create_score(method, k).fit(index, index.labels)
    scores = {name: pd.DataFrame({"ood_score": scorer(*index.project(raw[name][0]))}) for name in ("val", "test")}
    style = None
    if raw["train"][1].shape[1]:
        style = EmbeddingIndex.fit(raw["train"][1], frames["train"], min(dims, raw["train"][1].shape[1]), meta)
        style_knn = KNNDistance(k).fit(style, style.labels)
        for name in ("val", "test"):
            scores[name]["style_score"] = style_knn(*style.project(raw[name][1]))
        q = union_percentile(scores["val"]["ood_score"].to_numpy(), scores["val"]["style_score"].to_numpy(),
                             percentile)
        index.meta |= {"union_percentile": q, "style_dims": style.features.shape[1],
                       "style_raw_dims": int(raw["train"][1].shape[1]),
                       "style_threshold": float(np.percentile(scores["val"]["style_score"], q))}
    index.meta["threshold"] = float(np.percentile(scores["val"]["ood_score"], index.meta.get("union_percentile",
                                                                                             percentile)))
    index.reference = index.points(raw["val"][0])
    guard = OODGuard(index, None if style is None else dataclasses.replace(style, meta=index.meta))
    table = pd.concat([guard.assess(raw[name]).assign(image_id=frames[name]["image_id"].astype(str), split=name)
                       for name in ("val", "test")], ignore_index=True)
    table = table[["image_id", "split", "ood_score", "style_score", "out_of_distribution"]]
    summary = summarize(table, run_dir, thresholds["youden"], index.meta)
    index.save(run_dir)
    if guard.style is not None:
        guard.style.save(run_dir, STYLE_INDEX_FILE)
    write_csv(run_dir / OOD_SCORES, table, float_format=None)
    write_ood_summary(run_dir, summary)
    return summary


def summarize(table: pd.DataFrame, run_dir: Path, threshold: float, meta: dict) -> OODSummary:
    """Flag rates per split, and whether the test mistakes (at the val Youden threshold) lie farther out."""
    summary = {key: meta[key] for key in ("method", "k", "dims", "raw_dims", "percentile", "threshold",
                                          "union_percentile", "style_dims", "style_raw_dims", "style_threshold")
               if key in meta}
    summary["flag_rate"] = {name: float(part["out_of_distribution"].mean()) for name, part in table.groupby("split")}
    test = read_predictions(run_dir, "test").merge(table[table["split"] == "test"], on="image_id", validate="1:1")
    wrong = ((test["probability"] >= threshold).astype(int) != test["label"]).to_numpy()
    summary["mistakes_test"] = {
        "n": int(wrong.sum()),
        "flag_rate_mistakes": float(test["out_of_distribution"][wrong].mean()),
        "flag_rate_correct": float(test["out_of_distribution"][~wrong].mean()),
        "median_score_mistakes": float(test["ood_score"][wrong].median()),
        "median_score_correct": float(test["ood_score"][~wrong].median()),
        "auroc_score_for_mistake": float(roc_auc_score(wrong, test["ood_score"])) if 0 < wrong.sum() < len(wrong)
        else None,
    }
    return parse(OODSummary, summary)


def flagged_report(frame: pd.DataFrame, thresholds: dict[str, float], ood_threshold: float) -> FlaggedReport:
    """For a labelled set with ``ood_score`` / ``out_of_distribution`` columns: the share flagged, and AUROC and the
    metrics at the val thresholds for the flagged and the unflagged images apart (None where a part is empty)."""
    def part(rows: pd.DataFrame) -> FlaggedPart | None:
        if rows.empty:
            return None
        labels, probs = rows["label"].to_numpy(), rows["probability"].to_numpy()
        auroc = metrics.auroc(labels, probs) if len(set(labels)) == 2 else None
        return FlaggedPart(n=len(rows), auroc=auroc, at_threshold=metrics.at_thresholds(labels, probs, thresholds))

    flagged = frame["out_of_distribution"].astype(bool)
    return FlaggedReport(threshold=ood_threshold, share_flagged=float(flagged.mean()),
                         flagged=part(frame[flagged]), unflagged=part(frame[~flagged]))

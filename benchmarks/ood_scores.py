"""Which OOD score, and how much PCA costs it: kNN (k = 1, 10, 50) and Mahalanobis on the run's features, full and
reduced to 256 / 128 / 64 dimensions, each with its threshold at the val split's 95th percentile.

Reported per configuration: the test split's flag rate (in-distribution: should be ~5 %), the flag rate of each
non-dermoscopic probe set (``benchmarks/ood_probes.py``), the AUROC of the score for "probe vs HAM test image", the
flag rate of HAM test images blurred and colour-shifted (reported, not tuned to), the index size, and the search
time per image (median of repeats). The features are computed once by the prediction's own forward pass and cached.

    python -m benchmarks.ood_scores --run models/default --cache runs/.ood_features.npz
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from benchmarks import ood_probes
from core.audit.ood import create_score, split_features
from core.embedding import EmbeddingIndex
from core.run import Run, load
from core.transforms import resize_transform

METHODS = (("knn", 1), ("knn", 10), ("knn", 50), ("mahalanobis", 0))
DIMS = (64, 128, 256, None)  # None: no reduction (capped by the number of training images)
PROBE_KINDS = ("photos", "noise", "flat", "text")


def image_features(run: Run, images) -> tuple[np.ndarray, np.ndarray]:
    resize = resize_transform(run.config.input_size, run.config.crop)
    predictions = run.predict(torch.stack([resize(image).as_subclass(torch.Tensor) for image in images]),
                              features=True, batch_size=32)
    return predictions.features[0], predictions.probability


def all_features(run: Path, cache: Path | None, altered: int, limit: int | None) -> dict[str, np.ndarray]:
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as stored:
            return dict(stored)
    loaded = load(run)
    frames = loaded.splits()
    if limit:  # a quick look: the first N images of each split
        frames = {name: frame.head(limit) for name, frame in frames.items()}
    out = {name: split_features(loaded, frames[name])[0] for name in ("train", "val", "test")}
    from PIL import Image
    sample = frames["test"].sample(altered, random_state=0)
    probes = ood_probes.non_dermoscopic() | {"ham_altered": ood_probes.ham_altered(
        [Image.open(p) for p in sample["path"]], sample["image_id"].tolist())}
    for kind, images in probes.items():
        out[kind], out[f"p_{kind}"] = image_features(loaded, list(images.values()))
    out["train_label"] = frames["train"]["label"].to_numpy()
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, **out)
    return out


def evaluate(features: dict[str, np.ndarray], train_frame, pca: tuple[np.ndarray, np.ndarray], method: str, k: int,
             dims: int | None, residual: bool = True) -> dict:
    mean, axes = pca
    index = EmbeddingIndex.from_axes(features["train"], mean, axes[:dims or len(axes)], train_frame, {})
    if not residual:  # the index without its residual norms: distances on the d axes only
        index = dataclasses.replace(index, residuals=np.zeros_like(index.residuals))
    score = create_score(method, max(k, 1)).fit(index, index.labels)

    def scored(name: str) -> np.ndarray:
        coords, residuals = index.project(features[name])
        return score(coords, residuals if residual else np.zeros_like(residuals))

    scores = {name: scored(name) for name in ("val", "test", *PROBE_KINDS, "ham_altered")}
    threshold = np.percentile(scores["val"], 95)
    probes = np.concatenate([scores[kind] for kind in PROBE_KINDS])
    auroc = roc_auc_score(np.r_[np.zeros(len(scores["test"])), np.ones(len(probes))], np.r_[scores["test"], probes])
    name = method if method != "knn" else f"knn k={k}" + ("" if residual else " (no residual)")
    row = {"method": name, "dims": index.components.shape[0],
           "index_mb": (index.features.nbytes + index.components.nbytes + index.mean.nbytes) / 1e6,
           "test_flagged": float((scores["test"] > threshold).mean()), "auroc_probe_vs_test": float(auroc),
           **{f"{kind}_flagged": float((scores[kind] > threshold).mean()) for kind in (*PROBE_KINDS, "ham_altered")}}
    one, times = features["test"][:1], []
    for _ in range(50):
        start = time.perf_counter()
        coords, residuals = index.project(one)
        distances = index.distances(coords, residuals)
        score(coords, residuals), index.cases(distances[0], 6)  # what the Predictor does per image
        times.append(time.perf_counter() - start)
    row["search_ms"] = 1000 * float(np.median(times))
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("models/default"))
    parser.add_argument("--cache", type=Path, help="features file: read if it exists, else written")
    parser.add_argument("--limit", type=int, help="only the first N images of each split (a quick look)")
    parser.add_argument("--altered", type=int, default=100, help="HAM test images blurred and colour-shifted")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    features = all_features(args.run, args.cache, args.altered, args.limit)
    import pandas as pd
    train_frame = pd.DataFrame({"image_id": [str(k) for k in range(len(features["train"]))], "dx": "?",
                                "label": features["train_label"]})
    train = features["train"].astype(np.float64)
    pca = (train.mean(0), np.linalg.svd(train - train.mean(0), full_matrices=False)[2])  # one SVD for every d
    rows = [evaluate(features, train_frame, pca, method, k, dims, residual) for method, k in METHODS for dims in DIMS
            for residual in ((True, False) if method == "knn" and dims else (True,))]
    confident = {kind: float(((features[f"p_{kind}"] <= 0.1) | (features[f"p_{kind}"] >= 0.9)).mean())
                 for kind in (*PROBE_KINDS, "ham_altered")}
    print("share of probes answered confidently (p ≤ 0.1 or ≥ 0.9) without the guard:",
          ", ".join(f"{kind} {100 * v:.0f} %" for kind, v in confident.items()))
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "confident_without_guard": confident}, indent=1))


if __name__ == "__main__":
    main()

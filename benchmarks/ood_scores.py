"""Which OOD score, and how much PCA costs it: kNN (k = 1, 10, 50) and Mahalanobis on the run's features, full and
reduced to 256 / 128 / 64 dimensions, each with its threshold at the val split's 95th percentile.

Reported per configuration: the test split's flag rate (in-distribution: should be ~5 %), the flag rate of each
non-dermoscopic probe set (``benchmarks/ood_probes.py``), the AUROC of the score for "probe vs HAM test image", the
flag rate of HAM test images blurred and colour-shifted (reported, not tuned to), the index size, and the search
time per image (median of repeats). The features are computed once by the prediction's own forward pass and cached.

    python benchmarks/ood_scores.py --run models/default --cache runs/.ood_features.npz
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from benchmarks import ood_probes
from core.embedding import EmbeddingIndex
from core.engine import Preprocess, load_run, load_splits, predict_probabilities
from core.ood import create_score, split_features
from core.transforms import resize_transform

METHODS = (("knn", 1), ("knn", 10), ("knn", 50), ("mahalanobis", 0))
DIMS = (64, 128, 256, None)  # None: no reduction
PROBE_KINDS = ("photos", "noise", "flat", "text")


def image_features(cfg, model, images) -> tuple[np.ndarray, np.ndarray]:
    resize = resize_transform(cfg.input_size, cfg.crop)
    batch = torch.stack([resize(image).as_subclass(torch.Tensor) for image in images])
    features: list[np.ndarray] = []
    p = predict_probabilities(model, batch, Preprocess(cfg), torch.device("cpu"), 32, cfg.tta_flips, cfg.amp,
                              cfg.tta_views, cfg.calibration, features=features)
    return features[0], p


def all_features(run: Path, cache: Path, altered: int) -> dict[str, np.ndarray]:
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as stored:
            return dict(stored)
    cfg, model = load_run(run)
    frames = load_splits(cfg)
    out = {name: split_features(cfg, model, frames[name], torch.device("cpu")) for name in ("train", "val", "test")}
    from PIL import Image
    sample = frames["test"].sample(altered, random_state=0)
    probes = ood_probes.non_dermoscopic() | {"ham_altered": ood_probes.ham_altered(
        [Image.open(p) for p in sample["path"]], sample["image_id"].tolist())}
    for kind, images in probes.items():
        out[kind], out[f"p_{kind}"] = image_features(cfg, model, list(images.values()))
    out["train_label"] = frames["train"]["label"].to_numpy()
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


def evaluate(features: dict[str, np.ndarray], train_frame, method: str, k: int, dims: int | None) -> dict:
    raw_dims = features["train"].shape[1]
    index = EmbeddingIndex.fit(features["train"], train_frame, dims or raw_dims, {})
    score = create_score(method, max(k, 1)).fit(index, index.labels)
    scores = {name: score(index.project(features[name])) for name in ("val", "test", *PROBE_KINDS, "ham_altered")}
    threshold = np.percentile(scores["val"], 95)
    probes = np.concatenate([scores[kind] for kind in PROBE_KINDS])
    auroc = roc_auc_score(np.r_[np.zeros(len(scores["test"])), np.ones(len(probes))], np.r_[scores["test"], probes])
    row = {"method": method if method != "knn" else f"knn k={k}", "dims": dims or raw_dims,
           "index_mb": (index.features.nbytes + index.components.nbytes + index.mean.nbytes) / 1e6,
           "test_flagged": float((scores["test"] > threshold).mean()), "auroc_probe_vs_test": float(auroc),
           **{f"{kind}_flagged": float((scores[kind] > threshold).mean()) for kind in (*PROBE_KINDS, "ham_altered")}}
    one = features["test"][:1]
    times = []
    for _ in range(50):
        start = time.perf_counter()
        projected = index.project(one)
        score(projected), index.nearest(projected, 6)
        times.append(time.perf_counter() - start)
    row["search_ms"] = 1000 * float(np.median(times))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("models/default"))
    parser.add_argument("--cache", type=Path, default=Path("runs/.ood_features.npz"))
    parser.add_argument("--altered", type=int, default=100, help="HAM test images blurred and colour-shifted")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    features = all_features(args.run, args.cache, args.altered)
    import pandas as pd
    train_frame = pd.DataFrame({"image_id": [str(k) for k in range(len(features["train"]))], "dx": "?",
                                "label": features["train_label"]})
    rows = [evaluate(features, train_frame, method, k, dims) for method, k in METHODS for dims in DIMS]
    confident = {kind: float(((features[f"p_{kind}"] <= 0.1) | (features[f"p_{kind}"] >= 0.9)).mean())
                 for kind in (*PROBE_KINDS, "ham_altered")}
    print("share of probes answered confidently (p ≤ 0.1 or ≥ 0.9) without the guard:",
          ", ".join(f"{kind} {100 * v:.0f} %" for kind, v in confident.items()))
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "confident_without_guard": confident}, indent=1))


if __name__ == "__main__":
    main()

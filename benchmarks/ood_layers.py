"""Which features should the per-image OOD guard read: the penultimate ones, the style statistics of earlier stages,
or both? Flag rates on val (5 % by construction), test (in distribution: should stay near 5 %) and the probes of
``benchmarks/ood_probes.py`` (should be flagged), for each rule at a val-calibrated threshold.

    python -m benchmarks.ood_layers --run models/default [--train-limit 2000] [--cache runs/.ood_layers.npz]

The union rule flags an image when either distance is above its own threshold, both at the same val percentile,
chosen so that the union flags ``100 − percentile`` % of val.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from benchmarks import ood_probes
from core.embedding import EmbeddingIndex
from core.inference import Preprocess, load_run, load_splits, predict_probabilities, preload_images
from core.ood import DEFAULT_DIMS, DEFAULT_K, DEFAULT_PERCENTILE, KNNDistance, union_percentile
from core.predictor import Predictor


def features_of(run: Path, train_limit: int | None) -> dict[str, np.ndarray]:
    """Penultimate (``pen_*``) and style (``style_*``) features of train, val, test and every probe kind."""
    cfg, model = load_run(run, torch.device("cpu"))
    frames = load_splits(cfg)
    if train_limit:
        frames["train"] = frames["train"].sample(n=min(train_limit, len(frames["train"])), random_state=0)
    predictor = Predictor(run)
    sets = {name: preload_images(frame["path"].tolist(), cfg.input_size, cfg.crop) for name, frame in frames.items()}
    probes = ood_probes.non_dermoscopic()
    sets |= {kind: torch.stack([predictor.model_input(image) for image in images.values()])
             for kind, images in probes.items()}
    ham = frames["test"].head(24)
    altered = ood_probes.ham_altered([Image.open(path) for path in ham["path"]], ham["image_id"].tolist())
    sets["ham_altered"] = torch.stack([predictor.model_input(image) for image in altered.values()])
    out = {}
    for name, images in sets.items():
        start, features = time.perf_counter(), []
        predict_probabilities(model, images, Preprocess(cfg), torch.device("cpu"), cfg.eval_batch_size, cfg.tta_views,
                              cfg.amp, features=features)
        out[f"pen_{name}"], out[f"style_{name}"] = features
        print(f"{name}: {len(images)} images in {time.perf_counter() - start:.1f} s", flush=True)
    out["train_label"] = frames["train"]["label"].to_numpy()
    return out


def scores(features: dict[str, np.ndarray], kind: str, names: list[str]) -> dict[str, np.ndarray]:
    train = features[f"{kind}_train"]
    frame = pd.DataFrame({"image_id": [str(k) for k in range(len(train))], "dx": "?", "label": features["train_label"]})
    index = EmbeddingIndex.fit(train, frame, DEFAULT_DIMS, {})
    knn = KNNDistance(DEFAULT_K).fit(index, index.labels)
    return {name: knn(*index.project(features[f"{kind}_{name}"])) for name in names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("models/default"))
    parser.add_argument("--train-limit", type=int, help="index only this many training images (a quick look)")
    parser.add_argument("--cache", type=Path, help="features file: read if it exists, else written")
    parser.add_argument("--percentile", type=float, default=DEFAULT_PERCENTILE)
    args = parser.parse_args(argv)
    if args.cache is not None and args.cache.is_file():
        features = dict(np.load(args.cache))
    else:
        features = features_of(args.run, args.train_limit)
        if args.cache is not None:
            args.cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(args.cache, **features)
    names = [key.removeprefix("pen_") for key in features if key.startswith("pen_") and key != "pen_train"]
    pen, style = scores(features, "pen", names), scores(features, "style", names)
    pen_t = np.percentile(pen["val"], args.percentile)
    style_t = np.percentile(style["val"], args.percentile)
    q = union_percentile(pen["val"], style["val"], args.percentile)
    union_t = (np.percentile(pen["val"], q), np.percentile(style["val"], q))
    rules = {"penultimate": {n: pen[n] > pen_t for n in names}, "style": {n: style[n] > style_t for n in names},
             f"either (each at val {q:.2f}th pct)": {n: (pen[n] > union_t[0]) | (style[n] > union_t[1])
                                                       for n in names}}
    table = pd.DataFrame({rule: {n: flags[n].mean() for n in names} for rule, flags in rules.items()})
    table.insert(0, "images", [len(pen[n]) for n in names])
    print(f"share flagged ({len(features['pen_train'])} training images indexed; k = {DEFAULT_K}, "
          f"{DEFAULT_DIMS} PCA dims + residual)")
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

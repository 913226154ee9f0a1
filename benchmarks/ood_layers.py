"""Which features should the per-image OOD guard read: the penultimate ones, the style statistics of earlier stages,
or both? Flag rates on val (5 % by construction), test (in distribution: should stay near 5 %), the probes of
``benchmarks/ood_probes.py`` (not dermoscopy: should be flagged) and the re-photographed test copies of
``benchmarks/site_shifts.py`` (reported), for each rule at a val-calibrated threshold, on the run's committed
indexes (``train.py index``: ``index.safetensors`` and ``index_style.safetensors``).

    python -m benchmarks.ood_layers --run models/default [--cache runs/.site_pools]

Rules: ``penultimate`` alone at the val 95th percentile (the guard before issue #30), ``style`` alone at its val 95th
percentile, and ``either`` (what ships): flagged when either distance is above its threshold, both at the val
percentile q at which the union flags 5 % of val (``core.audit.ood.union_percentile``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from benchmarks import ood_probes
from benchmarks.site_shifts import SHIFTS, pool
from core.audit.ood import DEFAULT_PERCENTILE, KNNDistance, OODGuard, union_percentile
from core.data import read_ham10000
from core.predictor import Predictor
from core.runs import read_config


def probe_features(run: Path, cache: Path) -> dict[str, list[np.ndarray]]:
    """Penultimate and style features of every probe kind (and of 24 altered HAM test images)."""
    predictor = Predictor(run)
    sets = {kind: list(images.values()) for kind, images in ood_probes.non_dermoscopic().items()}
    ham = pool(run, "test", "none", cache)["frame"].head(24)
    paths = read_ham10000().set_index("image_id").loc[ham["image_id"], "path"]
    sets["ham_altered"] = list(ood_probes.ham_altered([Image.open(p) for p in paths], ham["image_id"]).values())
    out = {}
    for kind, images in sets.items():
        out[kind] = predictor.run.predict(torch.stack([predictor.model_input(i) for i in images]), features=True,
                                          batch_size=64).features
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("models/default"))
    parser.add_argument("--cache", type=Path, default=Path("runs/.site_pools"))
    parser.add_argument("--percentile", type=float, default=DEFAULT_PERCENTILE)
    args = parser.parse_args(argv)
    guard = OODGuard.load(args.run, read_config(args.run))
    if guard.style is None:
        parser.error(f"{args.run}'s index has no style statistics: rebuild it with `python train.py index`")
    k = guard.index.meta.get("k", 10)
    style_knn = KNNDistance(k).fit(guard.style, guard.style.labels)
    sets = {"val": pool(args.run, "val", "none", args.cache)["features"]}
    sets |= {f"test ({name})" if name != "none" else "test": pool(args.run, "test", name, args.cache)["features"]
             for name in SHIFTS}
    sets |= probe_features(args.run, args.cache)
    pen = {name: guard.score(features[0]) for name, features in sets.items()}
    style = {name: style_knn(*guard.style.project(features[1])) for name, features in sets.items()}
    alone = (np.percentile(pen["val"], args.percentile), np.percentile(style["val"], args.percentile))
    q = union_percentile(pen["val"], style["val"], args.percentile)
    both = (np.percentile(pen["val"], q), np.percentile(style["val"], q))
    table = pd.DataFrame({"images": {n: len(pen[n]) for n in sets},
                          "penultimate": {n: np.mean(pen[n] > alone[0]) for n in sets},
                          "style": {n: np.mean(style[n] > alone[1]) for n in sets},
                          f"either (val {q:.2f}th pct each)": {n: np.mean((pen[n] > both[0]) | (style[n] > both[1]))
                                                               for n in sets}})
    print(f"share flagged, on the committed indexes of {args.run} ({len(guard.index.image_ids)} training images; "
          f"k = {k})")
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Which trained runs to ensemble, and with how many flip views: val AUROC of every subset × TTA setting.

Each run's probabilities are computed once per flip view (identity, h, v, hv) on val and test; a subset with k
views is then the mean over its members and their first k views, exactly what ``train.py ensemble`` +
``evaluate`` would predict. Choose on the val column; test is printed for the record only. ``forwards`` is the
number of network passes one prediction costs (members × views), the CPU-latency side of the trade.

    python benchmarks/ensemble_search.py --runs runs/A runs/B runs/C [--out table.csv] [--cache runs/.search]
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import metrics
from core.engine import (
    FLIP_DIMS,
    Preprocess,
    load_run,
    load_splits,
    predict_probabilities,
    preload_images,
    resolve_device,
)


def view_probabilities(run: Path, cache: Path | None = None, device: str = "cpu") -> dict[str, np.ndarray]:
    """split → ``(views, N)`` P(malignant) of each flip view alone (kept in ``cache`` while the weights are
    unchanged, so adding a run to the search costs only that run)."""
    stored = cache / f"{run.resolve().name}.npz" if cache else None
    stamp = np.array((run / "model.safetensors").stat().st_mtime_ns)
    if stored and stored.is_file():
        with np.load(stored) as f:
            if f["stamp"] == stamp:
                return {k: f[k] for k in f.files if k != "stamp"}
    device = resolve_device(device)
    cfg, model = load_run(run, device)
    frames = load_splits(cfg)
    out = {}
    for split in ("val", "test"):
        images = preload_images(frames[split]["path"].tolist(), cfg.input_size)
        out[split] = np.stack([predict_probabilities(model, images.flip(dims) if dims else images, Preprocess(cfg),
                                                     device, cfg.eval_batch_size, amp=False)
                               for dims in FLIP_DIMS])
        out[f"{split}_labels"] = frames[split]["label"].to_numpy()
    if stored:
        stored.parent.mkdir(parents=True, exist_ok=True)
        np.savez(stored, stamp=stamp, **out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, nargs="+", required=True)
    parser.add_argument("--views", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--out", type=Path, help="also write the table as CSV")
    parser.add_argument("--cache", type=Path, help="folder keeping each run's per-view probabilities")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (fp32 either way)")
    args = parser.parse_args()
    probabilities = {run.name: view_probabilities(run, args.cache, args.device) for run in args.runs}
    labels = next(iter(probabilities.values()))
    rows = []
    for size in range(1, len(args.runs) + 1):
        for subset in itertools.combinations(probabilities, size):
            for views in args.views:
                row = {"members": " + ".join(subset), "views": views, "forwards": size * views}
                for split in ("val", "test"):
                    p = np.mean([probabilities[name][split][:views].mean(0) for name in subset], axis=0)
                    row[f"{split}_auroc"] = metrics.auroc(labels[f"{split}_labels"], p)
                rows.append(row)
    table = pd.DataFrame(rows).sort_values("val_auroc", ascending=False)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if args.out:
        table.to_csv(args.out, index=False, float_format="%.4f")


if __name__ == "__main__":
    main()

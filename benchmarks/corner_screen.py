"""Screen member combinations against issue 15's rule before building any of them: for every subset of the given
trained runs × flip views within the shipping limits, its val AUROC, its gain over the incumbent and the four corner
interventions' flip shares at its own val Youden threshold.

An ensemble's P(malignant) is the mean of its members' (``core.ensemble``), and a member sees the same pixels
alone or in an ensemble (its own corner mask included), so each run's val probabilities per flip view, clean and
under each corner intervention, are computed once (and cached while the weights are unchanged); every combination
is then arithmetic. It is a screen, not the rule: the verdict still needs the ensemble built (`train.py ensemble`),
`train.py stress --split val` and `corner_rule.py`. It reproduced run 71's stress test to the printed digit.

    python -m benchmarks.corner_screen --runs runs/A runs/B runs/C [--cache runs/.screen] [--incumbent models/default]
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmarks.corner_rule import MAX_FLIP, MAX_FORWARDS, MAX_MB, MIN_GAIN_LOW, paired_gain
from benchmarks.ensemble_search import compatible_pairs
from core import metrics, runs
from core.audit.interventions import CORNER_INTERVENTIONS, image_key
from core.audit.stress import STRESS_BATCH, intervened_probabilities
from core.inference import FLIP_DIMS, load_splits, model_view_masks
from core.run import load

VERSIONS = ("clean", *CORNER_INTERVENTIONS)


def corner_view_probabilities(run: Path, views: int, cache: Path | None = None) -> dict[str, np.ndarray]:
    """version → ``(views, N)`` val P(malignant) of each flip view alone, uncalibrated (an ensemble is built
    uncalibrated), for the clean images and each corner intervention (seed 0, as `train.py stress`)."""
    stored = cache / f"{run.resolve().name}.npz" if cache else None
    stamp = np.array((run / runs.MODEL_FILE).stat().st_mtime_ns)
    if stored and stored.is_file():
        with np.load(stored) as f:
            if f["stamp"] == stamp and f["clean"].shape[0] >= views:
                return {k: f[k] for k in VERSIONS}
    device = torch.device("cpu")
    loaded = load(run, device)
    cfg = loaded.config
    frame = loaded.splits()["val"]
    images = loaded.load_images(frame["path"].tolist())
    masks = model_view_masks(frame["mask_path"].tolist(), cfg.input_size, cfg.crop)
    keys = [image_key(i) for i in frame["image_id"]]
    per_view = [intervened_probabilities(
        lambda batch, dims=dims: loaded.view_probabilities(batch, dims, STRESS_BATCH),
        images, masks, keys, CORNER_INTERVENTIONS) for dims in FLIP_DIMS[:views]]
    out = {version: np.stack([p[version] for p in per_view]) for version in VERSIONS}
    if stored:
        stored.parent.mkdir(parents=True, exist_ok=True)
        np.savez(stored, stamp=stamp, **out)
    return out


def screen(probabilities: dict[str, dict[str, np.ndarray]], sizes: dict[str, float], val: pd.DataFrame,
           incumbent_val: pd.DataFrame, views_options: list[int], compatible: set[tuple[str, str]]) -> pd.DataFrame:
    """One row per compatible subset × views within the limits, best val AUROC first."""
    labels = val["label"].to_numpy()
    rows = []
    for size in range(1, len(probabilities) + 1):
        for subset in itertools.combinations(probabilities, size):
            if any((subset[0], other) not in compatible for other in subset[1:]):
                continue
            for views in views_options:
                megabytes = sum(sizes[name] for name in subset)
                if size * views > MAX_FORWARDS or megabytes > MAX_MB:
                    continue
                p = {v: np.mean([probabilities[name][v][:views].mean(0) for name in subset], axis=0)
                     for v in VERSIONS}
                threshold = metrics.youden_threshold(labels, p["clean"])
                flips = {f"flip_{name}": float(np.mean((p[name] >= threshold) != (p["clean"] >= threshold)))
                         for name in CORNER_INTERVENTIONS}
                gain, low, high = paired_gain(val[["image_id", "lesion_id", "label"]].assign(probability=p["clean"]),
                                              incumbent_val)
                rows.append({"members": " + ".join(subset), "views": views, "forwards": size * views,
                             "mb": megabytes, "val_auroc": metrics.auroc(labels, p["clean"]), "gain_p5": low,
                             **flips, "qualifies": max(flips.values()) <= MAX_FLIP,
                             "passes_margin": low >= MIN_GAIN_LOW})
    return pd.DataFrame(rows).sort_values("val_auroc", ascending=False, kind="stable").reset_index(drop=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="trained (single-model) run directories")
    parser.add_argument("--views", type=int, nargs="+", default=[1, 2], choices=[1, 2, 3, 4])
    parser.add_argument("--cache", type=Path, help="folder keeping each run's per-view probabilities")
    parser.add_argument("--incumbent", type=Path, default=runs.DEFAULT_RUN, help="the shipped run")
    parser.add_argument("--out", type=Path, help="also write the table as CSV")
    args = parser.parse_args(argv)
    names = [run.name for run in args.runs]
    if len(set(names)) != len(names):
        parser.error(f"runs need distinct folder names, got {names}")
    try:
        configs = {run.name: runs.read_config(run) for run in args.runs}
        incumbent_val = runs.read_predictions(args.incumbent, "val")
    except runs.RunError as err:
        parser.exit(2, f"corner_screen: {err}\n")
    probabilities = {run.name: corner_view_probabilities(run, max(args.views), args.cache) for run in args.runs}
    table = screen(probabilities, {run.name: runs.fp16_megabytes(run) for run in args.runs},
                   load_splits(configs[names[0]])["val"], incumbent_val, sorted(args.views),
                   compatible_pairs(configs))
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if args.out:
        table.to_csv(args.out, index=False, float_format="%.4f")
    both = table[table["qualifies"] & table["passes_margin"]]
    print("\nscreen: " + (f"{len(both)} combination(s) qualify and pass the margin; best {both.iloc[0]['members']} "
                          f"with {both.iloc[0]['views']} views: build it, stress it, run corner_rule.py"
                          if len(both) else "no combination both qualifies and passes the margin"))


if __name__ == "__main__":
    main()

"""Would a finer CAM see what the stress test measures? For N test images of a stress-tested run, the CAM's corner
share (``corner_fraction``) at several layers and methods against the interventions: Spearman ρ with the largest
|Δp| of the corner check, and AUROC for "the decision depends on the corners" and for "covering the corners flips
it" (0.5 = chance). The decisions explained are those at the val Youden threshold, as in ``train.py explain``.

    python benchmarks/cam_vs_stress.py --run models/default [--images 300] [--maps gradcam@16 gradcam@8 layercam@8]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from core import metrics
from core.audit import explain
from core.audit.stress import image_flags
from core.run import load
from core.runs import read_metrics, read_stress


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", type=Path, default=Path("models/default"))
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--maps", nargs="+", default=["gradcam@16", "gradcam@8", "layercam@8"],
                        help="METHOD@STRIDE, METHOD one of " + ", ".join(explain.CAM_METHODS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    threshold = read_metrics(args.run).thresholds["youden"]
    flags = image_flags(read_stress(args.run, "test"), threshold)
    run = load(args.run)
    model = run.model
    frame = run.splits()["test"].merge(flags, on="image_id")
    frame = frame.sample(n=min(args.images, len(frame)), random_state=args.seed).reset_index(drop=True)
    flipped = (frame["p_corner_fill"] >= threshold) != (frame["p_clean"] >= threshold)
    inputs = run.preprocess(run.load_images(frame["path"].tolist()))
    decided = (frame["p_clean"] >= threshold).astype(int).tolist()
    rows = []
    for spec in args.maps:
        method, stride = spec.split("@")
        cams = np.concatenate([explain.compute_cam(model, inputs[i:i + 16], method, decided[i:i + 16], int(stride))
                               for i in range(0, len(inputs), 16)])
        fraction = np.array([explain.attention_scores(cam)["corner_fraction"] for cam in cams])
        keep = np.isfinite(fraction)
        rows.append({"map": spec, "cells": f"{run.config.input_size // int(stride)}²",
                     "spearman_corner_delta_p": pd.Series(fraction[keep]).corr(
                         frame["corner_delta_p"][keep].reset_index(drop=True), method="spearman"),
                     "auroc_corner_dependent": metrics.auroc(frame["corner_dependent"][keep].astype(int),
                                                             fraction[keep]),
                     "auroc_corner_fill_flip": metrics.auroc(flipped[keep].astype(int), fraction[keep]),
                     "mean_corner_fraction": float(fraction[keep].mean())})
    print(f"{len(frame)} test images of {args.run} ({int(frame['corner_dependent'].sum())} corner-dependent, "
          f"{int(flipped.sum())} flipped by corner_fill at {threshold:.3f}):")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()

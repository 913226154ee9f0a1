"""How well does a site operating point chosen on a small labelled sample hold on the rest of that site?

Each pool of ``benchmarks/site_shifts.py`` (the val split as it is, and re-photographed copies of it) plays one site.
A sample of n images is drawn from it (whole lesions, in random order, until n images: a lesion's images stay
together), ``core.sites`` chooses the
threshold for 85 % sensitivity with each rule, and the sensitivity and specificity that threshold gives on the rest
of the pool are recorded; 2,000 draws per (pool, n, rule). A draw the rule refuses (too few malignant cases) is
counted, not scored. The run's own val Youden threshold on each pool is the line to beat.

    python -m benchmarks.site_rule --run models/default [--draws 2000] [--sizes 20 50 100]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.site_shifts import SHIFTS, pool
from core import metrics, sites
from core.runs import read_metrics


def simulate(frame: pd.DataFrame, n: int, rule: str, draws: int, target: float, seed: int = 0) -> dict:
    """Sensitivity and specificity on the rest of the pool of the threshold chosen on n-image samples."""
    rng = np.random.default_rng(seed)
    lesions = frame["lesion_id"].to_numpy()
    unique, counts = np.unique(lesions, return_counts=True)
    labels, probs = frame["label"].to_numpy(), frame["probability"].to_numpy()
    sensitivity, specificity, refused = [], [], 0
    for _ in range(draws):
        order = rng.permutation(len(unique))
        enough = int(np.searchsorted(np.cumsum(counts[order]), n)) + 1
        picked = np.isin(lesions, unique[order[:enough]])
        try:
            point = sites.choose_operating_point(labels[picked], probs[picked], target, rule)
        except sites.SiteError:
            refused += 1
            continue
        rest = metrics.binary_metrics(labels[~picked], probs[~picked], point.threshold)
        sensitivity.append(rest["sensitivity"])
        specificity.append(rest["specificity"])
    sens, spec = np.array(sensitivity), np.array(specificity)
    scored = len(sens) > 0
    return {"refused": refused / draws,
            "sensitivity_mean": sens.mean() if scored else np.nan,
            "sensitivity_p05": np.quantile(sens, 0.05) if scored else np.nan,
            "share_at_target": (sens >= target).mean() if scored else np.nan,
            "specificity_mean": spec.mean() if scored else np.nan}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("models/default"))
    parser.add_argument("--cache", type=Path, default=Path("runs/.site_pools"))
    parser.add_argument("--shifts", nargs="+", default=list(SHIFTS), choices=list(SHIFTS))
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 50, 100])
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--target", type=float, default=sites.DEFAULT_TARGET)
    args = parser.parse_args(argv)
    youden = read_metrics(args.run).thresholds["youden"]
    rows = []
    for shift in args.shifts:
        frame = pool(args.run, "val", shift, args.cache)["frame"]
        at = metrics.binary_metrics(frame["label"], frame["probability"], youden)
        auroc = metrics.auroc(frame["label"], frame["probability"])
        print(f"site = val / {shift}: {len(frame)} images, AUROC {auroc:.3f}; "
              f"at the run's val threshold {youden:.3f}: sensitivity {at['sensitivity']:.3f}, "
              f"specificity {at['specificity']:.3f}", flush=True)
        for n in args.sizes:
            for rule in sites.RULES:
                rows.append({"site": shift, "n": n, "rule": rule,
                             **simulate(frame, n, rule, args.draws, args.target)})
    table = pd.DataFrame(rows)
    print(f"\nthreshold for sensitivity ≥ {args.target} chosen on n images, judged on the rest of the site "
          f"({args.draws} draws each; refused: too few malignant cases for the rule)")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

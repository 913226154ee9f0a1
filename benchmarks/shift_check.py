"""The set-level shift check's false alarms and power, on sets drawn from images we have.

False alarms: sets of n images drawn from the test split as it is (in distribution: the check should call at most
``alpha`` of them shifted), and sets with half of them malignant (another case mix, which is not a camera shift).
Power: sets drawn from the re-photographed copies of the test split in ``benchmarks/site_shifts.py``. Each set gets
the verdict ``train.py shift`` gives (``core.audit.shift.compare`` on the guard's two distances, against val's), from
the cached predictions and features, so the images are predicted once, not per draw. The case-mix tests are reported
beside it: the probability test on every draw, the feature MMD (1,000 permutations, the slow one) on the half-
malignant draws.

    python -m benchmarks.shift_check --run models/default [--draws 200] [--sizes 50 100 300]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.site_shifts import SHIFTS, pool
from core.audit import shift
from core.audit.ood import OODGuard
from core.runs import read_config, read_ood_scores, read_predictions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("models/default"))
    parser.add_argument("--cache", type=Path, default=Path("runs/.site_pools"))
    parser.add_argument("--shifts", nargs="+", default=list(SHIFTS), choices=list(SHIFTS))
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 300])
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--mmd-draws", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=shift.DEFAULT_ALPHA)
    args = parser.parse_args(argv)
    guard = OODGuard.load(args.run, read_config(args.run))
    reference = read_ood_scores(args.run, "val")
    reference_p = read_predictions(args.run, "val")["probability"].to_numpy()
    thresholds = {"ood_score": guard.threshold, "style_score": guard.style_threshold}
    rng = np.random.default_rng(0)

    def verdicts(scores: pd.DataFrame, p: np.ndarray, features: np.ndarray | None, picks) -> dict:
        rows = []
        for pick in picks:
            report = shift.compare(scores.iloc[pick], reference, thresholds, p[pick], reference_p,
                                   None if features is None else features[pick],
                                   None if features is None else guard.index.reference, args.alpha)
            rows.append({"called shifted": report.shifted,
                         **{f"{k} test": t.p_value < args.alpha / len(report.tests) for k, t in report.tests.items()},
                         **{f"case mix: {k}": t.p_value < args.alpha for k, t in report.case_mix.items()}})
        return pd.DataFrame(rows).mean().to_dict()

    rows = []
    for name in args.shifts:
        images = pool(args.run, "test", name, args.cache)
        scores = guard.assess(images["features"])
        p = images["frame"]["probability"].to_numpy()
        for n in args.sizes:
            picks = [rng.choice(len(p), n, replace=False) for _ in range(args.draws)]
            rows.append({"test images": name, "n": n, **verdicts(scores, p, None, picks),
                         "flagged one by one": scores["out_of_distribution"].mean()})
        if name == "none":  # another case mix: half malignant, as a melanoma-enriched set would be
            labels = images["frame"]["label"].to_numpy()
            for n in args.sizes:
                picks = [np.r_[rng.choice(np.flatnonzero(labels == 1), n // 2, replace=False),
                               rng.choice(np.flatnonzero(labels == 0), n - n // 2, replace=False)]
                         for _ in range(args.mmd_draws)]
                rows.append({"test images": "none, half malignant", "n": n,
                             **verdicts(scores, p, guard.index.points(images["features"][0]), picks)})
        print(pd.DataFrame(rows).tail(2 * len(args.sizes) if name == "none" else len(args.sizes))
              .to_string(index=False, float_format=lambda v: f"{v:.3f}"), flush=True)
    print(f"\nshare of sets called shifted at alpha {args.alpha} ({args.draws} draws; half malignant: "
          f"{args.mmd_draws}); 'none' = our own test images: false alarms")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

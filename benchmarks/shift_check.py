"""The set-level shift check's false alarms and power, on sets drawn from images we have.

False alarms: sets of n images drawn from the test split as it is (in distribution: the check should call at most
``alpha`` of them shifted). Power: sets of n images drawn from the re-photographed copies of the test split in
``benchmarks/site_shifts.py``. Each set is judged by ``core.shift.against_val`` exactly as ``train.py shift``
judges a folder, from the cached predictions and features (so the images are predicted once, not per draw).

    python -m benchmarks.shift_check --run models/default [--draws 100] [--sizes 50 100 300]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmarks.site_shifts import SHIFTS, pool
from core import shift
from core.inference import load_run
from core.ood import OODGuard


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("models/default"))
    parser.add_argument("--cache", type=Path, default=Path("runs/.site_pools"))
    parser.add_argument("--shifts", nargs="+", default=list(SHIFTS), choices=list(SHIFTS))
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 300])
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=shift.DEFAULT_ALPHA)
    args = parser.parse_args(argv)
    cfg, _ = load_run(args.run, torch.device("cpu"))
    guard = OODGuard.load(args.run, cfg)
    rng = np.random.default_rng(0)
    rows = []
    for name in args.shifts:
        images = pool(args.run, "test", name, args.cache)
        probability = images["frame"]["probability"].to_numpy()
        flagged = guard.assess(images["features"])["out_of_distribution"].mean()
        for n in args.sizes:
            verdicts = []
            for _ in range(args.draws):
                pick = rng.choice(len(probability), n, replace=False)
                report = shift.against_val(args.run, probability[pick], [f[pick] for f in images["features"]],
                                           guard, args.alpha)
                verdicts.append((report["shifted"], {k: t["p_value"] < args.alpha / len(report["tests"])
                                                     for k, t in report["tests"].items()}))
            shifted = np.mean([v[0] for v in verdicts])
            by_test = pd.DataFrame([v[1] for v in verdicts]).mean()
            rows.append({"test images": name, "n": n, "called shifted": shifted,
                         **{f"by {k}": v for k, v in by_test.items()}, "images flagged one by one": flagged})
        print(pd.DataFrame(rows[-len(args.sizes):]).to_string(index=False, float_format=lambda v: f"{v:.3f}"),
              flush=True)
    print(f"\nshare of {args.draws} sets called shifted (alpha {args.alpha}); 'none' = false alarms")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Issue 15's selection rule for a corner-robust model, as written in ``benchmarks/experiments.md`` (fixed
2026-12-01, before any candidate was trained), applied on **val** only: which candidates qualify, which one is
best, and whether it replaces the incumbent. Test AUROC is printed for the record; the rule never reads it.

1. A candidate qualifies if its val flip share is ≤ 3 % for every corner intervention (``vignette_light``,
   ``vignette``, ``vignette_strong``, ``corner_fill``) at its own val Youden threshold.
2. Among qualifying candidates within the shipping limits (≤ 4 network passes per prediction, the 60 ms CPU budget
   of ``bench_predict.py``; ≤ 25 MB fp16), the best val AUROC is taken.
3. It replaces the incumbent only if the 5th percentile of its lesion-grouped paired bootstrap gain in val AUROC
   (``core.metrics.paired_auroc_gain``, 2,000 resamples, 90 % interval) is ≥ −0.005.

Each run needs ``predictions_val.csv`` / ``predictions_test.csv`` (``fit``, ``ensemble`` or ``evaluate``) and the
val section of ``stress_summary.json`` (``train.py stress --split val``).

    python benchmarks/corner_rule.py --candidates runs/A runs/B [--incumbent models/default]
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from core import metrics, runs
from core.audit.interventions import CORNER_INTERVENTIONS

MAX_FLIP = 0.03       # step 1: the largest val flip share a corner intervention may cause
MAX_FORWARDS = 4      # step 2: network passes per prediction (members × TTA views) that fit 60 ms on 2 CPU cores
MAX_MB = 25.0         # step 2: fp16 weights
MIN_GAIN_LOW = -0.005  # step 3: the gain's 5th percentile must reach this


@dataclass
class Candidate:
    """What the rule reads of one run."""

    run: Path
    flips: dict[str, float]   # corner intervention → share of val decisions flipped
    forwards: int
    megabytes: float
    val: pd.DataFrame         # predictions_val.csv
    test_auroc: float         # printed, never used

    @property
    def val_auroc(self) -> float:
        return metrics.auroc(self.val["label"], self.val["probability"])

    def failures(self) -> list[str]:
        """Why it does not qualify or fit the limits (empty: it does)."""
        out = [f"{name} flips {share:.1%} > {MAX_FLIP:.0%}" for name, share in self.flips.items() if share > MAX_FLIP]
        if self.forwards > MAX_FORWARDS:
            out.append(f"{self.forwards} network passes > {MAX_FORWARDS}")
        if self.megabytes > MAX_MB:
            out.append(f"{self.megabytes:.1f} MB > {MAX_MB:g} MB")
        return out


def read_candidate(run: str | Path) -> Candidate:
    run = Path(run)
    cfg = runs.read_config(run)
    section = runs.read_stress_summary(run, "val")
    missing = [name for name in CORNER_INTERVENTIONS if name not in section.interventions]
    if missing:
        raise runs.RunError(f"{run}'s val stress test lacks {', '.join(missing)}; run `python train.py stress "
                            f"--run {run} --split val` with every corner intervention")
    flips = {name: section.interventions[name].flipped for name in CORNER_INTERVENTIONS}
    test = runs.read_predictions(run, "test")
    return Candidate(run, flips, max(len(cfg.ensemble), 1) * cfg.tta_views, runs.fp16_megabytes(run),
                     runs.read_predictions(run, "val"), metrics.auroc(test["label"], test["probability"]))


def paired_gain(new: pd.DataFrame, old: pd.DataFrame, seed: int = 0) -> tuple[float, float, float]:
    """Val AUROC gain of ``new`` over ``old`` on the same images, lesions resampled whole: (gain, 5th, 95th pct)."""
    both = new.merge(old[["image_id", "probability"]], on="image_id", suffixes=("", "_old"), validate="1:1")
    if len(both) != len(new) or len(both) != len(old):
        raise ValueError(f"the two runs' val predictions cover different images ({len(new)} and {len(old)}, "
                         f"{len(both)} shared): were they evaluated on the same split file?")
    return metrics.paired_auroc_gain(both["label"], both["probability"], both["probability_old"], both["lesion_id"],
                                     n_boot=2000, alpha=0.10, seed=seed)


def apply_corner_rule(candidates: list[Candidate], incumbent_val: pd.DataFrame,
                      gains: dict[Path, tuple[float, float, float]] | None = None) -> dict:
    """Steps 1–3: the chosen candidate (or None), its gain and interval, and whether it replaces the incumbent.
    ``gains`` (run → :func:`paired_gain`) reuses bootstraps already drawn for the same incumbent."""
    eligible = sorted((c for c in candidates if not c.failures()), key=lambda c: c.val_auroc, reverse=True)
    if not eligible:
        return {"best": None, "replace": False}
    best = eligible[0]
    gain, low, high = (gains or {}).get(best.run) or paired_gain(best.val, incumbent_val)
    return {"best": best, "gain": gain, "low": low, "high": high, "replace": low >= MIN_GAIN_LOW}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=Path, nargs="+", required=True, help="run directories to judge")
    parser.add_argument("--incumbent", type=Path, default=runs.DEFAULT_RUN, help="the shipped run")
    args = parser.parse_args(argv)
    try:
        candidates = [read_candidate(run) for run in args.candidates]
        incumbent_val = runs.read_predictions(args.incumbent, "val")
    except runs.RunError as err:
        parser.exit(2, f"corner_rule: {err}\n")
    # the gain of every candidate, for the log; the decision reads only the qualifying ones'
    gains = {c.run: paired_gain(c.val, incumbent_val) for c in candidates}
    rows = []
    for c in candidates:
        gain, low, high = gains[c.run]
        rows.append({"run": str(c.run), "val_auroc": c.val_auroc, "val_gain": gain, "gain_p5": low, "gain_p95": high,
                     "test_auroc": c.test_auroc, "forwards": c.forwards, "mb": c.megabytes,
                     **{f"flip_{name}": share for name, share in c.flips.items()},
                     "verdict": "; ".join(c.failures()) or "qualifies"})
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    incumbent_auroc = metrics.auroc(incumbent_val["label"], incumbent_val["probability"])
    decision = apply_corner_rule(candidates, incumbent_val, gains)
    if decision["best"] is None:
        print(f"\nno candidate qualifies (every corner flip ≤ {MAX_FLIP:.0%}, ≤ {MAX_FORWARDS} passes, "
              f"≤ {MAX_MB:g} MB) → keep the incumbent {args.incumbent}")
        return
    best = decision["best"]
    print(f"\nbest qualifying: {best.run}, val AUROC {best.val_auroc:.4f} (incumbent {incumbent_auroc:.4f}); gain "
          f"{decision['gain']:+.4f}, lesion-grouped paired bootstrap 90 % CI {decision['low']:+.4f} to "
          f"{decision['high']:+.4f} (needs ≥ {MIN_GAIN_LOW:+.3f}) → "
          f"{'REPLACE the incumbent' if decision['replace'] else 'keep the incumbent'}")


if __name__ == "__main__":
    main()

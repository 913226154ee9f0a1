"""Issue 31's selection rule for a model that holds across sources, as written in ``benchmarks/experiments.md``
(fixed 2026-12-06, before any candidate), applied on **val** and on the held-out sources; test AUROC is printed for
the record, never read.

A candidate qualifies when all four hold (steps 2a–2d of the rule in experiments.md):

2a. **Source-stratified val AUROC not below the incumbent's**: the 5th percentile of the paired gain (lesions
   resampled whole within their source, ``core.metrics.paired_stratified_auroc_gain``, 2,000 resamples, 90 %
   interval) is ≥ −0.005.
2b. **Acquisition**: on its val acquisition stress test (``train.py stress --split val --suite acquisition``, seed 0,
   500 images, every edit) each camera edit flips at most 1.5 × the floor (the largest neutral-edit flip rate).
2c. **Corners**: issue 15's rule still met (``benchmarks/corner_rule.py``: every corner intervention ≤ 3 % on val,
   ≤ 4 network passes, ≤ 25 MB).
2d. **Held-out sources**: its recipe's ``train.py cv --by source`` folds (at least rosendahl and vidir_modern held
   out) give a higher mean sensitivity at each fold's own val Youden threshold than the incumbent recipe's, with
   the mean held-out AUROC at most 0.01 lower.

Among those that qualify, the best stratified val AUROC is taken.

    python -m benchmarks.source_rule --incumbent models/default [--incumbent-loso runs/loso_inc]
        [--candidates runs/A runs/B --loso runs/loso_A runs/loso_B]

Step 2d judges a *recipe*, and a recipe that fails it is out before any model is built from it: ``--recipes`` screens
recipes' ``cv --by source`` folders on that step alone.

    python -m benchmarks.source_rule --incumbent-loso runs/loso_default --recipes runs/loso_A runs/loso_B
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from benchmarks import corner_rule
from core import metrics, runs
from core.audit import acquisition as acquisition_module

MIN_GAIN_LOW = -0.005    # step 2a
MAX_AUROC_DROP = 0.01    # step 2d
LOSO_SOURCES = ("rosendahl", "vidir_modern")


def stratified(run: Path, split: str = "val") -> float:
    """The mean of the within-source AUROCs (over the sources with both classes), as ``evaluate`` reports it."""
    frame = runs.read_predictions(run, split)
    scored = [metrics.auroc(part["label"], part["probability"]) for _, part in frame.groupby("source")
              if 0 < part["label"].sum() < len(part)]
    return sum(scored) / len(scored)


def held_out(loso: Path | None) -> dict | None:
    """Mean sensitivity at the val Youden threshold and mean AUROC over the held-out sources of ``cv_sources.csv``."""
    if loso is None:
        return None
    table = pd.read_csv(Path(loso) / "cv_sources.csv")
    missing = set(LOSO_SOURCES) - set(table["held_out"])
    if missing:
        raise runs.RunError(f"{loso}/cv_sources.csv lacks {', '.join(sorted(missing))}; run `python train.py cv "
                            f"--by source --hold-out {' '.join(LOSO_SOURCES)}` with the candidate's recipe")
    table = table[table["held_out"].isin(LOSO_SOURCES)]
    return {"sensitivity": float(table["test_youden_sensitivity"].mean()), "auroc": float(table["test_auroc"].mean())}


def held_out_failures(mine: dict, incumbent: dict) -> list[str]:
    """Step 2d: a higher mean held-out sensitivity than the incumbent recipe's, and a mean held-out AUROC at most
    :data:`MAX_AUROC_DROP` lower."""
    if mine["sensitivity"] > incumbent["sensitivity"] and mine["auroc"] >= incumbent["auroc"] - MAX_AUROC_DROP:
        return []
    return [f"held-out sources: sensitivity {mine['sensitivity']:.3f} vs {incumbent['sensitivity']:.3f}, AUROC "
            f"{mine['auroc']:.3f} vs {incumbent['auroc']:.3f} (at least {incumbent['auroc'] - MAX_AUROC_DROP:.3f})"]


def screen_recipes(incumbent_loso: Path, recipes: list[Path]) -> int:
    """Step 2d alone, for recipes whose models are not built yet."""
    incumbent = held_out(incumbent_loso)
    assert incumbent is not None
    print(f"{incumbent_loso} (the incumbent recipe): held-out sensitivity {incumbent['sensitivity']:.3f}, AUROC "
          f"{incumbent['auroc']:.3f}")
    for loso in recipes:
        mine = held_out(loso)
        assert mine is not None
        failures = held_out_failures(mine, incumbent)
        print(f"{loso}: " + (f"passes the held-out-source step (2d in experiments.md) with sensitivity "
                             f"{mine['sensitivity']:.3f}, AUROC {mine['auroc']:.3f}: build its model and judge it on "
                             "the others" if not failures else "fails the held-out-source step (2d in "
                             "experiments.md): " + "; ".join(failures)))
    return 0


def judge(run: Path, incumbent: Path, loso: Path | None, incumbent_loso: dict | None) -> dict:
    """One run against the four steps: its figures and the reasons it fails (empty: it qualifies)."""
    new, old = runs.read_predictions(run, "val"), runs.read_predictions(incumbent, "val")
    both = new.merge(old[["image_id", "probability"]], on="image_id", suffixes=("", "_old"), validate="one_to_one")
    gain = metrics.paired_stratified_auroc_gain(both["label"], both["probability"], both["probability_old"],
                                                both["source"], both["lesion_id"], n_boot=2000, alpha=0.10)
    acquisition = runs.read_acquisition_summary(run, "val")
    expected = acquisition_module.default_edits(list(acquisition.source_colours))
    if (acquisition.seed, acquisition.limit, list(acquisition.edits_run)) != (0, 500, expected):
        raise runs.RunError(f"{run}'s val acquisition test is not the rule's (seed 0, 500 images, every edit): run "
                            f"`python train.py stress --run {run} --split val --suite acquisition`")
    corners = corner_rule.read_candidate(run)
    mine = held_out(loso)
    failures = []
    if gain[1] < MIN_GAIN_LOW:
        failures.append(f"stratified val AUROC gain 5th percentile {gain[1]:+.4f} < {MIN_GAIN_LOW}")
    holds = acquisition.holds
    if not holds.passed:
        failures.append(f"camera edits above {holds.factor:g} × the floor "
                        f"({acquisition.floor.rate:.1%}): {', '.join(holds.failing)}")
    failures += corners.failures()
    if mine is None or incumbent_loso is None:
        failures.append("no held-out-source result to compare (train.py cv --by source, for it and the incumbent)")
    else:
        failures += held_out_failures(mine, incumbent_loso)
    test = runs.read_predictions(run, "test")
    return {"run": str(run), "stratified_val_auroc": stratified(run), "gain": gain,
            "worst_camera_edit": holds.worst,
            "worst_times_floor": acquisition.edits[holds.worst].times_floor if holds.worst else None,
            "floor": acquisition.floor.rate, "held_out": mine,
            "test_auroc": metrics.auroc(test["label"], test["probability"]), "failures": failures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--incumbent", type=Path, default=runs.DEFAULT_RUN)
    parser.add_argument("--incumbent-loso", type=Path, help="the incumbent recipe's `cv --by source` folder")
    parser.add_argument("--candidates", type=Path, nargs="*", default=[])
    parser.add_argument("--loso", type=Path, nargs="*", default=[], help="each candidate's `cv --by source` folder")
    parser.add_argument("--recipes", type=Path, nargs="*", default=[],
                        help="screen these recipes' `cv --by source` folders on step 2d alone (needs --incumbent-loso)")
    args = parser.parse_args(argv)
    if args.recipes and (args.incumbent_loso is None or args.candidates or args.loso):
        parser.error("--recipes screens recipes against --incumbent-loso, and nothing else")
    if args.loso and len(args.loso) != len(args.candidates):
        parser.error(f"{len(args.candidates)} candidates but {len(args.loso)} --loso folders")
    try:
        if args.recipes:
            return screen_recipes(args.incumbent_loso, args.recipes)
        return judge_candidates(args.incumbent, args.incumbent_loso, args.candidates, args.loso)
    except (runs.RunError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def judge_candidates(incumbent: Path, incumbent_loso_dir: Path | None, candidates: list[Path],
                     loso_dirs: list[Path]) -> int:
    """Every step for the incumbent and each candidate, then the rule's choice."""
    incumbent_loso = held_out(incumbent_loso_dir)
    results = [judge(run, incumbent, loso, incumbent_loso)
               for run, loso in zip([incumbent, *candidates], [incumbent_loso_dir, *loso_dirs]
                                    if loso_dirs else [incumbent_loso_dir, *[None] * len(candidates)])]
    for result in results:
        gain, low, high = result["gain"]
        held = result["held_out"]
        print(f"{result['run']}: stratified val AUROC {result['stratified_val_auroc']:.4f} (gain {gain:+.4f}, 90 % CI "
              f"{low:+.4f} to {high:+.4f}); worst camera edit {result['worst_camera_edit']} at "
              f"{result['worst_times_floor'] or float('nan'):.1f} × the floor ({result['floor']:.1%}); held-out "
              + (f"sensitivity {held['sensitivity']:.3f}, AUROC {held['auroc']:.3f}" if held else "n/a")
              + f"; test AUROC {result['test_auroc']:.4f} (not used)")
        print("  qualifies" if not result["failures"] else "  fails: " + "; ".join(result["failures"]))
    qualified = [r for r in results[1:] if not r["failures"]]
    if qualified:
        best = max(qualified, key=lambda r: r["stratified_val_auroc"])
        print(f"ship {best['run']}: it qualifies with the best stratified val AUROC")
    else:
        print("no candidate qualifies: the incumbent stays")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

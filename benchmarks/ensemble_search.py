"""Which trained runs to ensemble, and with how many flip views: val AUROC of every subset × TTA setting.

Each run's probabilities are computed once per flip view (identity, h, v, hv) on val and test; a subset with k
views is then the mean over its members and their first k views, exactly what ``train.py ensemble`` +
``evaluate`` would predict (only subsets it would accept: one crop, size and normalisation). Choose on the val
column; test is printed for the record only. ``forwards`` is the number of network passes one prediction costs
(members × views), the CPU-latency side of the trade; ``mb`` the members' weights in fp16, as shipped.

With ``--max-forwards``/``--max-mb``/``--incumbent`` it also applies the selection rule (fixed 2026-11-26, before
runs 20+): the highest val AUROC within both limits replaces the shipped ensemble only if its val gain holds up
under a paired bootstrap that resamples whole lesions: the 5th percentile of the gain must be above 0. Without that
margin, noise-level val gains (runs 12, 19) swapped the shipped model back and forth.

    python benchmarks/ensemble_search.py --runs runs/A runs/B runs/C [--out table.csv] [--cache runs/.search]
        [--max-forwards 4 --max-mb 25 --incumbent A B --incumbent-views 2]
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import pandas as pd

from core import metrics
from core.config import RunConfig
from core.ensemble import check_compatible
from core.inference import FLIP_DIMS, load_splits
from core.run import load
from core.runs import fp16_megabytes, read_config


def view_probabilities(run: Path, cache: Path | None = None, device: str = "cpu") -> dict[str, np.ndarray]:
    """split → ``(views, N)`` P(malignant) of each flip view alone (kept in ``cache`` while the weights are
    unchanged, so adding a run to the search costs only that run)."""
    stored = cache / f"{run.resolve().name}.npz" if cache else None
    stamp = np.array((run / "model.safetensors").stat().st_mtime_ns)
    if stored and stored.is_file():
        with np.load(stored) as f:
            if f["stamp"] == stamp:
                return {k: f[k] for k in f.files if k != "stamp"}
    loaded = load(run, device)
    frames, out = loaded.splits(), {}
    for split in ("val", "test"):
        images = loaded.load_images(frames[split]["path"].tolist())
        out[split] = np.stack([loaded.view_probabilities(images, dims, loaded.config.eval_batch_size)
                               for dims in FLIP_DIMS])
        out[f"{split}_labels"] = frames[split]["label"].to_numpy()
    if stored:
        stored.parent.mkdir(parents=True, exist_ok=True)
        np.savez(stored, stamp=stamp, **out)
    return out


def ensemble_probabilities(probabilities: dict[str, dict[str, np.ndarray]], members: tuple[str, ...], views: int,
                           split: str) -> np.ndarray:
    """Mean P(malignant) over the members and their first ``views`` flip views."""
    return np.mean([probabilities[name][split][:views].mean(0) for name in members], axis=0)


def compatible_pairs(configs: dict[str, RunConfig]) -> set[tuple[str, str]]:
    """Pairs of runs that one ensemble may hold: the same input tensor and split (``check_compatible``), so a
    square-crop and a frame-crop run are never averaged into an ensemble ``train.py ensemble`` would refuse."""
    pairs = set()
    for a, b in itertools.product(configs, repeat=2):
        try:
            check_compatible([configs[a], configs[b]], [a, b])
        except ValueError:
            continue
        pairs.add((a, b))
    return pairs


def search(probabilities: dict[str, dict[str, np.ndarray]], sizes: dict[str, float],
           views_options: list[int], compatible: set[tuple[str, str]] | None = None) -> pd.DataFrame:
    """Every subset (of mutually ``compatible`` runs, when given) × views, sorted by val AUROC."""
    labels = next(iter(probabilities.values()))
    rows = []
    for size in range(1, len(probabilities) + 1):
        for subset in itertools.combinations(probabilities, size):
            if compatible is not None and any((subset[0], other) not in compatible for other in subset[1:]):
                continue
            for views in views_options:
                row = {"members": " + ".join(subset), "views": views, "forwards": size * views,
                       "mb": sum(sizes[name] for name in subset)}
                for split in ("val", "test"):
                    row[f"{split}_auroc"] = metrics.auroc(labels[f"{split}_labels"],
                                                          ensemble_probabilities(probabilities, subset, views, split))
                rows.append(row)
    return pd.DataFrame(rows).sort_values("val_auroc", ascending=False, kind="stable").reset_index(drop=True)


def apply_rule(table: pd.DataFrame, probabilities: dict[str, dict[str, np.ndarray]], lesions: np.ndarray,
               incumbent: tuple[str, ...], incumbent_views: int, max_forwards: int, max_mb: float) -> dict:
    """The selection rule on val only: the best subset within the limits, and whether it replaces the incumbent."""
    eligible = table[(table["forwards"] <= max_forwards) & (table["mb"] <= max_mb)]
    if eligible.empty:
        raise SystemExit(f"no subset has ≤ {max_forwards} forwards and ≤ {max_mb} MB")
    best = eligible.iloc[0]
    members = tuple(best["members"].split(" + "))
    labels = next(iter(probabilities.values()))["val_labels"]
    gain, low, high = metrics.paired_auroc_gain(
        labels, ensemble_probabilities(probabilities, members, int(best["views"]), "val"),
        ensemble_probabilities(probabilities, incumbent, incumbent_views, "val"), groups=lesions)
    same = set(members) == set(incumbent) and int(best["views"]) == incumbent_views
    return {"best": best["members"], "views": int(best["views"]), "val_auroc": best["val_auroc"], "gain": gain,
            "low": low, "high": high, "replace": not same and low > 0}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, nargs="+", required=True)
    parser.add_argument("--views", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--out", type=Path, help="also write the table as CSV")
    parser.add_argument("--cache", type=Path, help="folder keeping each run's per-view probabilities")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (fp32 either way)")
    rule = parser.add_argument_group("selection rule (all three, or none)")
    rule.add_argument("--max-forwards", type=int, help="network passes one prediction may cost (CPU latency)")
    rule.add_argument("--max-mb", type=float, help="fp16 weights of all members, MB")
    rule.add_argument("--incumbent", nargs="+", help="run names (folder names) of the shipped ensemble")
    rule.add_argument("--incumbent-views", type=int, default=2)
    args = parser.parse_args(argv)
    rule_args = (args.max_forwards, args.max_mb, args.incumbent)
    if any(a is not None for a in rule_args) and not all(a is not None for a in rule_args):
        parser.error("the selection rule needs --max-forwards, --max-mb and --incumbent together")
    names = [run.name for run in args.runs]
    if args.incumbent and not set(args.incumbent) <= set(names):
        parser.error(f"--incumbent {sorted(set(args.incumbent) - set(names))} not among --runs {names}")
    probabilities = {run.name: view_probabilities(run, args.cache, args.device) for run in args.runs}
    configs = {run.name: read_config(run) for run in args.runs}
    table = search(probabilities, {run.name: fp16_megabytes(run) for run in args.runs}, args.views,
                   compatible_pairs(configs))
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if args.out:
        table.to_csv(args.out, index=False, float_format="%.4f")
    if args.incumbent:
        val = load_splits(read_config(args.runs[0]))["val"]
        decision = apply_rule(table, probabilities, val["lesion_id"].to_numpy(), tuple(args.incumbent),
                              args.incumbent_views, args.max_forwards, args.max_mb)
        print(f"\nrule (≤ {args.max_forwards} forwards, ≤ {args.max_mb:g} MB): best {decision['best']} with "
              f"{decision['views']} views, val AUROC {decision['val_auroc']:.4f}; gain over the incumbent "
              f"{decision['gain']:+.4f} (lesion-grouped paired bootstrap 90 % CI {decision['low']:+.4f} to "
              f"{decision['high']:+.4f}) → {'REPLACE the incumbent' if decision['replace'] else 'keep the incumbent'}")


if __name__ == "__main__":
    main()

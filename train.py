#!/usr/bin/env python
"""Command line over ``core``: ``split`` (and, as they land, fit / evaluate / predict / explain).

    python train.py split                 # writes splits/ham10000.csv from the resolved HAM10000 folder
    python train.py split --folds 5       # also writes splits/ham10000_folds5.csv (train+val only)
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from core.data import DataError, read_dataset

DEFAULT_SPLIT = Path("splits/ham10000.csv")


def cmd_split(args: argparse.Namespace) -> None:
    from core import split

    data = read_dataset(args.data_dir, args.images)
    print(f"{len(data)} images, {data['lesion_id'].nunique()} lesions from {args.data_dir or 'the default data folder'}")
    print("hashing images for near-duplicates …", flush=True)
    hashes = split.perceptual_hashes(data["path"].tolist())
    clusters = split.near_duplicate_clusters(data["lesion_id"], hashes)
    print(f"near-duplicates: {clusters.near_duplicate_pairs} cross-lesion image pair(s) within "
          f"{split.NEAR_DUPLICATE_DISTANCE}/256 bits; merged {clusters.merged_lesions} lesions into "
          f"{clusters.merged_clusters} cluster(s) kept inside one split")
    data["split"] = split.lesion_wise_split(data, clusters.cluster, tuple(args.fractions), args.seed)
    split.write_csv(data[split.SPLIT_COLUMNS], args.out)
    print(split.split_summary(data).to_string(float_format=lambda v: f"{v:.1f}"))
    print(f"wrote {args.out}")
    plot = args.out.with_name(args.out.stem + "_distribution.png")
    split.plot_class_distribution(data, plot)
    print(f"wrote {plot}")
    if args.folds:
        dev = data[data["split"] != "test"].copy()
        dev["fold"] = split.lesion_wise_folds(dev, clusters.cluster[dev.index], args.folds, args.seed)
        folds_path = args.out.with_name(f"{args.out.stem}_folds{args.folds}.csv")
        split.write_csv(dev[split.SPLIT_COLUMNS[:-1] + ["fold"]], folds_path)
        table = dev.groupby("fold").agg(images=("image_id", "size"), lesions=("lesion_id", "nunique"),
                                        malignant_pct=("label", lambda s: 100 * s.mean()))
        print(table.to_string(float_format=lambda v: f"{v:.1f}"))
        print(f"wrote {folds_path} (test split held out)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("split", help="lesion-wise, near-duplicate-aware train/val/test split")
    data = p.add_argument_group("data")
    data.add_argument("--data-dir", help="HAM10000 folder, or a label CSV (ISIC 2018/2019 ground truth, image,label)")
    data.add_argument("--images", help="image folder, when --data-dir is a label CSV")
    out = p.add_argument_group("split")
    out.add_argument("--out", type=Path, default=DEFAULT_SPLIT, help="split file to write (default: %(default)s)")
    out.add_argument("--fractions", type=float, nargs=3, default=[0.70, 0.15, 0.15], metavar=("TRAIN", "VAL", "TEST"))
    out.add_argument("--seed", type=int, default=0)
    out.add_argument("--folds", type=int, default=0, help="also write an N-fold assignment of train+val")
    p.set_defaults(func=cmd_split)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

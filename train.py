#!/usr/bin/env python
"""Command line over ``core``.

    python train.py download ham10000 [--to DIR]           # HAM10000 from its Dataverse record, verified (make data)
    python train.py download isic2018-test                 # the ISIC 2018 Task 3 test set: an external set
    python train.py split [--folds 5]                       # splits/ham10000.csv (+ a 5-fold file of train+val)
    python train.py fit --config configs/default.yaml --out runs/NAME [--epochs 3 …]   # flags override the YAML
    python train.py fit --resume runs/NAME                 # continue an interrupted run
    python train.py cv --config configs/default.yaml --out runs/cv_NAME   # 5 lesion-wise folds: mean ± sd
    python train.py cv --by source --hold-out rosendahl --config … --out runs/loso_NAME   # a new clinic, in-house
    python train.py ensemble --members runs/A runs/B --out runs/ENS   # mean P(malignant) of trained runs
    python train.py calibrate --run runs/NAME             # Platt scaling fitted on val, then evaluate again
    python train.py evaluate --run runs/NAME [--data GT.csv --images DIR [--name SET]]
    python train.py site --run runs/NAME --name SITE --data LABELS.csv --images DIR   # a site's own threshold
    python train.py shift --run runs/NAME --images FOLDER [--out shift.json]   # is the folder unlike val?
    python train.py predict --run runs/NAME --images FOLDER --out predictions.csv [--site SITE]
    python train.py explain --run runs/NAME --split test    # Grad-CAM audit: attention_test.csv, cams, summary
    python train.py stress --run runs/NAME --split test     # artifact stress test: stress_test.csv, summary
    python train.py stress --run runs/NAME --suite acquisition   # other cameras: acquisition_test.csv, summary
    python train.py index --run runs/NAME                   # embedding index + OOD threshold (val percentile)
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
from pathlib import Path

from core import runs
from core.config import RunConfig, add_config_arguments, field_choices, given_settings
from core.data import DEFAULT_FOLDS_FILE, DEFAULT_SPLIT_FILE, IMAGE_EXTENSIONS, DataError, read_dataset
from core.download import add_parser as add_download_parser
from core.inference import DeviceError
from core.run_files import SampleSource, ShiftReport
from core.train.fit import Interrupted
from core.train.training import TrainingError


def cmd_split(args: argparse.Namespace) -> None:
    from core import split

    data = read_dataset(args.data_dir, args.images)
    where = args.data_dir or "the default data folder"
    print(f"{len(data)} images, {data['lesion_id'].nunique()} lesions from {where}")
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
        split.write_csv(dev[split.FOLD_COLUMNS], folds_path)
        table = dev.groupby("fold").agg(images=("image_id", "size"), lesions=("lesion_id", "nunique"),
                                        malignant_pct=("label", lambda s: 100 * s.mean()))
        print(table.to_string(float_format=lambda v: f"{v:.1f}"))
        print(f"wrote {folds_path} (test split held out)")


def cmd_fit(args: argparse.Namespace) -> None:
    from core.train.fit import fit

    if args.resume:
        run_dir = Path(args.resume)
        fit(runs.read_config(run_dir, need_weights=False), run_dir, resume=True)
        return
    if args.out is None:
        raise ValueError("fit needs --out RUN_DIR (or --resume RUN_DIR)")
    cfg = RunConfig.from_yaml(args.config) if args.config else RunConfig()
    cfg = cfg.override(args)
    if (args.out / runs.MODEL_FILE).exists() and not args.overwrite:
        raise ValueError(f"{args.out} already holds a trained run; use --resume, --overwrite or another --out")
    fit(cfg, args.out)


def cmd_cv(args: argparse.Namespace) -> None:
    from core.train.cv import cross_validate, leave_source_out

    cfg = (RunConfig.from_yaml(args.config) if args.config else RunConfig()).override(args)
    if args.by == "source":
        table = leave_source_out(cfg, args.out, args.hold_out)
        shown = ["held_out", "test_n", "test_malignant_share", "val_auroc", "test_auroc",
                 "test_youden_sensitivity", "test_youden_specificity"]
        print(table[shown].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        print(f"wrote {args.out}/cv_sources.csv (one row per held-out source; test = every image of that source)")
        return
    if args.hold_out:
        raise ValueError("--hold-out names sources; add --by source")
    summary = cross_validate(cfg, args.out, args.folds_file, args.only_folds)
    shown = summary[summary["metric"].str.match(r"(val|test)_auroc$|test_youden_")]
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"wrote {args.out}/cv_folds.csv and {args.out}/cv_summary.csv (mean, sd, min, max of every metric)")


def cmd_shipped(args: argparse.Namespace) -> None:
    from core.train.shipped import replay

    overrides = given_settings(args)
    if "init_from" in overrides:
        raise ValueError("--init-from: each stage of the replay starts from the one before it (the first from "
                         "ImageNet); the recipe, not a flag, says so")
    out = replay(args.out, args.recipe, overrides, args.limit, args.overwrite)
    print(f"next: python train.py evaluate --run {out}, or `make dashboard` and pick {out.name}")


def cmd_ensemble(args: argparse.Namespace) -> None:
    from core.ensemble import create_ensemble

    out = create_ensemble(args.members, args.out, args.tta_views, args.overwrite)
    print(f"wrote {out} ({len(args.members)} members); next: python train.py evaluate --run {out}")


def cmd_calibrate(args: argparse.Namespace) -> None:
    from core.evaluation import calibrate_run

    before, after = calibrate_run(args.run, args.device)
    if after.run is None or after.calibration_test is None:  # evaluate_run always writes both
        raise runs.RunError(f"{args.run}: the evaluation after calibrating wrote no calibration report")
    a, b = after.run.calibration
    was = f"{before.calibration_test.ece:.4f} → " if before and before.calibration_test else ""
    print(f"calibration a = {a:.4f}, b = {b:+.4f} (fitted on val); "
          f"test ECE {was}{after.calibration_test.ece:.4f}; "
          f"test AUROC {after.test.auroc:.4f} (calibration keeps the ranking)")
    if any(args.run.glob(runs.attention_file("*"))):
        print(f"the Grad-CAM audit still lists the old probabilities: python train.py explain --run {args.run}")
    if any(args.run.glob(runs.stress_file("*"))):
        print(f"the stress test still lists the old probabilities: python train.py stress --run {args.run}")
    if any(args.run.glob(runs.acquisition_file("*"))):
        print(f"the acquisition stress test still lists the old probabilities: python train.py stress --run "
              f"{args.run} --suite acquisition")
    if (args.run / runs.OOD_SUMMARY).is_file():
        print(f"the OOD summary's mistake rates use the old decisions: python train.py index --run {args.run}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from core.evaluation import evaluate_external, evaluate_run

    if args.data is None:
        if args.name is not None:
            raise ValueError("--name names an external set: give it with --data LABELS.csv --images DIR")
        evaluate_run(args.run, args.device)
        return
    report = evaluate_external(args.run, args.data, args.images, args.device, args.name)
    low, high = report.auroc_ci
    print(f"{report.name}: {report.n} images, AUROC {report.auroc:.4f} (95% CI {low:.3f}–{high:.3f})")
    youden = report.at_threshold.get("youden")
    if youden is not None:
        print(f"at the run's val Youden threshold {youden.threshold:.3f}: sensitivity {youden.sensitivity:.3f}, "
              f"specificity {youden.specificity:.3f}")
    if report.shift is not None:
        print_shift(report.shift)
    print(f"wrote {runs.external_metrics_file(report.name)} and "
          f"{runs.predictions_file(runs.external_split(report.name))} in {args.run}; the dashboard offers the set "
          "as a data set")
    if report.ood is None:
        print(f"no embedding index in {args.run}: `python train.py index --run {args.run}` adds the OOD flag")
        return
    print(f"out of distribution: {100 * report.ood.share_flagged:.1f} % of the images flagged")
    for name, part in (("unflagged", report.ood.unflagged), ("flagged", report.ood.flagged)):
        if part is not None:
            at = part.at_threshold["youden"]
            auroc = "n/a" if part.auroc is None else f"{part.auroc:.4f}"
            print(f"  {name:<9} n {part.n:>5}  AUROC {auroc}  sensitivity {at.sensitivity:.3f}  "
                  f"specificity {at.specificity:.3f}")


def print_shift(report: ShiftReport) -> None:
    verdict = "SHIFTED" if report.shifted else "not shifted"
    print(f"shift check against val: {verdict} (p = {report.p_value:.3g}, {report.adjustment}; "
          f"false-alarm rate {report.alpha:g})")
    for name, test in report.tests.items():
        print(f"  {name:<12} p {test.p_value:.3g}, flagged {100 * test.share_flagged:.1f} % "
              f"(val {100 * test.share_flagged_reference:.1f} %)  {test.test}")
    for name, mix in report.case_mix.items():
        print(f"  case mix, {name}: p {mix.p_value:.3g} ({mix.test}; moved by the malignant share too, "
              "not part of the verdict)")
    print(report.advice)


def image_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--images {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return files


def cmd_site(args: argparse.Namespace) -> None:
    from core import sites
    from core.evaluation import predict_labelled

    runs.check_name(args.name, "site")
    if (args.run / runs.site_file(args.name)).exists() and not args.overwrite:
        raise ValueError(f"{args.run / runs.site_file(args.name)} already holds the site profile '{args.name}'; "
                         "choose another --name or pass --overwrite")
    frame, _, _ = predict_labelled(args.run, args.data, args.images, args.device, with_guard=False)
    source = SampleSource(data=str(Path(args.data).resolve()), images=str(Path(args.images).resolve()))
    profile = sites.make_profile(args.run, args.name, frame, source, args.target_sensitivity, args.rule,
                                 args.confidence, args.sample_date)
    path = runs.write_site_profile(args.run, profile, args.overwrite)
    point = profile.point
    low, high = point.sensitivity_ci
    s_low, s_high = point.specificity_ci
    print(f"site '{args.name}': threshold {point.threshold:.4f} from {point.n} images "
          f"({point.n_malignant} malignant), rule {point.rule}: {point.guarantee}")
    print(f"expected sensitivity {point.expected_sensitivity:.3f} (95 % interval {low:.3f}–{high:.3f}); "
          f"specificity {point.expected_specificity:.3f} ({s_low:.3f}–{s_high:.3f}, on the sample's benign cases)")
    print(f"wrote {path}; use it with `python train.py predict --run {args.run} --site {args.name} …` or pick it on "
          "the dashboard's Predict page")


def cmd_shift(args: argparse.Namespace) -> None:
    from core.audit import shift
    from core.predictor import Predictor

    files = image_files(args.images)
    predictor = Predictor.load(args.run, args.device)
    shift.require_index(predictor.ood, args.run)  # before minutes of predictions
    batch = predictor.predict_files(files)
    for message in batch.failed:
        print(f"skipped: {message}", file=sys.stderr)
    if batch.features is None:
        raise DataError(f"none of the {len(files)} image files in {args.images} could be read")
    report = shift.against_val(args.run, batch.frame["probability"].to_numpy(), batch.features, predictor.ood,
                               args.alpha)
    report = dataclasses.replace(report, images=str(Path(args.images).resolve()))
    print_shift(report)
    if args.out is not None:
        runs.write_shift_report(args.out, report)
        print(f"wrote {args.out}")


def cmd_predict(args: argparse.Namespace) -> None:
    from core import sites
    from core.predictor import Predictor, decisions

    files = image_files(args.images)
    predictor = Predictor.load(args.run, args.device)
    threshold, source = None, ""
    if args.site is not None:
        threshold, source = sites.load_profile(args.run, args.site).point.threshold, f"site '{args.site}'"
    elif "youden" in predictor.thresholds:
        threshold, source = predictor.thresholds["youden"], "the run's val Youden threshold"
    else:
        print(f"note: {args.run} has no val thresholds (`python train.py evaluate --run {args.run}`) and no --site "
              "was given, so the threshold and decision columns stay empty", file=sys.stderr)
    if predictor.ood is None:
        print(f"note: {args.run} has no embedding index, so ood_score and out_of_distribution stay empty and no "
              f"decision is withheld; `python train.py index --run {args.run}` builds it", file=sys.stderr)
    batch = predictor.predict_files(files)
    for message in batch.failed:
        print(f"skipped: {message}", file=sys.stderr)
    if batch.frame.empty:
        raise DataError(f"none of the {len(files)} image files in {args.images} could be read")
    frame = batch.frame.assign(threshold=threshold, decision=None)
    if threshold is not None:
        frame["decision"] = decisions(frame["probability"], frame["out_of_distribution"], frame["unlike_in_content"],
                                      threshold, site=args.site is not None)
    runs.write_csv(args.out, frame, float_format=None)  # full precision: the threshold is one of the p
    counts = frame["decision"].value_counts()
    print(f"wrote {len(frame)} predictions to {args.out}"
          + (f" at threshold {threshold:.4f} ({source}): " + ", ".join(
              f"{counts.get(d, 0)} {d}" for d in ("malignant", "benign", "withheld")) if threshold is not None else ""))


def cmd_explain(args: argparse.Namespace) -> None:
    from core.audit.attention import explain_split

    summary = explain_split(args.run, args.split, args.method, args.limit, corner_threshold=args.corner_threshold,
                            device_name=args.device)
    flagged, by = summary.flagged, summary.by_correctness
    print(f"{summary.n} {args.split} images, {args.method}: {flagged.flagged} corner-focused "
          f"({100 * flagged.rate:.1f} %; rule {summary.corner_flag_rule}); "
          f"correct {100 * by['correct'].rate:.1f} % vs incorrect {100 * by['incorrect'].rate:.1f} % flagged; "
          f"AUROC flagged {summary.auroc.flagged:.3f}"
          f" vs unflagged {summary.auroc.unflagged:.3f}")
    print(f"wrote attention_{args.split}.csv, cams_{args.split}.npz and attention_summary.json in {args.run}")


def cmd_stress(args: argparse.Namespace) -> None:
    if args.suite == "acquisition":
        return stress_acquisition(args)
    if args.edits:
        raise ValueError("--edits names acquisition edits; add --suite acquisition")
    from core.audit.stress import stress_split

    section = stress_split(args.run, args.split, args.interventions, args.limit, args.seed, args.min_delta,
                           args.device, train_corners=not args.no_train_corners)
    print(f"{section.n} {args.split} images at the val Youden threshold {section.threshold_youden_val:.3f}: "
          f"clean AUROC {section.clean.auroc:.4f}")
    print(f"{'intervention':<16} {'AUROC':>7} {'change':>7} {'flipped':>8} {'→mal':>6} {'→ben':>6} {'mean Δp':>8}")
    for name, row in section.interventions.items():
        print(f"{name:<16} {row.auroc:7.4f} {row.auroc_change:+7.4f} {100 * row.flipped:7.1f}% "
              f"{100 * row.to_malignant:5.1f}% {100 * row.to_benign:5.1f}% {row.mean_delta_p:+8.3f}")
    dependent = section.corner_dependent
    print(f"corner-dependent decisions: {dependent.n} ({100 * dependent.rate:.1f} %; {dependent.rule})")
    print(f"wrote stress_{args.split}.csv and stress_summary.json in {args.run}")


def stress_acquisition(args: argparse.Namespace) -> None:
    from core.audit.stress import ACQUISITION_LIMIT, acquisition_split

    if args.interventions:
        raise ValueError("--interventions names artifacts; the acquisition suite takes --edits")
    limit = ACQUISITION_LIMIT if args.limit is None else args.limit
    section = acquisition_split(args.run, args.split, args.edits, limit, args.seed, args.device)
    floor, holds = section.floor, section.holds
    print(f"{section.n} of {section.split_size} {args.split} images at the val Youden threshold "
          f"{section.threshold_youden_val:.3f}: clean AUROC {section.clean.auroc:.4f}; floor "
          f"{100 * floor.rate:.1f} % ({floor.rule}: {', '.join(floor.edits)})")
    print(f"{'edit':<22} {'kind':<8} {'n':>5} {'flipped (95 % CI)':>20} {'× floor':>8} {'→mal':>6} {'→ben':>6} "
          f"{'AUROC Δ':>8}")
    for name, row in section.edits.items():
        low, high = row.flipped_ci
        times = (f"{row.times_floor:8.1f}" if row.times_floor is not None
                 else f"{'—' if row.floor is not None else '':>8}")
        print(f"{name:<22} {row.kind:<8} {row.n:5d} {100 * row.flipped:6.1f}% ({100 * low:4.1f}–"
              f"{100 * high:4.1f}) {times} {100 * row.to_malignant:5.1f}% {100 * row.to_benign:5.1f}% "
              f"{row.auroc_change:+8.4f}")
    verdict = "holds" if holds.passed else f"does not hold ({', '.join(holds.failing)} above the limit)"
    print(f"{holds.rule} (≤ {100 * holds.limit:.1f} %): {verdict}")
    print(f"wrote {runs.acquisition_file(args.split)} and {runs.ACQUISITION_SUMMARY} in {args.run}")


def cmd_index(args: argparse.Namespace) -> None:
    from core.audit.ood import build_index

    summary = build_index(args.run, args.device, args.method, args.dims, args.k, args.percentile)
    rates, mistakes = summary.flag_rate, summary.mistakes_test
    q = summary.percentile if summary.union_percentile is None else summary.union_percentile
    print(f"index of the training split: {summary.raw_dims} → {summary.dims} dims (PCA); OOD score "
          f"{summary.method}, threshold {summary.threshold:.4f} = val {q:.2f}th percentile")
    if summary.style_threshold is not None:
        print(f"style statistics: {summary.style_raw_dims} → {summary.style_dims} dims, threshold "
              f"{summary.style_threshold:.4f} = val {q:.2f}th percentile; an image is flagged when either "
              f"distance is above its threshold ({100 - summary.percentile:g} % of val)")
    print(f"flagged: val {100 * rates['val']:.1f} % (by construction), test {100 * rates['test']:.1f} %; test mistakes "
          f"{100 * mistakes.flag_rate_mistakes:.1f} % vs correct {100 * mistakes.flag_rate_correct:.1f} % "
          f"(AUROC of the score for a mistake: {mistakes.auroc_score_for_mistake})")
    print(f"wrote index.safetensors, ood_scores.csv and ood_summary.json in {args.run}")


DEVICES = field_choices()["device"]


def add_run_and_device(parser: argparse.ArgumentParser) -> None:
    """The two arguments every command on a trained run takes, with the same meaning and default everywhere."""
    parser.add_argument("--run", type=Path, required=True, help="run directory (a trained run or an ensemble)")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="auto: a CUDA GPU if there is one, else the CPU (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    add_download_parser(sub)

    p = sub.add_parser("split", help="lesion-wise, near-duplicate-aware train/val/test split")
    data = p.add_argument_group("data")
    data.add_argument("--data-dir", help="HAM10000 folder, or a label CSV (ISIC 2018/2019 ground truth, image,label)")
    data.add_argument("--images", help="image folder, when --data-dir is a label CSV")
    out = p.add_argument_group("split")
    out.add_argument("--out", type=Path, default=Path(DEFAULT_SPLIT_FILE),
                     help="split file to write (default: %(default)s)")
    out.add_argument("--fractions", type=float, nargs=3, default=[0.70, 0.15, 0.15], metavar=("TRAIN", "VAL", "TEST"))
    out.add_argument("--seed", type=int, default=0)
    out.add_argument("--folds", type=int, default=0, help="also write an N-fold assignment of train+val")
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("fit", help="train a model into a run directory, then evaluate it")
    run = p.add_argument_group("run")
    run.add_argument("--config", type=Path, help="YAML config (e.g. configs/default.yaml); flags override it")
    run.add_argument("--out", type=Path, help="run directory to create")
    run.add_argument("--resume", type=Path, help="continue the interrupted run in this directory")
    run.add_argument("--overwrite", action="store_true", help="train into --out even if it holds a run")
    add_config_arguments(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("cv", help="lesion-wise k-fold cross-validation over train+val: mean ± sd of every metric; "
                       "--by source: leave one source out (a new clinic)")
    run = p.add_argument_group("cross-validation")
    run.add_argument("--by", choices=["fold", "source"], default="fold",
                     help="fold: k lesion-wise folds (default); source: train on the other sources, test on each "
                     "held-out source's every image")
    run.add_argument("--hold-out", nargs="+", metavar="SOURCE",
                     help="with --by source: only these sources (default: every source of the split)")
    run.add_argument("--config", type=Path, help="YAML config (e.g. configs/default.yaml); flags override it")
    run.add_argument("--out", type=Path, required=True, help="folder for fold<k>/ run directories and the summary")
    run.add_argument("--folds-file", default=DEFAULT_FOLDS_FILE,
                     help="fold assignment of train+val (default: %(default)s; `train.py split --folds 5` makes it)")
    run.add_argument("--only-folds", type=int, nargs="+", help="train only these folds (e.g. one per machine)")
    add_config_arguments(p)
    p.set_defaults(func=cmd_cv)

    from core.train.shipped import RECIPE
    p = sub.add_parser("shipped", help="rebuild the shipped model from configs/shipped: every stage of every member "
                       "from the ImageNet weights, then ensemble, calibrate, evaluate, explain, stress-test, index")
    run = p.add_argument_group("replay")
    run.add_argument("--out", type=Path, required=True,
                     help="the shipped run to create (its stages go to OUT_stages beside it)")
    run.add_argument("--recipe", type=Path, default=RECIPE, help="the member chains (default: %(default)s)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace a run in --out, and retrain stages whose config changed")
    run.add_argument("--limit", type=int, help="audit and stress-test N images a split (default: as shipped)")
    p.epilog = ("Any training flag below is set on every stage: --device cuda; a candidate recipe through the "
                "whole chain (e.g. --camera-consistency 5); or a smoke replay (--epochs 1 --input-size 64 "
                "--train-limit 64), whose figures are not the shipped model's.")
    add_config_arguments(p)
    p.set_defaults(func=cmd_shipped)

    p = sub.add_parser("ensemble", help="one run directory averaging the P(malignant) of trained runs")
    p.add_argument("--members", type=Path, nargs="+", required=True, help="trained run directories")
    p.add_argument("--out", type=Path, required=True, help="run directory to create")
    p.add_argument("--tta-views", type=int, choices=[1, 2, 3, 4], help="flip views the ensemble averages (1: none; "
                   "2: identity + horizontal; 4: all four; default: the first member's)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.set_defaults(func=cmd_ensemble)

    p = sub.add_parser("calibrate", help="fit Platt scaling of P(malignant) on val, write it to the run's config, "
                       "evaluate again")
    add_run_and_device(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("evaluate", help="metrics of a run on val and test, or on another labelled set")
    add_run_and_device(p)
    p.add_argument("--data", help="a label CSV (ISIC 2018/2019 ground truth or image,label) instead of the split")
    p.add_argument("--images", help="image folder for --data")
    p.add_argument("--name", help="the set's name in the run and the dashboard (default: the label file's stem)")
    p.set_defaults(func=cmd_evaluate)

    from core import sites
    from core.audit import shift
    p = sub.add_parser("site", help="a site's own operating point: the threshold for a target sensitivity, chosen "
                       "on a labelled sample of that site's images (sites/NAME.json in the run)")
    add_run_and_device(p)
    p.add_argument("--name", required=True, help="the site's name (letters, digits, _ - .)")
    p.add_argument("--data", required=True, help="the sample's label CSV (image,label; or ISIC ground truth)")
    p.add_argument("--images", required=True, help="the sample's image folder")
    p.add_argument("--target-sensitivity", type=float, default=sites.DEFAULT_TARGET,
                   help="sensitivity to reach on the site (default: %(default)s)")
    p.add_argument("--rule", choices=sites.RULES, default=sites.DEFAULT_RULE,
                   help="sample: sensitivity ≥ target on the sample only; conformal: expected sensitivity on new "
                   "cases ≥ target; pac: ≥ target with probability --confidence (default: %(default)s)")
    p.add_argument("--confidence", type=float, default=sites.DEFAULT_CONFIDENCE,
                   help="for --rule pac (default: %(default)s)")
    p.add_argument("--sample-date", help="when the sample was taken, YYYY-MM-DD (default: today)")
    p.add_argument("--overwrite", action="store_true", help="replace a site profile of the same name")
    p.set_defaults(func=cmd_site)

    p = sub.add_parser("shift", help="is a folder of images, as a whole, unlike the val split the thresholds were "
                       "chosen on? (two-sample tests with a p-value)")
    add_run_and_device(p)
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--alpha", type=float, default=shift.DEFAULT_ALPHA,
                   help="false-alarm rate of the verdict (default: %(default)s)")
    p.add_argument("--out", type=Path, help="write the report as JSON here")
    p.set_defaults(func=cmd_shift)

    p = sub.add_parser("predict", help="P(malignant) and a decision for every image in a folder")
    add_run_and_device(p)
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--out", type=Path, required=True,
                   help="CSV to write: image, probability, ood_score, out_of_distribution, threshold, decision")
    p.add_argument("--site", help="decide at this site profile's threshold (train.py site) instead of the run's "
                   "val Youden threshold")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("explain", help="Grad-CAM + attention scores for every image of a split")
    add_run_and_device(p)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--method", default="gradcam", choices=["gradcam", "gradcam++", "hirescam", "layercam"])
    p.add_argument("--limit", type=int, help="only the first N images (a quick look)")
    p.add_argument("--corner-threshold", type=float, default=0.5,
                   help="flag attention as corner-focused when corner_fraction >= this (uniform = 0.25)")
    p.set_defaults(func=cmd_explain)

    from core.audit.acquisition import COLOUR_PREFIX, EDITS
    from core.audit.interventions import DEFAULT_MIN_DELTA, INTERVENTIONS
    p = sub.add_parser("stress", help="artifact stress test: p before and after painting vignettes, corner fills, "
                       "ink, rulers and hairs beside the lesion; --suite acquisition: before and after another "
                       "camera's JPEG, resolution, focus, white balance, tone curve and colours")
    add_run_and_device(p)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--suite", default="artifacts", choices=["artifacts", "acquisition"],
                   help="artifacts painted beside the lesion (default) or acquisition edits of the whole image, read "
                   "against the neutral-edit floor")
    p.add_argument("--interventions", nargs="+", choices=list(INTERVENTIONS), metavar="NAME",
                   help=f"artifacts to run (default: all of {', '.join(INTERVENTIONS)})")
    p.add_argument("--edits", nargs="+", metavar="NAME",
                   help=f"acquisition edits to run (default: all of {', '.join(EDITS)} and {COLOUR_PREFIX}<source> "
                   "for each source of the training split)")
    p.add_argument("--limit", type=int, help="artifacts: only N random images of the split (and of train, for the "
                   "dark-corner table); acquisition: N random images (default 500, 0 = all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random artifacts (ink, ruler, hair), of the random "
                   "--limit sample, and of the training images that give each source's colours")
    p.add_argument("--min-delta", type=float, default=DEFAULT_MIN_DELTA,
                   help="|Δp| that makes a decision corner-dependent even without a flip (default: %(default)s)")
    p.add_argument("--no-train-corners", action="store_true",
                   help="skip the table of dark corners by class on the training split")
    p.set_defaults(func=cmd_stress)

    from core.audit.ood import DEFAULT_DIMS, DEFAULT_K, DEFAULT_PERCENTILE
    p = sub.add_parser("index", help="embedding index of the training split and the out-of-distribution threshold "
                       "(the val split's percentile)")
    add_run_and_device(p)
    p.add_argument("--method", default="knn", choices=["knn", "mahalanobis"],
                   help="OOD score: distance to the k-th nearest training image, or class-conditional Mahalanobis "
                   "(default: %(default)s; benchmarks/ood_scores.py compares them)")
    p.add_argument("--dims", type=int, default=DEFAULT_DIMS, help="PCA dimensions kept (default: %(default)s)")
    p.add_argument("--k", type=int, default=DEFAULT_K, help="k of the knn score (default: %(default)s)")
    p.add_argument("--percentile", type=float, default=DEFAULT_PERCENTILE,
                   help="val percentile of the score that becomes the threshold (default: %(default)s)")
    p.set_defaults(func=cmd_index)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (DataError, runs.RunError, TrainingError, DeviceError, ValueError) as err:  # SiteError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM during fit: the shell's exit status for that signal
        return 128 + (signal.SIGTERM if isinstance(err, Interrupted) else signal.SIGINT)
    return 0


if __name__ == "__main__":
    sys.exit(main())

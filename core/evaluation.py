"""Evaluation of a trained run: val and test predicted with the best weights, thresholds chosen on val and applied
to test (never chosen on test), Platt calibration fitted on val, and labelled sets from outside the split."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pandas as pd
import torch

from core import metrics, runs, sites
from core.audit import ood, shift
from core.calibration import apply_platt, fit_platt
from core.data import read_dataset
from core.inference import device_description
from core.run import Predictions, load
from core.run_files import ExternalMetrics, Metrics, SourceReport, parse


def predict_labelled(run_dir: str | Path, data: str, images: str | None, device_name: str = "auto",
                     with_guard: bool = True) -> tuple[pd.DataFrame, Predictions, ood.OODGuard | None]:
    """A labelled set (any format ``core.data.read_dataset`` reads) predicted by the run, its predictions (with the
    images' features when there is a guard) and (``with_guard``) the run's OOD guard (None without an index)."""
    run = load(run_dir, device_name)
    guard = ood.OODGuard.load_if_built(run_dir, run.config) if with_guard else None
    frame, predictions = run.predict_frame(read_dataset(data, images), features=guard is not None)
    return frame, predictions, guard


def evaluate_external(run_dir: str | Path, data: str, images: str | None, device_name: str = "auto",
                      name: str | None = None) -> ExternalMetrics:
    """A labelled set from outside the split (ISIC ground truth, image,label CSV, a HAM10000-shaped folder): the
    run's val-chosen thresholds are applied, never new ones chosen, and the set is checked for a shift against val
    (``core.audit.shift``). Writes predictions_external_<name>.csv (each image's ``file`` under the image folder, which
    the report records, so the dashboard can show it) and metrics_external_<name>.json; the prefix keeps a set named
    e.g. ``val`` from overwriting the run's own split outputs. ``name`` defaults to the label file's stem."""
    run_dir = Path(run_dir)
    given, name = name is not None, name or Path(data).stem
    try:
        runs.check_name(name, "set")
    except runs.RunError as err:
        if given:
            raise
        raise runs.RunError(f"{err}; give the set a name with --name") from err
    frame, predictions, guard = predict_labelled(run_dir, data, images, device_name)
    # Every reader lists one folder (core.data.attach_image_paths): the file name finds the image there again.
    image_root = Path(frame["path"].iloc[0]).parent.resolve()
    frame["file"] = [Path(path).name for path in frame["path"]]
    thresholds = runs.read_metrics(run_dir).thresholds
    labels, probs = frame["label"].to_numpy(), frame["probability"].to_numpy()
    sources = parse(SourceReport, metrics.source_report(frame, thresholds)) if "source" in frame.columns else None
    flagged = None
    if guard is not None:  # how much of the set is unlike the training data, and how the model does on each part
        frame = pd.concat([frame.reset_index(drop=True), guard.assess(predictions.features)], axis=1)
        flagged = ood.flagged_report(frame, thresholds, guard.threshold)
    checked = guard is not None and len(frame) >= shift.MIN_IMAGES  # the set-level shift check needs a few images
    report = ExternalMetrics(
        name=name, n=len(frame), data=str(Path(data).resolve()), images=str(image_root),
        date=time.strftime("%Y-%m-%d"), model=sites.model_fingerprint(run_dir), auroc=metrics.auroc(labels, probs),
        auroc_ci=metrics.bootstrap_auroc_ci(labels, probs),
        at_threshold=metrics.at_thresholds(labels, probs, thresholds),
        sources=sources, ood=flagged,
        shift=shift.against_val(run_dir, probs, predictions.features, guard) if checked else None)
    runs.write_predictions(frame, run_dir / runs.predictions_file(runs.external_split(name)))
    runs.write_external(run_dir, report)
    return report


def evaluate_run(run_dir: str | Path, device_name: str = "auto", calibrate: bool = False) -> Metrics:
    """Predict val and test with the best checkpoint; thresholds chosen on val, applied to test.
    Writes predictions_{val,test}.csv and metrics.json. With ``calibrate``, Platt scaling is first fitted on the raw
    val probabilities and written into config.yaml as well; everything is computed before anything is written, so
    a failure (no data here, Ctrl-C) leaves the run as it was."""
    run_dir = Path(run_dir)
    run = load(run_dir, device_name)
    cfg, frames = run.config, run.splits()
    raw = {name: frames[name].assign(probability=run.predict(run.load_images(frames[name]["path"].tolist()),
                                                             calibrated=False).probability)
           for name in ("val", "test")}
    if calibrate:
        cfg = dataclasses.replace(cfg, calibration=list(fit_platt(raw["val"]["label"], raw["val"]["probability"])))
    predictions = {name: frame.assign(probability=apply_platt(torch.tensor(frame["probability"].to_numpy()),
                                                                tuple(cfg.calibration)).numpy())
                   for name, frame in raw.items()}
    val, test = predictions["val"], predictions["test"]
    found = metrics.threshold_report(val["label"].to_numpy(), val["probability"].to_numpy(),
                                     test["label"].to_numpy(), test["probability"].to_numpy())
    test_bands = test.assign(age_band=metrics.age_band(test["age"])) if "age" in test.columns else test
    if "source" in test.columns:  # where each image was taken: per-source metrics at the val thresholds
        found |= {f"sources_{name}": metrics.source_report(frame, found["thresholds"])
                  for name, frame in predictions.items()}
    found |= {
        "calibration_test": metrics.calibration(test["label"].to_numpy(), test["probability"].to_numpy()),
        "subgroups_test": json.loads(metrics.subgroup_auroc(test_bands).to_json(orient="records")),  # NaN → null
        "run": {"model": cfg.model, "ensemble": cfg.ensemble, "input_size": cfg.input_size,
                "tta_views": cfg.tta_views,
                "calibration": list(cfg.calibration),
                "n_val": len(val), "n_test": len(test), "evaluated_on": device_description(run.device),
                "date": time.strftime("%Y-%m-%d")},
    }
    report = parse(Metrics, found)  # the metric functions' plain dicts, checked against the file's type
    for name, frame in predictions.items():
        runs.write_predictions(frame, run_dir / runs.predictions_file(name))
    runs.write_metrics(run_dir, report)
    if calibrate:
        runs.write_config(cfg, run_dir)
    low, high = report.test.auroc_ci
    print(f"test AUROC {report.test.auroc:.4f} (95% CI {low:.3f}–{high:.3f}); "
          f"val AUROC {report.val.auroc:.4f}; wrote {run_dir}/metrics.json")
    return report


def calibrate_run(run_dir: str | Path, device_name: str = "auto") -> tuple[Metrics | None, Metrics]:
    """Fit Platt scaling on the run's raw val probabilities, write it into ``config.yaml`` and evaluate with it, so
    thresholds are re-chosen on the calibrated val probabilities. Returns the metrics before (None if the run had
    none) and after. Fitted on raw probabilities, so calibrating again gives the same result."""
    run_dir = Path(run_dir)
    before = runs.read_metrics(run_dir) if (run_dir / runs.METRICS_FILE).is_file() else None
    return before, evaluate_run(run_dir, device_name, calibrate=True)

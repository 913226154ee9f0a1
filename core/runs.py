"""A run directory read back by viewers (the dashboard): what it holds, and clear errors for what it lacks.

``train.py fit`` writes config + weights; ``evaluate`` adds metrics and predictions; ``explain`` adds the attention
audit. A viewer needs to know which of these exist, so each reader names the missing file and the command that
makes it instead of failing somewhere deeper.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from core.checkpoint import MODEL_FILE
from core.config import TrainConfig
from core.data import PROJECT_ROOT
from core.ensemble import member_configs

PREDICTION_COLUMNS = ("image_id", "label", "probability")
ATTENTION_COLUMNS = ("image_id", "corner_fraction", "border_fraction", "flag", "dark_corner_score")
HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_auroc")
STRESS_COLUMNS = ("image_id", "intervention", "p_clean", "p", "delta_p", "flipped")
STRESS_SUMMARY = "stress_summary.json"
OOD_SCORES = "ood_scores.csv"        # val and test: ood_score, out_of_distribution (train.py index)
OOD_SUMMARY = "ood_summary.json"
OOD_COLUMNS = ("image_id", "split", "ood_score", "out_of_distribution")
DEFAULT_RUN = PROJECT_ROOT / "models" / "default"


class RunError(ValueError):
    """A run directory, or one of its files, is missing or unreadable; the message says which and how to fix it."""


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.yaml").is_file() and (path / MODEL_FILE).is_file()


def find_runs(*roots: str | Path) -> list[Path]:
    """Run directories in ``roots`` (each a run itself or a folder of runs), sorted by name, without repeats."""
    found: dict[Path, None] = {}
    for root in map(Path, roots):
        candidates = [root] if is_run_dir(root) else sorted(p for p in root.glob("*") if p.is_dir())
        found.update((p.resolve(), None) for p in candidates if is_run_dir(p))
    return list(found)


def _fix(run: Path, command: str) -> str:
    return f"run `python train.py {command} --run {run}` to make it"


def read_config(run: str | Path) -> TrainConfig:
    run = Path(run)
    if not run.is_dir():
        raise RunError(f"run directory {run} does not exist")
    if not is_run_dir(run):
        raise RunError(f"{run} is not a run directory: it needs config.yaml and {MODEL_FILE} "
                       f"(written by `python train.py fit --out {run}`)")
    try:
        return TrainConfig.from_yaml(run / "config.yaml")
    except Exception as err:  # any parse or field error means the same thing to the user
        raise RunError(f"{run / 'config.yaml'} is not a valid run config ({err})") from err


def _read_json(path: Path, fix: str) -> dict:
    if not path.is_file():
        raise RunError(f"{path} is missing; {fix}")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunError(f"{path} is not readable JSON ({err}); {fix} again") from err


def read_metrics(run: str | Path) -> dict:
    path, fix = Path(run) / "metrics.json", _fix(Path(run), "evaluate")
    report = _read_json(path, fix)
    for key in ("thresholds", "val", "test"):
        if key not in report:
            raise RunError(f"{path} has no '{key}' section; {fix} again")
    return report


def _read_csv(path: Path, required: tuple[str, ...], fix: str) -> pd.DataFrame:
    if not path.is_file():
        raise RunError(f"{path} is missing; {fix}")
    try:
        frame = pd.read_csv(path, dtype={"image_id": str, "lesion_id": str})
    except (OSError, ValueError) as err:
        raise RunError(f"{path} is not a readable CSV ({err}); {fix} again") from err
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise RunError(f"{path} lacks column(s) {', '.join(missing)}; {fix} again")
    return frame


def read_predictions(run: str | Path, split: str) -> pd.DataFrame:
    """``predictions_<split>.csv``: image_id, lesion_id, dx, label, probability and the metadata columns."""
    return _read_csv(Path(run) / f"predictions_{split}.csv", PREDICTION_COLUMNS, _fix(Path(run), "evaluate"))


def read_attention(run: str | Path, split: str = "test") -> pd.DataFrame:
    """``attention_<split>.csv``: the Grad-CAM attention scores of every image (``train.py explain``)."""
    return _read_csv(Path(run) / f"attention_{split}.csv", ATTENTION_COLUMNS,
                     _fix(Path(run), f"explain --split {split}"))


def read_cams(run: str | Path, split: str = "test") -> dict[str, np.ndarray]:
    """The stored CAMs of a split: image_id → uint8 map, 255 = most attended (56×56; 42×56 for a frame-crop run)."""
    path = Path(run) / f"cams_{split}.npz"
    if not path.is_file():
        raise RunError(f"{path} is missing; {_fix(Path(run), f'explain --split {split}')}")
    try:
        with np.load(path, allow_pickle=False) as store:
            return dict(zip(store["image_id"].tolist(), store["cam"]))
    except (OSError, ValueError, KeyError) as err:
        raise RunError(f"{path} is not a readable CAM store ({err}); {_fix(Path(run), 'explain')} again") from err


def read_stress(run: str | Path, split: str = "test") -> pd.DataFrame:
    """``stress_<split>.csv``: p of every image before and after each intervention (``train.py stress``)."""
    return _read_csv(Path(run) / f"stress_{split}.csv", STRESS_COLUMNS, _fix(Path(run), f"stress --split {split}"))


def read_stress_summary(run: str | Path, split: str = "test") -> dict:
    """This split's section of ``stress_summary.json``: per intervention AUROC, flips and Δp, the corner flag."""
    path, fix = Path(run) / STRESS_SUMMARY, _fix(Path(run), f"stress --split {split}")
    summary = _read_json(path, fix)
    if split not in summary or "interventions" not in summary[split]:
        raise RunError(f"{path} has no '{split}' section; {fix}")
    return summary[split]


def read_ood_scores(run: str | Path, split: str = "test") -> pd.DataFrame:
    """This split's rows of ``ood_scores.csv``: each image's distance to the training data and its flag."""
    frame = _read_csv(Path(run) / OOD_SCORES, OOD_COLUMNS, _fix(Path(run), "index"))
    frame = frame[frame["split"] == split].drop(columns="split").reset_index(drop=True)
    return frame.assign(out_of_distribution=frame["out_of_distribution"].astype(bool))


def read_ood_summary(run: str | Path) -> dict:
    """``ood_summary.json``: the OOD score's method and threshold, flag rates, and the test mistakes' scores."""
    return _read_json(Path(run) / OOD_SUMMARY, _fix(Path(run), "index"))


def read_members(run: str | Path) -> dict[str, TrainConfig]:
    """An ensemble run's members (``members/<name>`` → its training config); empty for a single model."""
    cfg = read_config(run)
    try:
        return dict(zip(cfg.ensemble, member_configs(Path(run), cfg)))
    except Exception as err:
        raise RunError(f"{err}; rebuild it with `python train.py ensemble`") from err


def read_history(run: str | Path) -> pd.DataFrame:
    return _read_csv(Path(run) / "history.csv", HISTORY_COLUMNS, f"it is written by `python train.py fit --out {run}`")


def model_label(cfg: TrainConfig) -> str:
    """What a run predicts with: the architecture, or "ensemble of N: member + member"."""
    if not cfg.ensemble:
        return cfg.model
    return f"ensemble of {len(cfg.ensemble)}: " + " + ".join(Path(m).name for m in cfg.ensemble)


def run_summary(run: str | Path) -> dict:
    """One row of the runs table: what was trained and how it scored (NaN where the run was not evaluated)."""
    run = Path(run)
    cfg = read_config(run)
    row = {"run": run.name, "path": str(run), "model": model_label(cfg), "input_size": cfg.input_size,
           "crop": cfg.crop, "normalization": cfg.normalization, "epochs": cfg.epochs, "ema_decay": cfg.ema_decay,
           "tta_flips": cfg.tta_flips}
    nan = float("nan")
    try:
        report = read_metrics(run)
    except RunError:
        return row | {"val_auroc": nan, "test_auroc": nan, "test_auroc_ci_low": nan, "test_auroc_ci_high": nan,
                      "test_balanced_accuracy_youden": nan}
    low, high = report["test"].get("auroc_ci", [nan, nan])
    return row | {"val_auroc": report["val"]["auroc"], "test_auroc": report["test"]["auroc"],
                  "test_auroc_ci_low": low, "test_auroc_ci_high": high,
                  "test_balanced_accuracy_youden":
                      report["test"]["at_threshold"].get("youden", {}).get("balanced_accuracy", nan)}

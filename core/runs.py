"""The run directory's format, owned here: every file's name, and every reader and writer of them.

``train.py fit`` writes config + weights; ``evaluate`` adds metrics and predictions; ``explain`` the attention audit;
``stress`` the artifact stress test; ``index`` the embedding index and OOD scores. Everything else goes through this
module, so a missing or damaged file always gets the same :class:`RunError`, naming it and the command that makes it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
from safetensors import safe_open

from core.config import RunConfig
from core.data import PROJECT_ROOT
from core.io import atomic_write, atomic_write_text
from core.run_files import (
    AcquisitionSection,
    AttentionSummary,
    ExternalMetrics,
    FieldError,
    Metrics,
    OODSummary,
    ShiftReport,
    SiteProfile,
    StressSection,
    dump,
    parse,
)

CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.safetensors"     # the best weights (fp16)
STATE_FILE = "last.safetensors"      # the last committed epoch, for --resume
STATE_META = "last.json"             # a readable copy of its counters
HISTORY_FILE = "history.csv"
LINEAGE_FILE = "lineage.csv"         # a fine-tuned run's earlier stages' histories (stage + history columns)
METRICS_FILE = "metrics.json"
MEMBERS_DIR = "members"              # an ensemble's members/<name>/config.yaml (+ history.csv)
ATTENTION_SUMMARY = "attention_summary.json"
STRESS_SUMMARY = "stress_summary.json"
ACQUISITION_SUMMARY = "acquisition_summary.json"  # the acquisition stress test (train.py stress --suite acquisition)
INDEX_FILE = "index.safetensors"     # the training split's embeddings (train.py index)
STYLE_INDEX_FILE = "index_style.safetensors"  # … and their style statistics (earlier stages), for the same guard
OOD_SCORES = "ood_scores.csv"        # val and test: ood_score, out_of_distribution (train.py index)
OOD_SUMMARY = "ood_summary.json"
SITES_DIR = "sites"                  # sites/<name>.json: a site's operating point (train.py site)
EXTERNAL_PREFIX = "external_"        # an evaluated labelled set's split key: predictions_external_<name>.csv

PREDICTION_COLUMNS = ("image_id", "label", "probability")
PREDICTION_ORDER = ("image_id", "lesion_id", "dx", "label", "probability")  # written first, then the metadata
ATTENTION_COLUMNS = ("image_id", "corner_fraction", "border_fraction", "flag", "dark_corner_score")
HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_auroc")
STRESS_COLUMNS = ("image_id", "intervention", "p_clean", "p", "delta_p", "flipped")
OOD_COLUMNS = ("image_id", "split", "ood_score", "out_of_distribution")
DEFAULT_RUN = PROJECT_ROOT / "models" / "default"
T = TypeVar("T")


def predictions_file(split: str) -> str:
    return f"predictions_{split}.csv"


def attention_file(split: str) -> str:
    return f"attention_{split}.csv"


def cams_file(split: str) -> str:
    return f"cams_{split}.npz"


def stress_file(split: str) -> str:
    return f"stress_{split}.csv"


def acquisition_file(split: str) -> str:
    return f"acquisition_{split}.csv"


def external_split(name: str) -> str:
    """The split key of an evaluated external set: its predictions are ``predictions_external_<name>.csv``."""
    return EXTERNAL_PREFIX + name


def external_metrics_file(name: str) -> str:
    return f"metrics_{external_split(name)}.json"


def site_file(name: str) -> str:
    return f"{SITES_DIR}/{name}.json"


# What `evaluate`, `explain`, `stress` and `index` wrote about a run's weights: stale once they are replaced.
DERIVED_OUTPUTS = ("metrics*.json", predictions_file("*"), attention_file("*"), ATTENTION_SUMMARY, cams_file("*"),
                   stress_file("*"), STRESS_SUMMARY, acquisition_file("*"), ACQUISITION_SUMMARY, INDEX_FILE,
                   STYLE_INDEX_FILE, OOD_SCORES, OOD_SUMMARY, site_file("*"))
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class RunError(ValueError):
    """A run directory, or one of its files, is missing or unreadable; the message says which and how to fix it."""


def check_name(name: str, what: str) -> str:
    """A name that becomes part of a run file's name (an external set, a site): letters, digits, ``_ - .``, so it
    can never reach outside its own file (``../metrics`` would overwrite the run's own)."""
    if not NAME.fullmatch(name) or ".." in name:
        raise RunError(f"{what} name {name!r} is not allowed: use 1–64 letters, digits, '_', '-' or '.', starting "
                       "with a letter or digit (it becomes part of a file name in the run directory)")
    return name


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / MODEL_FILE).is_file()


def find_runs(*roots: str | Path) -> list[Path]:
    """Run directories in ``roots`` (each a run itself or a folder of runs), sorted by name, without repeats."""
    found: dict[Path, None] = {}
    for root in map(Path, roots):
        candidates = [root] if is_run_dir(root) else sorted(p for p in root.glob("*") if p.is_dir())
        found.update((p.resolve(), None) for p in candidates if is_run_dir(p))
    return list(found)


def _fix(run: Path, command: str) -> str:
    return f"run `python train.py {command} --run {run}` to make it"


def read_config(run: str | Path, need_weights: bool = True) -> RunConfig:
    """A run's ``config.yaml``; by default the run must also hold its weights (``need_weights=False`` for a run
    still training, which may not have finished an epoch)."""
    run = Path(run)
    if not run.is_dir():
        raise RunError(f"run directory {run} does not exist")
    if not (run / CONFIG_FILE).is_file() or (need_weights and not (run / MODEL_FILE).is_file()):
        raise RunError(f"{run} is not a run directory: it needs {CONFIG_FILE} and {MODEL_FILE} "
                       f"(written by `python train.py fit --out {run}`)")
    return _load_config(run / CONFIG_FILE)


def _load_config(path: Path) -> RunConfig:
    try:
        return RunConfig.from_yaml(path)
    except Exception as err:  # any parse or field error means the same thing to the user
        raise RunError(f"{path} is not a valid run config ({err})") from err


def write_config(cfg: RunConfig, run: str | Path) -> Path:
    return cfg.to_yaml(Path(run) / CONFIG_FILE)


def member_configs(run: str | Path, cfg: RunConfig) -> list[RunConfig]:
    """An ensemble run's members' training configs (``members/<name>/config.yaml``), in the ensemble's order."""
    run = Path(run)
    missing = [member for member in cfg.ensemble if not (run / member / CONFIG_FILE).is_file()]
    if missing:
        raise RunError(f"{run} is an ensemble whose member config(s) are missing: "
                       + ", ".join(f"{m}/{CONFIG_FILE}" for m in missing) + "; rebuild it with `python train.py "
                       "ensemble`")
    return [_load_config(run / member / CONFIG_FILE) for member in cfg.ensemble]


def _read_json(path: Path, fix: str) -> dict:
    if not path.is_file():
        raise RunError(f"{path} is missing; {fix}")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunError(f"{path} is not readable JSON ({err}); {fix} again") from err


def _read_typed(kind: type[T], path: Path, fix: str) -> T:
    """A run file read into its dataclass (``core.run_files``): unknown keys are ignored, a missing or mistyped one
    is a RunError naming the file, the key and the command that rebuilds it."""
    return _parse(kind, _read_json(path, fix), path, fix)


def _parse(kind: type[T], value: object, path: Path, fix: str, key: str = "") -> T:
    try:
        return parse(kind, value, key)
    except FieldError as err:
        raise RunError(f"{path} cannot be read: {err}; {fix} again") from err


def _write_typed(path: Path, value: object) -> Path:
    """A run file from its dataclass, as JSON (NaN as ``NaN``, as ``json`` writes it), indented, atomically."""
    return atomic_write_text(path, json.dumps(dump(value), indent=1))


def read_metrics(run: str | Path) -> Metrics:
    """``metrics.json``: the val-chosen thresholds and val and test at them (``train.py evaluate``)."""
    return _read_typed(Metrics, Path(run) / METRICS_FILE, _fix(Path(run), "evaluate"))


def write_metrics(run: str | Path, report: Metrics) -> Path:
    return _write_typed(Path(run) / METRICS_FILE, report)


def read_attention_summary(run: str | Path) -> AttentionSummary:
    """``attention_summary.json``: the Grad-CAM audit of the test split in numbers (``train.py explain``)."""
    return _read_typed(AttentionSummary, Path(run) / ATTENTION_SUMMARY, _fix(Path(run), "explain --split test"))


def write_attention_summary(run: str | Path, summary: AttentionSummary) -> Path:
    return _write_typed(Path(run) / ATTENTION_SUMMARY, summary)


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
    return _read_csv(Path(run) / predictions_file(split), PREDICTION_COLUMNS, _fix(Path(run), "evaluate"))


def read_attention(run: str | Path, split: str = "test") -> pd.DataFrame:
    """``attention_<split>.csv``: the Grad-CAM attention scores of every image (``train.py explain``)."""
    return _read_csv(Path(run) / attention_file(split), ATTENTION_COLUMNS,
                     _fix(Path(run), f"explain --split {split}"))


def read_cams(run: str | Path, split: str = "test") -> dict[str, np.ndarray]:
    """The stored CAMs of a split: image_id → uint8 map, 255 = most attended (56×56; 42×56 for a frame-crop run)."""
    path = Path(run) / cams_file(split)
    if not path.is_file():
        raise RunError(f"{path} is missing; {_fix(Path(run), f'explain --split {split}')}")
    try:
        with np.load(path, allow_pickle=False) as store:
            return dict(zip(store["image_id"].tolist(), store["cam"]))
    except (OSError, ValueError, KeyError) as err:
        raise RunError(f"{path} is not a readable CAM store ({err}); {_fix(Path(run), 'explain')} again") from err


def read_stress(run: str | Path, split: str = "test") -> pd.DataFrame:
    """``stress_<split>.csv``: p of every image before and after each intervention (``train.py stress``)."""
    return _read_csv(Path(run) / stress_file(split), STRESS_COLUMNS, _fix(Path(run), f"stress --split {split}"))


def read_stress_summary(run: str | Path, split: str = "test") -> StressSection:
    """This split's section of ``stress_summary.json``: per intervention AUROC, flips and Δp, the corner flag."""
    return _read_section(StressSection, Path(run) / STRESS_SUMMARY, split, _fix(Path(run), f"stress --split {split}"))


def _read_section(kind: type[T], path: Path, split: str, fix: str) -> T:
    """One split's section of a per-split summary, or a RunError saying how to make it (the other splits' sections
    are not read: a damaged one is named when it is opened)."""
    summary = _read_json(path, fix)
    if not isinstance(summary, dict) or split not in summary:
        raise RunError(f"{path} has no '{split}' section; {fix}")
    return _parse(kind, summary[split], path, fix, split)


def _write_section(path: Path, split: str, section: object, fix: str) -> Path:
    """Write one split's section of a per-split summary; the other splits' sections are kept as they are."""
    others = _read_json(path, fix) if path.is_file() else {}
    return _write_typed(path, others | {split: section})


def write_stress_summary(run: str | Path, split: str, section: StressSection) -> Path:
    """Write this split's section of ``stress_summary.json`` (a second split is added, not written over)."""
    return _write_section(Path(run) / STRESS_SUMMARY, split, section, _fix(Path(run), "stress"))


def read_acquisition(run: str | Path, split: str = "test") -> pd.DataFrame:
    """``acquisition_<split>.csv``: p of each sampled image before and after each acquisition edit."""
    return _read_csv(Path(run) / acquisition_file(split), STRESS_COLUMNS,
                     _fix(Path(run), f"stress --suite acquisition --split {split}"))


def read_acquisition_summary(run: str | Path, split: str = "test") -> AcquisitionSection:
    """This split's section of ``acquisition_summary.json``: per edit its flips against the neutral-edit floor."""
    return _read_section(AcquisitionSection, Path(run) / ACQUISITION_SUMMARY, split,
                         _fix(Path(run), f"stress --suite acquisition --split {split}"))


def write_acquisition_summary(run: str | Path, split: str, section: AcquisitionSection) -> Path:
    """Write this split's section of ``acquisition_summary.json`` (the other splits' sections are kept)."""
    return _write_section(Path(run) / ACQUISITION_SUMMARY, split, section,
                          _fix(Path(run), "stress --suite acquisition"))


def read_ood_scores(run: str | Path, split: str = "test") -> pd.DataFrame:
    """This split's rows of ``ood_scores.csv``: each image's distance to the training data and its flag."""
    frame = _read_csv(Path(run) / OOD_SCORES, OOD_COLUMNS, _fix(Path(run), "index"))
    frame = frame[frame["split"] == split].drop(columns="split").reset_index(drop=True)
    return frame.assign(out_of_distribution=frame["out_of_distribution"].astype(bool))


def read_ood_summary(run: str | Path) -> OODSummary:
    """``ood_summary.json``: the OOD score's method and threshold, flag rates, and the test mistakes' scores."""
    return _read_typed(OODSummary, Path(run) / OOD_SUMMARY, _fix(Path(run), "index"))


def write_ood_summary(run: str | Path, summary: OODSummary) -> Path:
    return _write_typed(Path(run) / OOD_SUMMARY, summary)


def _external_fix(run: str | Path, name: str) -> str:
    return f"run `python train.py evaluate --run {run} --data LABELS.csv --images DIR --name {name}`"


def read_external(run: str | Path, name: str) -> ExternalMetrics:
    """``metrics_external_<name>.json``: an external set's metrics, where it was read from, its shift verdict."""
    return _read_typed(ExternalMetrics, Path(run) / external_metrics_file(name), _external_fix(run, name))


def write_external(run: str | Path, report: ExternalMetrics) -> Path:
    return _write_typed(Path(run) / external_metrics_file(check_name(report.name, "set")), report)


def external_sets(run: str | Path) -> dict[str, ExternalMetrics]:
    """Every labelled set evaluated with ``train.py evaluate --data`` (name → its metrics file), sorted by name;
    an unreadable file is left out here and named when the set is opened."""
    sets = {}
    for path in sorted(Path(run).glob(external_metrics_file("*"))):
        name = path.stem.removeprefix("metrics_" + EXTERNAL_PREFIX)
        try:
            sets[name] = read_external(run, name)
        except RunError:
            continue
    return sets


def read_shift_report(path: str | Path) -> ShiftReport:
    """A shift verdict that ``train.py shift --out FILE`` wrote."""
    return _read_typed(ShiftReport, Path(path), f"run `python train.py shift --run RUN --images DIR --out {path}`")


def write_shift_report(path: str | Path, report: ShiftReport) -> Path:
    """``train.py shift --out FILE``: the shift verdict of a folder, outside the run (the same JSON as an external
    set's ``shift`` part)."""
    return _write_typed(Path(path), report)


def read_site_profile(run: str | Path, name: str) -> SiteProfile:
    """``sites/<name>.json``: a site's threshold and what it is expected to give there (``train.py site``)."""
    check_name(name, "site")
    return _read_typed(SiteProfile, Path(run) / site_file(name),
                       f"run `python train.py site --run {run} --name {name} --data LABELS.csv --images DIR "
                       "--overwrite`")


def site_profiles(run: str | Path) -> dict[str, SiteProfile]:
    """Every site profile of the run (name → profile), sorted by name."""
    profiles = {}
    for path in sorted((Path(run) / SITES_DIR).glob("*.json")):
        try:
            profiles[path.stem] = read_site_profile(run, path.stem)
        except RunError:
            continue
    return profiles


def write_site_profile(run: str | Path, profile: SiteProfile, overwrite: bool = False) -> Path:
    """Write ``sites/<name>.json`` atomically; an existing profile of that name is kept unless ``overwrite``."""
    name = check_name(profile.name, "site")
    path = Path(run) / site_file(name)
    if path.exists() and not overwrite:
        raise RunError(f"{path} already holds the site profile '{name}'; choose another --name or pass --overwrite")
    path.parent.mkdir(exist_ok=True)
    return _write_typed(path, profile)


def read_members(run: str | Path) -> dict[str, RunConfig]:
    """An ensemble run's members (``members/<name>`` → its training config); empty for a single model."""
    cfg = read_config(run)
    return dict(zip(cfg.ensemble, member_configs(run, cfg)))


def fp16_megabytes(run: str | Path) -> float:
    """The run's weights once stored in fp16 (what ``train.py ensemble`` ships), in MB: the shipping size limit."""
    with safe_open(Path(run) / MODEL_FILE, "pt") as f:
        return sum(int(np.prod(f.get_slice(name).get_shape())) for name in f.keys()) * 2 / 1e6


def read_history(run: str | Path) -> pd.DataFrame:
    return _read_csv(Path(run) / HISTORY_FILE, HISTORY_COLUMNS, f"it is written by `python train.py fit --out {run}`")


def committed_history(run: str | Path, epochs: int) -> list[dict]:
    """The history rows of the ``epochs`` epochs a resume starts after (a stop just before the training state was
    committed leaves one row more)."""
    path = Path(run) / HISTORY_FILE
    frame = pd.read_csv(path) if path.is_file() else pd.DataFrame()
    if len(frame) < epochs:
        raise RunError(f"{path} holds {len(frame)} epoch(s) but {STATE_FILE} has {epochs}: cannot resume exactly")
    return frame.iloc[:epochs].to_dict("records")


def write_history(history: list[dict], path: str | Path) -> Path:
    frame = pd.DataFrame(history)
    return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False, float_format="%.6g"))


def read_lineage(run: str | Path) -> pd.DataFrame:
    """Every stage the run's weights went through, oldest first: the earlier stages' rows of ``lineage.csv`` (a
    fine-tuning run inherits them from the run it started from) and the run's own ``history.csv``, labelled with
    the run's folder name. Columns: ``stage``, ``stage_epoch`` (within the stage), ``epoch`` (counted over the
    whole lineage) and the history's; a stage whose run was not kept may carry its val AUROC only, with a ``note``."""
    run = Path(run)
    own = read_history(run).assign(stage=run.name)
    path = run / LINEAGE_FILE
    earlier = _read_csv(path, ("stage",) + HISTORY_COLUMNS[:1] + ("val_auroc",),
                        "fine-tune from its parent (`python train.py fit --init-from PARENT`)") \
        if path.is_file() else pd.DataFrame(columns=["stage", "epoch"])
    lineage = pd.concat([earlier, own], ignore_index=True)
    if lineage["epoch"].isna().any():
        raise RunError(f"{path if path.is_file() else run / HISTORY_FILE} has a row without its epoch; fine-tune "
                       "from its parent (`python train.py fit --init-from PARENT`) again")
    lineage["stage_epoch"] = lineage["epoch"].astype(int)
    lineage["epoch"] = np.arange(1, len(lineage) + 1)
    if "note" not in lineage:
        lineage["note"] = ""
    lineage["note"] = lineage["note"].astype(object).fillna("").astype(str)
    return lineage


def inherit_lineage(run: str | Path, parent: str | Path) -> Path | None:
    """Write ``run``'s ``lineage.csv`` as ``parent``'s whole lineage, when ``run`` starts from ``parent``'s weights:
    the Training report then shows every stage, not only the last fine-tuning. None when the parent kept no
    history (e.g. a bare weights file)."""
    parent = Path(parent)
    if not (parent / HISTORY_FILE).is_file():
        return None
    lineage = read_lineage(parent).drop(columns="epoch").rename(columns={"stage_epoch": "epoch"})
    return atomic_write(Path(run) / LINEAGE_FILE,
                        lambda tmp: lineage.to_csv(tmp, index=False, float_format="%.6g"))


def write_predictions(frame: pd.DataFrame, path: str | Path) -> Path:
    """The prediction columns first, then whatever metadata the source has; no local file paths. Full precision:
    a val-chosen threshold *is* one of these probabilities, and a rounded copy can fall below it."""
    extra = [c for c in frame.columns if c not in PREDICTION_ORDER + ("path", "mask_path", "split")]
    out = frame[list(PREDICTION_ORDER) + extra]
    return atomic_write(path, lambda tmp: out.to_csv(tmp, index=False))


def write_csv(path: str | Path, frame: pd.DataFrame, float_format: str | None = "%.6f") -> Path:
    return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False, float_format=float_format))


def write_cam_store(path: str | Path, image_ids: np.ndarray, cams: np.ndarray) -> Path:
    """``image_id`` and ``cam`` arrays in one .npz (through an open handle: given a path, numpy would add ".npz"
    to the temporary file's name)."""
    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            np.savez_compressed(f, image_id=image_ids, cam=cams)

    return atomic_write(path, write)


def clear_for_training(run: str | Path) -> None:
    """Before a fresh (not resumed) fit into ``run``: remove the old weights, training state, history, lineage and
    everything derived from them, so that a fit stopped early never sits beside an older run's finished files."""
    for name in (MODEL_FILE, STATE_FILE, STATE_META, HISTORY_FILE, LINEAGE_FILE):
        (Path(run) / name).unlink(missing_ok=True)
    remove_derived_outputs(run)


def remove_derived_outputs(run: str | Path) -> None:
    """Delete what described a run's old weights (``train.py ensemble --overwrite`` replaces them)."""
    for pattern in DERIVED_OUTPUTS:
        for path in Path(run).glob(pattern):
            path.unlink()


def model_label(cfg: RunConfig) -> str:
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
           "tta_views": cfg.tta_views}
    nan = float("nan")
    try:
        report = read_metrics(run)
    except RunError:
        return row | {"val_auroc": nan, "test_auroc": nan, "test_auroc_ci_low": nan, "test_auroc_ci_high": nan,
                      "test_balanced_accuracy_youden": nan}
    low, high = report.test.auroc_ci
    youden = report.test.at_threshold.get("youden")
    return row | {"val_auroc": report.val.auroc, "test_auroc": report.test.auroc,
                  "test_auroc_ci_low": low, "test_auroc_ci_high": high,
                  "test_balanced_accuracy_youden": nan if youden is None else youden.balanced_accuracy}

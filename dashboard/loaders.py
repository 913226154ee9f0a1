"""Cached readers shared by the pages: each file is parsed once per change, not on every rerun."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import streamlit as st
import torch

from core.audit.acquisition import ColourStats, create_edits, retaken_view
from core.audit.interventions import create_intervention, image_key
from core.audit.stress import wide
from core.config import RunConfig
from core.data import DEFAULT_SPLIT_FILE, DataError, project_path, read_ham10000, resolve_data_dir
from core.images import open_rgb
from core.inference import model_view_masks
from core.metrics import age_band, source_report
from core.predictor import Predictor
from core.run_files import (
    AcquisitionSection,
    ExternalMetrics,
    Metrics,
    ModelFingerprint,
    OODSummary,
    SiteProfile,
    SourceColours,
    SourceReport,
    StressSection,
    parse,
)
from core.runs import (
    CONFIG_FILE,
    EXTERNAL_PREFIX,
    HISTORY_FILE,
    INDEX_FILE,
    LINEAGE_FILE,
    MODEL_FILE,
    SITES_DIR,
    STYLE_INDEX_FILE,
    RunError,
    read_acquisition,
    read_acquisition_summary,
    read_attention,
    read_cams,
    read_config,
    read_lineage,
    read_members,
    read_metrics,
    read_ood_scores,
    read_ood_summary,
    read_predictions,
    read_stress,
    read_stress_summary,
    run_summary,
)
from core.runs import (
    external_sets as read_external_sets,
)
from core.sites import model_fingerprint as core_model_fingerprint
from core.sites import usable_profiles
from core.split import read_split
from core.transforms import CornerMask, resize_transform
from dashboard import charts

T = TypeVar("T")
DEFAULT_SPLIT = project_path(DEFAULT_SPLIT_FILE)


@st.cache_data(show_spinner=False)
def load_split(path: str, mtime: float) -> pd.DataFrame:
    """``mtime`` is part of the cache key so a regenerated file is picked up."""
    return read_split(path)


def split_frame(path: Path = DEFAULT_SPLIT) -> pd.DataFrame:
    return load_split(str(path), path.stat().st_mtime if path.exists() else 0.0)


def data_dir_or_none() -> tuple[Path | None, str]:
    """The resolved HAM10000 folder, or None with the reason (shown to the user instead of a stack trace)."""
    try:
        return resolve_data_dir(), ""
    except DataError as err:
        return None, str(err)


def _mtime(path: Path) -> float:
    return path.stat().st_mtime if path.exists() else 0.0


def _run_stamp(run: Path) -> float:
    """Newest modification time in a run directory: a cache key that changes when the run is re-evaluated."""
    return max((_mtime(p) for p in run.glob("*")), default=0.0) if run.is_dir() else 0.0


@st.cache_resource(show_spinner="Loading the model…", max_entries=4)
def _predictor(run: str, stamp: float) -> Predictor:
    return Predictor.load(run)


def _model_stamp(run: Path) -> float:
    return max(_mtime(run / MODEL_FILE), _mtime(run / CONFIG_FILE), _mtime(run / INDEX_FILE),
               _mtime(run / STYLE_INDEX_FILE))


def predictor(run: Path) -> Predictor:
    """The run's model, loaded once per process and shared by all sessions (read-only; CAMs are serialised).
    Reloaded when the weights or the config change (`train.py calibrate` rewrites only the config)."""
    return _predictor(str(run), _model_stamp(run))


def intervened(run: Path, row: pd.Series, view: tuple[int, str, float | None], name: str, seed: int,
               threshold: float) -> tuple[np.ndarray, float, np.ndarray]:
    """:func:`intervened_case` for one case row (with its ``path`` and ``mask_path``)."""
    mask_path = row.get("mask_path")
    return intervened_case(str(run), _model_stamp(run), row["path"], mask_path if isinstance(mask_path, str) else None,
                           *view, name, seed, row["image_id"], threshold)


@st.cache_data(show_spinner=False, max_entries=8)
def _metadata(data_dir: str) -> pd.DataFrame:
    """Image paths, and the source where the metadata has it (predictions written before it was carried lack it)."""
    frame = read_ham10000(data_dir)
    return frame[[c for c in ("image_id", "path", "mask_path", "source") if c in frame]]


@st.cache_data(show_spinner=False, max_entries=16)
def _cases(run: str, split: str, stamp: float, data_dir: str | None) -> pd.DataFrame:
    frame = read_predictions(run, split)
    try:
        attention = read_attention(run, split)
    except RunError:
        attention = None
    if attention is not None:
        # "correct" there is at the Youden threshold; pages derive outcomes at the current threshold instead.
        keep = [c for c in attention.columns if c == "image_id" or c not in {*frame.columns, "correct"}]
        frame = frame.merge(attention[keep], on="image_id", how="left", validate="one_to_one")
    try:
        stressed = wide(read_stress(run, split)).drop(columns="p_clean")
    except RunError:
        stressed = None
    if stressed is not None:  # p with each artifact painted in (train.py stress); the flag is set per threshold
        frame = frame.merge(stressed, on="image_id", how="left", validate="one_to_one")
    if split in ("val", "test"):
        try:  # the distance to the training data (train.py index), val and test alike
            frame = frame.merge(read_ood_scores(run, split), on="image_id", how="left", validate="one_to_one")
        except RunError:
            pass
    if "age" in frame:
        frame["age_band"] = age_band(frame["age"]).astype(str)
    if split.startswith(EXTERNAL_PREFIX):  # its images lie where `train.py evaluate --data` read them
        report = external_sets(Path(run)).get(split.removeprefix(EXTERNAL_PREFIX))
        root = None if report is None else report.images
        # gallery.cases_at_threshold checks the folder; a set evaluated before the folder was recorded has none
        frame["path"] = [str(Path(root) / name) for name in frame["file"]] if root and "file" in frame else None
        frame["mask_path"] = None
    elif data_dir is not None:
        metadata = _metadata(data_dir)
        frame = frame.merge(metadata.drop(columns=[c for c in ("source",) if c in frame]), on="image_id", how="left",
                            validate="one_to_one")
    return frame


def cases(run: Path, split: str = "test", data_dir: Path | None = None) -> pd.DataFrame:
    """One row per image of a split or an evaluated external set: prediction, metadata, the attention and stress
    scores where the run has them, and image paths (if the images were found). Raises RunError when the run lacks
    its predictions."""
    return _cases(str(run), split, _run_stamp(run), None if data_dir is None else str(data_dir))


def images_problem(run: Path, split: str) -> str:
    """Why the images of an external set cannot be shown ("" when they can)."""
    name = split.removeprefix(EXTERNAL_PREFIX)
    report = external_sets(run).get(name) if split.startswith(EXTERNAL_PREFIX) else None
    if report is None:
        return ""
    if report.images is None:
        return (f"`{name}` was evaluated before runs recorded where a set's images are. Evaluate it again: "
                f"`python train.py evaluate --run {run} --data LABELS.csv --images FOLDER --name {name}`.")
    if Path(report.images).is_dir():
        return ""
    return (f"The images of `{name}` were read from `{report.images}`, which is not there any more. Move them "
            f"back, or evaluate the set again from where they are now: `python train.py evaluate --run {run} --data "
            f"LABELS.csv --images NEW_FOLDER --name {name}`.")


@st.cache_data(show_spinner=False, max_entries=16)
def _source_report(run: str, split: str, stamp: float, data_dir: str | None) -> SourceReport:
    return parse(SourceReport, source_report(_cases(run, split, stamp, data_dir), {}, n_boot=200))


@st.cache_data(show_spinner=False, max_entries=16)
def _p_by_dx_source_spec(run: str, split: str, stamp: float, data_dir: str | None) -> dict:
    return charts.p_by_dx_source_chart(_cases(run, split, stamp, data_dir)).to_dict(validate=False)


def p_by_dx_source_spec(run: Path, split: str, data_dir: Path | None = None) -> dict:
    """The P-by-diagnosis-by-source chart's Vega-Lite spec, built once per set rather than on every rerun."""
    return _p_by_dx_source_spec(str(run), split, _run_stamp(run), None if data_dir is None else str(data_dir))


def sources(run: Path, split: str, data_dir: Path | None = None) -> SourceReport:
    """The set's per-source AUROCs with their CIs and the source-stratified AUROC (``core.metrics.source_report``
    without thresholds), computed once per set: the bootstrap would cost 40 ms on every rerun of a dragged slider."""
    return _source_report(str(run), split, _run_stamp(run), None if data_dir is None else str(data_dir))


@st.cache_data(show_spinner=False, max_entries=16)
def _external_sets(run: str, stamp: float) -> dict[str, ExternalMetrics]:
    return read_external_sets(run)


def external_sets(run: Path) -> dict[str, ExternalMetrics]:
    """The labelled sets evaluated on the run (name → its metrics file, with where its images were read from)."""
    return _external_sets(str(run), _run_stamp(run))


@st.cache_data(show_spinner=False, max_entries=16)
def _model_fingerprint(run: str, stamp: float) -> ModelFingerprint:
    return core_model_fingerprint(run)


def model_fingerprint(run: Path) -> ModelFingerprint:
    """The run's weights and calibration (``core.sites.model_fingerprint``), hashed once per change of them: the
    weights are 16 MB, and the Threshold explorer asks on every rerun whether an external set's predictions are
    theirs."""
    return _model_fingerprint(str(run), _model_stamp(run))


@st.cache_data(show_spinner=False, max_entries=16)
def _site_profiles(run: str, stamp: float, sites_stamp: float) -> dict[str, SiteProfile]:
    return usable_profiles(run)


def site_profiles(run: Path) -> dict[str, SiteProfile]:
    """The run's site profiles that belong to its current weights and calibration (name → profile)."""
    sites = run / SITES_DIR  # the folder's own time changes when a profile is added or removed, a file's when rewritten
    return _site_profiles(str(run), _model_stamp(run), max(_mtime(sites), _run_stamp(sites)))


@st.cache_data(show_spinner=False, max_entries=4)
def _cams(run: str, stamp: float) -> dict[str, np.ndarray]:
    return read_cams(run, "test")


def stored_cams(run: Path) -> dict[str, np.ndarray]:
    """Test-split CAMs from ``train.py explain`` (empty when the run has none)."""
    try:
        return _cams(str(run), _run_stamp(run))
    except RunError:
        return {}


def _or_none(read: Callable[..., T], run: Path, *args: Any) -> T | None:
    """A cached reader's answer for ``run`` (keyed on the run directory's stamp), or None when the run lacks what
    it reads: the pages then show that part as not made yet, with the command that makes it."""
    try:
        return read(str(run), *args, _run_stamp(run))
    except RunError:
        return None


@st.cache_data(show_spinner=False, max_entries=4)
def _stress(run: str, split: str, stamp: float) -> pd.DataFrame:
    return read_stress(run, split)


def stress_table(run: Path, split: str = "test") -> pd.DataFrame | None:
    """The long stress table of ``train.py stress`` (None when the run has none)."""
    return _or_none(_stress, run, split)


def with_image_paths(similar: pd.DataFrame, data_dir: Path | None) -> pd.DataFrame:
    """Training cases (e.g. a prediction's most similar ones) with their image paths where the images are here."""
    if data_dir is None:
        return similar
    return similar.merge(_metadata(str(data_dir))[["image_id", "path"]], on="image_id", how="left")


@st.cache_data(show_spinner=False, max_entries=16)
def _ood_summary(run: str, stamp: float) -> OODSummary:
    return read_ood_summary(run)


def ood_summary(run: Path) -> OODSummary | None:
    return _or_none(_ood_summary, run)


@st.cache_data(show_spinner=False, max_entries=16)
def _stress_summary(run: str, split: str, stamp: float) -> StressSection:
    return read_stress_summary(run, split)


def stress_summary(run: Path, split: str = "test") -> StressSection | None:
    return _or_none(_stress_summary, run, split)


@st.cache_data(show_spinner=False, max_entries=4)
def _acquisition(run: str, split: str, stamp: float) -> pd.DataFrame:
    return read_acquisition(run, split)


def acquisition_table(run: Path, split: str = "test") -> pd.DataFrame | None:
    """The long table of the acquisition stress test (None when the run has none for ``split``)."""
    return _or_none(_acquisition, run, split)


@st.cache_data(show_spinner=False, max_entries=16)
def _acquisition_summary(run: str, split: str, stamp: float) -> AcquisitionSection:
    return read_acquisition_summary(run, split)


def acquisition_summary(run: Path, split: str = "test") -> AcquisitionSection | None:
    return _or_none(_acquisition_summary, run, split)


@st.cache_data(show_spinner=False, max_entries=64)
def acquired_view(path: str, name: str, source: str | None, colours: dict[str, SourceColours], size: int,
                  crop: str = "square", corner_mask: float | None = None) -> np.ndarray:
    """A photo re-taken with one acquisition edit exactly as ``train.py stress --suite acquisition`` took it (the
    file's pixels edited, then cropped and resized as the model sees them, as :func:`model_view`)."""
    stats = {s: ColourStats(tuple(c.mean), tuple(c.std)) for s, c in colours.items()}
    view = retaken_view(np.asarray(open_rgb(path)), create_edits([name], stats)[0], source,
                        resize_transform(size, crop))
    return (view if corner_mask is None else CornerMask(corner_mask)(view)).permute(1, 2, 0).numpy().copy()


@st.cache_data(show_spinner=False, max_entries=64)
def intervened_case(run: str, stamp: float, path: str, mask_path: str | None, size: int, crop: str,
                    corner_mask: float | None, name: str, seed: int, image_id: str,
                    threshold: float) -> tuple[np.ndarray, float, np.ndarray]:
    """A test image with one intervention painted in exactly as ``train.py stress`` painted it (same seed, key
    and mask), with its P(malignant) and the Grad-CAM of the decision at ``threshold``, computed now."""
    view = model_view(path, size, crop, corner_mask)
    mask = model_view_mask(mask_path, size, crop) if mask_path else None
    pixels = torch.from_numpy(view).permute(2, 0, 1).unsqueeze(0)
    painted = create_intervention(name, seed)(pixels, [mask], [image_key(image_id)])[0]
    result = _predictor(run, stamp).predict_view(painted, explain=True, threshold=threshold)
    return result.model_input, result.probability, result.cam


@st.cache_data(show_spinner=False, max_entries=4096)
def thumbnail(path: str, size: int = 160) -> np.ndarray:
    """A small copy for the grid: decoded once per image, never the full image per rerun."""
    image = open_rgb(path)
    image.thumbnail((size, size))
    return np.asarray(image)


@st.cache_data(show_spinner=False, max_entries=256)
def model_view(path: str, size: int, crop: str = "square", corner_mask: float | None = None) -> np.ndarray:
    """uint8 (H, W, 3): the photo cropped and resized as the model sees it (and as stored CAMs are aligned), with
    the run's corner mask (``RunConfig.corner_mask``: its radius, None without one) painted by the same transform
    the model's preprocessing uses."""
    view = resize_transform(size, crop)(open_rgb(path))
    return (view if corner_mask is None else CornerMask(corner_mask)(view)).permute(1, 2, 0).numpy().copy()


@st.cache_data(show_spinner=False, max_entries=256)
def model_view_mask(path: str, size: int, crop: str = "square") -> np.ndarray:
    return model_view_masks([path], size, crop)[0]


def or_stop(load: Callable[[], T], what: str = "", errors: tuple[type[Exception], ...] = (RunError, DataError)) -> T:
    """``load()``, or an error box saying what could not be opened and why (the error names the missing or damaged
    file and the command that makes it), and the page stops there."""
    try:
        return load()
    except errors as err:
        st.error(f"{what}\n\n{err}" if what else str(err))
        st.stop()


def cases_or_stop(run: Path, split: str = "test", data_dir: Path | None = None) -> pd.DataFrame:
    return or_stop(lambda: cases(run, split, data_dir), f"Cannot open the {split} predictions of `{run}`.")


@st.cache_data(show_spinner=False, max_entries=32)
def _explorer_spec(run: str, split: str, stamp: float, value: float) -> dict:
    return charts.threshold_explorer(read_predictions(run, split), value).to_dict(validate=False)


def explorer_spec(run: Path, split: str, value: float) -> dict:
    """The explorer's Vega-Lite spec, built once per (run, split, start value): while the user drags, reruns reuse
    it instead of re-serialising every test prediction."""
    return _explorer_spec(str(run), split, _run_stamp(run), value)


# Small run files, read once per change rather than on every rerun (every widget move reruns the page).
@st.cache_data(show_spinner=False, max_entries=64)
def _config(run: str, stamp: float) -> RunConfig:
    return read_config(run)


def run_config(run: Path) -> RunConfig:
    return _config(str(run), _run_stamp(run))


@st.cache_data(show_spinner=False, max_entries=64)
def _members(run: str, stamp: float) -> dict[str, RunConfig]:
    return read_members(run)


def run_members(run: Path) -> dict[str, RunConfig]:
    """An ensemble's members (name → config); empty for a single model."""
    return _members(str(run), _run_stamp(run))


@st.cache_data(show_spinner=False, max_entries=64)
def _lineage(run: str, history_stamp: float, lineage_stamp: float) -> pd.DataFrame:
    return read_lineage(run)


def run_lineage(run: Path) -> pd.DataFrame:
    """A run's (or an ensemble member's) history over every stage it went through, re-read when history.csv
    changes: it grows every epoch while the run trains, which the run directory's own stamp would not always show."""
    return _lineage(str(run), _mtime(run / HISTORY_FILE), _mtime(run / LINEAGE_FILE))


@st.cache_data(show_spinner=False, max_entries=64)
def _metrics(run: str, stamp: float) -> Metrics:
    return read_metrics(run)


def run_metrics(run: Path) -> Metrics:
    return _metrics(str(run), _run_stamp(run))


@st.cache_data(show_spinner=False, max_entries=64)
def _summary(run: str, stamp: float) -> dict:
    return run_summary(run)


def runs_table(runs: list[Path]) -> pd.DataFrame:
    """One row per run (``core.runs.run_summary``), for comparing them."""
    return pd.DataFrame([_summary(str(run), _run_stamp(run)) for run in runs if run.is_dir()])

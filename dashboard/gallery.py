"""Case views shared by the browser and the audit: the paged thumbnail grid and one case's image / CAM / mask."""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import streamlit as st

from core import metrics
from core.audit.interventions import CORNER_CHECK, DEFAULT_MIN_DELTA, corner_delta_p, corner_dependent
from core.data import DX_NAMES, DataError
from core.overlay import cam_overlay, outline_mask
from dashboard import loaders, state
from dashboard.labels import readable_index

OPACITY_KEY = "cam_opacity"
OUTCOME_HELP = {"TP": "malignant, called malignant", "FP": "benign, called malignant",
                "FN": "malignant, called benign", "TN": "benign, called benign"}
METADATA = ["image_id", "lesion_id", "dx", "dx_type", "age", "sex", "localization", "source"]
SCORES = ["probability", "outcome", "out_of_distribution", "ood_score", "style_score", "corner_dependent",
          "p_corner_fill", "p_vignette", "corner_delta_p",
          "corner_fraction", "border_fraction", "outside_lesion_fraction", "background_lesion_ratio",
          "dark_corner_score", "flag"]


class Cases(NamedTuple):
    run: Path
    split: str                # the data set's split key ("test", "val", "external_<name>")
    label: str                # what the pages call it ("test split", "isic2018_test (external, 1512 images)")
    cases: pd.DataFrame       # one row per image of the set, with its ``outcome`` at ``threshold``
    view: tuple[int, str, float | None]  # the model view (input_size, crop, corner mask), as loaders.model_view takes
    threshold: float
    images_problem: str       # why the images were not found ("" when they were)


def cases_at_threshold() -> Cases:
    """The open run's chosen data set (sidebar) at the shared threshold, for the pages that browse it; the page
    stops with a message if the run has no predictions for it."""
    run, split = state.current_run(), state.data_set()
    data_dir, problem = loaders.data_dir_or_none()
    cases = loaders.cases_or_stop(run, split, data_dir)
    if state.external_name(split) is not None:
        problem = loaders.images_problem(run, split)
        if problem:  # the folder the set was evaluated from is gone: numbers only
            cases["path"] = None
    threshold = state.threshold()
    cases["outcome"] = metrics.outcomes(cases["label"], cases["probability"], threshold)
    add_corner_dependence(cases, threshold)
    return Cases(run, split, state.set_label(split), cases, state.run_view(run), threshold, problem)


def add_corner_dependence(cases: pd.DataFrame, threshold: float) -> None:
    """``corner_dependent`` at ``threshold`` (the rule of ``core.audit.interventions.corner_dependent``) and
    ``corner_delta_p``, from the stress test's p columns; nothing when the run has no stress test."""
    if not has_stress(cases):
        return
    checked = {name: cases[f"p_{name}"].to_numpy() for name in CORNER_CHECK}
    p = cases["probability"].to_numpy()
    cases["corner_dependent"] = corner_dependent(p, checked, threshold)
    cases["corner_delta_p"] = corner_delta_p(p, checked)


def has_stress(frame: pd.DataFrame) -> bool:
    return all(f"p_{name}" in frame for name in CORNER_CHECK)


def has_images(frame: pd.DataFrame) -> bool:
    return "path" in frame and frame["path"].notna().any()


def corner_dependence_note(p: float, covered: float, vignette: float) -> str:
    """The warning text for a corner-dependent decision, with the numbers that make it so."""
    return (f"This decision depends on the image corners, not only on the lesion: P(malignant) {p:.3f} becomes "
            f"{covered:.3f} with the corners covered with skin colour and {vignette:.3f} with a dermoscope "
            f"vignette added (the decision flips at the threshold, or p moves by ≥ {DEFAULT_MIN_DELTA}).")


def ood_warning(result, guard) -> str:
    """The text for an image the OOD guard flags (a ``core.predictor.Prediction`` and the run's ``OODGuard``): which
    distance is too large, and why the probability is not to be trusted."""
    reasons = []
    if result.ood_score > guard.threshold:
        reasons.append(f"in what it shows (distance to the training images {result.ood_score:.3f}, above "
                       f"{guard.threshold:.3f})")
    if guard.style is not None and result.style_score > guard.style_threshold:
        reasons.append(f"in how it looks: colour, texture, sharpness (style distance {result.style_score:.3f}, above "
                       f"{guard.style_threshold:.3f})")
    share = 100 - guard.index.meta["percentile"]
    return (f"**This image is unlike the training data** {' and '.join(reasons)}; only {share:g} % of the "
            "validation images are flagged so. The model has not learned to judge images like it: its probability "
            "is unreliable, so **no decision is given**. Use a dermoscopic photo with the lesion centred.")


def similar_cases(similar: pd.DataFrame, data_dir: Path | None, key: str) -> None:
    """The most similar training cases of a prediction as thumbnails (diagnosis, label, distance), or as a table
    when the images are not here: retrieval as decision support (Tschandl et al., Nat. Med. 2020)."""
    similar = loaders.with_image_paths(similar, data_dir)
    labelled = similar.assign(diagnosis=[f"{dx} — {DX_NAMES.get(dx, dx)}" for dx in similar["dx"]],
                              label=similar["label"].map({1: "malignant", 0: "benign"}))
    if "path" not in similar or similar["path"].isna().any():
        st.dataframe(labelled[["image_id", "diagnosis", "label", "distance"]].style.format({"distance": "{:.3f}"}),
                     hide_index=True, key=f"similar_{key}")
        return
    for column, (_, row) in zip(st.columns(len(labelled)), labelled.iterrows()):
        column.image(loaders.thumbnail(row["path"]), width="stretch")
        column.caption(f"**{row['dx']}** ({row['label']}) · d={row['distance']:.3f}")


def opacity_slider() -> float:
    return st.slider("CAM opacity", 0.0, 1.0, 0.5, 0.05, key=OPACITY_KEY)


def page_of(frame: pd.DataFrame, key: str, per_page: int) -> pd.DataFrame:
    """The rows of the page the user picked (1-based), clamped to the pages there are."""
    pages = max(1, math.ceil(len(frame) / per_page))
    page = st.number_input(f"Page (of {pages})", min_value=1, max_value=pages, value=1, step=1, key=key)
    start = (min(int(page), pages) - 1) * per_page
    return frame.iloc[start:start + per_page]


def thumbnail_grid(frame: pd.DataFrame, on_open: Callable[[str], None], columns: int = 6) -> None:
    """Thumbnails (cached, small) with an Open button each; captions say outcome, dx and probability."""
    for start in range(0, len(frame), columns):
        for column, (_, row) in zip(st.columns(columns), frame.iloc[start:start + columns].iterrows()):
            with column:
                try:
                    st.image(loaders.thumbnail(row["path"]), width="stretch")
                except DataError as err:
                    st.warning(str(err))
                st.caption(f"**{row['outcome']}** · {row['dx']} · p={row['probability']:.2f}"
                           + (" · ⚠ corners" if bool(row.get("corner_dependent", False)) else "")
                           + (" · ⚠ unlike training" if bool(row.get("out_of_distribution", False)) else ""))
                st.button("Open", key=f"open-{row['image_id']}", on_click=on_open, args=(row["image_id"],),
                          width="stretch")


def case_cam(row: pd.Series, run: Path, split: str) -> tuple[np.ndarray, str]:
    """The stored CAM of a test case (from ``train.py explain``), else one computed now at the current threshold
    (an external set's ids may be a test image's: its stored CAM would be another photo's)."""
    stored = loaders.stored_cams(run).get(row["image_id"]) if split == "test" else None
    if stored is not None:
        return stored, "Grad-CAM of the decision at the val Youden threshold (stored by `train.py explain`)"
    prediction = loaders.predictor(run).predict(row["path"], explain=True, threshold=state.threshold())
    return prediction.cam, "Grad-CAM of the decision at the current threshold (computed now)"


def case_detail(row: pd.Series, run: Path, split: str, view_geometry: tuple[int, str, float | None],
                opacity: float) -> None:
    """Image as the model sees it, CAM overlay and lesion-mask outline side by side, then scores and metadata."""
    st.subheader(f"{row['image_id']} — {DX_NAMES.get(row['dx'], row['dx'])}")
    if bool(row.get("corner_dependent", False)):
        st.warning(corner_dependence_note(row["probability"], row["p_corner_fill"], row["p_vignette"]))
    if "corner_fraction" in row.index and np.isfinite(row["corner_fraction"]):
        st.caption(f"Grad-CAM share in the four corners: {row['corner_fraction']:.0%} (uniform: 25 %). An "
                   "explanation, not the verdict: whether the decision depends on the corners is measured by "
                   "painting over them (Error audit → Artifact stress test).")
    if isinstance(row.get("path"), str):
        view = loaders.model_view(row["path"], *view_geometry)
        cam, cam_note = case_cam(row, run, split)
        image_col, cam_col, mask_col = st.columns(3)
        image_col.image(view, caption="as the model sees it", width="stretch")
        cam_col.image(cam_overlay(view, cam, opacity), caption=cam_note, width="stretch")
        if isinstance(row.get("mask_path"), str):
            mask = loaders.model_view_mask(row["mask_path"], *view_geometry[:2])
            mask_col.image(outline_mask(cam_overlay(view, cam, opacity), mask), width="stretch",
                           caption="lesion mask outline (green) over the CAM")
        else:
            mask_col.info("No lesion mask for this image.")
    else:
        st.info("Images not found, so only the numbers are shown. " + state.images_hint())
    scores, metadata = st.columns(2)
    shown = [c for c in SCORES if c in row.index]
    scores.dataframe(readable_index(row[shown].astype(str).rename("value")), width="stretch")
    metadata.dataframe(readable_index(row[[c for c in METADATA if c in row.index]].astype(str).rename("value")),
                       width="stretch")
    st.caption(f"{row['outcome']}: {OUTCOME_HELP[row['outcome']]} at threshold {state.threshold():.3f}.")


def intervention_case(row: pd.Series, run: Path, split: str, view_geometry: tuple[int, str, float | None], name: str,
                      seed: int, opacity: float) -> None:
    """One stress-test case: the image and its CAM, then the same image with the artifact painted in (as
    ``train.py stress`` painted it) and the CAM of the decision made on that copy."""
    p_after = row[f"p_{name}"]
    st.markdown(f"**{row['image_id']}** — {DX_NAMES.get(row['dx'], row['dx'])} · P(malignant) "
                f"{row['probability']:.3f} → **{p_after:.3f}** with `{name}` (Δp {p_after - row['probability']:+.3f})")
    if not isinstance(row.get("path"), str):
        st.info("Images not found, so only the numbers are shown. " + state.images_hint())
        return
    threshold = state.threshold()
    view = loaders.model_view(row["path"], *view_geometry)
    cam, _ = case_cam(row, run, split)
    painted, p_now, painted_cam = loaders.intervened(run, row, view_geometry, name, seed, threshold)
    columns = st.columns(4)
    columns[0].image(view, caption="as the model sees it", width="stretch")
    columns[1].image(cam_overlay(view, cam, opacity), caption="its Grad-CAM", width="stretch")
    columns[2].image(painted, caption=f"with {name} (p = {p_now:.3f})", width="stretch")
    columns[3].image(cam_overlay(painted, painted_cam, opacity), width="stretch",
                     caption=f"Grad-CAM of the '{'malignant' if p_now >= threshold else 'benign'}' decision")

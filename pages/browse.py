"""Case browser: filter the images of the data set chosen in the sidebar (the test or val split, or an evaluated
external set) by outcome, diagnosis, score, corner dependence and metadata; open a case."""
import pandas as pd
import streamlit as st

from core import metrics
from core.data import DX_NAMES
from dashboard import gallery, state
from dashboard.labels import readable

CASE_KEY = "browse_case"
PER_PAGE = 24
CORNER_FILTER = {"depends on corners": True, "does not": False}
OOD_FILTER = {"unlike training": True, "like training": False}

st.title("Case browser")
run, split, label, cases, view, threshold, problem = gallery.cases_at_threshold()


def choices(column: str) -> list[str]:
    return sorted(cases[column].dropna().astype(str).unique()) if column in cases else []


with st.expander("Filters", expanded=True):
    row1 = st.columns(5)
    outcome = row1[0].pills(f"Outcome at {threshold:.3f}", list(metrics.OUTCOMES), selection_mode="multi",
                            key="f_outcome", help="; ".join(f"{k}: {v}" for k, v in gallery.OUTCOME_HELP.items()))
    dx = row1[1].multiselect("True diagnosis", choices("dx"), format_func=lambda d: f"{d} — {DX_NAMES.get(d, d)}",
                             key="f_dx")
    low, high = row1[2].slider("P(malignant)", 0.0, 1.0, (0.0, 1.0), 0.01, key="f_prob")
    corners = row1[3].pills("Decision and corners", list(CORNER_FILTER), key="f_corners",
                            disabled="corner_dependent" not in cases,
                            help="From the artifact stress test: covering the corners or adding a vignette flips "
                                 "the decision at this threshold, or moves p by ≥ 0.2. None picked: all images.")
    source = row1[4].multiselect("Source", choices("source"), key="f_source", disabled="source" not in cases,
                                 help="Where the image was taken (HAM10000's `dataset`; a labels CSV's `source` or "
                                      "`site` column).")
    row2 = st.columns(5)
    far = row2[4].pills("Distance to training", list(OOD_FILTER), key="f_ood",
                        disabled="out_of_distribution" not in cases,
                        help="From the embedding index (train.py index): flagged when the image's distance to the "
                             "training images, in content or in style, is above its threshold (5 % of val are). "
                             "None picked: all images.")
    ages = cases["age"].dropna() if "age" in cases else pd.Series(dtype=float)
    age_range = row2[0].slider("Age", 0, 100, (0, 100), 5, key="f_age", disabled=ages.empty)
    include_unknown_age = row2[0].checkbox("include unknown age", True, key="f_age_unknown")
    sex = row2[1].multiselect("Sex", choices("sex"), key="f_sex")
    site = row2[2].multiselect("Localization", choices("localization"), key="f_site")
    order = row2[3].selectbox("Sort by", ["most malignant first", "most benign first", "image id"], key="f_sort")

shown = cases[cases["probability"].between(low, high)]
if outcome:
    shown = shown[shown["outcome"].isin(outcome)]
if dx:
    shown = shown[shown["dx"].isin(dx)]
if source:
    shown = shown[shown["source"].astype(str).isin(source)]
if corners is not None and "corner_dependent" in shown:
    shown = shown[shown["corner_dependent"] == CORNER_FILTER[corners]]
if far is not None and "out_of_distribution" in shown:
    shown = shown[shown["out_of_distribution"] == OOD_FILTER[far]]
if "age" in shown and age_range != (0, 100):
    in_range = shown["age"].between(*age_range)
    shown = shown[in_range | (shown["age"].isna() & include_unknown_age)]
elif "age" in shown and not include_unknown_age:
    shown = shown[shown["age"].notna()]
if sex:
    shown = shown[shown["sex"].astype(str).isin(sex)]
if site:
    shown = shown[shown["localization"].astype(str).isin(site)]
sort_by = {"most malignant first": ("probability", False), "most benign first": ("probability", True),
           "image id": ("image_id", True)}[order]
shown = shown.sort_values(sort_by[0], ascending=sort_by[1], kind="stable")
counts = shown["outcome"].value_counts().reindex(list(metrics.OUTCOMES), fill_value=0)
st.markdown(f"**{len(shown):,} of {len(cases):,} images match** ({label}) — "
            + ", ".join(f"{k} {v}" for k, v in counts.items()))


def open_case(image_id: str) -> None:
    st.session_state[CASE_KEY] = image_id


if not gallery.has_images(cases):
    hint = "" if state.external_name(split) else f"\n\n{state.images_hint()}"
    st.info(f"Images not found, so the grid shows no thumbnails.\n\n{problem}{hint}")
    st.dataframe(readable(shown[[c for c in gallery.METADATA + gallery.SCORES if c in shown]]), hide_index=True,
                 key="browse_table")
elif len(shown):
    gallery.thumbnail_grid(gallery.page_of(shown, "browse_page", PER_PAGE), open_case)

chosen = st.session_state.get(CASE_KEY)
if chosen is not None and chosen in set(cases["image_id"]):
    st.divider()
    gallery.case_detail(cases.set_index("image_id", drop=False).loc[chosen], run, split, view,
                        st.session_state.get(gallery.OPACITY_KEY, 0.5))
    gallery.opacity_slider()

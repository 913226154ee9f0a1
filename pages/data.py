"""Data & split: what the models are trained and tested on."""
import altair as alt
import streamlit as st

from core.data import DATA_CITATION, DX_NAMES, MALIGNANT_DX
from core.split import SPLITS, split_summary
from dashboard.loaders import DEFAULT_SPLIT, data_dir_or_none, or_stop, split_frame

st.title("Data & split")

data_dir, problem = data_dir_or_none()
if data_dir is None:
    st.warning(f"Images not found, so image views are unavailable.\n\n{problem}")
else:
    st.caption(f"Images: `{data_dir}`")

split = or_stop(split_frame, f"Cannot read the split file `{DEFAULT_SPLIT}`.")

st.markdown("Lesion-wise 70 / 15 / 15 split: no lesion (and no near-duplicate cluster of lesions) is in two splits. "
            "Thresholds are chosen on **val** and applied to **test**.")
summary = split_summary(split).rename(columns={"share_%": "share %", "malignant_%": "malignant %"})
st.dataframe(summary.style.format({"share %": "{:.1f}", "malignant %": "{:.1f}"}), width="content")

counts = split.groupby(["split", "dx"]).size().rename("images").reset_index()
counts["share %"] = 100 * counts["images"] / counts.groupby("split")["images"].transform("sum")
counts["diagnosis"] = counts["dx"].map(lambda dx: f"{dx} — {DX_NAMES.get(dx, dx)}")
counts["malignant"] = counts["dx"].isin(MALIGNANT_DX)
chart = alt.Chart(counts).mark_bar().encode(
    x=alt.X("dx:N", sort="-y", title="diagnosis"),
    xOffset=alt.XOffset("split:N", sort=list(SPLITS)),
    y=alt.Y("share %:Q", title="% of the split's images"),
    color=alt.Color("split:N", sort=list(SPLITS)),
    opacity=alt.condition("datum.malignant", alt.value(1.0), alt.value(0.55)),
    tooltip=["split", "diagnosis", "images", alt.Tooltip("share %:Q", format=".1f"), "malignant"],
)
st.altair_chart(chart, width="stretch")
st.caption("Malignant (target = 1): " + ", ".join(f"{dx} ({DX_NAMES[dx]})" for dx in MALIGNANT_DX[:3])
           + ". Opaque bars are malignant classes.")
st.caption(DATA_CITATION)

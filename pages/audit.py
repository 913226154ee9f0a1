"""Error audit: the model's most confident mistakes, corner-focused attention, and where it does worse."""
import streamlit as st

from core import metrics
from dashboard import charts, gallery, state

st.title("Error audit")
run, cases, view, threshold, problem = gallery.test_cases_at_threshold()
cases["correct"] = cases["outcome"].isin(["TP", "TN"])
# How sure the model was of its wrong answer: P(malignant) for a false positive, P(benign) for a false negative.
cases["mistake_confidence"] = cases["probability"].where(cases["outcome"] == "FP", 1 - cases["probability"])
has_attention = "flag" in cases
if not has_attention:
    st.warning(f"`{run}` has no attention audit, so corner flags and CAMs are missing. Make it with "
               f"`python train.py explain --run {run} --split test`.")
if not gallery.has_images(cases):
    st.info(f"Images not found: tables and charts work, images do not.\n\n{problem}\n\n{state.images_hint()}")

errors = cases[~cases["correct"]].sort_values("mistake_confidence", ascending=False)
kinds = st.multiselect("Mistakes", ["FP", "FN"], default=["FP", "FN"], key="audit_kinds",
                       help="FP: benign called malignant. FN: malignant called benign (the dangerous one).")
only_flagged = st.toggle("Only corner-focused attention", key="audit_flagged", disabled=not has_attention)
selection = errors[errors["outcome"].isin(kinds)]
if only_flagged and has_attention:
    selection = selection[selection["flag"].astype(bool)]
columns = [c for c in ["image_id", "outcome", "dx", "probability", "mistake_confidence", "corner_fraction",
                       "dark_corner_score", "flag", "age", "sex", "localization"] if c in selection]
st.markdown(f"**{len(selection):,} mistakes** at threshold {threshold:.3f} (of {len(errors):,}: "
            f"{(errors['outcome'] == 'FP').sum()} FP, {(errors['outcome'] == 'FN').sum()} FN), most confident first. "
            "Select rows to compare them below.")
event = st.dataframe(selection[columns].style.format(precision=3), hide_index=True, key="audit_table",
                     on_select="rerun", selection_mode="multi-row", height=300)
st.download_button("Export this selection as CSV", selection[columns].to_csv(index=False).encode(),
                   file_name=f"audit_{run.name}_t{threshold:.3f}.csv", mime="text/csv", key="audit_export")

picked = selection.iloc[event.selection.rows] if event.selection.rows else selection.head(3)
if len(picked):
    st.subheader("Side by side" + ("" if event.selection.rows else " — the three most confident mistakes"))
    opacity = gallery.opacity_slider()
    for _, row in picked.iterrows():
        with st.container(border=True):
            gallery.case_detail(row, run, view, opacity)

if has_attention:
    st.header("Corner-focused attention")
    flagged = cases[cases["flag"].astype(bool)]
    st.markdown(f"**{len(flagged)}** of {len(cases):,} test CAMs are corner-focused (≥ 50 % of the CAM in the four "
                "corner squares, twice a uniform map's share).")
    st.dataframe(flagged[columns].style.format(precision=3), hide_index=True, key="flagged_table")
    by_correct = cases.assign(result=cases["correct"].map({True: "correct", False: "mistake"}))
    left, right = st.columns(2)
    left.altair_chart(charts.rate_bars(by_correct, "result", "Corner-flag rate: mistakes vs correct cases"),
                      width="stretch")
    right.altair_chart(charts.corner_vs_dark_chart(cases), width="stretch")

st.header("Where the model does worse")
subgroups = metrics.subgroup_auroc(cases)
st.altair_chart(charts.subgroup_chart(subgroups), width="stretch")
with st.expander("Subgroup table"):
    st.dataframe(subgroups.style.format({"auroc": "{:.3f}"}), hide_index=True)

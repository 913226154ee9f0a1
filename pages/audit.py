"""Error audit: the model's most confident mistakes, decisions that depend on the image corners (measured by
painting over them) or on the camera (measured by re-taking the image), what the Grad-CAM says about it, and where
the model does worse."""
import pandas as pd
import streamlit as st

from core import metrics
from core.audit.interventions import CORNER_INTERVENTIONS
from core.run_files import frame
from dashboard import acquisition_panel, charts, gallery, loaders, state
from dashboard.labels import readable

STRESS_PER_PAGE = 4

st.title("Error audit")
run, split, label, cases, view, threshold, problem = gallery.cases_at_threshold()
st.caption(f"On the {label}: choose the data set in the sidebar.")
cases["correct"] = cases["outcome"].isin(["TP", "TN"])
# How sure the model was of its wrong answer: P(malignant) for a false positive, P(benign) for a false negative.
cases["mistake_confidence"] = cases["probability"].where(cases["outcome"] == "FP", 1 - cases["probability"])
has_attention = "flag" in cases
has_stress = gallery.has_stress(cases)
internal = state.external_name(split) is None
if not has_stress and internal:
    st.warning(f"`{run}` has no artifact stress test of the {split} split, so no decision is checked for corner "
               f"dependence. Make it with `python train.py stress --run {run} --split {split}`.")
if not has_attention and split == "test":
    st.warning(f"`{run}` has no attention audit, so CAMs and their corner scores are missing. Make it with "
               f"`python train.py explain --run {run} --split test`.")
if not gallery.has_images(cases):
    hint = f"\n\n{state.images_hint()}" if internal else ""
    st.info(f"Images not found: tables and charts work, images do not.\n\n{problem}{hint}")

errors = cases[~cases["correct"]].sort_values("mistake_confidence", ascending=False)
kinds = st.multiselect("Mistakes", ["FP", "FN"], default=["FP", "FN"], key="audit_kinds",
                       help="FP: benign called malignant. FN: malignant called benign (the dangerous one).")
only_dependent = st.toggle("Only decisions that depend on the corners", key="audit_corner", disabled=not has_stress,
                           help="Covering the corners with skin colour or adding a vignette flips the decision or "
                                "moves p by ≥ 0.2 (train.py stress).")
sources = st.multiselect("Source", sorted(cases["source"].dropna().astype(str).unique()) if "source" in cases else [],
                         key="audit_source", disabled="source" not in cases,
                         help="Only the mistakes on images from these sources (none picked: all).")
selection = errors[errors["outcome"].isin(kinds)]
if sources:
    selection = selection[selection["source"].astype(str).isin(sources)]
if only_dependent and has_stress:
    selection = selection[selection["corner_dependent"]]
columns = [c for c in ["image_id", "outcome", "dx", "source", "probability", "mistake_confidence",
                       "out_of_distribution", "ood_score", "corner_dependent",
                       "p_corner_fill", "p_vignette", "corner_fraction", "dark_corner_score", "age", "sex",
                       "localization"] if c in selection]
st.markdown(f"**{len(selection):,} mistakes** at threshold {threshold:.3f} (of {len(errors):,}: "
            f"{(errors['outcome'] == 'FP').sum()} FP, {(errors['outcome'] == 'FN').sum()} FN), most confident first. "
            "Select rows to compare them below.")
event = st.dataframe(readable(selection[columns]).style.format(precision=3), hide_index=True, key="audit_table",
                     on_select="rerun", selection_mode="multi-row", height=300)
st.download_button("Export this selection as CSV", selection[columns].to_csv(index=False).encode(),
                   file_name=f"audit_{run.name}_t{threshold:.3f}.csv", mime="text/csv", key="audit_export")

picked = selection.iloc[event.selection.rows] if event.selection.rows else selection.head(3)
if len(picked):
    st.subheader("Side by side" + ("" if event.selection.rows else " — the three most confident mistakes"))
    opacity = gallery.opacity_slider()
    for _, row in picked.iterrows():
        with st.container(border=True):
            gallery.case_detail(row, run, split, view, opacity)

ood = loaders.ood_summary(run)
if ood is not None and "out_of_distribution" in cases:
    st.header("Are mistakes far from the training data?")
    by_result = cases.assign(result=cases["correct"].map({True: "correct", False: "mistake"}))
    wrong = ~cases["correct"]
    st.markdown(
        f"Each image's distance to the training images ({ood.method} in the model's embedding, "
        f"`train.py index`; flagged above {ood.threshold:.3f}"
        + (f", or when its style statistics are farther than {ood.style_threshold:.3f}: together "
           f"{100 - ood.percentile:g} % of val" if ood.style_threshold is not None else
           f", the val split's {ood.percentile:g}th percentile")
        + f"). At threshold {threshold:.3f}: **{cases['out_of_distribution'][wrong].mean():.1%} "
        f"of the mistakes** are flagged against {cases['out_of_distribution'][~wrong].mean():.1%} of the correct "
        f"decisions; median distance {cases['ood_score'][wrong].median():.3f} vs "
        f"{cases['ood_score'][~wrong].median():.3f}.")
    left, right = st.columns([1, 2])
    left.altair_chart(charts.rate_bars(by_result, "result", "Unlike training: mistakes vs correct",
                                       flag="out_of_distribution"), width="stretch")
    right.altair_chart(charts.score_by_group_chart(by_result, "ood_score", "result", ood.threshold),
                       width="stretch")

summary = loaders.stress_summary(run, split)
if has_stress and summary is not None:
    st.header("Artifact stress test")
    dependent = cases["corner_dependent"]
    st.markdown(
        f"Every image was predicted again with an artifact painted in beside the lesion, never on it (the "
        f"lesion mask's pixels are kept), with the run's own preprocessing, TTA and calibration "
        f"(`train.py stress`). **{dependent.sum():,} of {len(cases):,} decisions ({dependent.mean():.1%}) depend on "
        f"the corners** at threshold {threshold:.3f}: covering them with skin colour or adding a dermoscope "
        f"vignette flips them or moves p by ≥ {summary.corner_dependent.min_delta}. The table's flips are at "
        f"the val Youden threshold ({summary.threshold_youden_val:.3f}), where `train.py stress` reads them.")
    rows = [{"intervention": "none (clean)", "AUROC": summary.clean.auroc,
             "sensitivity": summary.clean.sensitivity, "specificity": summary.clean.specificity}]
    for name, row in summary.interventions.items():
        low, high = row.auroc_change_ci
        rows.append({"intervention": name, "AUROC": row.auroc,
                     "AUROC change (95 % CI)": f"{row.auroc_change:+.3f} ({low:+.3f} to {high:+.3f})",
                     "flipped": row.flipped, "benign → malignant": row.to_malignant,
                     "malignant → benign": row.to_benign, "mean Δp": row.mean_delta_p,
                     "mean |Δp|": row.mean_abs_delta_p, "sensitivity": row.sensitivity,
                     "specificity": row.specificity})
    shares = ["flipped", "benign → malignant", "malignant → benign", "sensitivity", "specificity"]
    st.dataframe(pd.DataFrame(rows).style.format("{:.1%}", subset=shares, na_rep="")
                 .format("{:.3f}", subset=["AUROC"]).format("{:+.3f}", subset=["mean Δp"], na_rep="")
                 .format("{:.3f}", subset=["mean |Δp|"], na_rep=""), hide_index=True, key="stress_table")
    stress = loaders.stress_table(run, split)
    left, right = st.columns([2, 1])
    left.altair_chart(charts.delta_p_chart(stress), width="stretch")
    by_correct = cases.assign(result=cases["correct"].map({True: "correct", False: "mistake"}))
    right.altair_chart(charts.rate_bars(by_correct, "result", "Corner-dependent: mistakes vs correct",
                                        flag="corner_dependent"), width="stretch")

    st.subheader("Decisions an artifact changes, largest |Δp| first")
    name = st.selectbox("Intervention", list(summary.interventions), key="stress_intervention",
                        index=list(summary.interventions).index("corner_fill")
                        if "corner_fill" in summary.interventions else 0)
    changed = cases.assign(delta=(cases[f"p_{name}"] - cases["probability"]))
    changed = changed[(changed[f"p_{name}"] >= threshold) != (changed["probability"] >= threshold)]
    changed = changed.reindex(changed["delta"].abs().sort_values(ascending=False).index)
    st.markdown(f"**{len(changed):,}** decisions flip at {threshold:.3f} with `{name}`.")
    if len(changed):
        opacity = st.session_state.get(gallery.OPACITY_KEY, 0.5)
        for _, row in gallery.page_of(changed, "stress_page", STRESS_PER_PAGE).iterrows():
            with st.container(border=True):
                gallery.intervention_case(row, run, split, view, name, summary.seed, opacity)

    st.subheader("Does the Grad-CAM see it?")
    validation = summary.cam_validation
    if validation:
        cam_rows = [{"intervention": key, "Spearman ρ (corner share vs |Δp|)": value.spearman_abs_delta_p,
                     "AUROC of corner share for a flip": value.auroc_flipped, "flips": value.flipped,
                     "flips the CAM flag caught": value.cam_flag_among_flipped}
                    for key, value in validation.interventions.items() if key in CORNER_INTERVENTIONS]
        st.dataframe(pd.DataFrame(cam_rows).style.format(precision=3), hide_index=True, key="cam_validation")
        st.caption(f"AUROC of the CAM's corner share for the corner-dependence flag: "
                   f"{validation.corner_dependent.auroc:.3f} (0.5 = chance). A CAM that showed what the model "
                   "uses would rank the images whose decision the corners change first.")
    else:
        st.info(f"Run `python train.py explain --run {run} --split test`, then `train.py stress` again, to compare "
                "the CAM with the interventions.")
    dark = summary.dark_corners_train
    if dark:
        st.subheader("Why a model learns the ring: dark corners and the label (training split)")
        quantiles = frame(dark.malignant_share_by_quantile).rename(
            columns={"low": "dark-corner score from", "high": "to", "n": "images", "malignant": "malignant share"})
        by_dx = frame(dark.by_dx).rename_axis("dx").reset_index()
        left, right = st.columns(2)
        left.dataframe(quantiles.style.format({"dark-corner score from": "{:.3f}", "to": "{:.3f}",
                                               "malignant share": "{:.1%}"}), hide_index=True, key="dark_quantiles")
        right.dataframe(by_dx.style.format({"n": "{:,.0f}", "mean": "{:.3f}", "median": "{:.3f}"}), hide_index=True,
                        key="dark_by_dx")
        st.caption(f"AUROC of the dark-corner score alone for malignancy on the {dark.n:,} training images: "
                   f"{dark.auroc_dark_corners_for_label:.3f} (0.5 = no information).")

if internal:
    acquisition_panel.acquisition_section(run, split, cases, threshold, view)

if has_attention:
    st.header("Grad-CAM corner attention (explanatory)")
    flagged = cases[cases["flag"].astype(bool)]
    st.markdown(f"**{len(flagged)}** of {len(cases):,} CAMs put ≥ 50 % of their mass in the four corner squares "
                "(twice a uniform map's share). The CAM is a hint where the model looks; whether a decision "
                "*depends* on the corners is what the stress test above measures.")
    st.dataframe(readable(flagged[columns]).style.format(precision=3), hide_index=True, key="flagged_table")
    st.altair_chart(charts.corner_vs_dark_chart(cases), width="stretch")

st.header("Where the model does worse")
subgroups = metrics.subgroup_auroc(cases)
if subgroups.empty:
    st.info(f"The {label} carries no metadata (age, sex, localization, how the diagnosis was made) to group the "
            "images by.")
else:
    st.altair_chart(charts.subgroup_chart(subgroups), width="stretch")
    with st.expander("Subgroup table"):
        st.dataframe(subgroups.style.format({"auroc": "{:.3f}"}), hide_index=True)

"""Threshold explorer: what a decision threshold buys and costs on the data set chosen in the sidebar (test, val or
an evaluated external set), live while dragging; whether the run's val threshold holds on an external set, and a
site operating point made from it."""
import pandas as pd
import streamlit as st

from core import metrics
from core.run_files import Calibration, parse
from dashboard import charts, loaders, site_panels, state
from dashboard.labels import readable

st.title("Threshold explorer")
run, split = state.current_run(), state.data_set()
label = state.set_label(split)
st.caption(f"On the {label} (choose the data set in the sidebar). Thresholds are chosen on val, or on a site's own "
           "labelled cases, and applied elsewhere: never chosen on the set they are judged on.")
frame = loaders.cases_or_stop(run, split, loaders.data_dir_or_none()[0])  # with the images' metadata (source)
labels, probs = frame["label"].to_numpy(), frame["probability"].to_numpy()
presets = state.run_thresholds(run)
external = state.external_name(split)
if external is not None:
    site_panels.stale_warning(run, loaders.external_sets(run)[external])
    site_panels.shift_verdict(loaders.external_sets(run)[external])
if split != "test" and "youden" in presets:
    site_panels.val_threshold_check(run, label, labels, probs, presets["youden"])

profiles = loaders.site_profiles(run)
columns = st.columns(len(presets) + len(profiles) + 1)
columns[0].markdown("**Presets** (chosen on val; sites on their own cases)")
for column, (name, value) in zip(columns[1:], presets.items()):
    column.button(f"{state.PRESET_LABELS.get(name, name)} = {value:.3f}", key=f"preset-{name}",
                  on_click=state.use_preset, args=(value,), width="stretch")
for column, (name, profile) in zip(columns[1 + len(presets):], profiles.items()):
    column.button(f"site {name} = {profile.point.threshold:.3f}", key=f"site-{name}", on_click=state.select_site,
                  args=(name,), width="stretch")

chart_key = f"explorer-{split}-{state.chart_threshold()}"
if chart_key not in st.session_state:  # a fresh chart (page opened again): start it where the threshold is now
    state.restart_chart_at_threshold()
    chart_key = f"explorer-{split}-{state.chart_threshold()}"


def follow_chart() -> None:
    """The chart's slider moved: the rest of the app follows (the chart itself already has)."""
    picked = st.session_state[chart_key].selection.get(charts.THRESHOLD_PARAM)
    if picked:
        st.session_state[state.THRESHOLD_KEY] = float(picked[0]["threshold"])


st.vega_lite_chart(loaders.explorer_spec(run, split, state.chart_threshold()), key=chart_key, on_select=follow_chart,
                   selection_mode=[charts.THRESHOLD_PARAM])
st.caption("Drag the slider under the figures: they follow in the browser; the tables below and the other pages "
           "follow when it stops. Positive (malignant) iff P(malignant) ≥ threshold.")

threshold = state.threshold()
at = metrics.binary_metrics(labels, probs, threshold)
st.subheader(f"{split} at threshold {threshold:.3f}")
left, right = st.columns([1, 2])
left.dataframe(pd.DataFrame([[at["tp"], at["fn"]], [at["fp"], at["tn"]]], index=["actual malignant", "actual benign"],
                            columns=["predicted malignant", "predicted benign"]), key="confusion")
rates = {name: at[name] for name in ("sensitivity", "specificity", "ppv", "npv", "balanced_accuracy", "f1",
                                      "macro_f1", "accuracy")}
right.dataframe(readable(pd.DataFrame([rates])).style.format("{:.3f}"), hide_index=True, key="rates")

comparison = pd.DataFrame(
    [{"operating point": state.PRESET_LABELS.get(name, name), **metrics.binary_metrics(labels, probs, value)}
     for name, value in [*presets.items(), ("current", threshold)]])
st.markdown(f"**Operating points on {split}** — AUROC {metrics.auroc(labels, probs):.3f}")
st.dataframe(readable(comparison[["operating point", "threshold", "sensitivity", "specificity", "ppv", "npv",
                                         "balanced_accuracy", "f1", "tp", "fp", "fn", "tn"]]).style.format(precision=3),
             hide_index=True)
st.altair_chart(charts.calibration_chart(parse(Calibration, metrics.calibration(labels, probs))))

if "source" in frame and frame["source"].nunique() > 1:
    st.subheader(f"By source at threshold {threshold:.3f}")
    report = loaders.sources(run, split, loaders.data_dir_or_none()[0])
    parts = {str(name): part for name, part in frame.groupby("source")}
    rows = [{"source": name, "images": row.n, "malignant": row.n_malignant, "AUROC": row.auroc,
             "AUROC 95 % CI": "" if row.auroc_ci is None else f"{row.auroc_ci[0]:.3f}–{row.auroc_ci[1]:.3f}",
             **{key: metrics.binary_metrics(parts[name]["label"], parts[name]["probability"], threshold)[key]
                for key in ("sensitivity", "specificity")}} for name, row in report.sources.items()]
    st.dataframe(pd.DataFrame(rows).style.format({"AUROC": "{:.3f}", "sensitivity": "{:.3f}",
                                                  "specificity": "{:.3f}"}, na_rep="—"),
                 hide_index=True, key="source_rows")
    if report.stratified_auroc is not None:
        st.markdown(f"Source-stratified AUROC (the mean of the within-source AUROCs, over "
                    f"{len(report.stratified_over)} sources with both classes): "
                    f"**{report.stratified_auroc:.3f}**, against {report.pooled_auroc:.3f} pooled: a pooled "
                    "AUROC can be carried by one easy source, or by sources whose malignant shares differ.")
    st.vega_lite_chart(loaders.p_by_dx_source_spec(run, split, loaders.data_dir_or_none()[0]), width="stretch")

if external is not None:
    site_panels.profile_form(run, external, frame)

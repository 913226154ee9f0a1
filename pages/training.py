"""Training report: how the open run was trained, how it scored, and how it compares with the other runs."""
from pathlib import Path

import pandas as pd
import streamlit as st

from core.config import RunConfig
from core.runs import CONFIG_FILE, RunError
from core.transforms import CROP_DESCRIPTIONS, view_shape
from dashboard import charts, loaders, state
from dashboard.labels import readable


def recipe(cfg: RunConfig) -> str:
    """The last stage's settings; where it started from is in the lineage below the charts."""
    height, width = view_shape(cfg.input_size, cfg.crop)
    text = (f"**{cfg.model}** ({cfg.head} head) at {height}×{width} px ({CROP_DESCRIPTIONS[cfg.crop]}), "
            f"{cfg.epochs} epochs, normalisation *{cfg.normalization}*, EMA {cfg.ema_decay or 'off'}, seed {cfg.seed}")
    # What makes a member corner- or camera-robust.
    if cfg.corner_mask is not None:
        text += f"; **blind outside {cfg.corner_mask:g} of the radius** (corner mask)"
    if cfg.corner_artifacts:
        text += f"; painted corners on {cfg.corner_artifacts:.0%} of training images"
    if cfg.corner_consistency:
        text += f"; corner consistency λ {cfg.corner_consistency:g}"
    if cfg.source_balanced:
        text += "; malignant share balanced within every source"
    if cfg.camera_augment:
        text += f"; camera re-takes on {cfg.camera_augment:.0%} of training images"
    if cfg.camera_consistency:
        text += f"; camera consistency λ {cfg.camera_consistency:g}"
    if cfg.source_adversary:
        text += (f"; adversarial source head λ {cfg.source_adversary:g}"
                 f"{' (given the diagnosis)' if cfg.source_adversary_given_dx else ''}")
    return text


def show_lineage(run: Path) -> None:
    """The loss and AUROC charts over every stage, and which stage started from which."""
    try:
        lineage = loaders.run_lineage(run)
    except RunError as err:
        st.info(str(err))
        return
    stages = list(dict.fromkeys(lineage["stage"]))
    if len(stages) > 1:
        st.markdown(f"Trained in **{len(stages)} stages**, each starting from the one before: "
                    + " → ".join(f"`{s}`" for s in stages) + ". The settings above are the last stage's.")
    st.altair_chart(charts.history_charts(lineage))
    for stage, note in lineage.loc[lineage["note"] != "", ["stage", "note"]].drop_duplicates("stage").values:
        st.caption(f"`{stage}`: {note}.")


def tta(cfg: RunConfig) -> str:
    return f"flip TTA {f'on ({cfg.tta_views} views)' if cfg.tta_views > 1 else 'off'}"


st.title("Training report")
run = state.current_run()
config = loaders.or_stop(lambda: loaders.run_config(run))
members = loaders.or_stop(lambda: loaders.run_members(run))
if members:
    st.markdown(f"`{state.run_label(run)}`: an **ensemble** averaging the P(malignant) of {len(members)} trained "
                f"runs, {tta(config)}.")
    for name, member in members.items():
        st.subheader(f"Member {Path(name).name}")
        st.markdown(recipe(member) + ".")
        show_lineage(run / name)
else:
    st.markdown(f"`{state.run_label(run)}`: {recipe(config)}, {tta(config)}.")
    show_lineage(run)

st.header("Metrics")
try:
    report = loaders.run_metrics(run)
except RunError as err:
    st.info(str(err))
else:
    rows = []
    for split, part in (("val", report.val), ("test", report.test)):
        low, high = part.auroc_ci
        for name, at in part.at_threshold.items():
            rows.append({"split": split, "AUROC (95 % CI)": f"{part.auroc:.3f} ({low:.3f}–{high:.3f})",
                         "threshold": f"{state.PRESET_LABELS.get(name, name)} = {at.threshold:.3f}",
                         "sensitivity": at.sensitivity, "specificity": at.specificity,
                         "balanced_accuracy": at.balanced_accuracy, "macro_f1": at.macro_f1, "ppv": at.ppv,
                         "npv": at.npv, "tp": at.tp, "fp": at.fp, "fn": at.fn, "tn": at.tn})
    st.dataframe(readable(pd.DataFrame(rows)).style.format(precision=3), hide_index=True, key="metrics_table")
    st.caption("Thresholds are chosen on val and applied unchanged to test. CIs: 2,000 bootstrap resamples.")
    if report.calibration_test is not None:
        st.altair_chart(charts.calibration_chart(report.calibration_test))

with st.expander("Resolved config (config.yaml)"):
    st.code((run / CONFIG_FILE).read_text(), language="yaml")

st.header("All runs")
table = loaders.runs_table(state.available_runs())
if len(table):
    st.dataframe(readable(table.drop(columns="path")).style.format(precision=4, na_rep="—"), hide_index=True,
                 key="runs_table")
st.caption("Runs are the directories under models/ and runs/ that hold config.yaml and model.safetensors. "
           "Compare them on val AUROC: the test split is for reporting, not choosing.")

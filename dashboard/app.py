"""Dashboard entry point: ``streamlit run dashboard/app.py [-- --run DIR]`` (or ``make dashboard [RUN=DIR]``).

The sidebar (run, data set, site profile, shared threshold) is drawn here, on every page, so its state survives page
switches.
"""
from pathlib import Path

import streamlit as st

from dashboard import loaders, state

PAGES = Path(__file__).resolve().parents[1] / "pages"

st.set_page_config(page_title="Melanoma workbench", page_icon=":material/dermatology:", layout="wide")
navigation = st.navigation([
    st.Page(PAGES / "predict.py", title="Predict", icon=":material/upload:", default=True),
    st.Page(PAGES / "threshold.py", title="Threshold explorer", icon=":material/tune:"),
    st.Page(PAGES / "browse.py", title="Case browser", icon=":material/grid_view:"),
    st.Page(PAGES / "audit.py", title="Error audit", icon=":material/troubleshoot:"),
    st.Page(PAGES / "training.py", title="Training report", icon=":material/monitoring:"),
    st.Page(PAGES / "data.py", title="Data & split", icon=":material/dataset:"),
])

with st.sidebar:
    runs = state.available_runs()
    run = state.current_run()
    if run not in runs:
        runs = [run, *runs]
    st.selectbox("Run", runs, index=runs.index(run), format_func=state.run_label, key="run_choice",
                 on_change=lambda: state.select_run(st.session_state["run_choice"]),
                 help="Run directories under models/ and runs/ (or `--run DIR`).")
    sets = state.data_sets(run)
    st.session_state[state.DATA_SET_KEY] = state.data_set()  # valid for this run before its widget is drawn
    st.selectbox("Data set", list(sets), format_func=sets.get, key=state.DATA_SET_KEY,
                 help="What the Threshold explorer, the Case browser and the Error audit show: the run's test or val "
                      "split, or a labelled set evaluated with `train.py evaluate --data … --name NAME`.")
    profiles = ["", *loaders.site_profiles(run)]
    st.session_state[state.SITE_KEY] = site.name if (site := state.site()) else ""
    st.selectbox("Site operating point", profiles, key=state.SITE_KEY,
                 format_func=lambda name: f"site: {name}" if name else "none: the run's val thresholds",
                 on_change=lambda: state.select_site(st.session_state[state.SITE_KEY]),
                 help="A threshold chosen on labelled cases of one site (`train.py site`, or the Threshold "
                      "explorer on an external set); picking one moves the threshold there.")
    state.threshold()  # make sure the shared key exists before its slider is drawn
    st.slider("Decision threshold", 0.0, 1.0, step=0.001, format="%.3f", key=state.THRESHOLD_KEY,
              on_change=lambda: state.set_threshold(st.session_state[state.THRESHOLD_KEY]),
              help="Malignant iff P(malignant) ≥ threshold. Shared by every page; presets on the Threshold explorer.")
    st.caption("Research tool, not a medical device: do not use it to diagnose anyone.")
navigation.run()

"""Session state every page shares: which run is open, which data set its pages show, the site profile and the
decision threshold.

Both are plain session-state keys changed only in widget callbacks, which run before the script: that way a control
on one page (a preset button, the chart's slider) can move a widget defined earlier in the run (the sidebar slider).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import streamlit as st

from core.data import PROJECT_ROOT
from core.run_files import SiteProfile
from core.runs import DEFAULT_RUN, EXTERNAL_PREFIX, RunError, external_split, find_runs
from dashboard import loaders

RUN_KEY = "run"
THRESHOLD_KEY = "threshold"
CHART_THRESHOLD_KEY = "chart_threshold"  # the value the explorer chart starts from; changes only from outside it
DATA_SET_KEY = "data_set"  # "test", "val" or "external_<name>": the split key of the set the pages show
SITE_KEY = "site"          # the name of the site profile in use, or "": the run's own val thresholds
PRESET_LABELS = {"0.5": "0.5", "youden": "Youden (val)", "sens95": "≥95 % sensitivity (val)"}


def run_argument(argv: list[str] | None = None) -> Path | None:
    """``--run DIR`` after ``streamlit run dashboard/app.py --``; None without it."""
    parser = argparse.ArgumentParser(prog="dashboard", add_help=False)
    parser.add_argument("--run", type=Path)
    known, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    return known.run


@st.cache_data(show_spinner=False, ttl=10)
def _found_runs() -> list[Path]:
    """Run directories under ``models/`` and ``runs/``, looked up at most every 10 s rather than on every rerun."""
    return find_runs(PROJECT_ROOT / "models", PROJECT_ROOT / "runs")


def available_runs() -> list[Path]:
    """The run named by ``--run`` first (even if broken: the pages then say what is wrong), then every run under
    ``models/`` and ``runs/``."""
    asked = run_argument()
    found = _found_runs()
    if asked is None:
        return found
    asked = asked.resolve()
    return [asked] + [run for run in found if run != asked]


def run_label(run: Path) -> str:
    try:
        return str(run.relative_to(PROJECT_ROOT))
    except ValueError:
        return str(run)


def current_run() -> Path:
    if RUN_KEY not in st.session_state:
        runs = available_runs()
        st.session_state[RUN_KEY] = runs[0] if runs else DEFAULT_RUN
    return st.session_state[RUN_KEY]


def run_thresholds(run: Path) -> dict[str, float]:
    """The run's operating points chosen on val; empty if it was never evaluated."""
    try:
        return {name: float(value) for name, value in loaders.run_metrics(run).thresholds.items()}
    except RunError:
        return {}


def default_threshold(run: Path) -> float:
    return run_thresholds(run).get("youden", 0.5)


def set_threshold(value: float) -> None:
    """Move the shared threshold (and the explorer chart's starting point) from a callback."""
    value = float(min(max(value, 0.0), 1.0))
    st.session_state[THRESHOLD_KEY] = value
    st.session_state[CHART_THRESHOLD_KEY] = value


def threshold() -> float:
    if THRESHOLD_KEY not in st.session_state:
        set_threshold(default_threshold(current_run()))
    return float(st.session_state[THRESHOLD_KEY])


def chart_threshold() -> float:
    threshold()
    return float(st.session_state[CHART_THRESHOLD_KEY])


def restart_chart_at_threshold() -> None:
    """A chart drawn afresh starts where the shared threshold is now (safe outside callbacks: not a widget key)."""
    st.session_state[CHART_THRESHOLD_KEY] = threshold()


def select_run(run: Path) -> None:
    """Open another run: its own Youden threshold becomes the shared threshold, on its test split, without a site."""
    st.session_state[RUN_KEY] = run
    st.session_state[DATA_SET_KEY] = "test"
    st.session_state[SITE_KEY] = ""
    set_threshold(default_threshold(run))


def data_sets(run: Path) -> dict[str, str]:
    """The sets the pages can show (split key → label): the test and val splits, then every labelled set evaluated
    with `train.py evaluate --data … --name NAME`."""
    sets = {"test": "test split", "val": "val split"}
    for name, report in loaders.external_sets(run).items():
        sets[external_split(name)] = f"{name} (external, {report.n} images)"
    return sets


def data_set() -> str:
    """The split key of the set the pages show; "test" when the one chosen is gone (another run was opened)."""
    chosen = st.session_state.get(DATA_SET_KEY, "test")
    return chosen if chosen in data_sets(current_run()) else "test"


def set_label(split: str) -> str:
    return data_sets(current_run()).get(split, split)


def external_name(split: str) -> str | None:
    """The external set's name for its split key; None for the run's own splits."""
    return split.removeprefix(EXTERNAL_PREFIX) if split.startswith(EXTERNAL_PREFIX) else None


def site() -> SiteProfile | None:
    """The site profile in use (``sites/<name>.json`` of the open run), or None."""
    name = st.session_state.get(SITE_KEY)
    return loaders.site_profiles(current_run()).get(name) if name else None


def select_site(name: str) -> None:
    """Use a site profile: its threshold becomes the shared threshold ("": back to the run's val Youden)."""
    st.session_state[SITE_KEY] = name
    profile = loaders.site_profiles(current_run()).get(name) if name else None
    set_threshold(profile.point.threshold if profile else default_threshold(current_run()))


def use_preset(value: float) -> None:
    """One of the run's own (val-chosen) operating points: no site profile in use any more."""
    st.session_state[SITE_KEY] = ""
    set_threshold(value)


def at_site_threshold(profile: SiteProfile | None) -> bool:
    """Whether the shared threshold is still the site profile's (the user may have moved it since)."""
    return profile is not None and abs(threshold() - profile.point.threshold) < 5e-4


def images_hint() -> str:
    """How to point the app at the HAM10000 images, for pages that need them."""
    return ("Point the app at the HAM10000 folder (with `HAM10000_metadata.csv` and `images/`): set "
            "`HAM10000_DIR=/path/to/ham10000` before `make dashboard`, or place it at `data/ham10000` or "
            f"`../shared/data/ham10000` beside `{PROJECT_ROOT.name}/`.")


def run_view(run: Path) -> tuple[int, str, float | None]:
    """The run's model view, (input_size, crop, corner mask radius or None); (224, "square", None) if its config is
    unreadable (pages then show the error)."""
    try:
        cfg = loaders.run_config(run)
    except RunError:
        return 224, "square", None
    return cfg.input_size, cfg.crop, cfg.corner_mask

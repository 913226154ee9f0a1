"""Cached readers shared by the pages: each file is parsed once per change, not on every rerun."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from core.data import PROJECT_ROOT, DataError, resolve_data_dir
from core.split import read_split

DEFAULT_SPLIT = PROJECT_ROOT / "splits" / "ham10000.csv"


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

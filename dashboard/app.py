"""Dashboard entry point: ``streamlit run dashboard/app.py`` (or ``make dashboard``)."""
from pathlib import Path

import streamlit as st

PAGES = Path(__file__).resolve().parents[1] / "pages"

st.set_page_config(page_title="Melanoma workbench", page_icon=":material/dermatology:", layout="wide")
navigation = st.navigation([
    st.Page(PAGES / "data.py", title="Data & split", icon=":material/dataset:", default=True),
])
st.sidebar.caption("Research tool, not a medical device: do not use it to diagnose anyone.")
navigation.run()

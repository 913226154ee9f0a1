"""Melanoma-detection workbench: the library (no Streamlit here)."""

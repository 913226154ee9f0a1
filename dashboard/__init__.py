"""Streamlit dashboard: entry point (app.py) and UI parts shared by the pages."""

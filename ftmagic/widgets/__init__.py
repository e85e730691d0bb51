"""Notebook widgets and the magics that show them (ipywidgets is imported lazily)."""

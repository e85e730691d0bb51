"""Show a widget with a static HTML copy beside it, for notebooks viewed without a kernel.

A live front end (JupyterLab, Notebook, VS Code, Colab) renders the widget; GitHub,
nbviewer and nbconvert have no widget state and fall back to the ``text/html`` copy,
so a saved notebook still shows the estimate or the dataset summary.

Example::

    display_with_snapshot(calc.widget, calc.snapshot_html())
"""

from __future__ import annotations


def widget_bundle(widget, snapshot_html: str) -> dict:
    """The widget's own MIME bundle plus ``text/html`` (the static copy)."""
    bundle = dict(widget._repr_mimebundle_() or {})
    bundle["text/html"] = snapshot_html
    return bundle


def display_with_snapshot(widget, snapshot_html: str) -> None:
    """Display ``widget``; viewers without a kernel show ``snapshot_html`` instead."""
    from IPython.display import display

    display(widget_bundle(widget, snapshot_html), raw=True)

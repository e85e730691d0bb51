"""Show a widget together with its static copy, so a saved notebook reads the same without a kernel.

Why by hand: a trusted JupyterLab or Notebook 7 renders a widget output in preference
to every other MIME type of the same bundle, and once the kernel is gone it shows
"Error displaying widget: model not found" instead of the HTML beside it. Widget state
is saved with a notebook only where the user turned that on, and never in VS Code. So
the static copy is an output of its own, and plain CSS decides which of the two shows:

1. the static copy: ``text/html`` (plus a ``text/plain`` twin) with a display id; it is
   re-sent after every change of the widget, so the saved copy shows what was on screen;
2. the widget: its widget-view bundle and a one-line ``text/plain`` note.

While the widget is rendered, a ``<style>`` inside it hides the static copy. When it
cannot render (no kernel), a ``<style>`` inside the static copy hides the dead widget
output's error line. GitHub, nbviewer and nbconvert never render a widget without saved
state: they show the static copy and the note. Nothing here runs script.

Example::

    twin = StaticTwin(calc.widget, calc.snapshot_html, calc.snapshot_text)
    twin.display()
    ...                 # a control changed
    twin.refresh()      # the saved copy follows
"""

from __future__ import annotations

import uuid
from typing import Any, Callable, Optional

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
WIDGET_NOTE = "(interactive widget: shown when the notebook runs in Jupyter, VS Code or Colab)"
STATIC_ATTRIBUTE = "data-ftmagic-static"


def live_style(twin_id: str) -> str:
    """The ``<style>`` a rendered widget carries: it hides its static copy (whole output in Jupyter).

    Example::

        >>> "display:none" in live_style("abc")
        True
    """
    selector = f'[{STATIC_ATTRIBUTE}="{twin_id}"]'
    return f"<style>.jp-OutputArea-child:has({selector}), {selector} {{display:none}}</style>"


def static_style(twin_id: str) -> str:
    """The ``<style>`` the static copy carries: it hides the next output while it is not a widget.

    In JupyterLab and Notebook 7 a widget output that cannot render holds only a line of
    text ("Loading widget...", then "Error displaying widget: model not found"); a
    rendered widget is an element inside the output node, so a live widget is never hidden.
    (CSS allows no ``:has()`` inside ``:has()``, hence the ``:not(:has())`` form.)
    """
    selector = f'[{STATIC_ATTRIBUTE}="{twin_id}"]'
    return (f"<style>.jp-OutputArea-child:has({selector}) + .jp-OutputArea-child"
            f":not(:has(.jp-OutputArea-output > *)) {{display:none}}</style>")


def static_bundle(html: str, text: str, twin_id: str) -> dict:
    """The static copy's MIME bundle: the HTML in a marked ``div`` and its plain-text twin.

    Example::

        >>> static_bundle("<b>7 GiB</b>", "7 GiB", "abc")["text/html"].count('data-ftmagic-static="abc"')
        2
    """
    return {"text/html": f'{static_style(twin_id)}<div class="ftmagic-static" {STATIC_ATTRIBUTE}="{twin_id}">'
                         f"{html}</div>",
            "text/plain": text}


def widget_bundle(widget: Any) -> dict:
    """The widget's own bundle with a short note as its text (what text-only viewers show)."""
    bundle = {WIDGET_MIME: dict(widget._repr_mimebundle_()[WIDGET_MIME])}
    bundle["text/plain"] = WIDGET_NOTE
    return bundle


class StaticTwin:
    """A widget displayed with its static copy; :meth:`refresh` after the widget changed.

    ``html`` and ``text`` are functions that render the widget's current state.

    Example::

        twin = StaticTwin(box, lambda: summary_html(report), lambda: report.to_text())
        twin.display()
    """

    def __init__(self, widget: Any, html: Callable[[], str], text: Callable[[], str]) -> None:
        import ipywidgets

        self.id = uuid.uuid4().hex
        self.html, self.text = html, text
        self._style = ipywidgets.HTML(live_style(self.id), layout=ipywidgets.Layout(height="0px", margin="0"))
        self.widget = ipywidgets.VBox([self._style, widget], layout=ipywidgets.Layout(width="100%"))
        self.handle: Optional[Any] = None

    def bundle(self) -> dict:
        return static_bundle(self.html(), self.text(), self.id)

    def display(self) -> None:
        """Show the static copy, then the widget (which hides the copy while it is rendered)."""
        from IPython.display import display

        self.handle = display(self.bundle(), raw=True, display_id=True)
        display(widget_bundle(self.widget), raw=True)

    def refresh(self) -> None:
        """Re-send the static copy so that a notebook saved now shows the widget's current state."""
        if self.handle is not None:
            self.handle.update(self.bundle(), raw=True)

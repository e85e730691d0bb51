"""Widgets carry a static HTML copy, so a notebook saved and viewed without a kernel shows them."""

import json

import pytest


@pytest.fixture
def shown(monkeypatch):
    """Bundles passed to IPython's display() by ftmagic's widgets."""
    bundles = []

    def fake_display(obj, raw=False, **kwargs):
        assert raw, "widgets are published as raw MIME bundles"
        bundles.append(obj)

    monkeypatch.setattr("IPython.display.display", fake_display)
    return bundles


def test_bundle_keeps_the_live_widget_and_adds_html():
    import ipywidgets

    from ftmagic.widgets.static import widget_bundle

    bundle = widget_bundle(ipywidgets.HTML("x"), "<b>saved</b>")
    assert bundle["text/html"] == "<b>saved</b>"
    assert "application/vnd.jupyter.widget-view+json" in bundle


def test_memory_calculator_snapshot_has_the_verdict(shown):
    from ftmagic.widgets.memory import MemoryCalculator

    calc = MemoryCalculator(model="llama-3.2-1b", method="full", batch_size=8, seq_len=2048)
    calc._ipython_display_()
    html = shown[-1]["text/html"]
    assert html == calc.snapshot_html()
    assert "T4" in html and calc.verdict_box.value in html and calc.bar.value in html


def test_preview_magic_analyses_small_data_before_showing(shown, monkeypatch, tmp_path):
    from IPython.core.interactiveshell import InteractiveShell

    path = tmp_path / "d.jsonl"
    rows = [{"instruction": "say hi", "output": "hi"}, {"instruction": "say hi", "output": "hi"},
            {"instruction": "count", "output": ""}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    monkeypatch.setattr("ftmagic.widgets.preview._in_notebook", lambda shell: True)
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "ftmagic")
    try:
        shell.run_line_magic("ft_preview", f"{path} --name rep")
    finally:
        shell.run_line_magic("unload_ext", "ftmagic")
    report = shell.user_ns["rep"]
    assert report.complete
    html = shown[-1]["text/html"]
    assert "duplicate" in html  # the problem list is in the saved copy, not only in the live widget

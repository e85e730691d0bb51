"""Widgets are shown with a static copy of their own that follows every change, so a notebook
saved and reopened without a kernel shows what was on screen (tests/browser checks it in
JupyterLab and Notebook 7; these check the bundles in plain pytest)."""

import json
import re

import pytest

from ftmagic.widgets.static import STATIC_ATTRIBUTE, WIDGET_MIME, StaticTwin, live_style, static_bundle


class _Handle:
    def __init__(self, log):
        self.log = log

    def update(self, obj, raw=False):
        assert raw
        self.log.append(("update", obj))


@pytest.fixture
def shown(monkeypatch):
    """("display" | "update", bundle) for everything ftmagic's widgets publish."""
    log = []

    def fake_display(obj, raw=False, display_id=None, **kwargs):
        assert raw, "widgets are published as raw MIME bundles"
        log.append(("display", obj))
        return _Handle(log) if display_id else None

    monkeypatch.setattr("IPython.display.display", fake_display)
    return log


def _twin_id(html):
    return re.search(STATIC_ATTRIBUTE + r'="([0-9a-f]+)"', html).group(1)


def test_static_copy_first_then_the_widget_which_hides_it(shown):
    import ipywidgets

    twin = StaticTwin(ipywidgets.HTML("live"), lambda: "<b>saved</b>", lambda: "saved")
    twin.display()
    (kind1, static), (kind2, widget) = shown
    assert (kind1, kind2) == ("display", "display")
    assert set(static) == {"text/html", "text/plain"} and static["text/plain"] == "saved"
    assert "<b>saved</b>" in static["text/html"]
    assert set(widget) == {WIDGET_MIME, "text/plain"}, "no HTML beside the widget: a viewer shows the copy once"
    # The rendered widget carries the style that hides this very copy.
    style_child = twin.widget.children[0]
    assert style_child.value == live_style(_twin_id(static["text/html"]))
    assert widget[WIDGET_MIME]["model_id"] == twin.widget.model_id


def test_static_copy_hides_only_a_dead_widget_output():
    html = static_bundle("x", "x", "abc")["text/html"]
    # A widget output that cannot render holds only text ("Error displaying widget: ...").
    assert ":not(:has(.jp-OutputArea-output > *)) {display:none}" in html
    assert '.jp-OutputArea-child:has([data-ftmagic-static="abc"]) + .jp-OutputArea-child' in html
    assert "<script" not in html


def test_memory_calculator_copy_follows_a_control_change(shown):
    from ftmagic.widgets.memory import MemoryCalculator

    calc = MemoryCalculator(model="llama-3.1-8b", method="qlora", batch_size=1, seq_len=512,
                            gradient_checkpointing=True, gpu="T4")
    calc._ipython_display_()
    first = shown[0][1]["text/html"]
    assert calc.verdict_box.value in first and calc.bar.value in first and "fits" in first
    assert "batch size 1" in first  # the settings, since the copy has no controls to show them
    calc.controls["batch_size"].value = 16
    kind, latest = shown[-1]
    assert kind == "update" and "does not fit" in latest["text/html"] and "batch size 16" in latest["text/html"]
    assert _twin_id(latest["text/html"]) == _twin_id(first)
    assert latest["text/plain"].startswith("does not fit T4")


def test_preview_magic_analyses_small_data_before_showing_and_the_copy_follows_the_pager(shown, monkeypatch,
                                                                                         tmp_path):
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
    displays = [bundle for kind, bundle in shown if kind == "display"]
    assert len(displays) == 2 and WIDGET_MIME in displays[1]
    html = displays[0]["text/html"]
    assert "duplicate" in html  # the problem list is in the saved copy, not only in the live widget
    assert "record 0" in html
    assert "problems: 2 (empty field 1, exact duplicate 1)" in displays[0]["text/plain"]  # the text twin too


def test_preview_copy_follows_the_pager(shown, test_tokenizer):
    import ftmagic
    from ftmagic.widgets.preview import PreviewWidget

    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(3)]
    w = PreviewWidget(ftmagic.preview(rows, tokenizer=test_tokenizer, max_seq_len=64))
    w._ipython_display_()
    w.next.click()
    kind, latest = shown[-1]
    assert kind == "update" and "record 1" in latest["text/html"] and "answer 1" in latest["text/html"]

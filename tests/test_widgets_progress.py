"""The progress texts, the live widget fed with events, the Stop button and the static summary."""

from __future__ import annotations

import io
import re
import threading
from xml.etree import ElementTree

import pytest

from ftmagic.textprogress import (RunState, TextProgress, format_bar, format_bytes, format_count, format_duration,
                                  format_end_line, format_loss, format_lr, format_params, format_plan_line,
                                  format_step_line)
from ftmagic.widgets.summary import as_mimebundle, loss_chart_svg, summary_html, summary_rows, summary_text

PLAN = {"event": "plan", "model": "tiny", "method": "lora", "device": "cpu", "precision": "fp32",
        "reason": "no GPU found", "format": "messages", "train_records": 90, "eval_records": 10,
        "output_dir": "out/run"}
START = {"event": "start", "trainable_params": 12_288, "total_params": 1_000_000, "max_steps": 10,
         "epochs": 1.0, "resumed_from_step": 0}


def step(n, loss, max_steps=10, **extra):
    event = {"event": "step", "step": n, "max_steps": max_steps, "epoch": n / max_steps, "loss": loss,
             "lr": 2e-4, "grad_norm": 1.0, "tokens": 100, "tokens_per_s": 2500.0, "elapsed_s": n * 2.0,
             "eta_s": (max_steps - n) * 2.0, "memory_bytes": 300 * 1024**2 + n}
    event.update(extra)
    return event


def run_events(n=10, reason="finished"):
    events = [PLAN, START]
    for i in range(1, n + 1):
        events.append(step(i, 3.0 - 0.2 * i))
        if i == 5:
            events.append({"event": "eval", "step": 5, "eval_loss": 2.25})
            events.append({"event": "checkpoint", "step": 5, "path": "out/run/checkpoint-5"})
    events.append({"event": "eval", "step": n, "eval_loss": 1.5})
    events.append({"event": "end", "reason": reason, "output_dir": "out/run",
                   "metrics": {"train_loss": 1.25, "eval_loss": 1.5, "steps": n, "runtime_s": 20.0,
                               "stopped": reason != "finished"}})
    return events


# --------------------------------------------------------------------------- pure formatters


def test_formatters_exact_strings():
    assert format_duration(0) == "00:00"
    assert format_duration(59.6) == "01:00"
    assert format_duration(3600) == "1:00:00"
    assert format_duration(float("nan")) == "?"
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(300 * 1024**2) == "300 MiB"
    assert format_bytes(15.5 * 1024**3) == "15.5 GiB"
    assert format_count(999) == "999"
    assert format_count(1000) == "1.00k"
    assert format_count(123_456_789) == "123M"
    assert format_loss(float("nan")) == "nan"
    assert format_loss(10.0) == "10"
    assert format_lr(3e-5) == "3.0e-05"
    assert format_bar(0.0, 4) == "[----]"
    assert format_bar(1.5, 4) == "[####]"
    assert format_bar(None, 3) == "[???]"
    assert format_params(12_288, 1_000_000) == "12.3k of 1.00M parameters trainable (1.23%)"


def test_plan_line_names_every_part():
    line = format_plan_line(PLAN)
    assert line == "ftmagic: tiny | lora | cpu fp32 | data: 90 train + 10 eval records (messages)"
    with_params = format_plan_line(PLAN, START)
    assert with_params.endswith("| 12.3k of 1.00M parameters trainable (1.23%)")


def test_step_and_end_lines():
    assert format_step_line(step(4, 2.5), width=10) == (
        "[####------] 4/10 ep 0.40 | loss 2.5 | lr 2.0e-04 | 2.50k tok/s | 00:08<00:12 | mem 300 MiB")
    assert format_end_line({"reason": "stopped", "metrics": {"steps": 3}, "output_dir": "o"}) == \
        "stopped after 3 steps | saved to o"
    assert format_end_line({"reason": "early_stopping", "metrics": {"steps": 8, "eval_loss": 1.0}}) == \
        "stopped early (no eval improvement) after 8 steps | eval loss 1"


def test_run_state_accumulates_points_and_peak_memory():
    state = RunState()
    for event in run_events(6):
        state.update(event)
    assert state.train_points[:2] == [(1, 2.8), (2, 2.6)]
    assert len(state.train_points) == 6
    assert state.eval_points == [(5, 2.25), (6, 1.5)]
    assert state.peak_memory_bytes == 300 * 1024**2 + 6
    assert state.step == 6 and state.max_steps == 10 and state.fraction == pytest.approx(0.6)
    assert [c.step for c in state.checkpoints] == [5]
    # A non-finite loss is kept out of the chart (it would break the scale) but counts as a step.
    state.update(step(7, float("nan")))
    assert len(state.train_points) == 6 and state.step == 7


def test_text_progress_in_a_log_prints_throttled_lines():
    clock = iter([0.0, 0.1, 0.2, 1.0, 1.1, 1.2, 1.3, 1.4, 1.45, 1.6]).__next__
    out = io.StringIO()
    progress = TextProgress(out, dynamic=False, min_interval=0.5, width=10, clock=clock)
    for event in run_events(10):
        progress(event)
    lines = out.getvalue().splitlines()
    assert lines[0] == format_plan_line(PLAN)
    assert lines[1] == "12.3k of 1.00M parameters trainable (1.23%)"
    step_lines = [line for line in lines if line.startswith("[")]
    # Step 1 prints, steps 2-3 are within 0.5 s, step 4 prints, 5-9 within 0.5 s, step 10 is last.
    assert [re.search(r"\] (\d+)/", line).group(1) for line in step_lines] == ["1", "4", "10"]
    assert "step 5: eval loss 2.25" in lines
    assert "step 5: checkpoint saved to out/run/checkpoint-5" in lines
    assert lines[-1] == "finished after 10 steps in 00:20 | train loss 1.25 | eval loss 1.5 | saved to out/run"


def test_text_progress_on_a_terminal_redraws_in_place():
    out = io.StringIO()
    progress = TextProgress(out, dynamic=True, min_interval=0.0, width=4, header=False)
    progress(step(1, 2.0, max_steps=2))
    progress(step(2, 1.0, max_steps=2))
    progress({"event": "message", "level": "warning", "text": "QLoRA needs CUDA; using LoRA"})
    text = out.getvalue()
    assert text.count("\r") == 2
    assert "\r[##--] 1/2" in text and "\r[####] 2/2" in text
    assert text.endswith("\nwarning: QLoRA needs CUDA; using LoRA\n")


# --------------------------------------------------------------------------- chart and summary


def test_loss_chart_svg_scales_points_into_the_plot():
    svg = loss_chart_svg([(1, 3.0), (2, 2.0), (3, 1.0)], [(3, 1.5)], width=200, height=100)
    assert svg.startswith('<svg xmlns="http://www.w3.org/2000/svg" width="200" height="100"')
    points = re.search(r'class="train"[^>]*points="([^"]+)"', svg).group(1).split()
    xs = [float(p.split(",")[0]) for p in points]
    ys = [float(p.split(",")[1]) for p in points]
    # Plot area: x from 48 to 188, y from 10 to 74; loss 3 (the highest) is drawn nearest the top.
    assert xs == [48.0, 118.0, 188.0]
    assert ys[0] < ys[1] < ys[2] and 10 <= ys[0] and ys[2] <= 74
    assert svg.count('<circle class="eval"') == 1 and "&#9679; eval" in svg
    assert ">3<" in svg and ">1<" in svg  # the loss range is labelled
    assert loss_chart_svg([], []) == ""
    # Well-formed XML: browsers, GitHub and nbconvert all parse it the same way.
    root = ElementTree.fromstring(svg)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"


def test_loss_chart_downsamples_long_runs():
    svg = loss_chart_svg([(i, 1.0 / i) for i in range(1, 5001)], max_points=100)
    points = re.search(r'class="train"[^>]*points="([^"]+)"', svg).group(1).split()
    assert len(points) == 100
    assert points[-1].startswith("468.0,")  # the last step is always kept, at the right edge


def test_single_point_chart_is_a_dot():
    svg = loss_chart_svg([(1, 2.0)])
    assert '<circle class="train"' in svg and "polyline" not in svg


def test_summary_html_is_static_and_complete():
    state = RunState()
    for event in run_events(10):
        state.update(event)
    html = summary_html(state, {"train_loss": 1.25, "peak_memory_bytes": 2 * 1024**3}, name="ft")
    assert "<script" not in html and "<svg" in html and 'class="train"' in html
    rows = dict(summary_rows(state, {"train_loss": 1.25, "peak_memory_bytes": 2 * 1024**3}, name="ft"))
    assert rows["status"] == "finished"
    assert rows["steps"] == "10"
    assert rows["train loss"] == "1.25" and rows["eval loss"] == "1.5"
    assert rows["runtime"] == "00:20"
    assert rows["peak memory"] == "2.00 GiB"
    assert rows["output"] == "out/run"
    assert rows["why this device"] == "no GPU found"
    assert rows["parameters"] == "12.3k of 1.00M parameters trainable (1.23%)"
    assert "resume" not in rows
    for label, value in rows.items():
        assert f"<th style=\"text-align:left;padding:2px 12px 2px 0\">{label}</th>" in html
    bundle = as_mimebundle(state, {"train_loss": 1.25}, name="ft")
    assert set(bundle) == {"text/html", "text/plain"}
    assert "train loss: 1.25" in bundle["text/plain"].splitlines()


def test_summary_of_a_stopped_run_says_how_to_resume():
    state = RunState()
    for event in run_events(4, reason="stopped"):
        state.update(event)
    rows = dict(summary_rows(state))
    assert rows["status"] == "stopped"
    assert rows["steps"] == "4/10"
    assert "--resume" in rows["resume"]
    assert "status: stopped" in summary_text(state)


def test_summary_escapes_html_in_messages():
    state = RunState()
    state.update({"event": "message", "level": "warning", "text": "<b>bad</b>"})
    html = summary_html(state)
    assert "&lt;b&gt;bad&lt;/b&gt;" in html and "<b>bad</b>" not in html
    assert dict(summary_rows(state))["status"] == "did not finish"


# --------------------------------------------------------------------------- the widget


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_widget_copies_event_values_in():
    from ftmagic.widgets.progress import TrainingProgress, progress_fields

    clock = FakeClock()
    progress = TrainingProgress(clock=clock, redraw_interval=0.0, chart_interval=0.0)
    assert "preparing" in progress.header.value
    progress(PLAN)
    progress(START)
    assert "tiny | lora | cpu fp32" in progress.header.value
    assert "<small" in progress.header.value and "no GPU found" in progress.header.value
    assert "12.3k of 1.00M parameters trainable" in progress.header.value
    progress(step(4, 2.5))
    assert progress.bar.value == pytest.approx(0.4)
    fields = progress_fields(progress.state)
    assert fields["step"] == "step 4/10"
    assert fields["rate"] == "2.50k tokens/s"
    assert fields["memory"] == "300 MiB"
    for text in ("step 4/10", "epoch 0.40", "<b>loss</b> 2.5", "<b>lr</b> 2.0e-04", "2.50k tokens/s",
                 "00:08 elapsed, 00:12 left", "<b>memory</b> 300 MiB"):
        assert text in progress.status.value
    assert 'class="train"' in progress.chart.value
    progress({"event": "message", "level": "warning", "text": "QLoRA needs CUDA; using LoRA"})
    assert "QLoRA needs CUDA; using LoRA" in progress.log.value


def test_widget_throttles_chart_redraws_but_not_evals_or_end():
    from ftmagic.widgets.progress import TrainingProgress

    clock = FakeClock()
    progress = TrainingProgress(clock=clock, redraw_interval=0.2, chart_interval=1.0)
    progress(PLAN)
    progress(START)
    for i in range(1, 11):
        clock.now = (i - 1) * 0.125  # ten steps in 1.125 s
        progress(step(i, 3.0 - 0.1 * i))
    assert progress.chart_redraws == 2  # step 1 (t=0) and step 9 (t=1.0, the interval elapsed)
    # Texts redraw at most every 0.2 s: the last redraw was at step 9; step 10 came 0.125 s later.
    assert progress.bar.value == pytest.approx(0.9)
    progress({"event": "eval", "step": 10, "eval_loss": 2.0})
    assert progress.chart_redraws == 3 and 'class="eval"' in progress.chart.value
    progress({"event": "end", "reason": "finished", "metrics": {}, "output_dir": "o"})
    assert progress.chart_redraws == 4
    assert progress.bar.value == 1.0 and progress.bar.bar_style == "success"
    assert progress.button.disabled and progress.button.description == "Done"
    # Every step is in the chart's data even when redraws were skipped.
    assert len(progress.state.train_points) == 10


def test_stop_button_sets_the_event_once():
    from ftmagic.widgets.progress import TrainingProgress

    stop = threading.Event()
    progress = TrainingProgress(stop=stop)
    progress(PLAN)
    progress(step(2, 2.0))
    assert not stop.is_set() and not progress.button.disabled
    progress.button.click()
    assert stop.is_set()
    assert progress.button.disabled and progress.button.description == "Stopping..."
    assert "checkpoint will be saved" in progress.log.value
    progress({"event": "end", "reason": "stopped", "metrics": {"stopped": True}, "output_dir": "o"})
    assert progress.button.description == "Stopped" and progress.bar.bar_style == "warning"
    assert progress.bar.value == pytest.approx(0.2)  # a stopped run does not pretend to be complete


def test_clicking_stop_after_the_end_does_nothing():
    from ftmagic.widgets.progress import TrainingProgress

    progress = TrainingProgress()
    for event in run_events(3):
        progress(event)
    progress._on_stop_click()
    assert not progress.stop.is_set()


def test_finish_replaces_the_widget_with_the_summary(monkeypatch):
    from ftmagic.widgets.progress import TrainingProgress

    shown = []

    class Handle:
        def update(self, obj, raw=False):
            shown.append(("update", obj, raw))

    monkeypatch.setattr("IPython.display.display", lambda obj, **kw: shown.append(("display", obj, kw)) or Handle())
    progress = TrainingProgress()
    progress.show()
    assert shown[0][0] == "display" and shown[0][1] is progress.widget and shown[0][2] == {"display_id": True}
    for event in run_events(10):
        progress(event)
    progress.finish({"train_loss": 1.25}, output_dir="out/run", name="ft")
    kind, bundle, raw = shown[-1]
    assert kind == "update" and raw is True
    assert "ftmagic-summary" in bundle["text/html"] and "<svg" in bundle["text/html"]
    assert "result: `ft`" in bundle["text/plain"]
    # The live widget's comms are closed: nothing is left to render without a kernel.
    assert progress.widget.comm is None and progress.button.comm is None


def test_a_kernel_without_subshells_gets_the_interrupt_hint(monkeypatch):
    from ftmagic.widgets import progress as module

    monkeypatch.setattr("IPython.display.display", lambda obj, **kw: None)
    monkeypatch.setattr(module, "_kernel", lambda: object())  # a kernel with no subshell support
    progress = module.TrainingProgress()
    progress.show()
    assert progress.button.tooltip == module.NO_LIVE_CLICK_HINT
    assert "interrupt button (\u25a0)" in progress.log.value
    progress({"event": "message", "level": "info", "text": "resuming from checkpoint-4"})
    assert "resuming from checkpoint-4<br>to stop early" in progress.log.value
    progress({"event": "end", "reason": "finished", "metrics": {}})
    assert "to stop early" not in progress.log.value


def test_no_side_channel_outside_a_kernel():
    from ftmagic.widgets.liveclicks import open_side_channel
    from ftmagic.widgets.progress import TrainingProgress

    progress = TrainingProgress()
    assert open_side_channel(progress.button) is None

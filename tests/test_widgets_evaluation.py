"""What evaluation by generation and sweeps look like: pure functions, and the widgets fed with events."""

from __future__ import annotations

import pytest

from ftmagic.evalevents import Generations, SweepEnd, Trial
from ftmagic.events import End, Eval, Step
from ftmagic.textprogress import RunState, TextProgress
from ftmagic.widgets.evaluation import answers_rows, answers_table_html, answers_table_text, metric_chart_svg
from ftmagic.widgets.sweep import (SweepState, param_plot_svg, sweep_summary_html, sweep_summary_text,
                                   trials_table_html)


def _table(step, answers):
    rows = [{"prompt": f"reverse: {w}", "reference": w[::-1], "answer": a} for w, a in zip(["ab", "cd"], answers)]
    return Generations(step=step, rows=rows, metrics={}, total=2)


def _events():
    return [_table(0, ["ab", "cd"]), Eval(step=0, metrics={"exact_match": 0.0}),
            Step(step=5, max_steps=10, loss=2.0),
            _table(5, ["ba", "cd"]), Eval(step=5, eval_loss=1.5, metrics={"exact_match": 0.5}),
            Step(step=10, max_steps=10, loss=1.0),
            _table(10, ["ba", "dc"]), Eval(step=10, eval_loss=1.0, metrics={"exact_match": 1.0}),
            End(reason="finished", metrics={"steps": 10})]


def test_run_state_keeps_metric_curves_and_answer_tables():
    state = RunState()
    for event in _events():
        state.update(event.to_dict())  # the dict form (history.json) reads back too
    assert state.metric_points == {"exact_match": [(0, 0.0), (5, 0.5), (10, 1.0)]}
    assert [g.step for g in state.generations] == [0, 5, 10]
    header, rows = answers_rows(state.generations)
    assert header == ["prompt", "reference", "base", "step 5", "step 10"]
    assert rows == [["reverse: ab", "ba", "ab", "ba", "ba"], ["reverse: cd", "dc", "cd", "cd", "dc"]]
    assert answers_table_text(state.generations).splitlines()[1].split() == ["reverse:", "ab", "ba", "ab", "ba", "ba"]
    table = answers_table_html(state.generations)
    assert table.count("&#10003;</td>") == 3 and "2 of 2 prompts" in table  # ba, ba and dc equal their references
    assert answers_rows(state.generations, steps=1)[0] == ["prompt", "reference", "base", "step 10"]


def test_metric_chart_draws_a_line_per_metric():
    svg = metric_chart_svg({"exact_match": [(0, 0.0), (10, 1.0)], "chrf": [(0, 0.2), (10, 0.9)]})
    assert svg.count("<polyline") == 2 and svg.count("<circle") == 4 and "exact_match 1" in svg
    assert metric_chart_svg({}) == "" and metric_chart_svg({"x": []}) == ""


def test_training_widget_and_summary_show_the_evaluation():
    pytest.importorskip("ipywidgets")
    from ftmagic.widgets.progress import TrainingProgress
    from ftmagic.widgets.summary import as_mimebundle

    progress = TrainingProgress(clock=lambda: 0.0)
    for event in _events():
        progress(event)
    assert 'class="metric exact_match"' in progress.evaluation.value and "step 10" in progress.evaluation.value
    bundle = as_mimebundle(progress.state, {"steps": 10})
    assert "ftmagic-answers" in bundle["text/html"] and 'class="metric exact_match"' in bundle["text/html"]
    assert "exact_match: 0 (base) -> 1" in bundle["text/plain"]
    assert "prompt       reference  base  step 5  step 10" in bundle["text/plain"]
    progress.close()


def test_text_progress_prints_evaluations_and_trials(capsys):
    import io

    out = io.StringIO()
    printer = TextProgress(out, dynamic=False)
    for event in _events()[:2]:
        printer(event)
    printer(Trial(number=1, state="running", params={"lr": 0.003}, metric="exact_match", n_trials=6))
    printer(Trial(number=1, state="failed", params={"lr": 0.003}, metric="exact_match", n_trials=6, message="boom"))
    printer(SweepEnd(metric="exact_match", direction="maximize", best_number=None, counts={"failed": 1}))
    assert out.getvalue().splitlines() == [
        "step 0 (base model): exact_match 0", "trial 1/6 running: lr=0.003", "trial 1/6 failed: lr=0.003; boom",
        "sweep finished: no trial completed | 1 failed"]


TRIALS = [
    {"number": 0, "state": "complete", "params": {"lr": 0.001, "lora_r": 8}, "value": 0.2, "runtime_s": 30, "curve": []},
    {"number": 1, "state": "complete", "params": {"lr": 0.01, "lora_r": 16}, "value": 0.9, "runtime_s": 31, "curve": []},
    {"number": 2, "state": "pruned", "params": {"lr": 0.1, "lora_r": 8}, "value": None, "runtime_s": 5,
     "curve": [[0, 0.0], [50, 0.05]]},
    {"number": 3, "state": "skipped", "params": {"lr": 0.1, "lora_r": 64}, "value": None, "message": "does not fit"},
]


def test_trials_table_and_plots():
    html = trials_table_html(TRIALS, ["lr", "lora_r"], "exact_match", best_number=1)
    assert html.count("<tr>") == 5 and "font-weight:bold" in html and "does not fit" in html
    lr = param_plot_svg(TRIALS, "lr", "exact_match")
    assert "(log)" in lr and lr.count("<circle") == 3  # the pruned trial at its last value, hollow
    assert 'class="trial pruned"' in lr and 'fill="none"' in lr
    rank = param_plot_svg(TRIALS, "lora_r", "exact_match", log=False)
    assert "(log)" not in rank and rank.count("<circle") == 3
    assert param_plot_svg([{"number": 0, "state": "failed", "params": {"lr": 1}, "value": None}], "lr", "m") == ""
    method = param_plot_svg([{"number": 0, "state": "complete", "params": {"method": "lora"}, "value": 0.5},
                             {"number": 1, "state": "complete", "params": {"method": "dora"}, "value": 0.7}],
                            "method", "exact_match")
    assert ">lora<" in method and ">dora<" in method


def test_sweep_widget_fed_with_events_and_its_static_summary():
    pytest.importorskip("ipywidgets")
    from ftmagic.widgets.sweep import SweepProgress

    progress = SweepProgress()
    progress(Trial(number=0, state="running", params={"lr": 0.001}, metric="exact_match", n_trials=2))
    progress(Step(step=3, max_steps=10, loss=1.5))
    assert "step 3/10" in progress.current.value
    progress(Trial(number=0, state="complete", params={"lr": 0.001}, value=0.5, metric="exact_match", n_trials=2,
                   runtime_s=12.0, curve=[[0, 0.0], [10, 0.5]]))
    assert "1 trial(s) ended of 2" in progress.header.value and "<circle" in progress.plots.value
    progress(SweepEnd(metric="exact_match", direction="maximize", best_number=0, best_value=0.5,
                      best_params={"lr": 0.001}, counts={"complete": 1}))
    progress.button.click()
    assert progress.stop.is_set()
    state = progress.state
    html = sweep_summary_html(state, "%%finetune --name ft\nlr: 0.001", "ft")
    assert "best trial 0 (exact_match 0.5)" in html and "<pre" in html and "<code>ft_sweep</code>" in html
    text = sweep_summary_text(state, "%%finetune --name ft\nlr: 0.001")
    assert text.splitlines()[2].split() == ["trial", "lr", "exact_match", "state", "time"]
    assert text.endswith("best configuration:\n%%finetune --name ft\nlr: 0.001")
    progress.close()


def test_a_resumed_sweep_shows_the_trials_of_earlier_sessions(monkeypatch):
    pytest.importorskip("ipywidgets")
    import IPython.display

    from ftmagic.widgets.sweep import SweepProgress

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda bundle, raw=False: shown.append(bundle))
    progress = SweepProgress()  # no trial ran in this session: every trial comes from the sweep's record
    progress(SweepEnd(metric="exact_match", direction="maximize", best_number=1, best_value=0.9,
                      best_params={"lr": 0.01, "lora_r": 16}, counts={"complete": 2, "pruned": 1, "skipped": 1}))
    progress.finish(trials=TRIALS, keys=["lr", "lora_r"])
    text = shown[0]["text/plain"]
    assert [line.split()[0] for line in text.splitlines()[3:]] == ["0", "1", "2", "3"]
    assert shown[0]["text/html"].count("<circle") == 6  # three trials with a value, in two plots

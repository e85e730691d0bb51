"""Static HTML summary of a run, with the loss chart as inline SVG.

This is what stays in a saved notebook: plain HTML that GitHub, nbviewer and nbconvert
show without a kernel or a widget manager. Everything here is a pure function of the
run's events and metrics, so it is tested with string asserts.

Example::

    from ftmagic.widgets.summary import loss_chart_svg
    svg = loss_chart_svg([(1, 2.5), (2, 2.1), (3, 1.8)], [(3, 2.0)])
"""

from __future__ import annotations

import html
from typing import Any, Iterable, Optional, Sequence

from ftmagic.textprogress import (METRIC_LABELS, RunState, format_bytes, format_count, format_data, format_duration,
                                  format_loss, format_metrics, format_params)

TRAIN_COLOR = "#1f77b4"
EVAL_COLOR = "#ff7f0e"


def _downsample(points: Sequence[tuple[float, float]], max_points: int) -> list[tuple[float, float]]:
    """Keep at most ``max_points`` points (evenly spaced, last one kept) so the SVG stays small."""
    points = list(points)
    if len(points) <= max_points:
        return points
    stride = len(points) / (max_points - 1)
    kept = [points[int(i * stride)] for i in range(max_points - 1)]
    kept.append(points[-1])
    return kept


def loss_chart_svg(train: Iterable[tuple[float, float]], eval: Iterable[tuple[float, float]] = (), *,
                   width: int = 480, height: int = 200, max_points: int = 400) -> str:
    """An SVG line chart of (step, loss) pairs: train as a line, eval as a line with dots.

    Returns ``""`` when there is nothing to draw. Text and frame take the surrounding
    text colour (``currentColor``), so the chart reads on light and dark themes; it is
    ``width`` wide at most and shrinks with a narrow output.

    Example::

        svg = loss_chart_svg([(1, 2.0), (2, 1.5)], [(2, 1.7)])
        assert svg.startswith("<svg") and "polyline" in svg
    """
    train = _downsample([(float(s), float(v)) for s, v in train], max_points)
    evals = _downsample([(float(s), float(v)) for s, v in eval], max_points)
    everything = train + evals
    if not everything:
        return ""
    left, right, top, bottom = 48, 12, 10, 26
    plot_w, plot_h = width - left - right, height - top - bottom
    x_min = min(s for s, _ in everything)
    x_max = max(s for s, _ in everything)
    y_min = min(v for _, v in everything)
    y_max = max(v for _, v in everything)
    if x_max == x_min:
        x_min, x_max = x_min - 1, x_max + 1
    pad = (y_max - y_min) * 0.05 or max(abs(y_max) * 0.05, 0.05)
    y_lo, y_hi = y_min - pad, y_max + pad

    def xy(step: float, value: float) -> str:
        x = left + (step - x_min) / (x_max - x_min) * plot_w
        y = top + (y_hi - value) / (y_hi - y_lo) * plot_h
        return f"{x:.1f},{y:.1f}"

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" style="width:100%;max-width:{width}px;height:auto" '
        f'font-family="sans-serif" font-size="11" fill="currentColor" role="img" aria-label="loss chart">',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="currentColor" '
        f'stroke-opacity="0.3"/>',
        # Axis labels: the range is what a reader needs; gridlines would only add bytes.
        f'<text x="{left - 4}" y="{top + 10}" text-anchor="end">{format_loss(y_max)}</text>',
        f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end">{format_loss(y_min)}</text>',
        f'<text x="{left}" y="{height - 8}">step {int(min(s for s, _ in everything))}</text>',
        f'<text x="{left + plot_w}" y="{height - 8}" text-anchor="end">{int(max(s for s, _ in everything))}</text>',
    ]
    if train:
        points = " ".join(xy(s, v) for s, v in train)
        if len(train) == 1:
            x, y = xy(*train[0]).split(",")
            parts.append(f'<circle class="train" cx="{x}" cy="{y}" r="2.5" fill="{TRAIN_COLOR}"/>')
        else:
            parts.append(f'<polyline class="train" fill="none" stroke="{TRAIN_COLOR}" stroke-width="1.5" '
                         f'points="{points}"/>')
    if evals:
        if len(evals) > 1:
            points = " ".join(xy(s, v) for s, v in evals)
            parts.append(f'<polyline class="eval" fill="none" stroke="{EVAL_COLOR}" stroke-width="1.5" '
                         f'points="{points}"/>')
        for s, v in evals:
            x, y = xy(s, v).split(",")
            parts.append(f'<circle class="eval" cx="{x}" cy="{y}" r="2.5" fill="{EVAL_COLOR}"/>')
    legend_x = left + plot_w - 100
    parts.append(f'<text x="{legend_x}" y="{top + 14}" fill="{TRAIN_COLOR}">&#9473; train</text>')
    if evals:
        parts.append(f'<text x="{legend_x + 50}" y="{top + 14}" fill="{EVAL_COLOR}">&#9679; eval</text>')
    parts.append("</svg>")
    return "".join(parts)


def summary_rows(state: RunState, metrics: Optional[dict] = None, output_dir: Optional[str] = None,
                 name: Optional[str] = None) -> list[tuple[str, str]]:
    """The (label, value) rows of the summary table, as plain text.

    ``metrics`` (the RunResult's) wins over what the ``end`` event carried.

    Example::

        rows = dict(summary_rows(state, {"train_loss": 1.2, "steps": 10}))
        assert rows["train loss"] == "1.2"
    """
    end = state.end
    metrics = {**((end.metrics if end else None) or {}), **(metrics or {})}
    rows: list[tuple[str, str]] = []
    reason = (end.reason if end else None) or ("stopped" if metrics.get("stopped") else "did not finish")
    rows.append(("status", reason.replace("_", " ")))
    steps = metrics.get("steps", state.step if state.last_step else None)
    if steps is not None:
        total = state.max_steps
        rows.append(("steps", f"{steps}/{total}" if total and total != steps else str(steps)))
    if state.last_step and state.last_step.epoch is not None:
        rows.append(("epoch", f"{state.last_step.epoch:.2f}"))
    if metrics.get("train_loss") is not None:
        rows.append(("train loss", format_loss(metrics["train_loss"])))
    elif state.train_points:
        rows.append(("train loss (last step)", format_loss(state.train_points[-1][1])))
    eval_loss = metrics.get("eval_loss", state.eval_points[-1][1] if state.eval_points else None)
    if eval_loss is not None:
        rows.append(("eval loss", format_loss(eval_loss)))
    # The objective's own metrics (reward margin, accuracy, F1) in one row; a metric of
    # evaluation by generation gets a row of its own, with the base model's value before it.
    eval_metrics = metrics.get("eval_metrics") or state.eval_metrics
    objective_keys = tuple(k for k in eval_metrics or {} if k in METRIC_LABELS or k.startswith("f1/"))
    if objective_keys:
        rows.append(("eval metrics", format_metrics(eval_metrics, objective_keys)))
    elif state.last_step and state.last_step.metrics:
        rows.append(("train metrics (last step)", format_metrics(state.last_step.metrics)))
    for metric, points in state.metric_points.items():
        if metric in METRIC_LABELS or metric.startswith(("f1/", "tp/", "fp/", "fn/")):
            continue
        first, last = points[0], points[-1]
        shown = format_loss(last[1]) if first[0] != 0 or len(points) == 1 else \
            f"{format_loss(first[1])} (base) -> {format_loss(last[1])}"
        rows.append((metric, shown))
    if metrics.get("runtime_s") is not None:
        rows.append(("runtime", format_duration(metrics["runtime_s"])))
    if state.last_step and state.last_step.tokens_per_s is not None:
        rows.append(("throughput", f"{format_count(state.last_step.tokens_per_s)} tokens/s"))
    peak = metrics.get("peak_memory_bytes", state.peak_memory_bytes)
    if peak is not None:
        rows.append(("peak memory", format_bytes(peak)))
    if state.start is not None:
        rows.append(("parameters", format_params(state.start.trainable_params, state.start.total_params)))
    if state.plan is not None:
        plan = state.plan
        rows.append(("run", f"{plan.model} | {plan.method} | {plan.device} {plan.precision}"))
        rows.append(("data", format_data(plan)))
        if plan.reason:
            rows.append(("why this device", plan.reason))
    output_dir = output_dir or (end.output_dir if end else None) or (state.plan.output_dir if state.plan else None)
    if output_dir:
        rows.append(("output", str(output_dir)))
    if state.checkpoints:
        last = state.checkpoints[-1]
        rows.append(("checkpoint", f"step {last.step}: {last.path}"))
    if reason in ("stopped", "interrupted"):
        rows.append(("resume", "run the cell again with `--resume` (or `resume: true`) to continue"))
    if name:
        objective = state.plan.objective if state.plan is not None else "sft"
        use = {"reward": ".score(conversations)", "classify": ".predict(texts)"}.get(objective, ".generate(prompt)")
        rows.append(("result", f"`{name}` (RunResult: .metrics, .history, {use})"))
    return rows


def summary_text(state: RunState, metrics: Optional[dict] = None, output_dir: Optional[str] = None,
                 name: Optional[str] = None) -> str:
    """The summary as plain text (the ``text/plain`` twin of :func:`summary_html`)."""
    from ftmagic.widgets.evaluation import answers_table_text

    text = "\n".join(f"{label}: {value}" for label, value in summary_rows(state, metrics, output_dir, name))
    table = answers_table_text(state.generations)
    return text + ("\n\n" + table if table else "")


def summary_html(state: RunState, metrics: Optional[dict] = None, output_dir: Optional[str] = None,
                 name: Optional[str] = None, title: str = "ftmagic run") -> str:
    """Self-contained HTML: a metrics table and the loss chart (inline SVG); no scripts.

    Example::

        state = RunState()
        for event in events:
            state.update(event)
        IPython.display.display(IPython.display.HTML(summary_html(state, result.metrics, name="ft")))
    """
    rows = "".join(
        f'<tr><th style="text-align:left;padding:2px 12px 2px 0">{html.escape(label)}</th>'
        f'<td style="text-align:left;padding:2px 0">{html.escape(value)}</td></tr>'
        for label, value in summary_rows(state, metrics, output_dir, name)
    )
    chart = loss_chart_svg(state.train_points, state.eval_points)
    from ftmagic.widgets.evaluation import evaluation_html

    evaluation = evaluation_html(state)
    messages = "".join(
        f'<div class="ftmagic-message">{"&#9888; " if m.level == "warning" else ""}'
        f'{html.escape(m.text)}</div>'
        for m in state.messages
    )
    return (
        '<div class="ftmagic-summary" style="font-family:sans-serif;font-size:13px">'
        f'<div style="font-weight:bold;margin-bottom:4px">{html.escape(title)}</div>'
        '<div style="display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start">'
        f'<table style="border-collapse:collapse">{rows}</table>'
        f'<div style="flex:0 1 480px;min-width:280px">{chart}</div></div>{evaluation}{messages}</div>'
    )


def as_mimebundle(state: RunState, metrics: Optional[dict] = None, output_dir: Optional[str] = None,
                  name: Optional[str] = None) -> dict[str, Any]:
    """``{"text/html": ..., "text/plain": ...}`` for ``display(bundle, raw=True)``.

    The plain-text twin keeps the summary readable in text-only front ends and nbconvert
    to markdown or script.
    """
    return {"text/html": summary_html(state, metrics, output_dir, name),
            "text/plain": summary_text(state, metrics, output_dir, name)}

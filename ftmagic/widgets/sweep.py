"""The sweep's live display: a table of trials, the metric against each parameter, the best cell.

Built only from events (``trial``, ``sweep_end`` and the running trial's own events), like
the training widget; every string and chart comes from a pure function here, so it is
tested with string asserts, and the static summary that replaces the widget (plain HTML
with inline SVG) is what stays in a saved notebook.

Example::

    progress = SweepProgress()
    progress.show()
    result = sweep(config, on_event=progress, stop=progress.stop)
    progress.finish(result, name="ft", cell_values=values)
"""

from __future__ import annotations

import html
import math
import threading
import time
from typing import Any, Optional, Sequence

from ftmagic.textprogress import RunState, format_duration, format_loss
from ftmagic.widgets.liveclicks import LiveDisplay

STATE_COLORS = {"complete": "#2ca02c", "pruned": "#ff7f0e", "failed": "#d62728", "skipped": "#7f7f7f",
                "running": "#1f77b4", "stopped": "#d62728", "interrupted": "#d62728"}


def _value_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def trials_rows(trials: Sequence[dict], keys: Sequence[str], metric: str) -> tuple:
    """``(header, rows)`` of the trials table as text, in trial order.

    Example::

        >>> trials_rows([{"number": 0, "state": "complete", "params": {"lr": 0.001}, "value": 0.5,
        ...               "runtime_s": 30}], ["lr"], "exact_match")
        (['trial', 'lr', 'exact_match', 'state', 'time'], [['0', '0.001', '0.5', 'complete', '00:30']])
    """
    header = ["trial", *keys, metric, "state", "time"]
    rows = []
    for t in sorted(trials, key=lambda t: t["number"]):
        rows.append([str(t["number"]), *(_value_text(t["params"].get(k, "")) for k in keys),
                     format_loss(t["value"]) if t.get("value") is not None else "",
                     t["state"], format_duration(t["runtime_s"]) if t.get("runtime_s") is not None else ""])
    return header, rows


def trials_table_html(trials: Sequence[dict], keys: Sequence[str], metric: str,
                      best_number: Optional[int] = None) -> str:
    """The trials table; the best trial in bold, each state in its colour, a reason as a tooltip."""
    header, rows = trials_rows(trials, keys, metric)
    if not rows:
        return ""
    by_number = {str(t["number"]): t for t in trials}
    head = "".join(f'<th style="text-align:left;padding:2px 10px 2px 0">{html.escape(h)}</th>' for h in header)
    body = []
    for cells in rows:
        trial = by_number[cells[0]]
        weight = "font-weight:bold;" if best_number is not None and trial["number"] == best_number else ""
        tds = []
        for j, cell in enumerate(cells):
            style = f"text-align:left;padding:2px 10px 2px 0;{weight}"
            if header[j] == "state":
                style += f"color:{STATE_COLORS.get(cell, 'inherit')}"
                title = trial.get("message") or ""
                tds.append(f'<td style="{style}" title="{html.escape(title)}">{html.escape(cell)}'
                           + (f' <small style="opacity:0.8">{html.escape(title)}</small>'
                              if title and cell in ("failed", "skipped") else "") + "</td>")
            else:
                tds.append(f'<td style="{style}">{html.escape(cell)}</td>')
        body.append("<tr>" + "".join(tds) + "</tr>")
    return f'<table class="ftmagic-trials" style="border-collapse:collapse"><tr>{head}</tr>{"".join(body)}</table>'


def trials_table_text(trials: Sequence[dict], keys: Sequence[str], metric: str) -> str:
    header, rows = trials_rows(trials, keys, metric)
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def param_plot_svg(trials: Sequence[dict], key: str, metric: str, *, log: Optional[bool] = None,
                   width: int = 240, height: int = 170) -> str:
    """The metric of each ended trial against one parameter (numbers on a linear or log axis,
    anything else as evenly spaced categories); pruned trials are drawn hollow at their last value.

    Example::

        svg = param_plot_svg(trials, "lr", "exact_match")
        assert svg.count('<circle') == len([t for t in trials if t["value"] is not None])
    """
    points = []
    for t in trials:
        value = t.get("value")
        if value is None and t.get("state") == "pruned" and t.get("curve"):
            value = t["curve"][-1][1]
        if value is None or key not in t.get("params", {}):
            continue
        points.append((t["params"][key], float(value), t["state"]))
    if not points:
        return ""
    xs = [p[0] for p in points]
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
    if numeric and log is None:
        log = min(xs) > 0 and max(xs) / min(xs) >= 20
    if numeric:
        ticks = sorted(set(xs))
        scale = (lambda x: math.log10(x)) if log else (lambda x: float(x))
        lo, hi = scale(min(xs)), scale(max(xs))
    else:
        ticks = list(dict.fromkeys(str(x) for x in xs))
        scale = lambda x: float(ticks.index(str(x)))  # noqa: E731
        lo, hi = 0.0, float(len(ticks) - 1)
    if hi == lo:
        lo, hi = lo - 1, hi + 1
    ys = [p[1] for p in points]
    y_lo, y_hi = (0.0, 1.0) if min(ys) >= 0 and max(ys) <= 1 else (min(ys), max(ys))
    if y_hi == y_lo:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    left, right, top, bottom = 40, 14, 18, 30
    pw, ph = width - left - right, height - top - bottom

    def x_of(x) -> float:
        return left + (scale(x) - lo) / (hi - lo) * pw

    def y_of(y) -> float:
        return top + (y_hi - y) / (y_hi - y_lo) * ph

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'font-family="sans-serif" font-size="10" role="img" aria-label="{html.escape(metric)} against '
             f'{html.escape(key)}">',
             f'<text x="{left}" y="12" fill="currentColor">{html.escape(metric)} vs {html.escape(key)}'
             f'{" (log)" if numeric and log else ""}</text>',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#ccc"/>',
             f'<text x="{left - 3}" y="{top + 9}" text-anchor="end" fill="currentColor">{format_loss(y_hi)}</text>',
             f'<text x="{left - 3}" y="{top + ph}" text-anchor="end" fill="currentColor">{format_loss(y_lo)}</text>']
    shown = ticks if len(ticks) <= 6 else [ticks[0], ticks[len(ticks) // 2], ticks[-1]]
    for tick in shown:
        parts.append(f'<text x="{x_of(tick):.1f}" y="{height - 16}" text-anchor="middle" fill="currentColor">'
                     f'{html.escape(_value_text(tick))}</text>')
    for x, y, state in points:
        color = STATE_COLORS.get(state, "#1f77b4")
        fill = "none" if state == "pruned" else color
        parts.append(f'<circle class="trial {html.escape(state)}" cx="{x_of(x):.1f}" cy="{y_of(y):.1f}" r="3.5" '
                     f'fill="{fill}" stroke="{color}"/>')
    parts.append("</svg>")
    return "".join(parts)


def sweep_plots_html(trials: Sequence[dict], keys: Sequence[str], metric: str, log_keys: Sequence[str] = ()) -> str:
    plots = [param_plot_svg(trials, k, metric, log=True if k in log_keys else None) for k in keys]
    return '<div style="display:flex;flex-wrap:wrap;gap:8px">' + "".join(f"<div>{p}</div>" for p in plots if p) + "</div>"


def best_cell_html(cell: str) -> str:
    return ('<div style="margin-top:6px"><b>best configuration</b>, ready to run as a cell:'
            f'<pre style="padding:6px;border:1px solid #ccc;overflow-x:auto">{html.escape(cell)}</pre></div>')


class SweepState:
    """What the sweep's events said so far: the trials (latest event of each), the running one's progress."""

    def __init__(self) -> None:
        self.trials: dict[int, dict] = {}
        self.current = RunState()
        self.end = None
        self.metric = ""
        self.keys: list = []

    def update(self, event) -> str:
        kind = getattr(event, "kind", None)
        if kind == "trial":
            self.metric = event.metric or self.metric
            for key in event.params:
                if key not in self.keys:
                    self.keys.append(key)
            self.trials[event.number] = {"number": event.number, "state": event.state, "params": dict(event.params),
                                         "value": event.value, "runtime_s": event.runtime_s,
                                         "message": event.message, "curve": list(event.curve),
                                         "output_dir": event.output_dir}
            if event.state == "running":
                self.current = RunState()
        elif kind == "sweep_end":
            self.end = event
            self.metric = event.metric
        elif kind is not None:
            self.current.update(event)
        return kind

    def absorb(self, trials: Sequence[dict], keys: Sequence[str] = ()) -> None:
        """Take the trials from the sweep's own record (``sweep.json``), in place of the events' view."""
        for key in keys:
            if key not in self.keys:
                self.keys.append(key)
        for t in trials:
            self.trials[t["number"]] = dict(t)
            for key in t.get("params", {}):
                if key not in self.keys:
                    self.keys.append(key)

    @property
    def trial_list(self) -> list:
        return [self.trials[n] for n in sorted(self.trials)]

    @property
    def best_number(self) -> Optional[int]:
        if self.end is not None:
            return self.end.best_number
        return None


def sweep_summary_html(state: SweepState, cell: Optional[str] = None, name: Optional[str] = None,
                       log_keys: Sequence[str] = ()) -> str:
    """The static summary: counts and best line, the trials table, the plots, the best cell."""
    from ftmagic.textprogress import format_sweep_end_line

    line = format_sweep_end_line(state.end) if state.end is not None else "sweep did not finish"
    bound = (f"<div>best run bound to <code>{html.escape(name)}</code>, every trial in "
             f"<code>{html.escape(name)}_sweep</code></div>") if name and state.best_number is not None else ""
    return ('<div class="ftmagic-sweep" style="font-family:sans-serif;font-size:13px">'
            f'<div style="font-weight:bold;margin-bottom:4px">ftmagic sweep</div><div>{html.escape(line)}</div>{bound}'
            f'<div style="display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start;margin-top:6px">'
            f'<div>{trials_table_html(state.trial_list, state.keys, state.metric, state.best_number)}</div>'
            f'<div>{sweep_plots_html(state.trial_list, state.keys, state.metric, log_keys)}</div></div>'
            f'{best_cell_html(cell) if cell else ""}</div>')


def sweep_summary_text(state: SweepState, cell: Optional[str] = None) -> str:
    from ftmagic.textprogress import format_sweep_end_line

    parts = [format_sweep_end_line(state.end) if state.end is not None else "sweep did not finish",
             trials_table_text(state.trial_list, state.keys, state.metric)]
    if cell:
        parts.append("best configuration:\n" + cell)
    return "\n\n".join(p for p in parts if p)


class SweepProgress(LiveDisplay):
    """An ``on_event`` callback that drives the live sweep display; Stop ends the running trial and the sweep."""

    def __init__(self, stop: Optional[threading.Event] = None) -> None:
        import ipywidgets as w

        self.stop = stop if stop is not None else threading.Event()
        self.state = SweepState()
        self.header = w.HTML(value="<b>ftmagic sweep</b>: starting&hellip;")
        self.button = w.Button(description="Stop", icon="stop", button_style="danger",
                               tooltip="End the running trial (resumable) and the sweep")
        self.button.on_click(self._on_stop)
        self.current = w.HTML(value="")
        self.table = w.HTML(value="")
        self.plots = w.HTML(value="")
        self.widget = w.VBox([w.HBox([self.header, self.button]), self.current, self.table, self.plots])

    def __call__(self, event) -> None:
        from ftmagic.widgets.progress import status_html

        if not self.stop.is_set():
            self.let_clicks_in(time.monotonic())
        kind = self.state.update(event)
        if kind in ("trial", "sweep_end"):
            done = sum(1 for t in self.state.trials.values() if t["state"] != "running")
            running = [t for t in self.state.trials.values() if t["state"] == "running"]
            total = getattr(event, "n_trials", 0) or ""
            self.header.value = (f"<b>ftmagic sweep</b>: {done} trial(s) ended" + (f" of {total}" if total else "")
                                 + (f"; trial {running[-1]['number']} running" if running else ""))
            self.table.value = trials_table_html(self.state.trial_list, self.state.keys, self.state.metric,
                                                 self.state.best_number)
            self.plots.value = sweep_plots_html(self.state.trial_list, self.state.keys, self.state.metric)
        elif kind == "step":
            self.current.value = status_html(self.state.current)

    def _on_stop(self, _button: Any = None) -> None:
        self.stop.set()
        self.button.disabled = True
        self.button.description = "Stopping..."

    def finish(self, cell: Optional[str] = None, name: Optional[str] = None, log_keys: Sequence[str] = (),
               trials: Optional[Sequence[dict]] = None, keys: Sequence[str] = ()) -> None:
        """Replace the live widget with the static summary (table, plots, best cell).

        ``trials`` (the sweep's record, e.g. ``SweepResult.trials``) replace what the events
        said, so a resumed sweep shows the trials of earlier sessions too.
        """
        self.state.absorb(trials or [], keys)
        self.replace_with({"text/html": sweep_summary_html(self.state, cell, name, log_keys),
                           "text/plain": sweep_summary_text(self.state, cell)})

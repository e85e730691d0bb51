"""The live training widget: progress bar, ETA, tokens/s, loss chart, lr, memory, Stop.

It is built only from engine events (:mod:`ftmagic.events`), so it is tested by feeding events,
with no training. The strings it shows come from pure functions
(:func:`progress_fields`, :mod:`ftmagic.textprogress`); the widget only copies them in.
The Stop button sets a ``threading.Event`` that the engine checks after each step;
:mod:`ftmagic.widgets.liveclicks` lets the click in while the cell is still running.

Example::

    progress = TrainingProgress()
    progress.show()
    result = finetune(config, on_event=progress, stop=progress.stop)
    progress.finish(result.metrics, name="ft")   # replaced by the static summary
"""

from __future__ import annotations

import html
import threading
import time
from typing import Any, Callable, Optional

from ftmagic.textprogress import (RunState, format_bytes, format_count, format_duration, format_loss, format_lr,
                                  format_metrics, format_plan_line)
from ftmagic.widgets.liveclicks import LiveDisplay
from ftmagic.widgets.summary import as_mimebundle, loss_chart_svg


NO_LIVE_CLICK_HINT = ("to stop early in this kernel, use the notebook's interrupt button (\u25a0): "
                      "training ends after the current step and a checkpoint is saved")


def _kernel() -> Any:
    from ftmagic.widgets.liveclicks import current_kernel

    return current_kernel()


def progress_fields(state: RunState) -> dict[str, str]:
    """The texts of the status line, from what the events said so far.

    Example::

        >>> state = RunState()
        >>> _ = state.update({"event": "step", "step": 3, "max_steps": 12, "epoch": 0.25, "loss": 2.0,
        ...                   "lr": 1e-4, "tokens_per_s": 900, "elapsed_s": 3, "eta_s": 9, "memory_bytes": 1024**2})
        >>> progress_fields(state)["step"], progress_fields(state)["eta"], progress_fields(state)["memory"]
        ('step 3/12', '00:03 elapsed, 00:09 left', '1.00 MiB')
    """
    step = state.last_step
    total = state.max_steps
    fields = {
        "step": f"step {state.step}/{total}" if total else f"step {state.step}",
        "epoch": f"epoch {step.epoch:.2f}" if step and step.epoch is not None else "",
        "loss": format_loss(step.loss) if step else "",
        "eval_loss": format_loss(state.eval_points[-1][1]) if state.eval_points else "",
        "lr": format_lr(step.lr) if step else "",
        "rate": f"{format_count(step.tokens_per_s)} tokens/s" if step and step.tokens_per_s is not None else "",
        "eta": f"{format_duration(step.elapsed_s)} elapsed, {format_duration(step.eta_s)} left" if step else "",
        "memory": format_bytes(step.memory_bytes) if step and step.memory_bytes is not None else "",
        "metrics": format_metrics(step.metrics) if step else "",
        "eval_metrics": format_metrics(state.eval_metrics),
    }
    return fields


def status_html(state: RunState) -> str:
    """The status line under the bar: labelled values, empty ones left out."""
    fields = progress_fields(state)
    labelled = [("", fields["step"]), ("", fields["epoch"]), ("loss", fields["loss"]), ("", fields["metrics"]),
                ("eval loss", fields["eval_loss"]), ("eval", fields["eval_metrics"]), ("lr", fields["lr"]),
                ("", fields["rate"]), ("", fields["eta"]), ("memory", fields["memory"])]
    parts = [(f"<b>{label}</b> " if label else "") + html.escape(value) for label, value in labelled if value]
    return '<span style="font-family:monospace">' + " &middot; ".join(parts) + "</span>"


def header_html(state: RunState) -> str:
    """The run's one-line description (model, method, device, precision, data, parameters)."""
    if state.plan is None:
        return "<span>ftmagic: preparing the run&hellip;</span>"
    line = f"<span>{html.escape(format_plan_line(state.plan, state.start))}</span>"
    if state.plan.reason:
        line += f'<br><small style="opacity:0.7">{html.escape(state.plan.reason)}</small>'
    return line


def log_html(state: RunState, limit: int = 5) -> str:
    """The latest messages and checkpoints (warnings first-class, not hidden in a log)."""
    lines = []
    for message in state.messages[-limit:]:
        icon = "&#9888; " if message.level == "warning" else ""
        lines.append(icon + html.escape(message.text))
    if state.checkpoints:
        last = state.checkpoints[-1]
        lines.append(html.escape(f"checkpoint at step {last.step}: {last.path}"))
    return "<br>".join(lines)


class TrainingProgress(LiveDisplay):
    """An ``on_event`` callback that drives an ipywidgets progress display.

    ``stop`` is the event handed to the engine; the Stop button sets it. Redraws are
    throttled (``redraw_interval`` for the texts, ``chart_interval`` for the chart) so a
    fast run does not flood the front end; eval and end events always redraw.

    Example::

        progress = TrainingProgress()
        progress.show()
        result = finetune(config, on_event=progress, stop=progress.stop)
        progress.finish(result.metrics, output_dir=result.output_dir, name="ft")
    """

    def __init__(self, stop: Optional[threading.Event] = None, *, redraw_interval: float = 0.2,
                 chart_interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        import ipywidgets as w  # only a notebook run pays for ipywidgets

        self.stop = stop if stop is not None else threading.Event()
        self.state = RunState()
        self.redraw_interval = redraw_interval
        self.chart_interval = chart_interval
        self.clock = clock
        self._last_redraw: Optional[float] = None
        self._last_chart: Optional[float] = None
        self.chart_redraws = 0  # how many times the SVG was rebuilt (tests check the throttle)
        self._hint = ""  # a standing note under the chart (e.g. how to stop in this kernel)

        self.header = w.HTML(value=header_html(self.state))
        self.bar = w.FloatProgress(value=0.0, min=0.0, max=1.0, bar_style="info",
                                   layout=w.Layout(flex="1 1 auto", width="auto"))
        self.button = w.Button(description="Stop", icon="stop", button_style="danger",
                               tooltip="End training after the current step and save a checkpoint")
        self.button.on_click(self._on_stop_click)
        self.status = w.HTML(value="")
        self.chart = w.HTML(value="")
        self.evaluation = w.HTML(value="")  # metric curves and the answers table (evaluation by generation)
        self.log = w.HTML(value="")
        self._row = w.HBox([self.bar, self.button])
        self.widget = w.VBox([self.header, self._row, self.status, self.chart, self.evaluation, self.log])

    # ------------------------------------------------------------------ events
    def __call__(self, event) -> None:
        kind = self.state.update(event)
        self._poll_clicks()
        if kind in ("plan", "start"):
            self.header.value = header_html(self.state)
            self._redraw_texts()
        elif kind == "step":
            now = self.clock()
            if self._last_redraw is None or now - self._last_redraw >= self.redraw_interval:
                self._last_redraw = now
                self._redraw_texts()
            if self._last_chart is None or now - self._last_chart >= self.chart_interval:
                self._last_chart = now
                self._redraw_chart()
        elif kind == "eval":
            self._redraw_texts()
            self._redraw_chart()
            self._redraw_evaluation()
        elif kind in ("message", "checkpoint"):
            self._render_log()
        elif kind == "end":
            self._on_end(self.state.end)

    def _poll_clicks(self) -> None:
        if self.state.end is None:
            self.let_clicks_in(self.clock())

    def _redraw_texts(self) -> None:
        fraction = self.state.fraction
        if fraction is not None:
            self.bar.value = fraction
        self.status.value = status_html(self.state)

    def _redraw_chart(self) -> None:
        self.chart_redraws += 1
        self.chart.value = loss_chart_svg(self.state.train_points, self.state.eval_points)

    def _redraw_evaluation(self) -> None:
        from ftmagic.widgets.evaluation import evaluation_html

        self.evaluation.value = evaluation_html(self.state)

    def _on_end(self, event) -> None:
        self._redraw_texts()
        self._redraw_chart()
        self._redraw_evaluation()
        self._hint = ""
        self._render_log()
        reason = event.reason
        self.bar.bar_style = "success" if reason in ("finished", "early_stopping") else "warning"
        if reason == "finished":
            self.bar.value = 1.0
        self.button.disabled = True
        self.button.description = "Done" if reason in ("finished", "early_stopping") else "Stopped"

    # ------------------------------------------------------------------ stop
    def _on_stop_click(self, _button: Any = None) -> None:
        if self.stop.is_set() or self.state.end is not None:
            return
        self.stop.set()
        self.button.disabled = True
        self.button.description = "Stopping..."
        self._hint = "stopping after the current step; a checkpoint will be saved"
        self._render_log()

    def _render_log(self) -> None:
        self.log.value = "<br>".join(part for part in (log_html(self.state), self._hint) if part)

    # ------------------------------------------------------------------ display
    def show(self) -> None:
        """Display the widget in the current cell (remembered so :meth:`finish` can replace it)."""
        super().show()
        if self._side_channel is None and _kernel() is not None:
            # This kernel delivers the click only after the cell ends; its interrupt works now.
            self.button.tooltip = NO_LIVE_CLICK_HINT
            self._hint = html.escape(NO_LIVE_CLICK_HINT)
            self._render_log()

    def header_bundle(self) -> dict:
        """The header line alone, as static output (what stays when a run fails before its first step)."""
        if self.state.plan is None:
            return {"text/plain": ""}
        return {"text/html": header_html(self.state), "text/plain": format_plan_line(self.state.plan, self.state.start)}

    def summary_bundle(self, metrics: Optional[dict] = None, output_dir: Optional[str] = None,
                       name: Optional[str] = None) -> dict:
        """The static summary (HTML + plain text) of what the events said."""
        return as_mimebundle(self.state, metrics, output_dir, name)

    def finish(self, metrics: Optional[dict] = None, output_dir: Optional[str] = None,
               name: Optional[str] = None) -> None:
        """Replace the live widget with the static HTML summary, then close the widget.

        The summary is plain HTML with an inline SVG, so a saved notebook shows it on
        GitHub and in nbconvert without a kernel.
        """
        self.replace_with(self.summary_bundle(metrics, output_dir, name))


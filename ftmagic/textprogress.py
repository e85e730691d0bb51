"""Training progress as text: pure formatters, an event accumulator and a terminal printer.

The engine reports progress only through the typed events of :mod:`ftmagic.events`
(``on_event(event)``). This module turns those events into text; its functions also take
an event's dict form (``event.to_dict()``, as stored in ``history.json``). It never imports ipywidgets, so the CLI and terminal
IPython use it directly, and the notebook widget reuses the same formatters (the way
``tqdm.notebook`` reuses ``format_meter``): every string a user sees comes from a pure
function that is tested with plain string asserts.

Example::

    from ftmagic.textprogress import TextProgress
    result = ftmagic.finetune(model="tiny", data=records, max_steps=20, on_event=TextProgress())
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable, Optional, TextIO

from ftmagic.evalevents import Generations, SweepEnd, Trial
from ftmagic.events import Checkpoint, End, Eval, Event, Message, Plan, Start, Step, as_event
from ftmagic.units import format_bytes  # noqa: F401  (part of this module's formatters)

# --------------------------------------------------------------------------- formatters


def format_duration(seconds: Optional[float]) -> str:
    """``"mm:ss"`` or ``"h:mm:ss"``; ``"?"`` when unknown.

    Example::

        >>> format_duration(75), format_duration(3725), format_duration(None)
        ('01:15', '1:02:05', '?')
    """
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{minutes:02d}:{secs:02d}"


def format_count(n: Optional[float]) -> str:
    """A count with a k/M/B suffix.

    Example::

        >>> format_count(950), format_count(12_345), format_count(1_500_000), format_count(7e9)
        ('950', '12.3k', '1.50M', '7.00B')
    """
    if n is None:
        return "?"
    value = float(n)
    for suffix, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            scaled = value / scale
            digits = 2 if abs(scaled) < 10 else 1 if abs(scaled) < 100 else 0
            return f"{scaled:.{digits}f}{suffix}"
    return f"{int(value)}" if value == int(value) else f"{value:.1f}"


def format_loss(loss: Optional[float]) -> str:
    """A loss with four significant digits (``"nan"`` shown as such).

    Example::

        >>> format_loss(2.345678), format_loss(0.012345), format_loss(None)
        ('2.346', '0.01235', '?')
    """
    if loss is None:
        return "?"
    if not math.isfinite(loss):
        return str(loss)
    return f"{loss:.4g}"


def format_lr(lr: Optional[float]) -> str:
    """A learning rate in short scientific notation.

    Example::

        >>> format_lr(0.0002), format_lr(0)
        ('2.0e-04', '0')
    """
    if lr is None:
        return "?"
    if lr == 0:
        return "0"
    return f"{lr:.1e}"


def format_bar(fraction: Optional[float], width: int = 30) -> str:
    """An ASCII bar (safe in every terminal and log file).

    Example::

        >>> format_bar(0.5, 10)
        '[#####-----]'
    """
    if fraction is None:
        return "[" + "?" * width + "]"
    fraction = min(max(fraction, 0.0), 1.0)
    filled = int(fraction * width)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def format_params(trainable: Optional[int], total: Optional[int]) -> str:
    """``"1.20M of 60.0M trainable (2.00%)"``.

    Example::

        >>> format_params(1_200_000, 60_000_000)
        '1.20M of 60.0M parameters trainable (2.00%)'
    """
    if trainable is None:
        return "trainable parameters unknown"
    if not total:
        return f"{format_count(trainable)} parameters trainable"
    share = 100.0 * trainable / total
    return f"{format_count(trainable)} of {format_count(total)} parameters trainable ({share:.2f}%)"


def format_data(plan) -> str:
    """What a run trains on, from its ``plan`` event.

    Example::

        >>> format_data({"model": "tiny", "method": "lora", "device": "cpu", "precision": "fp32",
        ...              "train_records": 200, "eval_records": 20, "format": "messages"})
        '200 train + 20 eval records (messages)'
    """
    plan = as_event(plan, "plan")
    data = f"{plan.train_records} train"
    if plan.eval_records:
        data += f" + {plan.eval_records} eval"
    data += " records"
    if plan.format:
        data += f" ({plan.format})"
    return data


# Short labels of the metrics objectives report (reward models, DPO/ORPO, classifiers), in display order.
METRIC_LABELS = {"reward_margin": "margin", "reward_chosen": "chosen", "reward_rejected": "rejected",
                 "accuracy": "acc", "macro_f1": "macro F1", "nll": "nll"}
SHARES = ("accuracy", "macro_f1")  # shown as percentages


def format_metrics(metrics: Optional[dict], keys: Optional[tuple] = None) -> str:
    """An objective's metrics as ``label value`` pairs: reward margin, chosen/rejected rewards, accuracy, F1.

    ``keys`` limits them to those names (default: the labelled ones, in :data:`METRIC_LABELS` order).

    Example::

        >>> format_metrics({"reward_chosen": 0.51, "reward_rejected": -0.3, "reward_margin": 0.81, "accuracy": 0.875})
        'margin 0.81 | chosen 0.51 | rejected -0.3 | acc 87.5%'
        >>> format_metrics({"accuracy": 0.9, "f1/pos": 0.92}, keys=("accuracy", "f1/pos"))
        'acc 90.0% | F1 pos 92.0%'
    """
    if not metrics:
        return ""
    keys = keys or tuple(k for k in METRIC_LABELS if k in metrics)
    parts = []
    for key in keys:
        value = metrics.get(key)
        if not isinstance(value, (int, float)):
            continue
        if key.startswith("f1/"):
            parts.append(f"F1 {key[3:]} {100 * value:.1f}%")
        elif key in SHARES:
            parts.append(f"{METRIC_LABELS[key]} {100 * value:.1f}%")
        else:
            parts.append(f"{METRIC_LABELS.get(key, key)} {format_loss(value)}")
    return " | ".join(parts)


def format_plan_line(plan, start=None) -> str:
    """The one line printed before heavy loading: model, method, device, precision, data.

    Pass the ``start`` event too once it arrived to append the trainable parameters.

    Example::

        >>> format_plan_line({"model": "tiny", "method": "lora", "device": "cpu", "precision": "fp32",
        ...                   "train_records": 200, "eval_records": 20, "format": "messages"})
        'ftmagic: tiny | lora | cpu fp32 | data: 200 train + 20 eval records (messages)'
    """
    plan = as_event(plan, "plan")
    method = str(plan.method) + (f" {plan.objective}" if plan.objective and plan.objective != "sft" else "")
    parts = [str(plan.model), method, f"{plan.device} {plan.precision}".strip()]
    if plan.processes > 1:
        parts[-1] += f" x {plan.processes} processes ({plan.distributed})"
    parts.append("data: " + format_data(plan))
    if start is not None:
        start = as_event(start, "start")
        parts.append(format_params(start.trainable_params, start.total_params))
    return "ftmagic: " + " | ".join(parts)


def format_step_line(step, width: int = 30) -> str:
    """One progress line from a ``step`` event.

    Example::

        >>> format_step_line({"step": 5, "max_steps": 10, "epoch": 0.5, "loss": 2.5, "lr": 2e-4,
        ...                   "tokens_per_s": 1234.0, "elapsed_s": 10, "eta_s": 10,
        ...                   "memory_bytes": 2**30}, width=10)
        '[#####-----] 5/10 ep 0.50 | loss 2.5 | lr 2.0e-04 | 1.23k tok/s | 00:10<00:10 | mem 1.00 GiB'
    """
    step = as_event(step, "step")
    fraction = step.step / step.max_steps if step.max_steps else None
    text = f"{format_bar(fraction, width)} {step.step}/{step.max_steps if step.max_steps else '?'}"
    if step.epoch is not None:
        text += f" ep {step.epoch:.2f}"
    text += f" | loss {format_loss(step.loss)}"
    if step.metrics:
        shown = format_metrics(step.metrics)
        text += f" | {shown}" if shown else ""
    text += f" | lr {format_lr(step.lr)}"
    if step.tokens_per_s is not None:
        text += f" | {format_count(step.tokens_per_s)} tok/s"
    text += f" | {format_duration(step.elapsed_s)}<{format_duration(step.eta_s)}"
    if step.memory_bytes is not None:
        text += f" | mem {format_bytes(step.memory_bytes)}"
    return text


def format_eval_line(event) -> str:
    """One line for an evaluation: its loss and every metric (step 0 is the base model).

    Example::

        >>> format_eval_line({"step": 0, "eval_loss": None, "metrics": {"exact_match": 0.0}})
        'step 0 (base model): exact_match 0'
        >>> format_eval_line({"step": 50, "eval_loss": 1.25, "metrics": {"exact_match": 0.5}})
        'step 50: eval loss 1.25 | exact_match 0.5'
    """
    event = as_event(event, "eval")
    parts = [f"eval loss {format_loss(event.eval_loss)}"] if event.eval_loss is not None else []
    # Confusion counts (a classifier's tp/fp/fn) feed F1; they are not shown on their own.
    shown = format_metrics(event.metrics, tuple(k for k in event.metrics if not k.startswith(("tp/", "fp/", "fn/"))))
    parts += [shown] if shown else []
    label = f"step {event.step}" + (" (base model)" if event.step == 0 else "")
    return f"{label}: " + " | ".join(parts)


def format_params_dict(params: dict) -> str:
    """``lr=0.003, lora_r=16`` (numbers in short form).

    Example::

        >>> format_params_dict({"lr": 0.0031622776, "lora_r": 16})
        'lr=0.003162, lora_r=16'
    """
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def format_trial_line(event) -> str:
    """One line per sweep trial as it starts or ends.

    Example::

        >>> format_trial_line({"number": 2, "state": "complete", "params": {"lr": 0.001}, "value": 0.75,
        ...                    "metric": "exact_match", "n_trials": 6, "runtime_s": 42})
        'trial 2/6 complete: lr=0.001 -> exact_match 0.75 (00:42)'
    """
    event = as_event(event, "trial")
    head = f"trial {event.number}" + (f"/{event.n_trials}" if event.n_trials else "")
    text = f"{head} {event.state}: {format_params_dict(event.params)}"
    if event.value is not None:
        text += f" -> {event.metric} {format_loss(event.value)}"
    if event.runtime_s is not None:
        text += f" ({format_duration(event.runtime_s)})"
    if event.message and event.state in ("running", "failed", "skipped", "pruned", "stopped"):
        text += f"; {event.message}"
    return text


def format_sweep_end_line(event) -> str:
    """The sweep's closing line: the best trial and how many ended in each state.

    Example::

        >>> format_sweep_end_line({"metric": "exact_match", "direction": "maximize", "best_number": 3,
        ...     "best_value": 0.9, "best_params": {"lr": 0.003}, "counts": {"complete": 5, "pruned": 1}})
        'sweep finished: best trial 3 (exact_match 0.9): lr=0.003 | 5 complete, 1 pruned'
    """
    event = as_event(event, "sweep_end")
    counts = ", ".join(f"{n} {state}" for state, n in event.counts.items())
    if event.best_number is None:
        return f"sweep {event.reason}: no trial completed | {counts}"
    return (f"sweep {event.reason}: best trial {event.best_number} ({event.metric} {format_loss(event.best_value)}): "
            f"{format_params_dict(event.best_params)} | {counts}")


def format_end_line(end, state: Optional["RunState"] = None) -> str:
    """The closing line: why the run ended, final losses and where the files are.

    Example::

        >>> format_end_line({"reason": "finished", "metrics": {"steps": 10, "train_loss": 1.5,
        ...                  "runtime_s": 62}, "output_dir": "out"})
        'finished after 10 steps in 01:02 | train loss 1.5 | saved to out'
    """
    end = as_event(end, "end")
    metrics = end.metrics or {}
    reason = end.reason
    steps = metrics.get("steps")
    if steps is None and state is not None and state.last_step:
        steps = state.last_step.step
    text = {"finished": "finished", "stopped": "stopped", "interrupted": "interrupted",
            "early_stopping": "stopped early (no eval improvement)",
            "nonfinite": "stopped on a NaN or infinite loss"}.get(reason, str(reason))
    if steps is not None:
        text += f" after {steps} steps"
    if metrics.get("runtime_s") is not None:
        text += f" in {format_duration(metrics['runtime_s'])}"
    if metrics.get("train_loss") is not None:
        text += f" | train loss {format_loss(metrics['train_loss'])}"
    if metrics.get("eval_loss") is not None:
        text += f" | eval loss {format_loss(metrics['eval_loss'])}"
    if end.output_dir:
        text += f" | saved to {end.output_dir}"
    return text


# --------------------------------------------------------------------------- state


class RunState:
    """Everything the events of one run said so far; the widget, printer and summary read it.

    Example::

        state = RunState()
        for event in events:
            state.update(event)
        state.train_points   # [(step, loss), ...]
    """

    def __init__(self) -> None:
        self.plan: Optional[Plan] = None
        self.start: Optional[Start] = None
        self.last_step: Optional[Step] = None
        self.end: Optional[End] = None
        self.train_points: list[tuple[int, float]] = []
        self.eval_points: list[tuple[int, float]] = []
        self.eval_metrics: dict = {}  # the latest evaluation's metrics beyond the loss
        self.checkpoints: list[Checkpoint] = []
        self.messages: list[Message] = []
        self.peak_memory_bytes: Optional[int] = None
        self.metric_points: dict[str, list[tuple[int, float]]] = {}  # eval metric -> [(step, value)]
        self.generations: list[Generations] = []  # answer tables, step 0 (the base model) first

    def update(self, event) -> str:
        """Record ``event`` (an event or its dict form); return its kind (``"step"``, ``"eval"``, ...)."""
        event = as_event(event)
        if isinstance(event, Plan):
            self.plan = event
        elif isinstance(event, Start):
            self.start = event
        elif isinstance(event, Step):
            self.last_step = event
            if event.loss is not None and math.isfinite(event.loss):
                self.train_points.append((int(event.step), float(event.loss)))
            if event.memory_bytes is not None:
                self.peak_memory_bytes = max(event.memory_bytes, self.peak_memory_bytes or 0)
        elif isinstance(event, Eval):
            if event.eval_loss is not None and math.isfinite(event.eval_loss):
                self.eval_points.append((int(event.step), float(event.eval_loss)))
            self.eval_metrics = dict(event.metrics or {})
            for name, value in event.metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self.metric_points.setdefault(name, []).append((int(event.step), float(value)))
        elif isinstance(event, Generations):
            self.generations.append(event)
        elif isinstance(event, Checkpoint):
            self.checkpoints.append(event)
        elif isinstance(event, Message):
            self.messages.append(event)
        elif isinstance(event, End):
            self.end = event
        return event.kind

    @property
    def max_steps(self) -> Optional[int]:
        if self.last_step and self.last_step.max_steps:
            return self.last_step.max_steps
        if self.start and self.start.max_steps:
            return self.start.max_steps
        return None

    @property
    def step(self) -> int:
        if self.last_step:
            return int(self.last_step.step)
        if self.start:
            return int(self.start.resumed_from_step or 0)
        return 0

    @property
    def fraction(self) -> Optional[float]:
        total = self.max_steps
        return min(self.step / total, 1.0) if total else None


# --------------------------------------------------------------------------- printer


class TextProgress:
    """An ``on_event`` callback that prints progress as text (terminal, CLI, log files).

    On a terminal the step line is redrawn in place; elsewhere (pipes, CI logs) a new
    line is printed at most every ``min_interval`` seconds, plus the final step.

    Example::

        progress = TextProgress()
        result = finetune(config, on_event=progress)
    """

    def __init__(self, stream: Optional[TextIO] = None, *, dynamic: Optional[bool] = None,
                 min_interval: float = 0.5, width: int = 30, header: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.dynamic = dynamic
        self.min_interval = min_interval
        self.width = width
        self.header = header
        self.clock = clock
        self.state = RunState()
        self._last_print: Optional[float] = None
        self._line_open = False  # a dynamic line waits for its newline

    def _out(self) -> TextIO:
        # Resolved late so that a redirected or captured sys.stdout is honoured.
        return self.stream if self.stream is not None else sys.stdout

    def _is_dynamic(self) -> bool:
        if self.dynamic is not None:
            return self.dynamic
        isatty = getattr(self._out(), "isatty", None)
        try:
            return bool(isatty and isatty())
        except ValueError:
            return False

    def _println(self, text: str) -> None:
        out = self._out()
        if self._line_open:
            out.write("\n")
            self._line_open = False
        out.write(text + "\n")
        out.flush()

    def __call__(self, event) -> None:
        event = as_event(event)
        self.state.update(event)
        if isinstance(event, Plan) and self.header:
            self._println(format_plan_line(event))
        elif isinstance(event, Start) and self.header:
            line = format_params(event.trainable_params, event.total_params)
            if event.resumed_from_step:
                line += f" | resuming from step {event.resumed_from_step}"
            self._println(line)
        elif isinstance(event, Step):
            self._step(event)
        elif isinstance(event, Eval):
            self._println(format_eval_line(event))
        elif isinstance(event, Trial) and event.state != "running":
            self._println(format_trial_line(event))
        elif isinstance(event, Trial):
            self.state = RunState()  # a new trial: its own progress
            self._println(format_trial_line(event))
        elif isinstance(event, SweepEnd):
            self._println(format_sweep_end_line(event))
        elif isinstance(event, Checkpoint):
            self._println(f"step {event.step}: checkpoint saved to {event.path}")
        elif isinstance(event, Message):
            self._println(("warning: " if event.level == "warning" else "") + event.text)
        elif isinstance(event, End):
            self._println(format_end_line(event, self.state))

    def _step(self, event: Step) -> None:
        now = self.clock()
        last = event.step == event.max_steps
        if not last and self._last_print is not None and now - self._last_print < self.min_interval:
            return
        self._last_print = now
        line = format_step_line(event, self.width)
        out = self._out()
        if self._is_dynamic():
            out.write("\r" + line + "\x1b[K")
            self._line_open = True
            out.flush()
        else:
            out.write(line + "\n")
            out.flush()

    def close(self) -> None:
        """End an open in-place line (call when the run ended without an ``end`` event)."""
        if self._line_open:
            self._out().write("\n")
            self._line_open = False


def any_event_callback(*callbacks: Optional[Callable[[Event], Any]]) -> Callable[[Event], None]:
    """Combine several ``on_event`` callbacks into one (``None`` entries are skipped)."""
    active = [cb for cb in callbacks if cb is not None]

    def fan_out(event: Event) -> None:
        for cb in active:
            cb(event)

    return fan_out

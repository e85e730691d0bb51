"""The engine's progress events: typed records, defined once.

The engine reports through one callback, ``on_event(event)``; the fronts decide what an
event becomes (a widget, a text bar, a tracker entry, a log line). Each kind of event is a
frozen dataclass here, so its fields have one home: the engine builds them by keyword,
the fronts read attributes, and :meth:`Event.to_dict` gives the plain dict that
``history.json``, ``RunResult.history`` and trackers store (with ``"event": kind``).
:func:`event_from_dict` reads such a dict back (a run's history, or an event that
crossed a process boundary).

=============== ==================================================================
kind            when
=============== ==================================================================
``plan``        before heavy loading: model, method, device, precision, data counts
``message``     a one-line note or warning the user should see
``start``       the model is ready: parameters, steps, where a resume starts
``step``        every ``logging_steps`` optimizer steps: loss, lr, speed, memory
``eval``        after an evaluation: eval loss and any other metrics
``checkpoint``  a checkpoint was written
``end``         the run ended: why, the final metrics, where the outputs are
=============== ==================================================================

Example::

    >>> from ftmagic.events import Step, event_from_dict
    >>> e = Step(step=3, max_steps=10, loss=1.25, lr=2e-4)
    >>> e.to_dict()["event"], e.to_dict()["loss"]
    ('step', 1.25)
    >>> event_from_dict(e.to_dict()) == e
    True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

from ftmagic.errors import FtmagicError


@dataclass(frozen=True)
class Event:
    """Base of every event; ``kind`` names it in dicts and logs."""

    kind: ClassVar[str] = ""

    def to_dict(self) -> dict:
        """A plain, JSON-ready dict: ``{"event": kind, <fields>}``."""
        out = {"event": self.kind}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = dict(value) if isinstance(value, dict) else value
        return out


@dataclass(frozen=True)
class Plan(Event):
    """What will run, known before any weights load."""

    kind: ClassVar[str] = "plan"
    model: str
    method: str
    device: str
    precision: str
    reason: str = ""  # one line: why this device and precision
    format: Optional[str] = None  # the detected data format
    train_records: int = 0
    eval_records: int = 0
    output_dir: str = ""
    objective: str = "sft"
    processes: int = 1  # processes training together (ftmagic/strategies.py)
    distributed: Optional[str] = None  # their strategy (ddp, fsdp, deepspeed_zero2/3); None for one process


@dataclass(frozen=True)
class Message(Event):
    """A one-line note (``info``) or warning (``warning``) for the user."""

    kind: ClassVar[str] = "message"
    text: str
    level: str = "info"


@dataclass(frozen=True)
class Start(Event):
    """The model is prepared and training begins."""

    kind: ClassVar[str] = "start"
    trainable_params: int
    total_params: int
    max_steps: int
    epochs: float = 0.0
    resumed_from_step: int = 0


@dataclass(frozen=True)
class Step(Event):
    """Training progress, sent every ``logging_steps`` optimizer steps.

    ``loss`` and ``grad_norm`` are means over the steps since the previous Step event
    (read from the device only then); ``tokens`` counts the trained tokens of those steps.
    ``metrics`` holds what an objective adds (for example DPO's reward margin).
    """

    kind: ClassVar[str] = "step"
    step: int
    max_steps: int
    loss: Optional[float] = None
    lr: Optional[float] = None
    epoch: Optional[float] = None
    grad_norm: Optional[float] = None
    tokens: int = 0
    tokens_per_s: Optional[float] = None
    elapsed_s: Optional[float] = None
    eta_s: Optional[float] = None
    memory_bytes: Optional[int] = None
    metrics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Eval(Event):
    """An evaluation at ``step``; ``metrics`` holds anything beyond the loss."""

    kind: ClassVar[str] = "eval"
    step: int
    eval_loss: Optional[float] = None
    metrics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Checkpoint(Event):
    """A checkpoint was written to ``path``."""

    kind: ClassVar[str] = "checkpoint"
    step: int
    path: str


@dataclass(frozen=True)
class End(Event):
    """The run ended (``reason``: finished, stopped, interrupted, early_stopping, ...)."""

    kind: ClassVar[str] = "end"
    reason: str
    metrics: dict = field(default_factory=dict)
    output_dir: str = ""


EVENT_TYPES: dict[str, type] = {cls.kind: cls for cls in (Plan, Message, Start, Step, Eval, Checkpoint, End)}

AnyEvent = Union[Plan, Message, Start, Step, Eval, Checkpoint, End]


def register_event(cls: type) -> type:
    """Add an event type (a frozen dataclass subclass of :class:`Event` with a unique ``kind``)."""
    if not cls.kind or cls.kind in EVENT_TYPES:
        raise ValueError(f"event kind {cls.kind!r} is empty or already registered")
    EVENT_TYPES[cls.kind] = cls
    return cls


def event_from_dict(values: dict) -> Event:
    """Read an event back from :meth:`Event.to_dict` output; unknown fields are ignored.

    Example::

        event_from_dict({"event": "message", "text": "hello", "level": "info"})
    """
    kind = values.get("event")
    cls = EVENT_TYPES.get(kind)
    if cls is None:
        raise FtmagicError(f"unknown event kind {kind!r}; known: {', '.join(EVENT_TYPES)}")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def as_event(event: Any, kind: Optional[str] = None) -> Event:
    """An :class:`Event` from an event or its dict form (callbacks may receive either).

    ``kind`` names the event a dict without an ``"event"`` key stands for.

    Example::

        as_event({"step": 3, "max_steps": 10}, "step").step    # 3
    """
    if isinstance(event, Event):
        return event
    if kind is not None and "event" not in event:
        event = {"event": kind, **event}
    return event_from_dict(event)

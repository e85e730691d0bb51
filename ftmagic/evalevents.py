"""Events of evaluation by generation and of sweeps, registered beside the core ones.

=============== ==================================================================
kind            when
=============== ==================================================================
``generations`` an evaluation generated answers: the table (prompt, reference,
                answer) and the scores; step 0 is the base model, before training
``trial``       a sweep trial started or ended (complete, pruned, failed, skipped)
``sweep_end``   a sweep ended: the best trial and the counts
=============== ==================================================================

Importing this module registers the kinds with :func:`ftmagic.events.register_event`, so
:func:`ftmagic.events.event_from_dict` reads them back from a history.

Example::

    >>> from ftmagic.evalevents import Generations
    >>> e = Generations(step=0, rows=[{"prompt": "reverse: ab", "reference": "ba", "answer": "ab"}],
    ...                 metrics={"exact_match": 0.0}, total=1)
    >>> e.to_dict()["event"]
    'generations'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

from ftmagic.events import EVENT_TYPES, Event, register_event

TABLE_ROWS = 50  # answers an event carries (all prompts are scored; trackers and tables need only a sample)


@dataclass(frozen=True)
class Generations(Event):
    """Answers generated at an evaluation (``step`` 0: the base model) and their scores."""

    kind: ClassVar[str] = "generations"
    step: int
    rows: list = field(default_factory=list)  # [{"prompt", "reference", "answer"}], at most TABLE_ROWS
    metrics: dict = field(default_factory=dict)
    total: int = 0  # prompts answered (rows may hold fewer)
    seconds: Optional[float] = None


@dataclass(frozen=True)
class Trial(Event):
    """A sweep trial: ``state`` is running, complete, pruned, failed or skipped (it would not fit)."""

    kind: ClassVar[str] = "trial"
    number: int
    state: str
    params: dict = field(default_factory=dict)
    value: Optional[float] = None
    metric: str = ""
    output_dir: str = ""
    message: str = ""
    n_trials: int = 0
    runtime_s: Optional[float] = None
    curve: list = field(default_factory=list)  # [(step, value)] of the metric, for pruned and finished trials


@dataclass(frozen=True)
class SweepEnd(Event):
    """The sweep ended; the best trial (``best_number`` None when none completed) and the counts."""

    kind: ClassVar[str] = "sweep_end"
    metric: str
    direction: str
    best_number: Optional[int] = None
    best_value: Optional[float] = None
    best_params: dict = field(default_factory=dict)
    output_dir: str = ""
    counts: dict = field(default_factory=dict)  # state -> trials
    reason: str = "finished"


for _cls in (Generations, Trial, SweepEnd):
    if _cls.kind not in EVENT_TYPES:
        register_event(_cls)

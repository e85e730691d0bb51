"""The ``sweep:`` block: which config keys to search, over what, and how to judge a trial.

A ``%%finetune`` cell or a YAML file with a ``sweep:`` block runs a hyperparameter search
(Optuna, :mod:`ftmagic.engine.sweep`): every other key is the base config, each key of
the block is a config field with its search space, plus the search's own settings::

    sweep:
      lr: {log_uniform: [1.0e-4, 1.0e-2]}   # a float range, sampled on a log scale
      lora_r: [8, 16, 32]                    # a list is a set of choices ({choices: [...]})
      warmup: {uniform: [0.0, 0.1]}
      batch_size: {int: [8, 32], step: 8}
      n_trials: 12
      metric: exact_match      # eval_loss (default without eval_metrics) or one of eval_metrics
      direction: maximize      # default: from the metric (losses go down, scores go up)
      sampler: tpe             # grid (default when every space is a list), random, tpe
      pruner: median           # stop a trial whose curve trails the median of earlier ones; none

This module is the block's one home: parsing, validation with one-line errors that name
``sweep.<key>`` (and its line), and the ready ``%%finetune`` cell of the best trial.
It is pure Python; Optuna is imported by the engine only.

Example::

    >>> from ftmagic.config import FinetuneConfig
    >>> cfg = FinetuneConfig(val_split=0.1)
    >>> spec = parse_sweep({"lr": [1e-4, 3e-4], "lora_r": {"choices": [8, 16]}}, cfg)
    >>> spec.sampler, spec.n_trials, spec.metric, spec.direction
    ('grid', 4, 'eval_loss', 'minimize')
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

from ftmagic.errors import ConfigError, did_you_mean, not_accepted

CONTROL_KEYS = ("n_trials", "metric", "direction", "sampler", "pruner")
SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("median", "none")
DIRECTIONS = {"minimize": "minimize", "min": "minimize", "maximize": "maximize", "max": "maximize"}
DIRECTION_NAMES = ("minimize", "maximize")
RANGE_KINDS = ("uniform", "log_uniform", "int")
DEFAULT_TRIALS = 10  # without a grid to exhaust: enough for TPE to start modelling after its random start
# Keys that say where data and outputs are, or steer the search itself: not hyperparameters.
NOT_SEARCHABLE = ("data", "eval_data", "eval_prompts", "eval_metrics", "output_dir", "sweep", "resume",
                  "overwrite", "report_to", "best_metric", "model", "columns", "format", "device")


@dataclass(frozen=True)
class Space:
    """One key's search space: ``choices`` (a list), or a ``uniform`` / ``log_uniform`` / ``int`` range."""

    key: str
    kind: str  # choices | uniform | log_uniform | int
    choices: tuple = ()
    low: Optional[float] = None
    high: Optional[float] = None
    step: Optional[float] = None

    def describe(self) -> str:
        if self.kind == "choices":
            return "[" + ", ".join(str(c) for c in self.choices) + "]"
        step = f", step {self.step:g}" if self.step else ""
        return f"{self.kind} {self.low:g}..{self.high:g}{step}"


@dataclass(frozen=True)
class SweepSpec:
    """A parsed, validated ``sweep:`` block."""

    spaces: tuple
    n_trials: int
    metric: str
    direction: str  # minimize | maximize
    sampler: str
    pruner: str

    @property
    def keys(self) -> list:
        return [s.key for s in self.spaces]

    def grid(self) -> dict:
        """``{key: [values]}`` for a grid search (every space is a list of choices)."""
        return {s.key: list(s.choices) for s in self.spaces}

    @property
    def grid_size(self) -> Optional[int]:
        if any(s.kind != "choices" for s in self.spaces):
            return None
        return math.prod(len(s.choices) for s in self.spaces)

    def to_dict(self) -> dict:
        return {**{s.key: s.describe() for s in self.spaces}, "n_trials": self.n_trials, "metric": self.metric,
                "direction": self.direction, "sampler": self.sampler, "pruner": self.pruner}


def parse_sweep(block: Any, config, *, source: Optional[str] = None, lines: Optional[dict] = None) -> SweepSpec:
    """Validate the ``sweep:`` block against ``config`` (the base of every trial); raise a one-line ConfigError.

    ``source`` and ``lines`` (``"sweep.lr"`` -> line) make errors point at the line of the key.
    """
    from ftmagic.config import config_fields

    def where(key: str) -> str:
        line = (lines or {}).get(f"sweep.{key}") or (lines or {}).get("sweep")
        if source and line:
            return f"{source}:{line}: "
        return f"{source}: " if source else ""

    found: list = []  # (line, order, message): every mistake of the block, reported together

    def fail(key: str, message: str) -> None:
        line = (lines or {}).get(f"sweep.{key}") or (lines or {}).get("sweep") or math.inf
        found.append((line, len(found), where(key) + message))
        raise _Refused  # the rest of this key (or setting) cannot be judged

    if not isinstance(block, dict) or not block:
        raise ConfigError(where("") + "`sweep` must be a mapping of config keys to search spaces, "
                          "e.g. `sweep: {lr: [1.0e-4, 3.0e-4], n_trials: 4}`")
    fields = [f.name for f in config_fields()]
    spaces, refused_keys = [], 0
    for key, value in block.items():
        if key in CONTROL_KEYS:
            continue
        try:
            if not isinstance(key, str) or key not in fields:
                hint = did_you_mean(key, fields + list(CONTROL_KEYS))
                fail(str(key), f"`sweep.{key}` is not a config key or a sweep setting"
                     + (hint or f" ({', '.join(CONTROL_KEYS)})"))
            if key in NOT_SEARCHABLE:
                fail(key, f"`sweep.{key}` cannot be searched: it says where data or outputs are, not how to train; "
                          "set it outside the `sweep:` block")
            spaces.append(_space(key, value, config, fail))
        except _Refused:
            refused_keys += 1
    with _judged():
        if not spaces and not refused_keys:
            fail("", "`sweep` names no config key to search; add one, e.g. `lr: [1.0e-4, 3.0e-4]`")

    sampler = block.get("sampler")
    all_choices = all(s.kind == "choices" for s in spaces)
    if sampler is None:
        sampler = "grid" if all_choices else "tpe"
    with _judged():
        if sampler not in SAMPLERS:
            fail("sampler", str(not_accepted("sweep.sampler", sampler, SAMPLERS)))
        if sampler == "grid" and not all_choices:
            ranged = next(s for s in spaces if s.kind != "choices")
            fail(ranged.key, f"`sweep.{ranged.key}` is a {ranged.kind} range, which a grid cannot enumerate; give a "
                             "list of values or use `sampler: random` or `tpe`")

    grid_size = math.prod(len(s.choices) for s in spaces) if all_choices else None
    n_trials = block.get("n_trials", grid_size if sampler == "grid" and grid_size else DEFAULT_TRIALS)
    with _judged():
        if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
            fail("n_trials", f"`sweep.n_trials: {n_trials!r}` must be a whole number of at least 1")
        if sampler == "grid" and grid_size:
            n_trials = min(n_trials, grid_size)  # the grid has no more points to try

    names = list(config.metric_names) if config.generation_eval else []
    has_eval = config.eval_data is not None or config.val_split > 0
    metric = block.get("metric", names[0] if names else "eval_loss")
    direction = block.get("direction")
    with _judged():
        if not isinstance(metric, str):
            fail("metric", f"`sweep.metric: {metric!r}` must be a metric name, e.g. eval_loss")
        if metric == "eval_loss" and not has_eval:
            fail("metric", "`sweep.metric: eval_loss` needs evaluation data: set `val_split` or `eval_data` "
                           "(or score answers with `eval_metrics` and `sweep.metric`)")
        if metric != "eval_loss" and metric not in names:
            fail("metric", f"`sweep.metric: {metric}` is not computed; use eval_loss or one of `eval_metrics` "
                           f"({', '.join(names) or 'none set'})")
        if direction is None:
            from ftmagic.scoring import greater_is_better

            functions = {getattr(f, "__name__", ""): f for f in (config.eval_metrics or []) if callable(f)}
            higher = (bool(getattr(functions[metric], "greater_is_better", True)) if metric in functions
                      else greater_is_better(metric))
            direction = "maximize" if higher else "minimize"
    with _judged():
        if direction is not None and direction not in DIRECTIONS:
            fail("direction", str(not_accepted("sweep.direction", direction, DIRECTION_NAMES)))
    pruner = block.get("pruner", "median")
    if pruner is False or pruner is None:
        pruner = "none"
    with _judged():
        if pruner not in PRUNERS:
            fail("pruner", str(not_accepted("sweep.pruner", pruner, PRUNERS)))
    if found:
        raise ConfigError(problems=[message for _, _, message in sorted(found)])
    return SweepSpec(tuple(spaces), n_trials, metric, DIRECTIONS[direction], sampler, pruner)


def _refused(config) -> bool:
    """Whether the config outside the ``sweep:`` block is refused on its own."""
    try:
        config.replace(sweep=None)
    except ConfigError:
        return True
    return False


class _Refused(Exception):
    """A mistake was noted (by ``parse_sweep``'s ``fail``); the part it was found in is left."""


@contextmanager
def _judged():
    """One independent part of the ``sweep:`` block: a mistake in it is noted and the next part is judged."""
    try:
        yield
    except _Refused:
        pass


def _space(key: str, value: Any, config, fail) -> Space:
    """One key's space, each value checked by building the trial's config with it."""

    def check(v: Any) -> Any:
        try:
            trial = config.replace(sweep=None, **{key: v})
        except ConfigError as exc:
            if _refused(config):
                return v  # the base config's own mistakes, reported at their own lines, not this value's
            fail(key, f"`sweep.{key}`: value {v!r} is not accepted ({_strip_where(str(exc))})")
        return getattr(trial, key)

    if isinstance(value, (list, tuple)):
        value = {"choices": list(value)}
    if not isinstance(value, dict):
        fail(key, f"`sweep.{key}: {value!r}` is one value; give a list of values, e.g. `[1.0e-4, 3.0e-4]`, "
                  "or a range, e.g. `{log_uniform: [1.0e-5, 1.0e-3]}`")
    kinds = [k for k in value if k in ("choices",) + RANGE_KINDS]
    extra = [k for k in value if k not in ("choices", "step") + RANGE_KINDS]
    if len(kinds) != 1 or extra:
        fail(key, f"`sweep.{key}` must have exactly one of choices, uniform, log_uniform, int"
                  + (f" (not `{extra[0]}`)" if extra else ""))
    kind = kinds[0]
    if kind == "choices":
        choices = value["choices"]
        if not isinstance(choices, (list, tuple)) or not choices:
            fail(key, f"`sweep.{key}.choices` must be a non-empty list")
        checked = tuple(check(c) for c in choices)
        if len(set(map(repr, checked))) != len(checked):
            fail(key, f"`sweep.{key}` lists a value twice")
        return Space(key, "choices", choices=checked)
    bounds = value[kind]
    if (not isinstance(bounds, (list, tuple)) or len(bounds) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)):
        fail(key, f"`sweep.{key}.{kind}` must be [low, high], two numbers")
    low, high = (float(b) for b in bounds)
    if not low < high:
        fail(key, f"`sweep.{key}.{kind}: [{bounds[0]}, {bounds[1]}]`: low must be below high")
    if kind == "log_uniform" and low <= 0:
        fail(key, f"`sweep.{key}.log_uniform` needs a low above 0 (a log scale has no 0)")
    step = value.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0):
        fail(key, f"`sweep.{key}.step: {step!r}` must be a number above 0")
    if kind == "int":
        if low != int(low) or high != int(high) or (step is not None and step != int(step)):
            fail(key, f"`sweep.{key}.int` needs whole numbers")
        low, high, step = int(low), int(high), int(step) if step else None
    check(low), check(high)
    return Space(key, kind, low=low, high=high, step=step)


def _strip_where(message: str) -> str:
    """A nested error without its own ``source:line:`` prefix (the sweep's is added)."""
    head, sep, rest = message.partition(": ")
    return rest if sep and (":" in head or head.endswith("cell") or head == "config") and not head.startswith("`") \
        else message


def trial_overrides(params: dict) -> dict:
    """A trial's config changes: its sampled values (the search block itself is dropped)."""
    return {**params, "sweep": None}


def best_cell(values: dict, params: dict, *, output_dir: Optional[str] = None, name: str = "ft") -> str:
    """A ready ``%%finetune`` cell: the base config as written, the sweep block replaced by the best values.

    Example::

        >>> print(best_cell({"model": "tiny", "data": "$train", "lr": 1e-3, "sweep": {"lr": [1e-3]}},
        ...                 {"lr": 0.003}, output_dir="runs/best"))
        %%finetune --name ft
        model: tiny
        data: $train
        lr: 0.003
        output_dir: runs/best
    """
    import yaml

    body = {k: v for k, v in values.items() if k != "sweep"}
    body.update(params)
    if output_dir is not None:
        body["output_dir"] = output_dir
    body = {k: (_plain_number(v)) for k, v in body.items()}
    text = yaml.safe_dump(body, sort_keys=False, default_flow_style=False, width=100).strip()
    return f"%%finetune --name {name}\n{text}"


def _plain_number(value: Any) -> Any:
    """Floats rounded to 4 significant digits, so a sampled 0.0031622776 reads 0.003162."""
    if isinstance(value, float) and value != 0 and math.isfinite(value):
        return float(f"{value:.4g}")
    return value


def changed_fields(config) -> dict:
    """The fields of ``config`` that differ from their defaults (the base of a CLI sweep's best cell)."""
    from ftmagic.config import FinetuneConfig

    defaults = FinetuneConfig()
    out = {}
    values = config.to_dict()
    for f in dataclasses.fields(config):
        if values[f.name] != getattr(defaults, f.name):
            described = isinstance(values[f.name], str) and values[f.name] != getattr(config, f.name)
            # In-memory data has no spelling in a cell: a `$variable` of the same name stands in.
            out[f.name] = f"${f.name}" if described else values[f.name]
    return out

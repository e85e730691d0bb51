"""``report_to``: copy a run's events to TensorBoard, Weights & Biases, MLflow or trackio.

The fronts always show progress from the events; these trackers add an external record,
each through its own package's public API: the config when the run starts, training and
evaluation scalars at their steps, the table of generated answers at each evaluation
(:class:`~ftmagic.evalevents.Generations`), and the final metrics as the run's summary.
A tracker whose package is missing fails before the model loads, in one line naming the
extra to install, not after an hour of training without the log the user asked for.

Where each one writes, unless its own environment variables say otherwise:

============= =================================================================
tensorboard   ``<output_dir>/runs`` (event files; ``tensorboard --logdir``)
wandb         ``<root>/wandb``, project ``WANDB_PROJECT`` or the group name; offline
              with ``WANDB_MODE=offline``
mlflow        ``MLFLOW_TRACKING_URI``, else a local SQLite store ``<root>/mlflow.db`` (artifacts
              in ``<root>/mlartifacts``);
              experiment ``MLFLOW_EXPERIMENT_NAME`` or the group name
trackio       its local store (``TRACKIO_DIR``, default ``~/.cache/huggingface/trackio``),
              project = the group name
============= =================================================================

``<root>`` and the group are the run's ``output_dir`` and ``ftmagic``; a sweep sets them
(:func:`tracking_group`) to its own folder and name, so its trials sit side by side.

A resumed run (``resume: true``) continues the tracker runs it started: the W&B run id and the
MLflow run id are kept in ``<output_dir>/trackers.json`` (trackio continues the run of the
same name; TensorBoard adds an event file beside the first), so one run is one curve from step
1, not two records of which the second starts at the checkpoint's step.

Example::

    sinks = make_reporters(["tensorboard", "mlflow"], "out", config.to_dict())
    for sink in sinks: sink(Step(step=1, max_steps=10, loss=2.3, lr=1e-4))
"""

from __future__ import annotations

import contextvars
import json
import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

from ftmagic.config import TRACKERS
from ftmagic.engine.outdir import atomic_write_text
from ftmagic.errors import ConfigError, not_accepted
from ftmagic.evalevents import Generations
from ftmagic.events import End, Eval, Start, Step

EXTRA_HINT = "pip install 'ftmagic[tracking]'"
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
_GROUP: contextvars.ContextVar = contextvars.ContextVar("ftmagic_tracking_group", default=None)
TRACKER_FILE = "trackers.json"  # {tracker: its run id} in output_dir, so a resumed run continues the same records


@contextmanager
def tracking_group(root, name: str):
    """Runs started inside share one tracker project/experiment ``name``, stored under ``root``."""
    token = _GROUP.set((Path(root), name))
    try:
        yield
    finally:
        _GROUP.reset(token)


def tracker_names(report_to) -> list:
    """``report_to`` as a list of tracker names (``none`` dropped).

    Example::

        >>> tracker_names(["tensorboard", "none"]), tracker_names("none")
        (['tensorboard'], [])
    """
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    return [n for n in names if n not in ("none", None, "")]


def make_reporters(report_to, output_dir, config: Optional[dict] = None) -> list[Callable]:
    """One callback per requested tracker; each package is imported now, so a missing one fails early."""
    out = Path(output_dir)
    root, group = _GROUP.get() or (out, "ftmagic")
    sinks = []
    for name in tracker_names(report_to):
        if name not in TRACKERS:
            raise not_accepted("report_to", name, TRACKERS, also="or a list of them")
        module = _require(name)
        cls = {"tensorboard": TensorBoardSink, "wandb": WandbSink, "mlflow": MlflowSink, "trackio": TrackioSink}[name]
        sinks.append(cls(module, out=out, root=root, group=group, config=dict(config or {})))
    return sinks


def _require(name: str):
    import importlib

    try:
        if name == "tensorboard":
            importlib.import_module("tensorboard")
            return importlib.import_module("torch.utils.tensorboard")
        return importlib.import_module(_PACKAGES[name])
    except ImportError:
        raise ConfigError(f"`report_to: {name}` needs the {_PACKAGES[name]} package ({EXTRA_HINT})") from None


# --------------------------------------------------------------------------- what is logged


_SCALARS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens_per_s": "train/tokens_per_s",
            "memory_bytes": "train/memory_bytes"}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def scalars(event) -> dict:
    """The ``{tag: value}`` a Step or Eval event adds to a tracker's curves.

    Example::

        >>> from ftmagic.events import Eval
        >>> scalars(Eval(step=5, eval_loss=1.5, metrics={"exact_match": 0.25}))
        {'eval/loss': 1.5, 'eval/exact_match': 0.25}
    """
    if isinstance(event, Step):
        values = {tag: getattr(event, key) for key, tag in _SCALARS.items() if _number(getattr(event, key))}
        values.update({f"train/{k}": v for k, v in event.metrics.items() if _number(v)})
        return values
    if isinstance(event, Eval):
        values = {"eval/loss": event.eval_loss} if _number(event.eval_loss) else {}
        values.update({f"eval/{k}": v for k, v in event.metrics.items() if _number(v)})
        return values
    return {}


def summary_values(metrics: dict) -> dict:
    """The final metrics flattened to ``{name: number or text}`` (nested ones as ``a/b``).

    Example::

        >>> summary_values({"train_loss": 1.2, "eval_metrics": {"exact_match": 1.0}, "reason": "finished", "x": None})
        {'train_loss': 1.2, 'eval_metrics/exact_match': 1.0, 'reason': 'finished'}
    """
    out = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in summary_values(value).items()})
        elif _number(value) or isinstance(value, str):
            out[key] = value
        elif isinstance(value, bool):
            out[key] = int(value)
    return out


TABLE_COLUMNS = ("prompt", "reference", "answer")


def table_rows(event: Generations) -> list:
    """The generation table as rows of text (``reference`` empty where there is none)."""
    return [[str(r.get("prompt", "")), "" if r.get("reference") is None else str(r["reference"]),
             str(r.get("answer", ""))] for r in event.rows]


def table_markdown(event: Generations) -> str:
    """The generation table as Markdown (TensorBoard's text plugin renders it)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in table_rows(event)]
    return "\n".join(lines)


def config_text(config: dict) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


class _Sink:
    """Shared shape: opened when training starts (the ``start`` event says whether it resumes), one
    method per kind of record, closed at ``end``."""

    def __init__(self, module, *, out: Path, root: Path, group: str, config: dict):
        self.lib, self.out, self.root, self.group, self.config = module, out, root, group, config
        self.run_name = out.name or "run"
        self.opened = False

    def __call__(self, event) -> None:
        if not self.opened and isinstance(event, (Start, Step, Eval, Generations)):
            self.opened = True
            self.open(resumed=isinstance(event, Start) and bool(event.resumed_from_step))
        if not self.opened:
            return
        values = scalars(event)
        if values:
            self.log(values, event.step)
        if isinstance(event, Generations):
            self.table(event)
        if isinstance(event, End):
            self.close(event)
            self.opened = False

    def fail(self, error: BaseException) -> None:
        """The run raised instead of ending: close the tracker's record as failed, with the error's
        first line as the reason. Left open, an MLflow run reads RUNNING for ever and W&B's next
        run in the same kernel finishes it as a success."""
        if not self.opened:
            return  # nothing was logged: the run failed before it started
        self.opened = False
        reason = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        lines = str(error).strip().splitlines()
        self.close(End(reason=reason, metrics={"reason": reason, "error": lines[0] if lines else type(error).__name__},
                       output_dir=str(self.out)))

    def previous_id(self, name: str) -> Optional[str]:
        """The id this run's ``name`` tracker run had before it was stopped (None: none kept)."""
        try:
            value = json.loads((self.out / TRACKER_FILE).read_text(encoding="utf-8")).get(name)
        except (OSError, ValueError, AttributeError):
            return None
        return value if isinstance(value, str) and value else None

    def keep_id(self, name: str, run_id: str) -> None:
        """Note the tracker run's id in ``output_dir`` (written whole, then renamed into place)."""
        path = self.out / TRACKER_FILE
        try:
            ids = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            ids = {}
        ids = {**(ids if isinstance(ids, dict) else {}), name: run_id}
        atomic_write_text(path, json.dumps(ids, indent=1))

    def open(self, resumed: bool = False) -> None: ...
    def log(self, values: dict, step: int) -> None: ...
    def table(self, event: Generations) -> None: ...
    def close(self, event: End) -> None: ...


class TensorBoardSink(_Sink):
    """Scalars, the config and the answer tables as text, and the summary in ``<output_dir>/runs``."""

    def open(self, resumed: bool = False) -> None:
        # Created at the first event, after the engine has claimed output_dir (the writer makes folders).
        self.writer = self.lib.SummaryWriter(log_dir=str(self.out / "runs"))
        self.writer.add_text("config", "```yaml\n" + config_text(self.config) + "```", 0)

    def log(self, values: dict, step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def table(self, event: Generations) -> None:
        self.writer.add_text("eval/generations", table_markdown(event), event.step)

    def close(self, event: End) -> None:
        summary = summary_values(event.metrics)
        step = int(event.metrics.get("steps") or 0)
        for key, value in summary.items():
            if _number(value):
                self.writer.add_scalar(f"final/{key}", value, step)
        self.writer.add_text("summary", "```json\n" + json.dumps(summary, indent=1) + "\n```", step)
        self.writer.close()


class WandbSink(_Sink):
    """A W&B run (offline with ``WANDB_MODE=offline``): config, history, answer tables, summary."""

    def open(self, resumed: bool = False) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        previous = self.previous_id("wandb") if resumed else None
        self.run = self.lib.init(project=os.environ.get("WANDB_PROJECT", self.group), name=self.run_name,
                                 config=self.config, dir=str(self.root), reinit="finish_previous",
                                 **({"id": previous, "resume": "allow"} if previous else {}))
        self.keep_id("wandb", self.run.id)

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def table(self, event: Generations) -> None:
        table = self.lib.Table(columns=list(TABLE_COLUMNS), data=table_rows(event))
        self.run.log({"eval/generations": table}, step=event.step)

    def close(self, event: End) -> None:
        self.run.summary.update(summary_values(event.metrics))
        self.run.finish(exit_code=0 if event.reason in ("finished", "early_stopping") else 1)


def mlflow_local_uri(root) -> str:
    """The local store used without ``MLFLOW_TRACKING_URI``: a SQLite file in ``root`` (MLflow's
    recommended local backend; its plain-folder store no longer accepts new runs by default).

    Example::

        >>> mlflow_local_uri("/runs/a")
        'sqlite:////runs/a/mlflow.db'
    """
    return "sqlite:///" + str(Path(root).resolve() / "mlflow.db")


@contextmanager
def quiet_mlflow():
    """MLflow's INFO lines off while the block runs; its warnings and errors still show.

    A run's first use of a local store logs "Creating initial MLflow database tables..." and
    "Updating database tables" on stderr, between ftmagic's own progress lines; they say
    nothing the user asked about. The ``mlflow`` logger's level is put back afterwards.
    """
    logger = logging.getLogger("mlflow")
    level = logger.level
    if logger.getEffectiveLevel() < logging.WARNING:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


class MlflowSink(_Sink):
    """An MLflow run through ``MlflowClient``: params, metrics by step, tables as JSON artifacts, summary."""

    def __call__(self, event) -> None:
        with quiet_mlflow():
            super().__call__(event)

    def fail(self, error: BaseException) -> None:
        with quiet_mlflow():
            super().fail(error)

    def open(self, resumed: bool = False) -> None:
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or mlflow_local_uri(self.root)
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", self.group)
        experiment = self.client.get_experiment_by_name(name)
        # Artifacts beside the store, not in MLflow's default `./mlruns` under whatever folder the process runs in.
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            name, artifact_location=None if os.environ.get("MLFLOW_TRACKING_URI")
            else (self.root / "mlartifacts").resolve().as_uri())
        self.run_id, logged = self.previous_id("mlflow") if resumed else None, {}
        if self.run_id is not None:
            try:  # the run this one continues, if the store still has it
                logged = self.client.get_run(self.run_id).data.params
                self.client.update_run(self.run_id, status="RUNNING")
            except MlflowException:
                self.run_id, logged = None, {}
        if self.run_id is None:
            self.run_id = self.client.create_run(experiment_id, run_name=self.run_name).info.run_id
            self.keep_id("mlflow", self.run_id)
        # A param keeps its first value (MLflow refuses a change): a resume may change how long the run goes.
        params = [Param(k, str(v)[:6000]) for k, v in self.config.items() if v is not None and k not in logged]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        self.client.log_text(self.run_id, config_text(self.config), "config.yaml")

    def log(self, values: dict, step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, int(step)) for k, v in values.items()])

    def table(self, event: Generations) -> None:
        rows = [dict(zip(TABLE_COLUMNS, row)) for row in table_rows(event)]
        self.client.log_dict(self.run_id, {"step": event.step, "metrics": event.metrics, "rows": rows},
                             f"generations/step_{event.step:06d}.json")

    def close(self, event: End) -> None:
        summary = summary_values(event.metrics)
        self.client.log_dict(self.run_id, summary, "summary.json")
        for key, value in summary.items():
            if isinstance(value, str):
                self.client.set_tag(self.run_id, key, value)
        status = ("FINISHED" if event.reason in ("finished", "early_stopping")
                  else "FAILED" if event.reason == "failed" else "KILLED")
        self.client.set_terminated(self.run_id, status=status)


class TrackioSink(_Sink):
    """A trackio run in its local store: config, metrics by step, answer tables, summary."""

    def open(self, resumed: bool = False) -> None:
        self.run = self.lib.init(project=self.group, name=self.run_name, config=self.config, embed=False,
                                 auto_log_gpu=False, auto_log_cpu=False, resume="allow" if resumed else "never")

    def log(self, values: dict, step: int) -> None:
        self.lib.log(values, step=step)

    def table(self, event: Generations) -> None:
        table = self.lib.Table(columns=list(TABLE_COLUMNS), data=table_rows(event))
        self.lib.log({"eval/generations": table}, step=event.step)

    def close(self, event: End) -> None:
        summary = {f"final/{k}": v for k, v in summary_values(event.metrics).items() if _number(v)}
        if summary:
            self.lib.log(summary, step=int(event.metrics.get("steps") or 0))
        self.lib.finish()

"""``report_to``: copy the run's events to TensorBoard or Weights & Biases.

The fronts always show progress from the events; these sinks only add an external log.
A sink whose package is missing fails before the model loads, not after an hour of
training without the log the user asked for.

Example::

    sinks = make_reporters("tensorboard", "out")     # writes out/runs/
    for sink in sinks: sink(Step(step=1, max_steps=10, loss=2.3, lr=1e-4))
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from ftmagic.errors import ConfigError
from ftmagic.events import End, Eval, Plan, Start, Step

KNOWN = ("tensorboard", "wandb")


def make_reporters(report_to, output_dir, config: dict | None = None) -> list[Callable[[dict], None]]:
    """One callback per requested sink (``none`` gives an empty list)."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    sinks = []
    for name in names:
        if name in ("none", None, ""):
            continue
        if name == "tensorboard":
            sinks.append(_tensorboard(Path(output_dir) / "runs"))
        elif name == "wandb":
            sinks.append(_wandb(output_dir, config or {}))
        else:
            raise ConfigError(f"`report_to: {name}` is not accepted; use none, tensorboard or wandb")
    return sinks


_SCALARS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens_per_s": "train/tokens_per_s",
            "memory_bytes": "train/memory_bytes"}


def _scalars(event) -> dict:
    if isinstance(event, Step):
        values = {tag: getattr(event, key) for key, tag in _SCALARS.items()
                  if isinstance(getattr(event, key), (int, float))}
        values.update({f"train/{k}": v for k, v in event.metrics.items() if isinstance(v, (int, float))})
        return values
    if isinstance(event, Eval):
        values = {"eval/loss": event.eval_loss} if isinstance(event.eval_loss, (int, float)) else {}
        values.update({f"eval/{k}": v for k, v in event.metrics.items() if isinstance(v, (int, float))})
        return values
    return {}


def _tensorboard(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("`report_to: tensorboard` needs the tensorboard package (pip install tensorboard)") from None
    state = {"writer": None}

    def sink(event) -> None:
        # Created at the first value, after the engine has claimed output_dir (the writer makes folders).
        values = _scalars(event)
        if values and state["writer"] is None:
            state["writer"] = SummaryWriter(log_dir=str(log_dir))
        for tag, value in values.items():
            state["writer"].add_scalar(tag, value, event.step)
        if isinstance(event, End) and state["writer"] is not None:
            state["writer"].close()

    return sink


def _wandb(output_dir, config: dict):
    try:
        import wandb
    except ImportError:
        raise ConfigError("`report_to: wandb` needs the wandb package (pip install wandb) and a login") from None
    state = {"run": None}

    def sink(event) -> None:
        if state["run"] is None and isinstance(event, (Plan, Start, Step)):
            state["run"] = wandb.init(project=os.environ.get("WANDB_PROJECT", "ftmagic"), config=config,
                                      dir=str(output_dir))
        values = _scalars(event)
        if values and state["run"] is not None:
            state["run"].log(values, step=event.step)
        if isinstance(event, End) and state["run"] is not None:
            state["run"].finish()

    return sink

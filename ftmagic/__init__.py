"""ftmagic: fine-tune language models from a notebook.

``%load_ext ftmagic`` registers ``%%finetune``, ``%ft_memory``, ``%ft_preview``,
``%%ft_generate`` and ``%ft_export``. The same engine runs from Python and from the ``ftmagic`` CLI.

Importing this package is cheap: torch, transformers and peft load only when a run
starts, so the memory calculator and the magics answer at once.

Layers (imports only point downwards; ``tests/test_layers.py`` walks every import):

* front: this package's ``__init__``, ``api``, ``cli`` + ``commands/``, ``magics`` +
  ``widgets/``, ``textprogress``, ``usage``, ``demo``: parse, validate, call, display;
* engine: ``engine/``, the only layer that imports torch, transformers, peft and
  accelerate; it reports through typed events (``ftmagic.events``) and never imports a front;
* core: ``adapters`` (what a saved adapter folder holds), ``config``, ``constants``,
  ``errors``, ``events``, ``evalevents``, ``flops``, ``hub``, ``methods``, ``objectives``, ``scoring``,
  ``strategies``, ``sweep_spec``, ``units``, ``data/``, ``memory/`` and ``export/`` (what
  exports share: targets, Modelfile, model card, summary): pure Python that never imports
  the engine or a front.

Example::

    import ftmagic
    from ftmagic.demo import DEMO_CONFIG

    result = ftmagic.finetune(data=ftmagic.demo_dataset("train"), **DEMO_CONFIG)  # about a minute on a CPU
    print(result.generate("reverse: lamp"))  # 'pmal'; the base model cannot reverse
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ftmagic.config import FinetuneConfig
from ftmagic.errors import (CheckpointError, ConfigError, DataError, ExportError, FtmagicError, MemoryFitError,
                            ModelError, TrainingError)

__version__ = "0.1.0"

# Public name -> module that defines it; loaded on first use (PEP 562).
_LAZY = {
    "finetune": "ftmagic.engine.run",
    "sweep": "ftmagic.engine.sweep",
    "SweepResult": "ftmagic.engine.sweep",
    "RunResult": "ftmagic.engine.result",
    "estimate_memory": "ftmagic.api",
    "MemoryEstimate": "ftmagic.memory",
    "preview": "ftmagic.data.report",
    "clean": "ftmagic.data.report",
    "DatasetReport": "ftmagic.data.report",
    "demo_dataset": "ftmagic.demo",
}

__all__ = [
    "FinetuneConfig", "FtmagicError", "ConfigError", "DataError", "ModelError", "MemoryFitError",
    "CheckpointError", "ExportError", "TrainingError", "load_ipython_extension", "unload_ipython_extension", *_LAZY,
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ftmagic' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def load_ipython_extension(ipython) -> None:
    """Called by ``%load_ext ftmagic``: registers the magics (no heavy imports)."""
    from ftmagic.magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython) -> None:
    """Called by ``%unload_ext ftmagic``."""
    from ftmagic.magics import unload_ipython_extension as unload

    unload(ipython)


if TYPE_CHECKING:  # pragma: no cover
    from ftmagic.data.report import DatasetReport, clean, preview
    from ftmagic.demo import demo_dataset
    from ftmagic.engine.result import RunResult
    from ftmagic.engine.run import finetune
    from ftmagic.engine.sweep import SweepResult, sweep
    from ftmagic.api import estimate_memory
    from ftmagic.memory import MemoryEstimate

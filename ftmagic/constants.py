"""Facts that several layers need, each written once (pure Python, no torch).

Example::

    >>> from ftmagic.constants import IGNORE_INDEX, resolve_model_name
    >>> IGNORE_INDEX
    -100
    >>> resolve_model_name("tiny") == str(TINY_MODEL_DIR)
    True
"""

from __future__ import annotations

import os
from pathlib import Path

# Label of a position the loss skips (PyTorch's cross-entropy default, and Hugging Face's).
IGNORE_INDEX = -100

# The embedded tiny pretrained model that ships inside the package (`model: tiny`).
TINY_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "tiny"

# `FTMAGIC_SMOKE=1`: every model that is not a local folder becomes the embedded tiny model
# and runs are capped at SMOKE_MAX_STEPS, so a notebook written for a 7B model runs end to
# end on a laptop or in CI.
SMOKE_ENV = "FTMAGIC_SMOKE"
SMOKE_MAX_STEPS = 20  # enough to see the loss move and every event fire, small enough for CI

# What ftmagic writes into every output_dir: the run's identity, its base model and method
# (read back by RunResult.load, resume, and a second stage that continues the run's adapter).
RUN_FILE = "ftmagic_run.json"

# fp32 logits per chunk of the engine's chunked loss (2**23 values = 32 MB, whatever the
# vocabulary); the memory calculator models the same chunks.
LOSS_CHUNK_ELEMENTS = 1 << 23

# 4-bit NF4 storage per parameter with double quantization: 4-bit codes, an 8-bit absmax
# per block of 64, and an fp32 absmax per 256 of those blocks.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)

# Keys of one entry of a `data:` list (a mixture of datasets), e.g.
# `data: [{path: a.jsonl, weight: 2}, {path: org/set, subset: en, split: train}]`.
DATA_SOURCE_KEYS = ("path", "data", "weight", "split", "subset", "format", "columns", "name")

# Optimizers a run can ask for (the engine decides how to build each on the device it has).
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "sgd")
# Precisions a run can ask for; `auto` is resolved per device.
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DEVICES = ("auto", "cuda", "mps", "cpu")
# What `data:` (and `eval_data:`) accept, for the line that says it is missing.
DATA_ACCEPTED = "a file path, a Hugging Face dataset id or a list of records"
# What users write for a name these keys accept, and which name they mean: the "did you mean"
# of a refused value suggests it where spelling alone would not (`gpu` looks most like `cpu`).
SYNONYMS = {
    "device": {"gpu": "cuda", "cuda:0": "cuda", "nvidia": "cuda", "metal": "mps", "apple": "mps"},
    "precision": {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"},
    "optimizer": {"adam": "adamw", "adam8bit": "adamw_8bit", "adamw8bit": "adamw_8bit"},
}


def smoke_mode() -> bool:
    """True when ``FTMAGIC_SMOKE`` is set to a true value (1, true, yes, on)."""
    return os.environ.get(SMOKE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def tiny_model_available() -> bool:
    """Whether the embedded tiny model ships with this copy of ftmagic."""
    return (TINY_MODEL_DIR / "config.json").exists()


def resolve_model_name(name: str) -> str:
    """``tiny`` (and, in smoke mode, any id that is not a local folder) -> the embedded model's folder.

    Other names are returned with ``~`` expanded: a Hugging Face id or a local folder.

    Example::

        resolve_model_name("Qwen/Qwen2.5-0.5B")   # unchanged (outside smoke mode)
        resolve_model_name("~/models/mine")        # "/home/me/models/mine"
    """
    expanded = os.path.expanduser(name)
    if name == "tiny" or (smoke_mode() and not os.path.isdir(expanded)):
        return str(TINY_MODEL_DIR)
    return expanded

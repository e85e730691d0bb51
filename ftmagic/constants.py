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

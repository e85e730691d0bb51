"""GPU presets and the fits / does-not-fit verdict.

A run fits when the predicted peak plus the CUDA context and allocator headroom is at
most the card's memory. The context (driver, kernels, cuBLAS workspace) is memory
torch never reports as allocated; the headroom covers the caching allocator's
fragmentation, which grows with the peak.

Both are built-in guesses until a GPU has measured them: ``benchmarks/gpu_suite.py``
writes the measured values to a JSON file, and :func:`cuda_constants` reads it from the
path in ``$FTMAGIC_GPU_CONSTANTS`` (``none`` turns measured values off), else from
``$XDG_CACHE_HOME/ftmagic/gpu_constants.json`` (``~/.cache/...``) where
``gpu_suite.py --install`` puts it.

Example::

    >>> from ftmagic.memory.gpus import GPU_PRESETS
    >>> GPU_PRESETS["T4"].bf16
    False
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from ftmagic.errors import ConfigError, not_accepted
from ftmagic.units import format_bytes  # noqa: F401  (sizes in verdicts and suggestions)

GIB = 1024 ** 3
MIB = 1024 ** 2

# What CUDA itself takes before the first tensor: context, kernel images, cuBLAS/cuDNN
# workspaces (about 0.4-0.6 GiB with CUDA 12 lazy loading).
CUDA_CONTEXT_BYTES = 512 * MIB
# Allocator headroom: fragmentation of PyTorch's caching allocator, a share of the peak
# plus a floor for small blocks.
HEADROOM_SHARE = 0.05
HEADROOM_FLOOR = 256 * MIB


@dataclass(frozen=True)
class GPU:
    """A GPU as the calculator sees it: usable memory and whether it computes in bf16."""

    name: str
    total_bytes: int
    bf16: bool

    @property
    def label(self) -> str:
        return f"{self.name} ({self.total_bytes / GIB:.0f} GiB)"


def _gpu(name: str, gib: float, bf16: bool) -> GPU:
    return GPU(name, int(gib * GIB), bf16)


# Memory as torch.cuda.get_device_properties reports it (a little under the label).
# The largest GPU memory a size may name: `gpu: 4080` is a card's model number, not 4080 GiB.
MAX_GPU_GIB = 1024
GPU_PRESETS = {g.name: g for g in [
    _gpu("T4", 14.75, False),
    _gpu("L4", 22.03, True),
    _gpu("A10G", 22.06, True),
    _gpu("RTX 3090", 23.69, True),
    _gpu("RTX 4090", 23.99, True),
    _gpu("A100 40GB", 39.39, True),
    _gpu("A100 80GB", 79.15, True),
    _gpu("H100 80GB", 79.11, True),
]}

_GPU_ALIASES = {"3090": "RTX 3090", "4090": "RTX 4090", "rtx3090": "RTX 3090", "rtx4090": "RTX 4090",
                "a100": "A100 40GB", "a100-40gb": "A100 40GB", "a100-80gb": "A100 80GB", "a10": "A10G",
                "h100": "H100 80GB", "a100-40": "A100 40GB", "a100-80": "A100 80GB"}


def resolve_gpu(gpu: Union[str, GPU, int, float, None]) -> Optional[GPU]:
    """A preset name (``T4``, ``A100 80GB``, ``4090``...), a GPU, or a size in GiB.

    Example::

        resolve_gpu("a100-80gb").total_bytes   # 79.15 GiB
        resolve_gpu(12)                        # a 12 GiB card, bf16 assumed
    """
    if gpu is None or isinstance(gpu, GPU):
        return gpu
    if isinstance(gpu, (int, float)) and not isinstance(gpu, bool):
        if not 0 < gpu <= MAX_GPU_GIB:
            raise ConfigError(f"`gpu: {gpu:g}` must be a size in GiB above 0 and at most {MAX_GPU_GIB} "
                              f"(a card's memory, not its model number), or one of {', '.join(GPU_PRESETS)}")
        return _gpu(f"{gpu:g} GiB GPU", gpu, True)
    key = str(gpu).strip()
    norm = key.lower().replace(" ", "-").replace("_", "-")
    for name, preset in GPU_PRESETS.items():
        if norm == name.lower().replace(" ", "-"):
            return preset
    if norm in _GPU_ALIASES:
        return GPU_PRESETS[_GPU_ALIASES[norm]]
    try:
        size = float(norm.removesuffix("gib").removesuffix("gb"))
    except ValueError:
        raise not_accepted("gpu", key, list(GPU_PRESETS), also="or a size in GiB such as 24") from None
    return resolve_gpu(size)


CONSTANTS_ENV = "FTMAGIC_GPU_CONSTANTS"
CONSTANTS_FILE = "gpu_constants.json"


@dataclass(frozen=True)
class CudaConstants:
    """What CUDA and the caching allocator add to a run's peak, and where the numbers come from."""

    context_bytes: int
    headroom_share: float
    headroom_floor: int
    source: str  # "built-in" or "<file> (measured on <GPU>)"


BUILT_IN = CudaConstants(CUDA_CONTEXT_BYTES, HEADROOM_SHARE, HEADROOM_FLOOR, "built-in")


def constants_path() -> Optional[Path]:
    """Where measured constants are read from (see the module docstring); None when turned off."""
    named = os.environ.get(CONSTANTS_ENV)
    if named is not None:
        return None if named.strip().lower() in ("", "none") else Path(named).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "ftmagic" / CONSTANTS_FILE


def read_constants(path) -> CudaConstants:
    """The ``constants`` block of a ``gpu_suite.py`` result; a one-line ConfigError names what is wrong.

    Example::

        read_constants("gpu_suite.json").context_bytes
    """
    where = str(path)
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read the measured GPU constants ({exc.strerror or exc}); "
                          f"fix the file or unset {CONSTANTS_ENV}") from None
    except ValueError as exc:
        raise ConfigError(f"{where}: not valid JSON ({exc}); write it again with benchmarks/gpu_suite.py") from None
    block = data.get("constants") if isinstance(data, dict) else None
    if not isinstance(block, dict):
        raise ConfigError(f"{where}: no `constants` mapping; expected the JSON benchmarks/gpu_suite.py writes")
    if block.get("dry_run") or data.get("dry_run"):
        raise ConfigError(f"{where}: written by a dry run (`gpu_suite.py --dry-run`), so its constants are not "
                          "measurements; run the suite on a GPU")

    def number(key: str, low: float, high: float) -> float:
        value = block.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not low <= value <= high:
            raise ConfigError(f"{where}: `constants.{key}: {value!r}` must be a number from {low:g} to {high:g}")
        return value

    context = int(number("cuda_context_bytes", 0, 16 * GIB))
    share = float(number("allocator_headroom_share", 0, 1))
    floor = int(number("allocator_headroom_floor_bytes", 0, 16 * GIB)) if "allocator_headroom_floor_bytes" in block \
        else HEADROOM_FLOOR
    gpu = block.get("gpu") or data.get("gpu") or "a GPU"
    return CudaConstants(context, share, floor, f"{where} (measured on {gpu})")


_CACHE: dict = {}


def cuda_constants() -> CudaConstants:
    """The constants the verdict uses: measured ones when a file is there (re-read when it changes), else built-in."""
    path = constants_path()
    if path is None or not path.is_file():
        return BUILT_IN
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = read_constants(path)
    return _CACHE[key]


def headroom_bytes(peak_bytes: int, constants: Optional[CudaConstants] = None) -> int:
    """Allocator headroom the verdict adds to a predicted peak."""
    c = constants or cuda_constants()
    return max(c.headroom_floor, int(peak_bytes * c.headroom_share))


def context_bytes(constants: Optional[CudaConstants] = None) -> int:
    """CUDA context (and kernel images) the verdict adds: measured where a file says, else 512 MiB."""
    return (constants or cuda_constants()).context_bytes


def required_bytes(peak_bytes: int, constants: Optional[CudaConstants] = None) -> int:
    """Peak + CUDA context + allocator headroom: what the card must have."""
    c = constants or cuda_constants()
    return peak_bytes + c.context_bytes + headroom_bytes(peak_bytes, c)

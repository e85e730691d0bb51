"""GPU presets and the fits / does-not-fit verdict.

A run fits when the predicted peak plus the CUDA context and allocator headroom is at
most the card's memory. The context (driver, kernels, cuBLAS workspace) is memory
torch never reports as allocated; the headroom covers the caching allocator's
fragmentation, which grows with the peak.

Example::

    >>> from ftmagic.memory.gpus import GPU_PRESETS
    >>> GPU_PRESETS["T4"].bf16
    False
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from ftmagic.errors import ConfigError
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
        if gpu <= 0:
            raise ConfigError(f"`gpu: {gpu}` must be a positive size in GiB or one of {', '.join(GPU_PRESETS)}")
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
        raise ConfigError(f"`gpu: {key}` is not a known GPU; use one of {', '.join(GPU_PRESETS)} "
                          "or a size in GiB such as 24") from None
    return resolve_gpu(size)


def headroom_bytes(peak_bytes: int) -> int:
    """Allocator headroom the verdict adds to a predicted peak."""
    return max(HEADROOM_FLOOR, int(peak_bytes * HEADROOM_SHARE))


def required_bytes(peak_bytes: int) -> int:
    """Peak + CUDA context + allocator headroom: what the card must have."""
    return peak_bytes + CUDA_CONTEXT_BYTES + headroom_bytes(peak_bytes)

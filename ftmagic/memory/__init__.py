"""Memory calculator: will this fine-tuning run fit the GPU, and what to change if not.

Importing this package never imports torch: the analytic estimate answers in
milliseconds. Exact mode (``estimate_memory(..., mode="exact")`` or
:func:`simulate_memory`) traces one real step under FakeTensorMode and imports torch then.

Example::

    from ftmagic.memory import estimate_memory, fits_gpu
    est = estimate_memory("llama-3.2-3b", method="qlora", batch_size=4, seq_len=1024)
    print(fits_gpu(est, "T4").message)
"""

from __future__ import annotations

from ftmagic.memory.architectures import BUILTIN, ModelShape, builtin_names, resolve_model
from ftmagic.memory.estimate import DEVICE_KEYS, MemoryEstimate, count_params, estimate_memory

__all__ = ["BUILTIN", "DEVICE_KEYS", "MemoryEstimate", "ModelShape", "builtin_names", "count_params",
           "estimate_memory", "resolve_model", "simulate_memory"]


def simulate_memory(model, **settings):
    """Exact mode: trace one training step under FakeTensorMode (see ftmagic.memory.simulate)."""
    from ftmagic.memory.simulate import simulate_memory as simulate

    return simulate(model, **settings)

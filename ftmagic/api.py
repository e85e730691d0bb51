"""The Python front's functions that span layers (``ftmagic.estimate_memory``).

The memory calculator's analytic model is core (no torch); its exact mode traces a real
step and so lives in the engine. This front picks one or the other, the way the magics
and the CLI do, so ``import ftmagic`` and an analytic estimate never import torch.

Example::

    import ftmagic
    est = ftmagic.estimate_memory("llama-3.2-1b", method="qlora", batch_size=4, seq_len=1024)
    exact = ftmagic.estimate_memory("smollm2-135m", method="lora", mode="exact")   # traces a step
"""

from __future__ import annotations

from typing import Any

from ftmagic.errors import not_accepted
from ftmagic.memory.estimate import MemoryEstimate
from ftmagic.memory.estimate import estimate_memory as analytic_memory

MODES = ("analytic", "exact")


def estimate_memory(model: Any = "tiny", *, mode: str = "analytic", **settings: Any) -> MemoryEstimate:
    """Peak GPU memory of one training step: ``analytic`` (milliseconds, no torch) or ``exact``.

    ``settings`` are those of :func:`ftmagic.memory.estimate_memory` (method, precision,
    batch_size, seq_len, gradient_checkpointing, optimizer, lora_r, ...). ``exact`` traces one
    step of the real architecture under FakeTensorMode (seconds to a minute; imports torch)
    and falls back to the analytic answer, with a note, where a step cannot be traced.

    Example::

        est = estimate_memory("mistral-7b", method="qlora", batch_size=2, seq_len=2048)
        print(f"{est.total_gib:.1f} GiB", est.breakdown)
    """
    if mode not in MODES:
        raise not_accepted("mode", mode, MODES)
    estimate = analytic_memory(model, **settings)  # validates and resolves the settings either way
    if mode == "analytic":
        return estimate
    from ftmagic.engine.trace import exact_estimate

    return exact_estimate(estimate.shape, estimate.settings, estimate)


def simulate_memory(model: Any, **settings: Any):
    """Trace one training step under FakeTensorMode; the raw trace (see :mod:`ftmagic.engine.trace`)."""
    from ftmagic.engine.trace import simulate_memory as simulate

    return simulate(model, **settings)

"""Memory calculator: will this fine-tuning run fit the GPU, and what to change if not.

Importing this package never imports torch: the analytic estimate answers in
milliseconds. Exact mode (``ftmagic.estimate_memory(..., mode="exact")``) traces one real
step under FakeTensorMode; it runs torch, so it lives in the engine
(:mod:`ftmagic.engine.trace`), which builds on this package and never the other way round.

Example::

    from ftmagic.memory import check_fit, preflight
    verdict = check_fit("llama-3.2-3b", "T4", method="qlora", batch_size=4, seq_len=1024)
    print(verdict.message)                      # fits / does not fit, and the best change
    verdict = preflight(config, gpu_total_bytes)  # the engine's check before loading weights
"""

from __future__ import annotations

from ftmagic.memory.architectures import BUILTIN, ModelShape, builtin_names, resolve_model
from ftmagic.memory.estimate import DEVICE_KEYS, MemoryEstimate, count_params, estimate_memory
from ftmagic.memory.gpus import GPU, GPU_PRESETS, format_bytes, resolve_gpu
from ftmagic.memory.suggest import Suggestion, Verdict, check_fit, format_measured, preflight, suggest

__all__ = ["BUILTIN", "DEVICE_KEYS", "GPU", "GPU_PRESETS", "MemoryEstimate", "ModelShape", "Suggestion", "Verdict",
           "builtin_names", "check_fit", "count_params", "estimate_memory", "format_bytes", "format_measured",
           "preflight", "resolve_gpu", "resolve_model", "suggest"]

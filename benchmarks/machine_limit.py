"""The machine's limit for a training run: its measured matrix-multiply peak and the FLOPs the run needs.

A run's *share of the limit* is the FLOP rate it reaches, counting only the work it cannot
avoid (:func:`ftmagic.flops.training_flops`: forward and backward of the parts that run,
the output layer only where there are labels, causal attention per example), over the
rate of one large matrix multiply measured on the same machine, in the same process and
with the same threads, in the dtype the run computes in. 100% would mean a run that does
nothing but its matrix multiplies, each at the best speed this machine reaches.

Both are measured in the process that trains, just before and after it, so other load on
a shared machine moves both alike; the CPU-time variant (FLOPs per CPU second over the
peak per CPU second) barely moves with it at all.

Example::

    from machine_limit import matmul_peak, run_flops
    peak = matmul_peak("fp32")                        # {"flops_per_s": ..., "flops_per_cpu_s": ...}
    flops = run_flops("model_dir", examples, lora_r=16, target_modules=[...])
"""

from __future__ import annotations

import time

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def matmul_peak(precision: str = "fp32", *, size: int = 2048, repeats: int = 5, device: str = "cpu") -> dict:
    """Best FLOP rate of ``size`` x ``size`` matrix multiplies in ``precision`` (``fp32``, ``bf16``, ``fp16``).

    Returns ``{"flops_per_s": wall-clock rate, "flops_per_cpu_s": rate per CPU second of this
    process, "size": size}``, each the best of ``repeats`` timed rounds. On CUDA the rate
    is the GPU's (TF32 off, as torch's default for fp32 matmuls).
    """
    import torch

    dtype = getattr(torch, DTYPES[precision])
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    flops = 2 * size ** 3
    a @ b  # the first call pays for kernel selection and page faults
    sync()
    best_wall = best_cpu = 0.0
    per_round = 3 if device == "cpu" else 20
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(per_round):
            a @ b
        sync()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        best_wall = max(best_wall, per_round * flops / wall)
        if cpu > 0:
            best_cpu = max(best_cpu, per_round * flops / cpu)
    return {"flops_per_s": best_wall, "flops_per_cpu_s": best_cpu, "size": size}


def run_flops(model_dir: str, examples: list[dict], *, method: str = "lora", lora_r: int = 16,
              target_modules=None) -> dict:
    """FLOPs one epoch over ``examples`` (``input_ids`` and ``labels`` lists) needs, and per trained token."""
    from ftmagic.flops import training_flops
    from ftmagic.memory.architectures import resolve_model

    shape = resolve_model(model_dir)
    lengths = [len(e["input_ids"]) for e in examples]
    labelled = sum(sum(1 for t in e["labels"][1:] if t != -100) for e in examples)
    count = training_flops(shape, lengths, labelled, method=method, lora_r=lora_r, target_modules=target_modules)
    return {"flops": count.total, "flops_per_token": count.per_token(labelled), "breakdown": count.breakdown,
            "trained_tokens": labelled}


def limit_fields(*, tokens: int, wall_s: float, cpu_s: float, train_s: float | None, flops_per_token: float,
                 peak: dict) -> dict:
    """The shares of the limit a run reached: over its whole wall time, its training loop, and its CPU time."""
    from ftmagic.flops import limit_share

    out = {"limit_share": limit_share(tokens / wall_s, flops_per_token, peak["flops_per_s"])}
    if train_s:
        out["train_limit_share"] = limit_share(tokens / train_s, flops_per_token, peak["flops_per_s"])
    if cpu_s and peak.get("flops_per_cpu_s"):
        out["cpu_limit_share"] = limit_share(tokens / cpu_s, flops_per_token, peak["flops_per_cpu_s"])
    return out

"""Will it fit, and if not, what to change: the verdict, ranked suggestions and pre-flight.

Each suggestion is one change to the run, with its own new estimate. Changes that make
the run fit come first, in order of what they cost the user: gradient checkpointing
(only time), an 8-bit optimizer, a smaller micro-batch with more accumulation (same
effective batch), QLoRA or LoRA (a different method), shorter sequences (less context).
When no single change is enough, a combination is offered. More GPUs with FSDP rank after
the settings and before changing the method (the run stays the same run); of those, the
fewest GPUs that fit is offered.

Example::

    from ftmagic.memory.suggest import check_fit
    verdict = check_fit("llama-3.1-8b", "T4", method="lora", batch_size=4, seq_len=1024)
    print(verdict.message)
    for s in verdict.suggestions:
        print(s.label, s.estimate.total_bytes)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ftmagic.errors import FtmagicError
from ftmagic.memory.estimate import MemoryEstimate, estimate_memory
from ftmagic.memory.policy import check_gpu_precision
from ftmagic.memory.gpus import (BUILT_IN, GPU, context_bytes, cuda_constants, format_bytes, headroom_bytes,
                                 required_bytes, resolve_gpu)
from ftmagic.strategies import LABELS as STRATEGY_LABELS


@dataclass
class Suggestion:
    """One change (``changes``: estimate_memory keyword -> new value) and its new estimate."""

    label: str
    changes: dict
    estimate: MemoryEstimate
    fits: bool
    cost: int  # lower = cheaper for the user (ranking key among the ones that fit)

    @property
    def required_bytes(self) -> int:
        return required_bytes(self.estimate.total_bytes)

    def __str__(self) -> str:
        return f"{self.label} (needs {format_bytes(self.required_bytes)})"


@dataclass
class Verdict:
    """The pre-flight answer: does it fit, the estimate, what to change, and a one-line message."""

    fits: bool
    estimate: Optional[MemoryEstimate]
    suggestions: list = field(default_factory=list)
    message: str = ""
    gpu: Optional[GPU] = None

    @property
    def required_bytes(self) -> int:
        return required_bytes(self.estimate.total_bytes) if self.estimate else 0


def with_overheads(estimate: MemoryEstimate) -> MemoryEstimate:
    """Fill the estimate's cuda_context and allocator_headroom (used only for the verdict)."""
    constants = cuda_constants()
    estimate.cuda_context = context_bytes(constants)
    estimate.allocator_headroom = headroom_bytes(estimate.total_bytes, constants)
    if constants is not BUILT_IN:
        note = f"CUDA context and allocator headroom from {constants.source}"
        if note not in estimate.notes:
            estimate.notes.append(note)
    return estimate


_ESTIMATE_KEYS = ("method", "precision", "batch_size", "seq_len", "gradient_checkpointing", "optimizer", "lora_r",
                  "target_modules", "packing", "lora_dropout", "num_virtual_tokens", "trainable_layers", "grad_accum",
                  "device", "loss", "devices", "strategy", "objective",
                  "num_labels")
# More GPUs cost more than a setting, less than changing what trains (the run stays the same run);
# FSDP, since it shards weights, gradients and optimizer states alike.
MORE_DEVICES = ((2, 4.5), (4, 4.6), (8, 4.7))


def _candidates(settings: dict) -> list:
    """(cost, label, changes) for every single change that could lower the peak."""
    out = []
    method, batch, seq = settings["method"], settings["batch_size"], settings["seq_len"]
    if not settings["gradient_checkpointing"]:
        out.append((1, "turn on gradient checkpointing (about 30% slower steps)", {"gradient_checkpointing": True}))
    if settings["optimizer"] == "adamw" and method in ("full", "freeze", "bitfit"):
        out.append((2, "use the 8-bit AdamW optimizer (bitsandbytes)", {"optimizer": "adamw_8bit"}))
    if batch > 1:
        new = max(1, batch // 2)
        accum = settings.get("grad_accum", 1) * (batch // new)
        out.append((3, f"micro-batch {batch} -> {new} with grad_accum {accum} (same effective batch)",
                    {"batch_size": new, "grad_accum": accum}))
        if new > 1:
            accum1 = settings.get("grad_accum", 1) * batch
            out.append((4, f"micro-batch {batch} -> 1 with grad_accum {accum1} (same effective batch)",
                        {"batch_size": 1, "grad_accum": accum1}))
    if method in ("lora", "dora", "full"):
        precision = settings["precision"] if settings["precision"] != "fp32" else "auto"
        out.append((5, "use QLoRA (4-bit base weights)", {"method": "qlora", "precision": precision}))
    if method in ("full", "freeze"):
        out.append((6, "use LoRA instead of full fine-tuning", {"method": "lora"}))
    if seq >= 256:
        out.append((7, f"shorter sequences: max_seq_len {seq} -> {seq // 2} (longer examples are truncated)",
                    {"seq_len": seq // 2}))
    devices = settings.get("devices", 1)
    if settings.get("device", "cuda") == "cuda":
        for count, cost in MORE_DEVICES:
            if count > devices and batch >= count:
                out.append((cost, f"use {count} GPUs with FSDP (`processes: {count}`, `distributed: fsdp`)",
                            {"devices": count, "strategy": "fsdp"}))
    return out


def suggest(model: Any, settings: dict, gpu_total_bytes: Optional[int] = None, limit: int = 5) -> list:
    """Ranked suggestions: the ones that fit first (cheapest change first), then by new size.

    ``settings`` are estimate_memory keywords (as in ``MemoryEstimate.settings``).
    """
    base = {k: v for k, v in settings.items() if k in _ESTIMATE_KEYS}
    results = []
    for cost, label, changes in _candidates(base):
        try:
            est = estimate_memory(model, **{**base, **changes})
        except FtmagicError:
            continue
        fits = gpu_total_bytes is not None and required_bytes(est.total_bytes) <= gpu_total_bytes
        results.append(Suggestion(label, changes, with_overheads(est), fits, cost))
    current = estimate_memory(model, **base).total_bytes
    results = _fewest_devices([r for r in results if r.estimate.total_bytes < current])
    if gpu_total_bytes is not None and results and not any(r.fits for r in results):
        combo = _combination(model, base, gpu_total_bytes)
        if combo is not None:
            results.append(combo)
    results.sort(key=lambda r: (not r.fits, r.cost if r.fits else 0, r.estimate.total_bytes))
    return results[:limit]


def _fewest_devices(results: list) -> list:
    """Of the "more GPUs" suggestions keep one: the fewest GPUs that fit, else the most there are."""
    more = [r for r in results if "devices" in r.changes]
    if not more:
        return results
    fitting = [r for r in more if r.fits]
    keep = min(fitting, key=lambda r: r.changes["devices"]) if fitting else max(more, key=lambda r: r.changes["devices"])
    return [r for r in results if "devices" not in r.changes or r is keep]


def _combination(model: Any, base: dict, gpu_total_bytes: int) -> Optional[Suggestion]:
    """Apply changes cheapest first until the run fits (or nothing is left to change)."""
    settings = dict(base)
    changes = {}
    for _ in range(8):
        options = []
        current = estimate_memory(model, **settings).total_bytes
        for cost, label, change in _candidates(settings):
            try:
                est = estimate_memory(model, **{**settings, **change})
            except FtmagicError:
                continue
            if est.total_bytes < current:
                options.append((cost, label, change, est))
        if not options:
            return None
        _, _, change, est = min(options, key=lambda o: o[0])
        settings.update(change)
        changes.update(change)
        if required_bytes(est.total_bytes) <= gpu_total_bytes:
            changes, est = _drop_unneeded(model, base, changes, est, gpu_total_bytes)
            return Suggestion(describe_changes(changes, base), changes, with_overheads(est), True, 10 + len(changes))
    return None


# The changes a combination is made of, each with what it costs the user (as in _candidates):
# undone as a whole, the costliest first, when the run fits without it.
_CHANGE_GROUPS = ((("method", "precision"), 5), (("devices", "strategy"), 4.5), (("batch_size", "grad_accum"), 3),
                  (("seq_len",), 7), (("optimizer",), 2), (("gradient_checkpointing",), 1))


def _drop_unneeded(model: Any, base: dict, changes: dict, est: MemoryEstimate, gpu_total_bytes: int) -> tuple:
    """Undo each change the fitting combination does not need, so none is asked for in vain.

    The combination is built cheapest first, so a costly change that came last (QLoRA) can
    make cheaper ones before it (more GPUs, an 8-bit optimizer) unnecessary: a 12 GiB card
    was told "QLoRA + gradient checkpointing + 8-bit AdamW + 4 GPUs" where QLoRA with
    checkpointing fits one GPU.
    """
    for keys, _cost in sorted(_CHANGE_GROUPS, key=lambda g: -g[1]):
        if not any(k in changes for k in keys):
            continue
        if keys == ("devices", "strategy"):  # fewer GPUs first, then none
            counts = [n for n, _ in MORE_DEVICES if n < changes["devices"]]
            trials = [{k: v for k, v in changes.items() if k not in keys}]
            trials += [{**changes, "devices": n} for n in counts if n > base.get("devices", 1)]
        else:
            trials = [{k: v for k, v in changes.items() if k not in keys}]
        for trial in trials:
            try:
                trial_est = estimate_memory(model, **{**base, **trial})
            except FtmagicError:
                continue
            if required_bytes(trial_est.total_bytes) <= gpu_total_bytes:
                changes, est = trial, trial_est
                break
    return changes, est


def describe_changes(changes: dict, base: dict) -> str:
    """A short label for several changes at once, e.g. ``QLoRA + gradient checkpointing + micro-batch 1 x 4``."""
    parts = []
    if "method" in changes:
        parts.append("QLoRA" if changes["method"] == "qlora" else changes["method"])
    if changes.get("gradient_checkpointing"):
        parts.append("gradient checkpointing")
    if "optimizer" in changes:
        parts.append("8-bit AdamW")
    if "batch_size" in changes:
        parts.append(f"micro-batch {changes['batch_size']} with grad_accum {changes['grad_accum']}")
    if "seq_len" in changes:
        parts.append(f"max_seq_len {changes['seq_len']}")
    if "devices" in changes:
        parts.append(f"{changes['devices']} GPUs with FSDP")
    del base
    return " + ".join(parts)


def check_fit(model: Any, gpu: Any, **settings: Any) -> Verdict:
    """Estimate ``model`` with ``settings`` and judge it against ``gpu`` (a preset name, GPU or GiB).

    Example::

        check_fit("qwen2.5-7b", "L4", method="qlora", batch_size=2, seq_len=2048).fits
    """
    card = resolve_gpu(gpu)
    if card is not None and "bf16_supported" not in settings:
        settings["bf16_supported"] = card.bf16
    if card is not None and settings.get("device", "cuda") == "cuda":
        check_gpu_precision(settings.get("precision", "auto"), settings["bf16_supported"], card.name)
    estimate = with_overheads(estimate_memory(model, **settings))
    return verdict_for(estimate, card)


def verdict_for(estimate: MemoryEstimate, gpu: Optional[GPU]) -> Verdict:
    """The verdict and suggestions for an existing estimate on ``gpu`` (None: no GPU chosen)."""
    with_overheads(estimate)
    need = estimate.required_bytes
    if gpu is None:
        message = f"{estimate.model}: peak {format_bytes(estimate.total_bytes)} ({format_bytes(need)} with CUDA context and headroom)"
        return Verdict(True, estimate, [], message, None)
    fits = need <= gpu.total_bytes
    suggestions = [] if fits else suggest(estimate.shape or estimate.model, estimate.settings, gpu.total_bytes)
    return Verdict(fits, estimate, suggestions, fit_message(estimate, gpu, fits, suggestions), gpu)


def fit_message(estimate: MemoryEstimate, gpu: GPU, fits: bool, suggestions: list) -> str:
    """One line: what is needed, against what the GPU has, and the best change if it does not fit."""
    need = estimate.required_bytes
    s = estimate.settings
    what = f"{estimate.model} {s.get('method')} {s.get('precision')} batch {s.get('batch_size')} x {s.get('seq_len')}"
    if s.get("devices", 1) > 1:
        what += f" on {s['devices']} GPUs ({STRATEGY_LABELS[s['strategy']]}), per GPU,"
    head = (f"{what} needs {format_bytes(need)} (peak {format_bytes(estimate.total_bytes)} at {estimate.peak_phase}"
            f" + CUDA context and allocator headroom)")
    if fits:
        return f"fits {gpu.label}: {head}, {format_bytes(gpu.total_bytes - need)} to spare"
    text = f"does not fit {gpu.label}: {head}"
    if suggestions:
        best = suggestions[0]
        verb = "fits" if best.fits else "still does not fit"
        text += f"; try: {best.label} -> {format_bytes(best.required_bytes)} ({verb})"
    return text


def preflight(config, gpu_total_bytes: int, *, bf16_supported: bool = True) -> Verdict:
    """Pre-flight check for the engine: will ``config`` (a FinetuneConfig) fit a GPU of this size?

    Called before any weights load. If the model's shape cannot be read (say, a hub id
    not yet downloaded), the check is skipped: ``fits`` is True and the message says why.

    Example::

        verdict = preflight(FinetuneConfig(model="llama-3.1-8b", method="lora"), 16 * 2**30)
        if not verdict.fits and not config.skip_memory_check:
            raise MemoryFitError(verdict.message)
    """
    gpu = GPU("this GPU", int(gpu_total_bytes), bf16_supported)
    settings = settings_from_config(config)
    try:
        estimate = with_overheads(estimate_memory(config.model, bf16_supported=bf16_supported, **settings))
    except FtmagicError as exc:
        return Verdict(True, None, [], f"memory check skipped: {exc}", gpu)
    verdict = verdict_for(estimate, gpu)
    if not verdict.fits:
        verdict.message += "; set `skip_memory_check: true` to try anyway"
    return verdict


def settings_from_config(config) -> dict:
    """estimate_memory keywords from a FinetuneConfig's fields."""
    return dict(method=config.method, precision=config.precision, batch_size=config.batch_size,
                seq_len=config.max_seq_len, gradient_checkpointing=config.gradient_checkpointing,
                optimizer=config.optimizer, lora_r=config.lora_r, target_modules=config.target_modules,
                packing=config.packing, lora_dropout=config.lora_dropout,
                num_virtual_tokens=config.num_virtual_tokens, trainable_layers=config.trainable_layers,
                grad_accum=config.grad_accum, devices=config.processes, strategy=config.distributed,
                objective=getattr(config, "objective", "sft"), num_labels=max(2, len(config.labels or [])))


def format_measured(measured_peak_bytes: Optional[int], estimate: Optional[MemoryEstimate]) -> str:
    """After training: the measured peak beside the estimate, e.g.
    ``peak memory 10.21 GiB measured, 10.60 GiB estimated (+3.8%)``.

    Example::

        print(format_measured(result.metrics["peak_memory_bytes"], verdict.estimate))
    """
    if not measured_peak_bytes:
        return "peak memory not measured (no CUDA device)"
    if estimate is None:
        return f"peak memory {format_bytes(measured_peak_bytes)} measured"
    error = (estimate.total_bytes - measured_peak_bytes) / measured_peak_bytes * 100
    return (f"peak memory {format_bytes(measured_peak_bytes)} measured, {format_bytes(estimate.total_bytes)} "
            f"estimated ({error:+.1f}%)")

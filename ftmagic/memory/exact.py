"""``estimate_memory(..., mode="exact")``: the traced step, as a MemoryEstimate.

Where the step cannot be traced (bitsandbytes' 8-bit optimizers, an architecture
transformers cannot build here), the analytic estimate is returned with a note that says
why, so callers always get an answer.

Example::

    est = estimate_memory("smollm2-135m", method="full", mode="exact")
    est.notes   # [] when traced, or the reason it fell back to the analytic estimate
"""

from __future__ import annotations

from ftmagic.errors import FtmagicError
from ftmagic.memory.architectures import ModelShape
from ftmagic.memory.estimate import DEVICE_KEYS, MemoryEstimate, _analytic


def exact_estimate(shape: ModelShape, settings: dict) -> MemoryEstimate:
    """Trace one steady-state step under FakeTensorMode; fall back to analytic with a note."""
    from ftmagic.memory.simulate import simulate_memory, untraceable_reason

    analytic = _analytic(shape, settings)
    reason = untraceable_reason(settings["method"], settings["optimizer"])
    if reason is None and settings["method"] in ("prefix_tuning",):
        reason = "prefix tuning's cache-based virtual tokens are not traced"
    if reason is None:
        try:
            sim = simulate_memory(
                shape, method=settings["method"], precision=settings["precision"],
                batch_size=settings["batch_size"], seq_len=settings["seq_len"],
                gradient_checkpointing=settings["gradient_checkpointing"], optimizer=settings["optimizer"],
                lora_r=settings["lora_r"], lora_dropout=settings["lora_dropout"],
                target_modules=settings["target_modules"], num_virtual_tokens=settings["num_virtual_tokens"],
                trainable_layers=settings["trainable_layers"], loss=settings.get("loss", "auto"),
                optimizer_impl="foreach" if settings.get("device") == "cpu" else "fused")
        except FtmagicError as exc:
            reason = str(exc)
        except Exception as exc:  # an architecture or op the tracer cannot run: say so, keep the analytic answer
            reason = f"the step could not be traced ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    if reason is not None:
        analytic.notes.append(f"exact mode fell back to the analytic estimate: {reason}")
        return analytic
    breakdown = dict.fromkeys(DEVICE_KEYS, 0)
    breakdown.update(sim.breakdown)
    peak_phase = max(sim.phases, key=sim.phases.get)
    notes = ["exact: one steady-state step traced under FakeTensorMode with torch's MemTracker"]
    if settings["method"] == "qlora":
        notes.append("4-bit linears traced as frozen compute-dtype linears (same saved tensors), weights counted at NF4 size")
    return MemoryEstimate(total_bytes=int(sim.peak_bytes), breakdown=breakdown, phases=dict(sim.phases),
                          peak_phase=peak_phase, settings=dict(settings, mode="exact"), model=shape.name,
                          trainable_params=sim.trainable_params, total_params=sim.total_params,
                          paged_optimizer_states=analytic.paged_optimizer_states, notes=notes, shape=shape)

"""Which dtype each part of the model lives in, per method and precision.

The analytic estimate and the traced step (exact mode, the benchmark) share this one
table, so they describe the same training step:

============  ==================  =====================  ===================  ==========
method        precision           frozen base weights    trainable weights    autocast
============  ==================  =====================  ===================  ==========
full/bitfit/  bf16                bf16                   bf16 (pure bf16)     no
freeze        fp16                fp32                   fp32 (master)        fp16
              fp32                fp32                   fp32                 no
adapters      bf16 / fp16         bf16 / fp16            fp32 (peft default)  bf16 / fp16
(lora, ...)   fp32                fp32                   fp32                 no
qlora         bf16 / fp16         linears NF4, the rest  fp32                 bf16 / fp16
                                  fp32 (peft's prepare_model_for_kbit_training)
============  ==================  =====================  ===================  ==========

fp16 full fine-tuning keeps fp32 master weights because a gradient scaler cannot
unscale fp16 gradients in place; bf16 needs no scaler, so pure bf16 halves the weights.

Example::

    >>> weight_plan("lora", "bf16")
    WeightPlan(base_bytes=2, trainable_bytes=4, compute_bytes=2, autocast='bf16', quantized=False)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ftmagic.errors import ConfigError, not_accepted
from ftmagic.methods import get_method_spec

PRECISIONS = ("bf16", "fp16", "fp32")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class WeightPlan:
    """Bytes per element of each part of the model, and the autocast dtype (None: off)."""

    base_bytes: int  # frozen weights that are not quantized
    trainable_bytes: int  # trainable weights (and their gradients)
    compute_bytes: int  # activations of the blocks
    autocast: Optional[str]
    quantized: bool  # linears of the blocks stored as 4-bit NF4


def weight_plan(method: str, precision: str) -> WeightPlan:
    """The dtype table above for one (method, precision); precision must already be resolved."""
    if precision not in PRECISIONS:
        raise not_accepted("precision", precision, PRECISIONS, by="the weight plan (resolve `auto` first)")
    spec = get_method_spec(method)
    half = DTYPE_BYTES[precision]
    if precision == "fp32":
        if spec.quantized:
            raise ConfigError(f"`precision: fp32` does not apply to `method: {method}`; use bf16 or fp16")
        return WeightPlan(4, 4, 4, None, False)
    if spec.trains_base_weights:
        if precision == "bf16":
            return WeightPlan(2, 2, 2, None, False)
        return WeightPlan(4, 4, 2, "fp16", False)
    if spec.quantized:
        return WeightPlan(4, 4, half, precision, True)
    return WeightPlan(half, 4, half, precision, False)


# CPU instruction sets under which bf16 autocast was measured to train faster than fp32 with the
# eval loss within 2% (benchmarks/README.md): Intel AMX and AVX512_BF16 (AMD Zen 4). Without them
# torch emulates bf16 on the CPU, which is slower than fp32.
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# bf16 pays through its matrix multiplies: measured 1.43x fewer CPU seconds at hidden size 512,
# nothing measurable at 144 (the embedded tiny model), where conversions cost what the matmuls save.
CPU_BF16_MIN_HIDDEN = 512


def cpu_bf16(flags) -> Optional[str]:
    """The bf16 instruction set of a CPU with these ``flags`` (from /proc/cpuinfo) that makes bf16 pay, or None.

    Example::

        >>> cpu_bf16({"avx512f", "avx512_bf16"}), cpu_bf16({"avx2", "avx512f"})
        ('avx512_bf16', None)
    """
    return next((flag for flag in CPU_BF16_FLAGS if flag in flags), None)


def cpu_bf16_pays(flags, hidden_size: Optional[int]) -> bool:
    """Whether ``precision: auto`` trains in bf16 on this CPU for a model of ``hidden_size``.

    Example::

        >>> cpu_bf16_pays({"amx_bf16"}, 2048), cpu_bf16_pays({"amx_bf16"}, 144), cpu_bf16_pays({"avx2"}, 4096)
        (True, False, False)
    """
    return cpu_bf16(flags) is not None and hidden_size is not None and hidden_size >= CPU_BF16_MIN_HIDDEN


def check_gpu_precision(precision: str, bf16_supported: bool, gpu_name: str = "this GPU") -> None:
    """Refuse ``precision: bf16`` on a GPU without bf16 (a T4, compute capability 7.5).

    One home for the refusal: the engine raises it before loading a model, and the memory
    calculator raises it too, so it never judges a run on a T4 that training would refuse.

    Example::

        >>> check_gpu_precision("fp16", False, "T4")
        >>> check_gpu_precision("bf16", False, "T4")
        Traceback (most recent call last):
        ...
        ftmagic.errors.ConfigError: `precision: bf16` is not supported by T4 (compute capability below 8.0); use `precision: fp16` or `precision: auto`
    """
    if precision == "bf16" and not bf16_supported:
        raise ConfigError(f"`precision: bf16` is not supported by {gpu_name} (compute capability below 8.0); "
                          "use `precision: fp16` or `precision: auto`")


def resolve_precision(precision: str, bf16_supported: bool = True, device: str = "cuda") -> str:
    """``auto`` -> bf16 where the device has it (on a CPU: where :func:`cpu_bf16_pays`), else
    fp16 on a GPU (a T4) and fp32 on a CPU."""
    if precision in (None, "auto"):
        return "bf16" if bf16_supported else ("fp32" if device == "cpu" else "fp16")
    return precision

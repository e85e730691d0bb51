"""Which device and precision a run uses, and why (one line).

The decision is a pure function of the machine's capabilities, so every GPU rule is
tested on a CPU with faked capabilities; :func:`detect_caps` is the only part that
looks at the real machine.

Example::

    >>> from ftmagic.engine.device import DeviceCaps, choose_device
    >>> t4 = DeviceCaps(cuda_available=True, name="Tesla T4", compute_capability=(7, 5),
    ...                 total_memory=15 * 2**30, bf16_supported=False)
    >>> plan = choose_device(t4, method="qlora")
    >>> plan.device, plan.precision, plan.use_grad_scaler, plan.qlora_compute_dtype
    ('cuda', 'fp16', True, 'float16')
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from ftmagic.constants import DEVICES, OPTIMIZERS
from ftmagic.errors import ConfigError, not_accepted
from ftmagic.memory.policy import check_gpu_precision, cpu_bf16, cpu_bf16_pays

# Flattened rows are rounded up to a multiple of this where oneDNN builds a kernel per shape
# (DevicePlan.row_multiple): a row pads at most 63 tokens.
ONEDNN_ROW_MULTIPLE = 64
# How many kernels oneDNN keeps for such a run (its own default is 1,024, with their memory):
# measured no slower, and 555 MB less peak RSS on a 2,000-example bf16 run (benchmarks/README.md).
ONEDNN_CACHE_CAPACITY = 64
# oneDNN reads the first of these that is set once, when the process builds its first kernel.
ONEDNN_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY")


@dataclass(frozen=True)
class DeviceCaps:
    """What the machine can do; build one by hand to test a GPU rule without a GPU."""

    cuda_available: bool = False
    name: str = "cpu"
    compute_capability: Optional[tuple] = None  # (major, minor); T4 is (7, 5), A100 (8, 0)
    total_memory: int = 0  # bytes of GPU memory (0 without CUDA)
    bf16_supported: bool = False  # Ampere (8.0) and newer
    mps_available: bool = False
    bnb_cpu_4bit: bool = False  # bitsandbytes can run NF4 matmuls on the CPU (bnb >= 0.48)
    bnb_available: bool = False  # bitsandbytes imports (8-bit optimizers, CUDA 4-bit)
    cpu_flags: frozenset = frozenset()  # the CPU's instruction-set flags (/proc/cpuinfo), e.g. {"avx512_bf16"}


@dataclass(frozen=True)
class DevicePlan:
    """The outcome of :func:`choose_device`."""

    device: str  # "cuda" | "mps" | "cpu"
    precision: str  # "bf16" | "fp16" | "fp32": autocast dtype of the forward pass
    use_grad_scaler: bool  # fp16 needs loss scaling; bf16 and fp32 do not
    qlora_compute_dtype: Optional[str]  # "bfloat16" | "float16" | "float32" for method qlora, else None
    method: str  # the method that will run (qlora may become lora where 4-bit cannot run)
    reason: str  # one line: which device and precision, and why
    fallback: Optional[str] = None  # one line when the method was changed, else None

    @property
    def torch_dtype(self) -> "torch.dtype":
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.precision]

    @property
    def autocast(self) -> bool:
        return self.precision != "fp32"

    @property
    def onednn(self) -> bool:
        """Whether oneDNN computes the run's matrix multiplies (bf16 and fp16 on a CPU), building a
        kernel for every new shape and keeping up to 1,024 of them, with their memory; fp32 goes
        to MKL, which keeps nothing, and CUDA has its own kernels."""
        return self.device == "cpu" and self.precision != "fp32"

    @property
    def row_multiple(self) -> int:
        """What a flattened row's length is rounded up to (1: not rounded), for every objective:
        the SFT loss, DPO/ORPO log-probabilities and the classifier and reward heads.

        Where :attr:`onednn` holds, an unrounded flattened row has a new length every
        micro-batch, so every micro-batch builds its kernels again and the cache grows for the
        whole run (measured in benchmarks/README.md, under the bf16 table).

        Example::

            >>> choose_device(DeviceCaps(cpu_flags=frozenset({"avx512_bf16"})), precision="bf16").row_multiple
            64
        """
        return ONEDNN_ROW_MULTIPLE if self.onednn else 1


def limit_onednn_cache(plan: DevicePlan, environ=os.environ) -> bool:
    """Cap oneDNN's kernel cache at :data:`ONEDNN_CACHE_CAPACITY` for a run it computes, unless
    the user set the capacity; True when it was set here.

    Called before the model loads: oneDNN reads the variable once, at the first kernel the
    process builds, so a bf16 multiply run earlier in the same process keeps its default.

    Example::

        >>> env = {}
        >>> limit_onednn_cache(choose_device(DeviceCaps(), precision="bf16"), env), env
        (True, {'ONEDNN_PRIMITIVE_CACHE_CAPACITY': '64'})
    """
    if not plan.onednn or any(name in environ for name in ONEDNN_CACHE_VARIABLES):
        return False
    environ[ONEDNN_CACHE_VARIABLES[0]] = str(ONEDNN_CACHE_CAPACITY)
    return True


def detect_caps() -> DeviceCaps:
    """Read the capabilities of this machine (the only impure part of the device choice)."""
    cuda = torch.cuda.is_available()
    name, cc, total, bf16 = "cpu", None, 0, False
    if cuda:
        props = torch.cuda.get_device_properties(0)
        name, cc, total = props.name, (props.major, props.minor), int(props.total_memory)
        bf16 = native_bf16(cc, is_rocm=torch.version.hip is not None)
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    bnb_ok, bnb_cpu = _bitsandbytes_support()
    return DeviceCaps(cuda_available=cuda, name=name, compute_capability=cc, total_memory=total,
                      bf16_supported=bf16, mps_available=mps, bnb_cpu_4bit=bnb_cpu, bnb_available=bnb_ok,
                      cpu_flags=cpu_flags())


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset:
    """The instruction-set flags of this machine's first CPU (empty where /proc/cpuinfo is missing)."""
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):  # x86, ARM
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()




def native_bf16(compute_capability, is_rocm: bool = False) -> bool:
    """Whether the GPU computes bf16 in hardware: NVIDIA Ampere (8.0) and newer.

    ``torch.cuda.is_bf16_supported()`` also says True on a T4 (7.5), where bf16 is
    emulated and slow; training there must use fp16 with a scaler instead.

    Example::

        >>> native_bf16((7, 5)), native_bf16((8, 0)), native_bf16((9, 0))
        (False, True, True)
    """
    if is_rocm:
        return True  # MI100 and newer, the GPUs ROCm builds of torch support for training
    return compute_capability is not None and tuple(compute_capability) >= (8, 0)


def _bitsandbytes_support() -> tuple[bool, bool]:
    try:
        import bitsandbytes  # its import-time note is silenced in ftmagic/engine/__init__.py
    except Exception:  # a broken install must not stop a LoRA run
        return False, False
    try:
        major, minor = (int(p) for p in bitsandbytes.__version__.split(".")[:2])
    except ValueError:
        return True, False
    # The CPU backend for 4-bit (NF4) matmuls arrived in bitsandbytes 0.48.
    return True, (major, minor) >= (0, 48)


def choose_device(caps: DeviceCaps, requested: str = "auto", precision: str = "auto",
                  method: str = "lora", hidden_size: Optional[int] = None) -> DevicePlan:
    """Pick device, precision, loss scaling and the QLoRA compute dtype for ``caps``.

    ``auto`` prefers CUDA (bf16 where the GPU has it, else fp16 with a gradient scaler),
    then Apple MPS, then the CPU: bf16 autocast where the CPU computes bf16 in hardware
    and the model (``hidden_size``, when known) is wide enough for it to pay
    (:func:`ftmagic.memory.policy.cpu_bf16_pays`), else fp32. QLoRA without CUDA runs on bitsandbytes' CPU
    backend when it is there, else becomes LoRA (``plan.fallback`` says so).

    Example::

        plan = choose_device(detect_caps(), requested="auto", precision="auto", method="lora")
        print(plan.reason)   # e.g. "cuda (NVIDIA A100, cc 8.0): bf16 autocast, no loss scaling needed"
    """
    if requested == "cuda" and not caps.cuda_available:
        raise ConfigError("`device: cuda` was asked for but no CUDA GPU is visible; use `device: auto` or `device: cpu`")
    if requested == "mps" and not caps.mps_available:
        raise ConfigError("`device: mps` was asked for but Apple MPS is not available; use `device: auto` or `device: cpu`")
    if requested not in DEVICES:
        raise not_accepted("device", requested, DEVICES)

    if requested == "auto":
        device = "cuda" if caps.cuda_available else "mps" if caps.mps_available else "cpu"
    else:
        device = requested

    fallback = None
    if method == "qlora" and device != "cuda":
        if device == "cpu" and caps.bnb_cpu_4bit:
            pass  # bitsandbytes runs NF4 on the CPU; slow but real QLoRA
        else:
            fallback = (f"QLoRA needs CUDA or bitsandbytes' CPU backend, which {device} does not have; "
                        "using LoRA (same adapters, unquantized base)")
            method = "lora"

    if device == "cuda":
        where = f"cuda ({caps.name}" + (f", cc {caps.compute_capability[0]}.{caps.compute_capability[1]})"
                                         if caps.compute_capability else ")")
        if precision == "auto":
            precision = "bf16" if caps.bf16_supported else "fp16"
            why = ("bf16 autocast, no loss scaling needed" if caps.bf16_supported
                   else "no bf16 on this GPU, so fp16 autocast with a gradient scaler")
        else:
            check_gpu_precision(precision, caps.bf16_supported, caps.name)
            why = f"{precision} as asked" + (" with a gradient scaler" if precision == "fp16" else "")
    elif device == "mps":
        where = "mps (Apple GPU)"
        if precision == "auto":
            # fp16 autocast on MPS has no dependable loss scaler; fp32 trains correctly everywhere.
            precision, why = "fp32", "fp32 (mixed precision on MPS is not dependable for training)"
        elif precision == "bf16":
            raise ConfigError("`precision: bf16` is not supported for training on MPS; use `precision: auto` (fp32)")
        else:
            why = f"{precision} as asked"
    else:
        where = "cpu" + (" (no CUDA GPU found)" if requested == "auto" else " (as asked)")
        hardware = cpu_bf16(caps.cpu_flags)
        if precision == "auto" and cpu_bf16_pays(caps.cpu_flags, hidden_size):
            precision, why = "bf16", f"bf16 autocast (this CPU computes bf16 in hardware: {hardware.upper()})"
        elif precision == "auto" and hardware:
            width = f"hidden size {hidden_size}" if hidden_size else "a model of unknown width"
            precision, why = "fp32", f"fp32 ({width} gains nothing measurable from this CPU's bf16)"
        elif precision == "auto":
            precision, why = "fp32", "fp32 (this CPU has no bf16 instructions; half precision would be slower)"
        elif precision == "fp16":
            raise ConfigError("`precision: fp16` is not supported on the CPU; use `precision: auto` or bf16")
        elif precision == "bf16" and not hardware:
            why = "bf16 as asked (this CPU has no bf16 instructions: expect it slower than fp32)"
        else:
            why = f"{precision} as asked"

    use_scaler = device == "cuda" and precision == "fp16"
    compute = None
    if method == "qlora":
        if device == "cuda":
            compute = {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "bfloat16" if caps.bf16_supported else "float16")
        else:
            # The CPU 4-bit path computes in the activation dtype; fp32 keeps it exact and portable.
            compute = "bfloat16" if precision == "bf16" else "float32"
        why += f"; 4-bit NF4 base computing in {compute}"
    reason = f"{where}: {why}"
    return DevicePlan(device=device, precision=precision, use_grad_scaler=use_scaler, qlora_compute_dtype=compute,
                      method=method, reason=reason, fallback=fallback)


def autocast_for(plan: Optional[DevicePlan]):
    """The context every forward pass of the run's model runs in: the plan's autocast (bf16 or
    fp16), or nothing for fp32 or no plan.

    Training steps, evaluation during training and everything a :class:`RunResult` answers
    afterwards (``generate``, ``compare``, ``evaluate``, ``score``, ``predict``) use this one
    rule, so an answer after the run is the answer the run's own evaluation gave.

    Example::

        >>> plan = choose_device(DeviceCaps(cpu_flags=frozenset({"avx512_bf16"})), method="lora", precision="bf16")
        >>> type(autocast_for(plan)).__name__, type(autocast_for(None)).__name__
        ('autocast', 'nullcontext')
    """
    from contextlib import nullcontext

    if plan is None or not plan.autocast:
        return nullcontext()
    return torch.autocast(device_type=plan.device, dtype=plan.torch_dtype)


def base_weight_dtype(plan: DevicePlan, *, adapter: bool) -> "torch.dtype":
    """The dtype the model's weights are loaded in (the table in :mod:`ftmagic.memory.policy`).

    Under an adapter the frozen base loads in the half-precision dtype (half the memory;
    the adapters stay fp32). Methods that train the model's own weights run pure bf16
    where bf16 is the precision (no scaler needed, half the memory of fp32 weights and
    optimizer states), and keep fp32 master weights under fp16 autocast, since a gradient
    scaler cannot unscale fp16 gradients. QLoRA loads its unquantized parts in the
    compute dtype. fp32 is fp32 everywhere.

    Example::

        >>> t4 = DeviceCaps(cuda_available=True, name="T4", compute_capability=(7, 5))
        >>> base_weight_dtype(choose_device(t4, method="lora"), adapter=True)
        torch.float16
    """
    if plan.qlora_compute_dtype:
        return getattr(torch, plan.qlora_compute_dtype)
    if plan.precision == "fp32":
        return torch.float32
    if adapter or plan.precision == "bf16":
        return plan.torch_dtype
    return torch.float32


def keeps_fp32_trainable(plan: DevicePlan, *, adapter: bool) -> bool:
    """Whether trainable weights are fp32 masters (all cases but pure-bf16 full-weight training)."""
    return adapter or plan.precision != "bf16"


@dataclass(frozen=True)
class OptimizerPlan:
    """The optimizer class to build and how (see :func:`choose_optimizer`)."""

    name: str  # "adamw" | "adamw_8bit" | "paged_adamw_8bit" | "sgd"
    impl: str  # "fused" | "foreach" | "bnb" | "plain"
    message: Optional[str] = None  # one line when the request was changed


def choose_optimizer(requested: str, device: str, bnb_available: bool) -> OptimizerPlan:
    """Decide how to build the optimizer; pure, so GPU-only choices are tested on a CPU.

    8-bit and paged AdamW come from bitsandbytes and need CUDA; elsewhere the run uses
    AdamW and says so. Plain AdamW uses the fused CUDA kernel on a GPU and the
    multi-tensor (foreach) path elsewhere.

    Example::

        >>> choose_optimizer("paged_adamw_8bit", "cpu", bnb_available=True).name
        'adamw'
    """
    if requested in ("adamw_8bit", "paged_adamw_8bit"):
        if device == "cuda" and bnb_available:
            return OptimizerPlan(requested, "bnb")
        why = "bitsandbytes is not installed" if not bnb_available else f"it needs CUDA and this run is on {device}"
        return OptimizerPlan("adamw", "foreach" if device != "mps" else "plain",
                             f"`optimizer: {requested}` is not available here ({why}); using AdamW")
    if requested == "sgd":
        return OptimizerPlan("sgd", "foreach" if device != "mps" else "plain")
    if requested != "adamw":
        raise not_accepted("optimizer", requested, OPTIMIZERS)
    return OptimizerPlan("adamw", "fused" if device == "cuda" else "foreach" if device == "cpu" else "plain")


def build_optimizer(plan: OptimizerPlan, params, *, lr: float, weight_decay: float):
    """Instantiate the optimizer that :func:`choose_optimizer` decided on."""
    params = list(params)
    if plan.impl == "bnb":
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if plan.name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        return cls(params, lr=lr, weight_decay=weight_decay)
    extra = {"fused": True} if plan.impl == "fused" else {"foreach": True} if plan.impl == "foreach" else {}
    if plan.name == "sgd":
        extra.pop("fused", None)
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=0.9, **extra)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **extra)

"""Device, precision and optimizer choices, tested with faked capabilities (no GPU here)."""

import pytest

from ftmagic.engine.device import DeviceCaps, choose_device, choose_optimizer
from ftmagic.errors import ConfigError

T4 = DeviceCaps(cuda_available=True, name="Tesla T4", compute_capability=(7, 5), total_memory=15 * 2**30,
                bf16_supported=False, bnb_available=True)
A100 = DeviceCaps(cuda_available=True, name="NVIDIA A100-SXM4-40GB", compute_capability=(8, 0),
                  total_memory=40 * 2**30, bf16_supported=True, bnb_available=True)
CPU = DeviceCaps()
CPU_BNB = DeviceCaps(bnb_cpu_4bit=True, bnb_available=True)
MAC = DeviceCaps(mps_available=True)


def test_t4_uses_fp16_with_scaler():
    plan = choose_device(T4)
    assert (plan.device, plan.precision, plan.use_grad_scaler, plan.qlora_compute_dtype) == ("cuda", "fp16", True, None)
    assert plan.reason == "cuda (Tesla T4, cc 7.5): no bf16 on this GPU, so fp16 autocast with a gradient scaler"


def test_t4_qlora_computes_in_fp16():
    plan = choose_device(T4, method="qlora")
    assert (plan.method, plan.precision, plan.qlora_compute_dtype, plan.use_grad_scaler) == ("qlora", "fp16", "float16", True)
    assert plan.fallback is None


def test_t4_refuses_bf16():
    with pytest.raises(ConfigError, match="`precision: bf16` is not supported by Tesla T4"):
        choose_device(T4, precision="bf16")


def test_a100_uses_bf16_without_scaler():
    plan = choose_device(A100, method="qlora")
    assert (plan.device, plan.precision, plan.use_grad_scaler, plan.qlora_compute_dtype) == ("cuda", "bf16", False, "bfloat16")
    assert plan.reason.startswith("cuda (NVIDIA A100-SXM4-40GB, cc 8.0): bf16 autocast, no loss scaling needed")


def test_a100_fp16_when_asked_gets_scaler():
    plan = choose_device(A100, precision="fp16")
    assert (plan.precision, plan.use_grad_scaler) == ("fp16", True)


def test_cpu_when_no_gpu():
    plan = choose_device(CPU, hidden_size=4096)
    assert (plan.device, plan.precision, plan.use_grad_scaler) == ("cpu", "fp32", False)
    assert plan.reason == "cpu (no CUDA GPU found): fp32 (this CPU has no bf16 instructions; half precision would be slower)"


ZEN4 = DeviceCaps(cpu_flags=frozenset({"avx2", "avx512f", "avx512_bf16"}))
SAPPHIRE_RAPIDS = DeviceCaps(cpu_flags=frozenset({"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}))
SKYLAKE = DeviceCaps(cpu_flags=frozenset({"avx2", "avx512f", "avx512bw"}))


@pytest.mark.parametrize("caps,hidden,precision,why", [
    (ZEN4, 512, "bf16", "bf16 autocast (this CPU computes bf16 in hardware: AVX512_BF16)"),
    (SAPPHIRE_RAPIDS, 2048, "bf16", "bf16 autocast (this CPU computes bf16 in hardware: AMX_BF16)"),
    (ZEN4, 144, "fp32", "fp32 (hidden size 144 gains nothing measurable from this CPU's bf16)"),
    (ZEN4, None, "fp32", "fp32 (a model of unknown width gains nothing measurable from this CPU's bf16)"),
    (SKYLAKE, 4096, "fp32", "fp32 (this CPU has no bf16 instructions; half precision would be slower)"),
])
def test_cpu_auto_takes_bf16_only_where_it_pays(caps, hidden, precision, why):
    plan = choose_device(caps, hidden_size=hidden)
    assert (plan.device, plan.precision, plan.use_grad_scaler) == ("cpu", precision, False)
    assert plan.reason == f"cpu (no CUDA GPU found): {why}"
    assert plan.autocast == (precision == "bf16")


def test_cpu_bf16_as_asked_warns_where_it_is_emulated():
    assert choose_device(SKYLAKE, precision="bf16").reason.endswith("expect it slower than fp32)")
    assert choose_device(ZEN4, precision="bf16", hidden_size=64).reason.endswith(": bf16 as asked")
    assert choose_device(ZEN4, precision="fp32", hidden_size=4096).precision == "fp32"


def test_qlora_on_a_bf16_cpu_computes_in_bf16():
    plan = choose_device(DeviceCaps(cpu_flags=ZEN4.cpu_flags, bnb_cpu_4bit=True), method="qlora", hidden_size=2048)
    assert (plan.method, plan.precision, plan.qlora_compute_dtype) == ("qlora", "bf16", "bfloat16")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    from ftmagic.engine.device import cpu_bf16, cpu_flags

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert cpu_flags(str(info)) == {"fpu", "sse", "avx512f", "avx512_bf16"}
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()
    assert cpu_bf16(cpu_flags(str(info))) == "avx512_bf16"


def test_cpu_can_be_forced_on_a_gpu_machine():
    plan = choose_device(A100, requested="cpu")
    assert (plan.device, plan.precision) == ("cpu", "fp32")
    assert plan.reason.startswith("cpu (as asked)")


def test_cpu_refuses_fp16_but_takes_bf16():
    with pytest.raises(ConfigError, match="fp16` is not supported on the CPU"):
        choose_device(CPU, precision="fp16")
    assert choose_device(CPU, precision="bf16").precision == "bf16"


def test_mps_preferred_over_cpu_and_trains_fp32():
    plan = choose_device(MAC)
    assert (plan.device, plan.precision, plan.use_grad_scaler) == ("mps", "fp32", False)


def test_qlora_on_cpu_uses_bitsandbytes_cpu_backend():
    plan = choose_device(CPU_BNB, method="qlora")
    assert (plan.method, plan.device, plan.qlora_compute_dtype, plan.fallback) == ("qlora", "cpu", "float32", None)


def test_qlora_without_cuda_or_bnb_falls_back_to_lora():
    plan = choose_device(CPU, method="qlora")
    assert plan.method == "lora" and plan.qlora_compute_dtype is None
    assert plan.fallback.startswith("QLoRA needs CUDA or bitsandbytes' CPU backend")
    assert choose_device(MAC, method="qlora").method == "lora"


def test_asking_for_missing_devices():
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        choose_device(CPU, requested="cuda")
    with pytest.raises(ConfigError, match="Apple MPS is not available"):
        choose_device(CPU, requested="mps")


@pytest.mark.parametrize("requested,device,bnb,expected", [
    ("adamw", "cuda", True, ("adamw", "fused", None)),
    ("adamw", "cpu", True, ("adamw", "foreach", None)),
    ("adamw", "mps", False, ("adamw", "plain", None)),
    ("adamw_8bit", "cuda", True, ("adamw_8bit", "bnb", None)),
    ("paged_adamw_8bit", "cuda", True, ("paged_adamw_8bit", "bnb", None)),
    ("sgd", "cpu", False, ("sgd", "foreach", None)),
])
def test_optimizer_choice(requested, device, bnb, expected):
    plan = choose_optimizer(requested, device, bnb)
    assert (plan.name, plan.impl, plan.message) == expected


def test_8bit_optimizer_off_cuda_falls_back_with_message():
    plan = choose_optimizer("paged_adamw_8bit", "cpu", True)
    assert (plan.name, plan.impl) == ("adamw", "foreach")
    assert plan.message == ("`optimizer: paged_adamw_8bit` is not available here (it needs CUDA and this run is on cpu); "
                            "using AdamW")
    assert "bitsandbytes is not installed" in choose_optimizer("adamw_8bit", "cuda", False).message


def test_detect_caps_on_this_machine():
    from ftmagic.engine.device import detect_caps

    caps = detect_caps()
    assert caps.cuda_available is False and caps.total_memory == 0
    assert caps.bnb_available and caps.bnb_cpu_4bit  # bitsandbytes 0.50 is installed here


@pytest.mark.parametrize("caps,method,adapter,expected", [
    (T4, "lora", True, "float16"),
    (T4, "full", False, "float32"),
    (T4, "qlora", True, "float16"),
    (A100, "lora", True, "bfloat16"),
    (A100, "freeze", False, "bfloat16"),  # pure bf16: no scaler, half the memory
    (A100, "qlora", True, "bfloat16"),
    (CPU, "lora", True, "float32"),
    (CPU, "full", False, "float32"),
    (CPU_BNB, "qlora", True, "float32"),
])
def test_base_weight_dtype(caps, method, adapter, expected):
    import torch

    from ftmagic.engine.device import base_weight_dtype

    assert base_weight_dtype(choose_device(caps, method=method), adapter=adapter) == getattr(torch, expected)


def test_trainable_weights_stay_fp32_except_pure_bf16_full_training():
    from ftmagic.engine.device import keeps_fp32_trainable

    assert keeps_fp32_trainable(choose_device(T4, method="full"), adapter=False) is True  # fp16 + scaler
    assert keeps_fp32_trainable(choose_device(A100, method="full"), adapter=False) is False
    assert keeps_fp32_trainable(choose_device(A100, method="lora"), adapter=True) is True
    assert keeps_fp32_trainable(choose_device(CPU, method="freeze"), adapter=False) is True


def test_native_bf16_is_decided_by_compute_capability():
    from ftmagic.engine.device import native_bf16

    # torch.cuda.is_bf16_supported() answers True on a T4 (emulation); the engine must not.
    assert [native_bf16(cc) for cc in [(7, 5), (7, 0), (8, 0), (8, 6), (8, 9), (9, 0), None]] == \
        [False, False, True, True, True, True, False]


def test_qlora_quantization_config():
    import torch

    from ftmagic.engine.models import quantization_config

    q = quantization_config(choose_device(T4, method="qlora").qlora_compute_dtype)
    assert (q.load_in_4bit, q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant, q.bnb_4bit_compute_dtype) == \
        (True, "nf4", True, torch.float16)
    assert quantization_config("bfloat16").bnb_4bit_compute_dtype == torch.bfloat16


def test_the_memory_calculator_resolves_cpu_precision_by_the_same_rule():
    from ftmagic.memory import estimate_memory
    from ftmagic.memory.policy import cpu_bf16_pays, resolve_precision

    assert resolve_precision("auto", bf16_supported=True, device="cpu") == "bf16"
    assert resolve_precision("auto", bf16_supported=False, device="cpu") == "fp32"
    assert resolve_precision("auto", bf16_supported=False) == "fp16"  # a T4
    for flags, hidden in ((ZEN4.cpu_flags, 512), (ZEN4.cpu_flags, 144), (SKYLAKE.cpu_flags, 4096)):
        plan = choose_device(DeviceCaps(cpu_flags=flags), hidden_size=hidden)
        est = estimate_memory("smollm2-135m", device="cpu", batch_size=1, seq_len=64,
                              bf16_supported=cpu_bf16_pays(flags, hidden))
        assert est.settings["precision"] == plan.precision


def test_onednn_kernel_cache_capped_only_for_runs_it_computes():
    from ftmagic.engine.device import ONEDNN_CACHE_CAPACITY, limit_onednn_cache

    env = {}
    assert limit_onednn_cache(choose_device(CPU, precision="bf16"), env)
    assert env == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": str(ONEDNN_CACHE_CAPACITY)}
    for plan in (choose_device(CPU, precision="fp32"), choose_device(A100), choose_device(T4)):
        env = {}
        assert not limit_onednn_cache(plan, env) and env == {}, plan.reason  # MKL's fp32, CUDA's own kernels
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY"):  # the user's value is kept
        env = {name: "1024"}
        assert not limit_onednn_cache(choose_device(CPU, precision="bf16"), env) and env == {name: "1024"}

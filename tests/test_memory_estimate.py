"""The analytic memory estimate: shapes, hand-computed breakdowns, verdicts, errors (no torch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from ftmagic.config import FinetuneConfig
from ftmagic.errors import ConfigError, ModelError
from ftmagic.memory import DEVICE_KEYS, ModelShape, count_params, estimate_memory, resolve_model
from ftmagic.memory.estimate import NF4_BYTES_PER_PARAM
from ftmagic.memory.gpus import CUDA_CONTEXT_BYTES, GPU_PRESETS, headroom_bytes, resolve_gpu
from ftmagic.memory.suggest import check_fit, format_measured, preflight

GIB = 2 ** 30
TOY = ModelShape(name="toy", model_type="llama", hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2,
                 vocab=1000)


# ------------------------------------------------------------------ shapes


@pytest.mark.parametrize("name,params", [
    ("llama-3.2-1b", 1_235_814_400), ("llama-3.1-8b", 8_030_261_248), ("mistral-7b", 7_248_023_552),
    ("qwen2.5-0.5b", 494_032_768), ("qwen2.5-7b", 7_615_616_512), ("gemma-2-2b", 2_614_341_888),
    ("phi-3-mini", 3_821_079_552), ("smollm2-135m", 134_515_008),
])
def test_builtin_parameter_counts_match_the_published_models(name, params):
    assert resolve_model(name).total_params == params


def test_hub_ids_and_suffixes_resolve_to_builtins():
    assert resolve_model("meta-llama/Llama-3.2-1B-Instruct").name == "llama-3.2-1b"
    assert resolve_model("Qwen/Qwen2.5-7B-Instruct").name == "qwen2.5-7b"
    assert resolve_model("HuggingFaceTB/SmolLM2-135M").name == "smollm2-135m"


def test_config_dict_and_local_directory(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "tie_word_embeddings": False}
    shape = resolve_model(cfg)
    assert (shape.hidden, shape.kv_dim, shape.tied) == (64, 32, False)
    # embeddings + head + 2 blocks (q 64x64, k,v 64x32, o 64x64, 3 x 64x128) + norms + final norm
    assert shape.total_params == 2 * 64000 + 2 * (4096 + 2 * 2048 + 4096 + 3 * 8192 + 128) + 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert resolve_model(str(tmp_path)).total_params == shape.total_params


def test_unknown_model_is_a_one_line_error_naming_what_is_accepted(tmp_path):
    with pytest.raises(ModelError) as err:
        resolve_model("someone/not-a-model-here")
    message = str(err.value)
    assert "\n" not in message and "someone/not-a-model-here" in message and "llama-3.2-1b" in message
    # A full stop before "Accepted" when there is no "did you mean", and no claim of being offline: it never downloads.
    assert message.startswith("`model: someone/not-a-model-here` is not a built-in name, a local directory or a "
                              "Hugging Face id in the local cache, and the memory calculator never downloads. "
                              "Accepted: a built-in name (")
    with pytest.raises(ModelError, match=r"never downloads; did you mean `llama-3.1-8b`\? Accepted: "):
        resolve_model("llama-3.1-8")
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelError, match="num_hidden_layers"):
        resolve_model({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 10})


def test_tiny_resolves_or_says_how_to_build_it():
    from ftmagic.memory.architectures import tiny_config_path

    if os.path.exists(tiny_config_path()):
        assert resolve_model("tiny").hidden > 0
    else:
        with pytest.raises(ModelError, match="build_tiny_model"):
            resolve_model("tiny")


# ------------------------------------------------------------------ hand-computed breakdowns


def test_full_fp32_adamw_breakdown_by_hand():
    est = estimate_memory(TOY, method="full", precision="fp32", batch_size=1, seq_len=8, device="cpu")
    p = TOY.total_params
    n_tensors = 2 * (7 + 2) + 2 + 1  # per block: 7 linears + 2 norms; embeddings, final norm; untied head
    assert est.trainable_params == p
    assert est.peak_phase == "optimizer_step"  # 8 tokens: states dominate
    assert est.breakdown["frozen_weights"] == 0
    assert est.breakdown["trainable_weights"] == 4 * p
    assert est.breakdown["gradients"] == 4 * p
    assert est.breakdown["optimizer_states"] == 8 * p + 4 * n_tensors
    assert est.breakdown["optimizer_step_transient"] == 4 * p  # foreach AdamW's sqrt(v) buffer
    assert est.total_bytes == 16 * p + 4 * p + 4 * n_tensors
    assert sum(est.breakdown.values()) == est.total_bytes
    # on CUDA the engine's fused AdamW needs no extra buffer
    cuda = estimate_memory(TOY, method="full", precision="fp32", batch_size=1, seq_len=8)
    assert cuda.breakdown["optimizer_step_transient"] == 0 and cuda.total_bytes == 16 * p + 4 * n_tensors


def test_full_bf16_activations_by_hand():
    """Pure bf16 Llama block: 2 norms x (4h + 2*2h) + 2*2*(q + kv) + 4*2*i + 6*heads bytes per token."""
    from ftmagic.memory.estimate import _layer_bytes_per_token
    from ftmagic.memory.policy import weight_plan

    per = _layer_bytes_per_token(TOY, "full", weight_plan("full", "bf16"), {})
    assert per == 2 * (4 * 64 + 4 * 64) + 4 * (64 + 32) + 8 * 128 + 6 * 4


def test_lora_parameter_count_by_hand():
    counts = count_params(TOY, "lora", lora_r=8, target_modules=["q_proj", "v_proj"])
    assert counts["trainable"] == 2 * (8 * (64 + 64) + 8 * (64 + 32))
    every = count_params(TOY, "lora", lora_r=8)["trainable"]
    assert every == 2 * 8 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))


def test_qlora_weights_are_nf4_linears_plus_fp32_rest():
    est = estimate_memory(TOY, method="qlora", precision="bf16", batch_size=1, seq_len=8)
    linears = TOY.layers * TOY.linear_params_per_layer
    rest = TOY.total_params - linears
    assert NF4_BYTES_PER_PARAM == pytest.approx(0.5159, abs=1e-4)
    assert est.breakdown["frozen_weights"] == int(linears * NF4_BYTES_PER_PARAM) + 4 * rest


def test_logits_term_at_the_loss():
    """Large vocabulary: peak is the loss backward, with 4 (log-softmax out) + 8 (its fp32 grads) bytes per logit."""
    big_vocab = ModelShape(name="v", model_type="llama", hidden=64, intermediate=128, layers=1, heads=4,
                           kv_heads=2, vocab=200_000, tied=True)
    est = estimate_memory(big_vocab, method="lora", precision="bf16", batch_size=2, seq_len=256, loss="full")
    assert est.peak_phase == "backward"
    assert est.breakdown["logits"] == 12 * 512 * 200_000
    # ftmagic's engine computes the loss in chunks of 2**23 logits: far less than the full logits
    chunked = estimate_memory(big_vocab, method="lora", precision="bf16", batch_size=2, seq_len=256)
    assert chunked.settings["loss"] == "chunked"
    assert chunked.breakdown["logits"] < est.breakdown["logits"] / 5


def test_peak_is_the_max_over_phases_not_the_sum():
    est = estimate_memory("llama-3.2-1b", method="full", precision="bf16", batch_size=1, seq_len=512)
    assert est.total_bytes == max(est.phases.values())
    assert set(est.breakdown) == set(DEVICE_KEYS)
    assert sum(est.breakdown.values()) == est.total_bytes


def test_paged_optimizer_states_are_reported_apart():
    normal = estimate_memory("llama-3.2-1b", method="full", optimizer="adamw_8bit", seq_len=128)
    paged = estimate_memory("llama-3.2-1b", method="full", optimizer="paged_adamw_8bit", seq_len=128)
    assert paged.breakdown["optimizer_states"] == 0
    assert paged.paged_optimizer_states == normal.breakdown["optimizer_states"]
    assert paged.total_bytes < normal.total_bytes


def test_gradient_checkpointing_and_accumulation_move_the_peak():
    plain = estimate_memory("llama-3.2-1b", method="lora", batch_size=4, seq_len=1024)
    ckpt = estimate_memory("llama-3.2-1b", method="lora", batch_size=4, seq_len=1024, gradient_checkpointing=True)
    assert ckpt.breakdown["activations"] < plain.breakdown["activations"] / 5
    one = estimate_memory("llama-3.2-1b", method="full", batch_size=1, seq_len=2048)
    accum = estimate_memory("llama-3.2-1b", method="full", batch_size=1, seq_len=2048, grad_accum=4)
    assert accum.phases["forward"] - one.phases["forward"] == 2 * resolve_model("llama-3.2-1b").total_params


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(batch_size=0), "batch_size: 0"),
    (dict(seq_len=-1), "seq_len: -1"),
    (dict(method="lorra"), "method: lorra"),
    (dict(optimizer="adam"), "optimizer: adam"),
    (dict(method="qlora", precision="fp32"), "precision: fp32"),
    (dict(target_modules=["q_prj"]), "q_prj"),
    (dict(lora_dropout=1.5), "lora_dropout"),
])
def test_impossible_values_are_one_line_config_errors(kwargs, fragment):
    with pytest.raises(ConfigError) as err:
        estimate_memory("llama-3.2-1b", **kwargs)
    assert fragment in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------ verdict, suggestions, pre-flight


def test_gpu_presets_and_sizes():
    assert set(GPU_PRESETS) >= {"T4", "L4", "A10G", "RTX 3090", "RTX 4090", "A100 40GB", "A100 80GB", "H100 80GB"}
    assert resolve_gpu("t4") is GPU_PRESETS["T4"] and not GPU_PRESETS["T4"].bf16
    assert resolve_gpu("4090").name == "RTX 4090"
    assert resolve_gpu("12").total_bytes == 12 * GIB
    with pytest.raises(ConfigError, match="Z80"):
        resolve_gpu("Z80")
    # a model number is not a size, and a card is not suggested for another with other digits
    with pytest.raises(ConfigError, match=r"^`gpu: 4080` must be a size in GiB above 0 and at most 1024 "):
        resolve_gpu("4080")
    with pytest.raises(ConfigError) as info:
        resolve_gpu("rtx 4080")
    assert "did you mean" not in str(info.value)
    with pytest.raises(ConfigError, match=r"; did you mean `RTX 4090`\?$"):
        resolve_gpu("rtx 4090 ti")


def test_verdict_adds_context_and_headroom():
    verdict = check_fit("smollm2-135m", "T4", method="lora", batch_size=1, seq_len=256)
    est = verdict.estimate
    assert verdict.fits and est.settings["precision"] == "fp16"  # a T4 has no bf16
    assert est.cuda_context == CUDA_CONTEXT_BYTES
    assert est.allocator_headroom == headroom_bytes(est.total_bytes)
    assert verdict.required_bytes == est.total_bytes + est.cuda_context + est.allocator_headroom
    assert verdict.message.startswith("fits T4")


def test_does_not_fit_gives_ranked_suggestions_each_with_its_estimate():
    verdict = check_fit("llama-3.1-8b", "T4", method="lora", batch_size=4, seq_len=1024)
    assert not verdict.fits and "does not fit T4" in verdict.message
    assert verdict.suggestions
    first = verdict.suggestions[0]
    assert first.fits and first.required_bytes <= GPU_PRESETS["T4"].total_bytes
    assert "try: " + first.label in verdict.message
    fitting = [s for s in verdict.suggestions if s.fits]
    assert fitting == verdict.suggestions[: len(fitting)]  # the ones that fit come first
    for s in verdict.suggestions:
        again = estimate_memory("llama-3.1-8b", **{**{k: v for k, v in verdict.estimate.settings.items()
                                                        if k != "mode"}, **s.changes})
        assert again.total_bytes == s.estimate.total_bytes < verdict.estimate.total_bytes


def test_single_change_ranking_prefers_checkpointing_when_it_fits():
    verdict = check_fit("qwen2.5-7b", "L4", method="qlora", batch_size=2, seq_len=2048)
    assert not verdict.fits
    assert verdict.suggestions[0].changes == {"gradient_checkpointing": True} and verdict.suggestions[0].fits


def test_preflight_uses_the_config_fields():
    from ftmagic.memory import preflight as exported  # the name the engine imports

    assert exported is preflight
    config = FinetuneConfig(model="llama-3.1-8b", method="full", batch_size=2, max_seq_len=512)
    verdict = preflight(config, 16 * GIB)
    assert not verdict.fits and verdict.suggestions and verdict.estimate.settings["seq_len"] == 512
    assert verdict.message.startswith("does not fit this GPU (16 GiB)")
    assert verdict.message.endswith("set `skip_memory_check: true` to try anyway")
    assert str(verdict.suggestions[0]).startswith(verdict.suggestions[0].label + " (needs ")
    small = preflight(FinetuneConfig(model="smollm2-135m", method="lora", batch_size=1, max_seq_len=256), 80 * GIB)
    assert small.fits and "to spare" in small.message
    unknown = preflight(FinetuneConfig(model="someone/unknown-model"), 16 * GIB)
    assert unknown.fits and unknown.estimate is None and unknown.message.startswith("memory check skipped")


def test_format_measured_beside_estimate():
    est = estimate_memory("smollm2-135m", method="lora", batch_size=1, seq_len=256)
    text = format_measured(est.total_bytes // 2, est)
    assert "measured" in text and "estimated (+100.0%)" in text
    assert format_measured(None, est) == "peak memory not measured (no CUDA device)"


# ------------------------------------------------------------------ speed and imports


def test_estimate_and_verdict_answer_in_milliseconds():
    check_fit("llama-3.1-8b", "T4", method="lora")  # warm imports
    timings = []
    for _ in range(5):  # best of five: other processes on a busy CI machine add noise, not work
        start = time.perf_counter()
        for _ in range(5):
            check_fit("llama-3.1-8b", "T4", method="lora", batch_size=4, seq_len=1024)
        timings.append((time.perf_counter() - start) / 5)
    assert min(timings) < 0.02


def test_memory_package_does_not_import_torch():
    code = ("import sys, ftmagic.memory, ftmagic.memory.suggest, ftmagic.memory.gpus; "
            "ftmagic.memory.estimate_memory('llama-3.2-1b'); "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False False"


def test_the_readmes_python_examples_give_what_it_shows():
    """The README's `>>>` examples run as doctests: its printed output is what the code gives."""
    import doctest
    import re
    from pathlib import Path

    import ftmagic

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    text = re.sub(r"^```.*$", "", text, flags=re.M)  # a closing fence is not output
    test = doctest.DocTestParser().get_doctest(text, {"ftmagic": ftmagic}, "README.md", "README.md", 0)
    assert test.examples, "the README has no >>> example"
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def test_bf16_on_a_gpu_without_it_is_refused_as_training_refuses_it():
    # A T4 has no bf16: training stops with this line, so the calculator must not judge the run.
    with pytest.raises(ConfigError, match=r"^`precision: bf16` is not supported by T4 \(compute capability below 8\.0\); "
                                          r"use `precision: fp16` or `precision: auto`$"):
        check_fit("smollm2-135m", "T4", precision="bf16")
    with pytest.raises(ConfigError, match="^`precision: bf16` is not supported by this GPU"):
        estimate_memory("smollm2-135m", precision="bf16", bf16_supported=False)
    assert check_fit("smollm2-135m", "T4", precision="fp16").fits
    assert check_fit("smollm2-135m", "L4", precision="bf16").fits
    # a CPU estimate (device="cpu") is not about a GPU's bf16
    assert estimate_memory("smollm2-135m", precision="bf16", bf16_supported=False, device="cpu").settings["precision"] == "bf16"


def test_a_combination_asks_only_for_the_changes_the_run_needs():
    # Built cheapest first, the combination used to keep what a later change made unnecessary:
    # a 12 GiB card was told "QLoRA + gradient checkpointing + 8-bit AdamW + 4 GPUs with FSDP".
    base = dict(method="full", batch_size=4, seq_len=512)
    verdict = check_fit("mistral-7b", 12, **base)
    combo = [s for s in verdict.suggestions if "+" in s.label]
    assert [(s.label, s.changes) for s in combo] == [
        ("QLoRA + gradient checkpointing", {"method": "qlora", "precision": "bf16", "gradient_checkpointing": True})]
    assert combo[0].fits and check_fit("mistral-7b", 12, **{**base, **combo[0].changes}).fits
    for key in ("method", "gradient_checkpointing"):  # each change is needed
        fewer = {k: v for k, v in combo[0].changes.items() if k != key}
        assert not check_fit("mistral-7b", 12, **{**base, **fewer}).fits


@pytest.mark.parametrize("kwargs, line", [
    (dict(seq_len=10**10), "`seq_len: 10000000000` must be at most 1048576 (the most `max_seq_len` a run accepts)"),
    (dict(batch_size=65_537), "`batch_size: 65537` must be at most 65536"),
    (dict(grad_accum=5_000), "`grad_accum: 5000` must be at most 4096"),
    (dict(devices=70_000), "`devices: 70000` must be at most 65536 (the most `processes` a run accepts)"),
])
def test_sizes_a_run_would_refuse_are_not_estimated(kwargs, line):
    # seq_len 10**10 was estimated (300,706 TiB) and judged, though a run refuses max_seq_len over 2**20.
    with pytest.raises(ConfigError) as err:
        estimate_memory("llama-3.2-1b", **kwargs)
    assert str(err.value) == line
    estimate_memory("llama-3.2-1b", seq_len=2**20, batch_size=1, gradient_checkpointing=True)  # the limit itself is fine


def test_a_seq_len_above_the_models_positions_is_estimated_where_training_cuts_it():
    at_limit, beyond = estimate_memory("tiny", seq_len=512), estimate_memory("tiny", seq_len=2048)
    assert beyond.total_bytes == at_limit.total_bytes and beyond.settings["seq_len"] == 512
    assert "`max_seq_len: 2048` is above the 512 positions tiny was built for" in beyond.notes[-1]
    assert not at_limit.notes

"""The memory calculator per device: N GPUs under DDP, FSDP and DeepSpeed ZeRO-2/3."""

from __future__ import annotations

import json

import pytest

from ftmagic.config import FinetuneConfig
from ftmagic.errors import ConfigError
from ftmagic.memory import check_fit, estimate_memory, preflight
from ftmagic.memory.gpus import GPU_PRESETS
from ftmagic.strategies import STRATEGIES, rows_per_process

PARTS = {"weights": ("trainable_weights",), "gradients": ("gradients",), "optimizer_states": ("optimizer_states",)}
BASE = dict(method="full", precision="fp32", batch_size=8, seq_len=512, gradient_checkpointing=True)


def _at_step(est) -> dict:
    """The static parts, read at the optimizer step (where gradients and states all exist)."""
    return {k: v for k, v in est.breakdown.items()}


def test_one_device_is_the_single_gpu_estimate():
    plain = estimate_memory("llama-3.2-1b", **BASE)
    assert estimate_memory("llama-3.2-1b", devices=1, strategy="fsdp", **BASE).total_bytes == plain.total_bytes
    assert plain.breakdown["communication_buffers"] == 0


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_each_strategy_shards_what_its_table_entry_says(strategy):
    spec = STRATEGIES[strategy]
    # fp32 keeps DeepSpeed's optimizer at the same 8 bytes per weight as AdamW, so only the sharding differs.
    one = estimate_memory("llama-3.2-1b", optimizer="adamw", **{**BASE, "batch_size": 4})
    four = estimate_memory("llama-3.2-1b", devices=4, strategy=strategy, optimizer="adamw", **{**BASE, "batch_size": 4})
    assert four.settings["devices"] == 4 and four.settings["strategy"] == strategy
    one_parts, four_parts = _parts(one), _parts(four)
    for part, keys in PARTS.items():
        for key in keys:
            expected = -(-one_parts[key] // 4) if part in spec.shards else one_parts[key]
            assert four_parts[key] == pytest.approx(expected, rel=1e-6), (strategy, key)
    assert four.breakdown["communication_buffers"] > 0


def _parts(est) -> dict:
    from ftmagic.memory.architectures import resolve_model
    from ftmagic.memory.estimate import _optimizer_bytes, _weight_bytes
    from ftmagic.memory.policy import weight_plan
    from ftmagic.memory.sharding import device_share
    from ftmagic.methods import get_method_spec

    s = est.settings
    shape, plan, spec = resolve_model("llama-3.2-1b"), weight_plan(s["method"], s["precision"]), get_method_spec(s["method"])
    frozen, train_w, grads = _weight_bytes(shape, spec, plan, est.trainable_params)
    states = _optimizer_bytes(shape, plan, s, est.trainable_params)[0]
    if s.get("devices", 1) == 1:
        return dict(trainable_weights=train_w, gradients=grads, optimizer_states=states)
    share = device_share(shape, plan, strategy=s["strategy"], devices=s["devices"], frozen=frozen,
                         trainable_bytes=train_w, gradients=grads, states=states, trainable=est.trainable_params,
                         adapter=spec.adapter)
    assert est.breakdown["trainable_weights"] == share.trainable and est.breakdown["optimizer_states"] == share.optimizer_states
    return dict(trainable_weights=share.trainable, gradients=share.gradients, optimizer_states=share.optimizer_states)


def test_ddp_replicates_and_adds_its_gradient_buckets_while_the_batch_is_split():
    one = estimate_memory("llama-3.2-1b", method="lora", batch_size=8, seq_len=1024)
    two = estimate_memory("llama-3.2-1b", method="lora", batch_size=8, seq_len=1024, devices=2, strategy="ddp")
    for key in ("frozen_weights", "trainable_weights", "optimizer_states"):
        assert two.breakdown[key] == one.breakdown[key]
    assert two.breakdown["communication_buffers"] == one.trainable_params * 4  # fp32 adapter gradients, bucketed
    half = estimate_memory("llama-3.2-1b", method="lora", batch_size=rows_per_process(8, 2), seq_len=1024)
    assert two.breakdown["activations"] == half.breakdown["activations"]  # each GPU runs 4 of the 8 rows


def test_fsdp_fits_where_one_gpu_does_not():
    settings = dict(method="full", batch_size=8, seq_len=1024, gradient_checkpointing=True)
    one = check_fit("llama-3.1-8b", "A100 40GB", **settings)
    assert not one.fits
    first = one.suggestions[0]
    assert first.fits and first.changes == {"devices": 2, "strategy": "fsdp"}
    assert first.label.startswith("use 2 GPUs with FSDP")
    two = check_fit("llama-3.1-8b", "A100 40GB", devices=2, strategy="fsdp", **settings)
    assert two.fits and two.estimate.total_bytes == first.estimate.total_bytes
    assert "on 2 GPUs (FSDP), per GPU" in two.message


def test_the_fewest_gpus_that_fit_are_suggested():
    verdict = check_fit("llama-3.1-8b", "T4", method="full", batch_size=8, seq_len=512, gradient_checkpointing=True,
                        precision="fp16")
    more = [s for s in verdict.suggestions if "devices" in s.changes]
    assert len(more) <= 1
    if more and more[0].fits:
        fewer = check_fit("llama-3.1-8b", "T4", method="full", batch_size=8, seq_len=512, gradient_checkpointing=True,
                          precision="fp16", devices=more[0].changes["devices"] // 2, strategy="fsdp")
        assert not fewer.fits


def test_no_gpu_suggestions_for_a_cpu_estimate_and_gpu_only_strategies_refused_there():
    from ftmagic.memory.suggest import suggest

    est = estimate_memory("llama-3.2-1b", method="full", batch_size=8, device="cpu")
    assert not any("devices" in s.changes for s in suggest(est.shape, est.settings, 1 * 2**30))
    with pytest.raises(ConfigError, match="runs on GPUs only"):
        estimate_memory("llama-3.2-1b", method="full", batch_size=8, device="cpu", devices=2, strategy="fsdp")
    with pytest.raises(ConfigError, match="`batch_size: 2` is split across 4 processes"):
        estimate_memory("llama-3.2-1b", batch_size=2, devices=4)
    with pytest.raises(ConfigError, match="`strategy: zero` is not accepted"):
        estimate_memory("llama-3.2-1b", devices=2, strategy="zero")


def test_auto_follows_the_engines_rule():
    assert estimate_memory("llama-3.2-1b", method="full", devices=2).settings["strategy"] == "fsdp"
    assert estimate_memory("llama-3.2-1b", method="qlora", devices=2).settings["strategy"] == "ddp"


def test_deepspeed_keeps_fp32_masters_in_its_partitioned_optimizer():
    z3 = estimate_memory("llama-3.2-1b", method="full", precision="bf16", batch_size=8, devices=4,
                         strategy="deepspeed_zero3")
    assert z3.breakdown["optimizer_states"] == -(-z3.trainable_params * 12 // 4)


def test_preflight_reads_processes_and_distributed_from_the_config():
    cfg = FinetuneConfig(model="llama-3.1-8b", method="full", batch_size=8, max_seq_len=1024,
                         gradient_checkpointing=True, processes=2, distributed="fsdp")
    assert preflight(cfg, GPU_PRESETS["A100 40GB"].total_bytes).fits
    assert not preflight(cfg.replace(processes=1), GPU_PRESETS["A100 40GB"].total_bytes).fits


def test_exact_mode_on_several_devices_answers_with_the_analytic_share():
    import ftmagic

    est = ftmagic.estimate_memory("tiny", method="lora", batch_size=4, seq_len=64, devices=2, mode="exact")
    assert any("the tracer runs one process" in note for note in est.notes)


def test_cli_and_magic_take_devices_and_strategy(capsys):
    from ftmagic.cli import main

    assert main(["estimate", "llama-3.1-8b", "--method", "full", "--batch-size", "8", "--gpu", "A100 80GB",
                 "--devices", "4", "--strategy", "fsdp", "--gradient-checkpointing", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings"]["devices"] == 4 and out["fits"] and out["breakdown"]["communication_buffers"] > 0
    assert main(["estimate", "llama-3.1-8b", "--method", "full", "--gpu", "A100 40GB", "--seq-len", "1024",
                 "--batch-size", "8", "--gradient-checkpointing"]) == 0
    assert "1. use 2 GPUs with FSDP" in capsys.readouterr().out

    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "ftmagic")
    try:
        shell.run_line_magic("ft_memory", "llama-3.1-8b --method full --batch-size 8 --gpu A100 --devices 4 "
                                          "--strategy deepspeed_zero3 --text")
        text = capsys.readouterr().out
        assert "on 4 GPUs (DeepSpeed ZeRO-3), per GPU" in text and "gathered weights + communication buffers" in text
    finally:
        shell.run_line_magic("unload_ext", "ftmagic")


def test_the_widget_has_gpu_count_and_strategy_controls():
    from ftmagic.widgets.memory import MemoryCalculator

    calc = MemoryCalculator(model="llama-3.1-8b", method="full", batch_size=8, seq_len=1024, gpu="A100 40GB",
                            gradient_checkpointing=True)
    assert not calc.verdict.fits
    calc.controls["strategy"].value = "fsdp"
    calc.controls["devices"].value = 2
    assert calc.verdict.fits and "per GPU (2 GPUs, FSDP)" in calc.verdict_box.value

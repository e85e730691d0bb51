"""The throughput benchmarks compare like with like: each system computes in the precision the
benchmark's ``--precision`` names, never ftmagic in what ``precision: auto`` would pick on the
machine (bf16 on a CPU that has it) while the other system runs in fp32."""

from __future__ import annotations

from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture()
def captured_finetune(monkeypatch):
    import ftmagic.engine.run as run

    calls = []

    class Stop(Exception):
        pass

    def fake(config=None, **settings):
        calls.append(settings)
        raise Stop

    monkeypatch.setattr(run, "finetune", fake)
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return calls, Stop


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_dpo_benchmark_holds_ftmagic_to_the_asked_precision(captured_finetune, precision):
    import dpo_throughput

    calls, stop = captured_finetune
    size = dpo_throughput.SIZES["quick"]
    with pytest.raises(stop):
        dpo_throughput.run_ftmagic("model", [], size, "out", 1, threads=1, precision=precision)
    assert calls[0]["precision"] == precision


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_dpo_benchmark_holds_trl_to_the_asked_precision(captured_finetune, precision, monkeypatch, test_model_dir):
    trl = pytest.importorskip("trl")
    import torch

    import dpo_throughput

    seen = {}

    class Stop(Exception):
        pass

    def fake_config(**settings):
        seen.update(settings)
        raise Stop

    monkeypatch.setattr(trl, "DPOConfig", fake_config)
    with pytest.raises(Stop):
        dpo_throughput.run_trl(test_model_dir, [], dpo_throughput.SIZES["quick"], "out", 1, precision=precision)
    assert seen["bf16"] is (precision == "bf16") and seen["use_cpu"] is not torch.cuda.is_available()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_benchmark_holds_ftmagic_to_the_asked_precision(captured_finetune, precision, monkeypatch):
    import train_throughput

    calls, stop = captured_finetune
    monkeypatch.setitem(train_throughput.PRECISION, "value", precision)
    with pytest.raises(stop):
        train_throughput.run_ftmagic("model", [], train_throughput.SIZES["quick"], "out", {})
    assert calls[0]["precision"] == precision

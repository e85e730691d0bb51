"""`threads: auto`: a pure choice from faked CPU loads, and a run that sets torch's count back."""

from __future__ import annotations

import pytest
import torch

from ftmagic.config import FinetuneConfig
from ftmagic.engine import threads as threads_mod
from ftmagic.engine.threads import (PARAMS_PER_THREAD, CpuLoad, ThreadPlan, choose_threads, measure_cpu_load,
                                    run_threads, usable_cores)
from ftmagic.errors import ConfigError

BIG = 1_000_000_000


def _auto(cores, busy, params=BIG, device="cpu", torch_threads=None):
    return choose_threads("auto", CpuLoad(cores, busy, torch_threads or cores), params=params, device=device)


@pytest.mark.parametrize("cores,busy,want", [
    (2, 0.0, 2),    # a quiet 2-core machine: both
    (2, 0.3, 2),    # a little background work leaves both cores mostly free
    (2, 1.0, 1),    # one core taken
    (2, 1.9, 1),    # both taken: one thread, never none
    (2, 5.0, 1),    # more busy work than cores
    (16, 6.2, 10),  # ten cores free (the seventh busy one is mostly idle)
])
def test_auto_uses_the_cores_free(cores, busy, want):
    plan = _auto(cores, busy)
    assert plan.threads == want
    assert plan.reason.startswith(f"threads: {want} (") and f"{busy:.1f} of {cores} cores busy" in plan.reason


def test_more_load_never_means_more_threads():
    counts = [_auto(8, busy / 4).threads for busy in range(0, 40)]
    assert counts == sorted(counts, reverse=True) and counts[0] == 8 and counts[-1] == 1


def test_small_models_take_fewer_threads_and_say_why():
    plan = _auto(16, 0.0, params=3 * PARAMS_PER_THREAD)
    assert plan.threads == 3 and "3.0M" not in plan.reason and "model gains little from more" in plan.reason
    tiny = _auto(16, 0.0, params=60_000, torch_threads=16)
    assert tiny == ThreadPlan(1, "threads: 1 (a 0.1M-parameter model gains little from more; "
                                 "torch's 16 set back after the run)")
    assert "gains little" not in _auto(2, 0.0, params=28_400_000).reason


def test_a_number_is_taken_as_asked_and_gpus_are_left_alone():
    asked = choose_threads(3, CpuLoad(2, 1.9, 2), params=60_000, device="cpu")
    assert asked == ThreadPlan(3, "threads: 3 (as asked; torch's 2 set back after the run)")
    gpu = _auto(8, 0.0, device="cuda")
    assert gpu.threads is None and "cuda does the work" in gpu.reason


def test_the_line_says_when_torchs_setting_changes_for_the_run():
    assert _auto(4, 0.0, torch_threads=4).reason == "threads: 4 (0.0 of 4 cores busy with other work)"
    assert _auto(4, 3.0, torch_threads=4).reason.endswith("; torch's 4 set back after the run)")


def test_run_threads_sets_back_even_on_error():
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    with pytest.raises(RuntimeError):
        with run_threads(ThreadPlan(target, "")):
            assert torch.get_num_threads() == target
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    with run_threads(ThreadPlan(None, "")):
        assert torch.get_num_threads() == before


def test_measured_load_is_within_the_machine():
    load = measure_cpu_load(interval=0.05)
    assert 1 <= load.cores == usable_cores() and 0.0 <= load.busy <= load.cores
    assert load.torch_threads == torch.get_num_threads()


def test_usable_cores_follows_the_affinity_mask(monkeypatch):
    monkeypatch.setattr(threads_mod.os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert usable_cores() <= 3


def test_config_key_accepts_auto_or_a_count():
    assert FinetuneConfig().threads == "auto"
    assert FinetuneConfig.from_yaml("threads: 2").threads == 2
    assert FinetuneConfig.from_dict({"threads": "4"}).threads == 4
    with pytest.raises(ConfigError, match="`threads: lots` must be `auto` or a number of threads from 1 up"):
        FinetuneConfig.from_yaml("threads: lots", source="run.yaml")
    with pytest.raises(ConfigError, match="run.yaml:1: `threads: 0`"):
        FinetuneConfig.from_yaml("threads: 0", source="run.yaml")


def test_a_run_reports_its_threads_and_sets_torch_back(test_model_dir, tmp_path):
    from engine_helpers import collect, reversal_records

    from ftmagic.engine.run import finetune

    before = torch.get_num_threads()
    on_event, events = collect()
    asked = 2 if before != 2 else 1
    result = finetune(model=test_model_dir, data=reversal_records(8), max_steps=1, batch_size=4, lora_r=4,
                      save_steps=0, eval_steps=0, output_dir=str(tmp_path / "out"), threads=asked, on_event=on_event)
    lines = [e["text"] for e in events if e["event"] == "message" and e["text"].startswith("threads:")]
    assert lines == [f"threads: {asked} (as asked; torch's {before} set back after the run)"]
    assert result.metrics["threads"] == asked and torch.get_num_threads() == before

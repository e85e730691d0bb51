"""benchmarks/gpu_suite.py: its plan for faked GPUs, and a dry run on the CPU through every path but CUDA."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_suite  # noqa: E402
from gpu_suite import GpuInfo, RunSpec, compute_precision, plan_runs  # noqa: E402

from ftmagic.errors import ConfigError  # noqa: E402
from ftmagic.memory.gpus import CONSTANTS_ENV, cuda_constants, read_constants  # noqa: E402

T4 = GpuInfo("Tesla T4", int(14.75 * 2**30), bf16=False)
H100 = GpuInfo("NVIDIA H100 80GB HBM3", int(79.1 * 2**30), bf16=True)


def test_a_bf16_gpu_runs_every_combination():
    runs, skipped = plan_runs(H100)
    assert len(runs) == 2 * 2 * 2 * 2 and skipped == []
    assert {(r.model, r.method, r.precision, r.system) for r in runs} == {
        (m, me, p, s) for m in ("1b", "8b") for me in ("qlora", "lora") for p in ("fp16", "bf16")
        for s in ("ftmagic", "trainer_peft")}
    eight = next(r for r in runs if r.model == "8b")
    assert eight.gradient_checkpointing and (eight.batch_size, eight.seq_len) == (2, 1024)


def test_a_t4_follows_t4_rules_and_skips_what_will_not_fit():
    def need(spec: RunSpec) -> int:  # a faked calculator: 8B LoRA needs 20 GiB, the rest 5
        return (20 if (spec.model, spec.method) == ("8b", "lora") else 5) * 2**30

    runs, skipped = plan_runs(T4, predict=need)
    assert {r.precision for r in runs} == {"fp16"}
    assert {(r.model, r.method) for r in runs} == {("1b", "qlora"), ("1b", "lora"), ("8b", "qlora")}
    assert sum("no native bf16" in line for line in skipped) == 4
    assert [line for line in skipped if "predicted" in line] == [
        f"8b lora fp16 {s}: predicted 20.0 GiB > 14.8 GiB on Tesla T4" for s in ("ftmagic", "trainer_peft")]


def test_the_dry_run_computes_fp16_in_what_a_cpu_has():
    spec = RunSpec("1b", "lora", "fp16", "ftmagic", 2, 48, False, 1)
    assert compute_precision(spec, dry_run=True) == "fp32"
    assert compute_precision(RunSpec("1b", "qlora", "fp16", "ftmagic", 2, 48, False, 1), dry_run=True) == "bf16"
    assert compute_precision(spec, dry_run=False) == "fp16"


def test_compare_pairs_systems():
    rows = [dict(model="1b", method="lora", precision="bf16", system="ftmagic", tokens_per_s=300.0,
                 steady_tokens_per_s=400.0, peak_allocated_bytes=50),
            dict(model="1b", method="lora", precision="bf16", system="trainer_peft", tokens_per_s=100.0,
                 steady_tokens_per_s=100.0, peak_allocated_bytes=100),
            dict(model="8b", method="lora", precision="bf16", system="ftmagic", error="OutOfMemoryError: ...")]
    assert gpu_suite.compare(rows) == [dict(model="1b", method="lora", precision="bf16", speedup=3.0,
                                            steady_speedup=4.0, memory_ratio=0.5)]


def test_constants_are_the_worst_seen():
    rows = [dict(peak_allocated_bytes=1000, peak_reserved_bytes=1100, outside_allocator_bytes=500),
            dict(peak_allocated_bytes=2000, peak_reserved_bytes=2060, outside_allocator_bytes=700),
            dict(error="OOM", peak_allocated_bytes=10, peak_reserved_bytes=100, outside_allocator_bytes=9999)]
    c = gpu_suite.measured_constants(rows, 400, H100, dry_run=False)
    assert (c["cuda_context_bytes"], c["allocator_headroom_share"], c["runs_measured"]) == (700, 0.1, 2)


def test_install_writes_what_the_calculator_reads(tmp_path, monkeypatch):
    target = tmp_path / "cache" / "gpu_constants.json"
    monkeypatch.setenv(CONSTANTS_ENV, str(target))
    result = {"dry_run": False, "machine": {"gpu": H100.name},
              "constants": {"gpu": H100.name, "cuda_context_bytes": 600 * 2**20, "allocator_headroom_share": 0.03,
                            "allocator_headroom_floor_bytes": 2**28, "dry_run": False}}
    assert gpu_suite.install_constants(result) == target
    assert cuda_constants().context_bytes == 600 * 2**20
    with pytest.raises(SystemExit, match="dry run"):
        gpu_suite.install_constants({**result, "dry_run": True})


@pytest.mark.slow
def test_dry_run_goes_through_every_path_but_cuda(tmp_path, monkeypatch):
    out = tmp_path / "suite.json"
    assert gpu_suite.main(["--dry-run", "--models", "1b", "--steps", "3", "--quiet", "--out", str(out),
                           "--workdir", str(tmp_path / "work")]) == 0
    result = json.loads(out.read_text())
    assert result["dry_run"] is True and result["skipped"] == []
    runs = result["runs"]
    assert {(r["method"], r["precision"], r["system"]) for r in runs} == {
        (m, p, s) for m in ("qlora", "lora") for p in ("fp16", "bf16") for s in ("ftmagic", "trainer_peft")}
    for r in runs:
        assert "error" not in r, r
        assert r["steps"] == 3 and r["trained_tokens"] == 3 * 2 * 47  # every example exactly 48 tokens
        assert r["tokens_per_s"] > 0 and r["steady_tokens_per_s"] > 0 and r["peak_allocated_bytes"] > 0
        assert r["predicted_bytes"] > 0 and "prediction_error" in r and r["params"] > 0
        assert r["loss_first"] > 0
    assert len(result["comparisons"]) == 4
    assert result["constants"]["dry_run"] is True
    # The memory calculator never takes a dry run's numbers for measurements.
    with pytest.raises(ConfigError, match="written by a dry run"):
        read_constants(out)

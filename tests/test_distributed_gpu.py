"""Multi-GPU runs: DDP, FSDP (also with QLoRA) and DeepSpeed ZeRO-2/3 on two GPUs against one.

They need two CUDA GPUs (accelerate runs FSDP and DeepSpeed on GPUs only) and are skipped
with that reason elsewhere. Each run is launched from a shell command (`ftmagic train
--processes 2`), because a process that already used CUDA, like this test process, cannot
fork GPU processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                       reason="needs two CUDA GPUs: accelerate runs FSDP and DeepSpeed on GPUs only, and DDP "
                              "across GPUs is tested on CPU processes in test_distributed.py"),
]

ROOT = Path(__file__).resolve().parent.parent


def _train(tmp_path, model_dir, name, *extra):
    from engine_helpers import reversal_records

    data = tmp_path / "train.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(r) + "\n" for r in reversal_records(64)))
    path = tmp_path / "run.yaml"
    path.write_text(f"model: {model_dir}\ndata: {data}\nmax_steps: 6\nbatch_size: 8\nlora_r: 4\nlora_dropout: 0.0\n"
                    "lr: 2.0e-3\nsave_steps: 3\nsave_total_limit: 0\neval_steps: 0\nprecision: fp32\nseed: 1\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / name
    done = subprocess.run([sys.executable, "-m", "ftmagic.cli", "train", str(path), "--quiet",
                           "--set", f"output_dir={out}", *extra], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    history = json.loads((out / "history.json").read_text())
    return {h["step"]: h["loss"] for h in history if h["event"] == "step"}, json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("method,strategy", [("lora", "ddp"), ("lora", "fsdp"), ("full", "fsdp"), ("qlora", "fsdp"),
                                             ("full", "deepspeed_zero2"), ("full", "deepspeed_zero3")])
def test_two_gpus_end_with_the_losses_of_one(test_model_dir, tmp_path, method, strategy):
    if strategy.startswith("deepspeed"):
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (`pip install 'ftmagic[deepspeed]'`)")
    precision = ["--set", "precision=bf16"] if method == "qlora" else []  # 4-bit weights compute in half precision
    one, _ = _train(tmp_path, test_model_dir, "one", "--set", f"method={method}", *precision)
    two, metrics = _train(tmp_path, test_model_dir, "two", "--set", f"method={method}", "--processes", "2",
                          "--set", f"distributed={strategy}", *precision)
    assert (metrics["processes"], metrics["distributed"]) == (2, strategy)
    tolerance = 2e-2 if method == "qlora" else 1e-3  # bf16 and 4-bit arithmetic round differently per split
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=tolerance), (step, one, two)


def test_an_fsdp_checkpoint_resumes_on_one_gpu(test_model_dir, tmp_path):
    import shutil

    reference, _ = _train(tmp_path, test_model_dir, "reference")
    _train(tmp_path, test_model_dir, "two", "--processes", "2", "--set", "distributed=fsdp")
    shutil.rmtree(tmp_path / "two" / "checkpoints" / "step-00000006")
    resumed, metrics = _train(tmp_path, test_model_dir, "two", "--set", "resume=true")
    assert metrics["steps"] == 6
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-3)

"""finetune(): events, output_dir protection, packing, gradient accumulation, schedules, smoke mode."""

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

import ftmagic.constants as constants
import ftmagic.engine.models as models
from ftmagic.engine.collate import collate
from ftmagic.engine.loop import lr_factor, plan_steps, warmup_steps
from ftmagic.engine.run import _oom_message, finetune
from ftmagic.config import FinetuneConfig
from ftmagic.engine.device import DeviceCaps, choose_device
from ftmagic.errors import CheckpointError, ConfigError, ModelError
from ftmagic.events import Step

from engine_helpers import collect, notes, reversal_records, step_losses, without_4bit

BASE = dict(method="lora", batch_size=4, lr=1e-2, lora_r=4, save_steps=0, eval_steps=0, seed=5)


def _train(model, out, **extra):
    on_event, events = collect()
    settings = {**BASE, "data": reversal_records(12), "max_steps": 3, **extra}
    result = finetune(model=model, output_dir=str(out), on_event=on_event, **settings)
    return result, events


def test_event_sequence_and_fields(test_model_dir, tmp_path):
    result, events = _train(test_model_dir, tmp_path / "out", eval_data=reversal_records(4, seed=2), eval_steps=2,
                            max_steps=4, save_steps=2)
    kinds = [e["event"] for e in events]
    assert kinds == ["plan", "message", "start", "step", "step", "eval", "checkpoint", "step", "step", "checkpoint",
                     "eval", "end"]
    assert events[1]["text"].startswith("threads: 1 (")  # a 60k-parameter model on the CPU
    plan = events[0]
    assert {k: plan[k] for k in ("model", "method", "device", "precision", "format", "train_records",
                                 "eval_records", "output_dir")} == {
        "model": test_model_dir, "method": "lora", "device": "cpu", "precision": "fp32",
        "format": "prompt_completion", "train_records": 12, "eval_records": 4, "output_dir": str(tmp_path / "out")}
    assert plan["reason"].startswith("cpu")
    step = events[3]
    assert set(step) == {"event"} | {f.name for f in dataclasses.fields(Step)}  # the fields' one home
    assert step["step"] == 1 and step["max_steps"] == 4 and step["tokens"] > 0 and step["memory_bytes"] > 0
    assert events[-1]["reason"] == "finished" and events[-1]["output_dir"] == str(tmp_path / "out")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["stopped"] is False
    assert metrics["trained_tokens"] == sum(e["tokens"] for e in events if e["event"] == "step")
    assert metrics["eval_loss"] == events[-2]["eval_loss"]
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert [h["event"] for h in result.history] == ["step", "step", "eval", "step", "step", "eval"]
    saved = (tmp_path / "out" / "config.yaml").read_text()
    assert "data: <list with 12 records>" in saved and "method: lora" in saved


def test_a_run_folder_holds_ftmagics_model_card_not_peft_template(test_model_dir, tmp_path):
    """peft's save_pretrained left its empty model-card template ("More Information Needed") as the
    run's README.md and in every checkpoint; the run's folder now holds ftmagic's card."""
    out = tmp_path / "out"
    result, _ = _train(test_model_dir, out, max_steps=4, save_steps=2)
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "More Information Needed" not in card
    assert card.startswith("---\n") and "\n# out\n" in card and "This folder holds a LoRA-style adapter" in card
    assert "| `lora_r` | 4 |" in card and f'model="{out.resolve()}"' in card
    assert "![Training loss by step](loss_curve.svg)" in card and (out / "loss_curve.svg").read_text().startswith("<svg")
    files = json.loads((out / "ftmagic_run.json").read_text())["files"]
    assert {"README.md", "loss_curve.svg"} <= set(files)  # in the manifest: `overwrite: true` may remove them
    assert not list((out / "checkpoints").rglob("README.md"))
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # written in staging, moved into place
    full = tmp_path / "full"
    _train(test_model_dir, full, method="full", lr=1e-4)
    assert "This folder holds full model weights" in (full / "README.md").read_text(encoding="utf-8")


def test_output_dir_of_another_run_is_protected(test_model_dir, tmp_path):
    out = tmp_path / "out"
    _train(test_model_dir, out)
    with pytest.raises(CheckpointError, match=r"already holds a different run \(`method: dora`, where it trained with "
                                              r"`method: lora`\); set `overwrite: true`"):
        _train(test_model_dir, out, method="dora")
    result, events = _train(test_model_dir, out, method="dora", overwrite=True)
    assert result.metrics["method"] == "dora"
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True


def test_rerunning_the_same_config_replaces_its_result(test_model_dir, tmp_path):
    _train(test_model_dir, tmp_path / "out")
    _, events = _train(test_model_dir, tmp_path / "out", max_steps=2)  # run length is not identity
    texts = [e["text"] for e in events if e["event"] == "message"]
    assert any(t.startswith("replacing the earlier result of this same config") for t in texts)


def test_foreign_files_are_never_overwritten(test_model_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="is not empty and was not written by ftmagic"):
        _train(test_model_dir, out)
    with pytest.raises(CheckpointError, match="holds files that are not an ftmagic run"):
        _train(test_model_dir, out, resume=True)
    _train(test_model_dir, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me"  # overwrite replaces only ftmagic's own files


def test_resume_refuses_another_runs_checkpoints(test_model_dir, tmp_path):
    _train(test_model_dir, tmp_path / "out")
    with pytest.raises(CheckpointError, match=r"holds a different run \(`lora_r: 8`, where it trained with `lora_r: \d+`\)"):
        _train(test_model_dir, tmp_path / "out", resume=True, lora_r=8)


def test_a_refusal_names_what_differs_and_reads_records_that_did_not_keep_it():
    from ftmagic.engine.outdir import what_differs

    before = {"method": "lora", "model": "tiny", "settings": {"lr": 0.0002, "lora_r": 16, "seed": 1, "beta": 0.1}}
    now = {"lr": 0.001, "lora_r": 8, "seed": 2, "beta": 0.1, "template": "chatml"}
    assert what_differs(before, now) == ("`lora_r: 8`, `lr: 0.001`, `seed: 2` and 1 more, where it trained with "
                                         "`lora_r: 16`, `lr: 0.0002`, `seed: 1`")
    assert what_differs({"method": "lora", "model": "tiny"}, now) == "method lora, model tiny"  # an older record
    long = {"settings": {"data": "x" * 100}}
    assert what_differs(long, {"data": "y" * 100}) == f"`data: {'y' * 40}...`, where it trained with `data: {'x' * 40}...`"
    paths = [f"/home/alice/projects/finetune/datasets/support_train_v{v}.jsonl" for v in (1, 2)]
    assert what_differs({"settings": {"data": paths[0]}}, {"data": paths[1]}) == \
        "`data: ...pport_train_v2.jsonl`, where it trained with `data: ...pport_train_v1.jsonl`"  # where they part


def test_the_run_record_keeps_long_settings_as_their_size_and_hash():
    """Records written inline in a mixture would make the record as large as the data."""
    from ftmagic.engine.outdir import kept_settings

    records = reversal_records(200)
    kept = kept_settings({"lr": 0.001, "data": [{"data": records, "weight": 2}]})
    assert kept["lr"] == 0.001 and kept["data"].startswith("<") and "sha256" in kept["data"]
    assert kept != kept_settings({"lr": 0.001, "data": [{"data": records[:-1], "weight": 2}]})  # still apart


def test_gradient_accumulation_equals_one_big_batch(test_model_dir, tmp_path):
    _, big = _train(test_model_dir, tmp_path / "a", batch_size=4, grad_accum=1, lora_dropout=0.0, max_steps=3)
    _, acc = _train(test_model_dir, tmp_path / "b", batch_size=2, grad_accum=2, lora_dropout=0.0, max_steps=3)
    a, b = step_losses(big), step_losses(acc)
    assert a.keys() == b.keys() == {1, 2, 3}
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-5)


def test_packed_examples_do_not_see_each_other(test_model_dir, test_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(test_model_dir).eval()
    first = test_tokenizer("reverse: hello world", add_special_tokens=False)["input_ids"]
    second = test_tokenizer("the quick brown fox", add_special_tokens=False)["input_ids"]
    row = {"input_ids": first + second, "labels": first + second,
           "position_ids": list(range(len(first))) + list(range(len(second)))}
    batch = collate([row, {"input_ids": second, "labels": second}], pad_id=0)
    assert batch["attention_mask"].shape == (2, 1, len(row["input_ids"]), len(row["input_ids"]))
    # The first label of the second packed example is not a target of the first one.
    assert batch["labels"][0, len(first)].item() == -100
    batch.pop("labels")
    with torch.no_grad():
        packed = model(**batch).logits
        alone = [model(input_ids=torch.tensor([ids])).logits[0] for ids in (first, second)]
    assert torch.allclose(packed[0, :len(first)], alone[0], atol=1e-5)
    assert torch.allclose(packed[0, len(first):], alone[1], atol=1e-5)
    assert torch.allclose(packed[1, :len(second)], alone[1], atol=1e-5)


def test_packing_trains(test_model_dir, tmp_path):
    result, events = _train(test_model_dir, tmp_path / "out", packing=True, max_seq_len=64, batch_size=2)
    plan = events[0]
    assert plan["train_records"] == 12 and result.metrics["steps"] == 3
    assert all(e["loss"] > 0 for e in events if e["event"] == "step")


def test_early_stopping(test_model_dir, tmp_path):
    # lr so large that eval loss cannot keep improving; patience 1 stops at the first bad eval.
    result, events = _train(test_model_dir, tmp_path / "out", eval_data=reversal_records(4, seed=2), eval_steps=1,
                            early_stopping_patience=1, max_steps=30, lr=5.0, scheduler="constant", warmup=0)
    evals = [e for e in events if e["event"] == "eval"]
    assert result.metrics["reason"] == "early_stopping" and result.metrics["steps"] < 30
    assert result.metrics["stopped"] is False
    assert evals[-1]["eval_loss"] >= min(e["eval_loss"] for e in evals[:-1])
    assert events[-1]["reason"] == "early_stopping"
    best = min(evals, key=lambda e: e["eval_loss"])
    messages = [e["text"] for e in notes(events)]
    assert messages == [f"early stopping: kept the weights of step {best['step']} (best eval loss {best['eval_loss']:.4f})"]
    assert result.metrics["eval_loss"] == best["eval_loss"]

    # The saved model really is the best one: evaluate it again.
    from ftmagic.data import prepare_data
    from ftmagic.engine.loop import evaluate
    from ftmagic.engine.result import RunResult

    reloaded = RunResult.load(tmp_path / "out")
    rows = prepare_data(result.config, reloaded.tokenizer).eval
    plan = choose_device(DeviceCaps())
    again = evaluate(reloaded.model, rows, batch_size=4, pad_id=reloaded.tokenizer.pad_token_id, plan=plan)
    assert again == pytest.approx(best["eval_loss"], abs=1e-5)


def test_schedules():
    assert [round(lr_factor(s, kind="linear", warmup_steps=2, total_steps=6), 4) for s in range(6)] == \
        [0.5, 1.0, 0.75, 0.5, 0.25, 0.0]
    assert [round(lr_factor(s, kind="cosine", warmup_steps=1, total_steps=5), 4) for s in range(5)] == \
        [1.0, 0.8536, 0.5, 0.1464, 0.0]
    assert [lr_factor(s, kind="constant", warmup_steps=2, total_steps=5) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert warmup_steps(0.1, 95) == 10 and warmup_steps(5, 95) == 5 and warmup_steps(0, 10) == 0
    assert plan_steps(10, batch_size=4, grad_accum=2, epochs=3, max_steps=-1) == (3, 5)
    assert plan_steps(10, batch_size=4, grad_accum=1, epochs=1, max_steps=7) == (3, 7)


def test_scheduler_reaches_the_loop(test_model_dir, tmp_path):
    _, events = _train(test_model_dir, tmp_path / "out", scheduler="linear", warmup=2, max_steps=6, lr=0.1)
    assert [round(e["lr"], 6) for e in events if e["event"] == "step"] == [0.05, 0.1, 0.075, 0.05, 0.025, 0.0]


def test_smoke_mode_uses_tiny_and_caps_steps(test_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "TINY_MODEL_DIR", Path(test_model_dir))
    monkeypatch.setenv("FTMAGIC_SMOKE", "1")
    result, events = _train("meta-llama/Llama-3.1-8B", tmp_path / "out", max_steps=500)
    assert result.metrics["steps"] == constants.SMOKE_MAX_STEPS
    texts = [e["text"] for e in events if e["event"] == "message"]
    assert texts[0] == ("smoke mode (FTMAGIC_SMOKE=1): using the embedded tiny model instead of "
                        "`meta-llama/Llama-3.1-8B` and at most 20 steps")


def test_unknown_model_is_one_line(tmp_path):
    with pytest.raises(ModelError, match=r"^model `.*no-such-model` was not found"):
        finetune(model=str(tmp_path / "no-such-model"), data=reversal_records(4), output_dir=str(tmp_path / "o"))


def test_missing_data_and_bad_device(test_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="`data` is not set"):
        finetune(model=test_model_dir, output_dir=str(tmp_path / "o"))
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        _train(test_model_dir, tmp_path / "o", device="cuda")


def test_config_spellings(test_model_dir, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"model: {test_model_dir}\nmethod: lora\nmax_steps: 1\nlora_r: 2\n")
    result = finetune(str(path), data=reversal_records(4), output_dir=str(tmp_path / "a"))
    assert result.config.lora_r == 2 and result.metrics["steps"] == 1
    cfg = FinetuneConfig(model=test_model_dir, data=reversal_records(4), max_steps=1, output_dir=str(tmp_path / "b"))
    assert finetune(cfg, lora_r=3).config.lora_r == 3


def test_oom_message_says_what_to_change(monkeypatch, test_model_dir):
    t4 = DeviceCaps(cuda_available=True, name="Tesla T4", compute_capability=(7, 5), total_memory=2**20)
    cfg = FinetuneConfig(model=test_model_dir, method="lora", batch_size=8, max_seq_len=512)  # its positions
    # With the memory calculator: its two best changes for this GPU.
    assert _oom_message(cfg, t4) == ("CUDA ran out of GPU memory; try micro-batch 8 -> 1 with grad_accum 8 (same "
                                     "effective batch), or shorter sequences: max_seq_len 512 -> 256 (longer examples "
                                     "are truncated) (see `%ft_memory`)")
    # When the calculator cannot judge the run: rules of thumb.
    import ftmagic.engine.run as run_module

    def cannot_judge(*args, **kwargs):
        raise ModelError("shape unknown")

    monkeypatch.setattr(run_module, "preflight", cannot_judge)
    message = _oom_message(cfg, t4)
    assert message == ("CUDA ran out of GPU memory; try `batch_size: 4` with `grad_accum: 2`, or "
                       "`gradient_checkpointing: true`, or `method: qlora`, or `max_seq_len: 256` (see `%ft_memory`)")

def test_finished_run_can_be_continued_with_more_steps(test_model_dir, tmp_path):
    _, first = _train(test_model_dir, tmp_path / "out", max_steps=3, save_steps=2)
    assert [e["step"] for e in first if e["event"] == "checkpoint"] == [2, 3]
    result, events = _train(test_model_dir, tmp_path / "out", max_steps=5, save_steps=2, resume=True)
    start = next(e for e in events if e["event"] == "start")
    assert start["resumed_from_step"] == 3
    assert sorted(step_losses(events)) == [4, 5] and result.metrics["steps"] == 5


@pytest.mark.parametrize("method", ["lora", "full"])
def test_gradient_checkpointing_gives_the_same_losses(test_model_dir, tmp_path, method):
    _, plain = _train(test_model_dir, tmp_path / "a", method=method, lora_dropout=0.0, lr=1e-3)
    _, ckpt = _train(test_model_dir, tmp_path / "b", method=method, lora_dropout=0.0, lr=1e-3,
                     gradient_checkpointing=True)
    a, b = step_losses(plain), step_losses(ckpt)
    assert a.keys() == b.keys() == {1, 2, 3}
    assert all(a[s] == pytest.approx(b[s], abs=1e-5) for s in a)
    grad_norms = [e["grad_norm"] for e in ckpt if e["event"] == "step"]
    assert all(g > 0 for g in grad_norms)  # gradients reach the adapters through the frozen base


def test_cuda_out_of_memory_becomes_one_line(test_model_dir, tmp_path, monkeypatch):
    import ftmagic.engine.run as run_module
    from ftmagic.errors import MemoryFitError

    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(run_module, "train_loop", boom)
    with pytest.raises(MemoryFitError, match=r"^CUDA ran out of GPU memory; try [^\n]+ \(see `%ft_memory`\)$"):
        _train(test_model_dir, tmp_path / "out")


def test_preflight_with_the_memory_calculator(test_model_dir):
    from ftmagic.engine.run import preflight_check
    from ftmagic.errors import MemoryFitError

    cfg = FinetuneConfig(model=test_model_dir, method="full", batch_size=64, max_seq_len=512)
    tiny_gpu = DeviceCaps(cuda_available=True, name="Tesla T4", compute_capability=(7, 5), total_memory=2**20)
    with pytest.raises(MemoryFitError, match=r"^does not fit this GPU .* fp16 batch 64 x 512 needs .*; try: micro-batch "
                                             r"64 -> 1 with grad_accum 64 .*; set `skip_memory_check: true` to try anyway$"):
        preflight_check(cfg, tiny_gpu)
    big_gpu = DeviceCaps(cuda_available=True, name="H100", compute_capability=(9, 0), total_memory=80 * 2**30,
                         bf16_supported=True)
    assert preflight_check(cfg, big_gpu).startswith("fits this GPU (80 GiB): ")


def test_compare_and_generate(test_model_dir, tmp_path):
    result, _ = _train(test_model_dir, tmp_path / "out", lr=0.05, max_steps=4)
    rows = result.compare(["reverse: abc", "reverse: fox"], max_new_tokens=5)
    assert [r["prompt"] for r in rows] == ["reverse: abc", "reverse: fox"]
    assert all(set(r) == {"prompt", "base", "tuned"} for r in rows)
    assert rows[0]["tuned"] == result.generate("reverse: abc", max_new_tokens=5)
    assert result.render("reverse: abc") == "<|im_start|>user\nreverse: abc<|im_end|>\n<|im_start|>assistant\n"
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(test_model_dir).eval()
    enc = result.tokenizer(result.render("reverse: fox"), return_tensors="pt", add_special_tokens=False)
    out = base.generate(**enc, max_new_tokens=5, do_sample=False, eos_token_id=result.tokenizer.eos_token_id,
                        pad_token_id=result.tokenizer.pad_token_id)
    assert rows[1]["base"] == result.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    # The adapter is switched back on after comparing.
    assert result.generate("reverse: abc", max_new_tokens=5) == rows[0]["tuned"]


def test_load_refuses_unfinished_run(tmp_path):
    from ftmagic.engine.result import RunResult

    with pytest.raises(CheckpointError, match="is not a finished ftmagic run"):
        RunResult.load(tmp_path)


def test_bf16_autocast_on_cpu_with_packing(test_model_dir, tmp_path, monkeypatch):
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY"):
        monkeypatch.delenv(name, raising=False)  # conftest puts the environment back after the test
    result, events = _train(test_model_dir, tmp_path / "out", precision="bf16", packing=True, max_seq_len=64,
                            eval_data=reversal_records(4, seed=2), eval_steps=2)
    assert events[0]["precision"] == "bf16" and result.metrics["precision"] == "bf16"
    assert all(p.dtype == torch.float32 for p in result.model.parameters() if p.requires_grad)
    assert isinstance(result.metrics["eval_loss"], float) and result.metrics["eval_loss"] > 0
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "64"  # set before the run built its first kernel


def test_upcast_trainable_keeps_frozen_half_weights():
    from ftmagic.engine.run import _upcast_trainable

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)).half()
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    _upcast_trainable(model)
    assert [p.dtype for p in model.parameters()] == [torch.float16, torch.float16, torch.float32, torch.float32]


def test_tiny_resolves_to_the_embedded_model(tmp_path, monkeypatch):
    monkeypatch.delenv("FTMAGIC_SMOKE", raising=False)
    if (constants.TINY_MODEL_DIR / "config.json").exists():
        assert models.resolve_model_path("tiny") == str(constants.TINY_MODEL_DIR)
    assert models.resolve_model_path("org/some-model") == "org/some-model"
    monkeypatch.setattr(constants, "TINY_MODEL_DIR", tmp_path / "absent")
    with pytest.raises(ModelError, match=r"^the embedded model is missing at .*absent; rebuild it"):
        models.resolve_model_path("tiny")


def test_report_to_without_its_package_fails_early(test_model_dir, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    on_event, events = collect()
    with pytest.raises(ConfigError, match=r"^`report_to: wandb` needs the wandb package"):
        finetune(model=test_model_dir, data=reversal_records(4), output_dir=str(tmp_path / "o"), report_to="wandb",
                 on_event=on_event)
    assert events == []  # nothing was loaded or trained


def test_qlora_load_failure_on_cpu_falls_back(tmp_path, monkeypatch, test_tokenizer):
    from model_builders import build_test_model_dir

    model_dir = build_test_model_dir(tmp_path / "wide", test_tokenizer, hidden_size=64, intermediate_size=128)
    without_4bit(monkeypatch, "no kernel image for this CPU\nmore detail")
    result, events = _train(model_dir, tmp_path / "out", method="qlora", max_steps=1)
    texts = [e["text"] for e in notes(events)]
    assert texts == ["QLoRA's 4-bit load failed on this CPU (no kernel image for this CPU); using LoRA"]
    assert result.metrics["method"] == "lora"


def test_tokenizer_without_pad_pads_with_eos(tmp_path, test_tokenizer):
    import copy

    tok = copy.deepcopy(test_tokenizer)
    tok.pad_token = None
    tok.save_pretrained(str(tmp_path))
    loaded = models.load_tokenizer(str(tmp_path))
    assert loaded.pad_token == "<|im_end|>" and loaded.padding_side == "right"


def test_output_dir_that_is_a_file(test_model_dir, tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(CheckpointError, match=r"is a file; give a folder path$"):
        _train(test_model_dir, tmp_path / "out")


def test_compare_for_full_weights_loads_the_original_model(test_model_dir, tmp_path):
    from ftmagic.engine.result import RunResult

    result, _ = _train(test_model_dir, tmp_path / "out", method="freeze", trainable_layers=1, lr=0.05)
    reloaded = RunResult.load(tmp_path / "out")
    rows = reloaded.compare("reverse: abc", max_new_tokens=4)
    again = result.compare(["reverse: abc"], max_new_tokens=4)
    assert rows == again
    assert reloaded.base_model_path == test_model_dir


def test_pure_bf16_full_training_and_reload(test_model_dir, tmp_path):
    from ftmagic.engine.result import RunResult

    result, events = _train(test_model_dir, tmp_path / "out", method="full", precision="bf16", lr=1e-3,
                            data=reversal_records(4), max_steps=4)
    assert {p.dtype for p in result.model.parameters()} == {torch.bfloat16}
    losses = list(step_losses(events).values())
    assert losses[-1] < losses[0]
    reloaded = RunResult.load(tmp_path / "out")
    assert reloaded.model.dtype == torch.bfloat16
    assert reloaded.generate("reverse: abc", max_new_tokens=4, min_new_tokens=4) == \
        result.generate("reverse: abc", max_new_tokens=4, min_new_tokens=4)


def test_bf16_lora_reloads_to_the_same_generations(test_model_dir, tmp_path):
    from ftmagic.engine.result import RunResult

    result, _ = _train(test_model_dir, tmp_path / "out", precision="bf16", lr=0.05)
    assert result.model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight.dtype == torch.bfloat16
    reloaded = RunResult.load(tmp_path / "out")
    assert reloaded.generate("reverse: abc", max_new_tokens=5, min_new_tokens=5) == \
        result.generate("reverse: abc", max_new_tokens=5, min_new_tokens=5)


@pytest.mark.skipif(not (constants.TINY_MODEL_DIR / "config.json").exists(), reason="the embedded model is not built")
def test_qlora_on_the_embedded_tiny_model(tmp_path, monkeypatch):
    monkeypatch.delenv("FTMAGIC_SMOKE", raising=False)
    result, events = _train("tiny", tmp_path / "out", method="qlora", max_steps=2)
    assert events[0]["model"] == "tiny" and events[0]["method"] == "qlora"
    assert notes(events) == []
    assert result.metrics["steps"] == 2 and isinstance(result.generate("reverse: abc", max_new_tokens=4), str)


def test_message_levels(test_model_dir, tmp_path):
    _, events = _train(test_model_dir, tmp_path / "out", resume=True, max_steps=1, save_steps=1)
    assert [(e["level"], e["text"].split(";")[0]) for e in notes(events)] == \
        [("warning", f"no checkpoint in {tmp_path / 'out' / 'checkpoints'}")]
    _, events = _train(test_model_dir, tmp_path / "out", resume=True, max_steps=2, save_steps=1)
    assert [(e["level"], e["text"]) for e in notes(events)] == [("info", "resuming from step-00000001")]


def test_data_warnings_name_skipped_and_truncated_records():
    from ftmagic.engine.run import data_warnings

    assert data_warnings({"records": 5, "skipped": 0, "truncated": 0}) == []
    lines = data_warnings({"records": 5, "skipped": 1, "skipped_reasons": {"empty": 1}, "truncated": 2})
    assert lines[0] == "1 of 5 records skipped (empty: 1); `ftmagic preview` shows which and why"
    assert lines[1].startswith("2 records are longer than max_seq_len and were truncated")


def test_max_seq_len_above_the_models_positions_is_cut_there_and_said(tmp_path):
    # GPT-2's learned positions end at n_positions: past them its forward raised "IndexError: index out of range".
    from model_builders import build_family_model_dir

    model_dir = build_family_model_dir(tmp_path / "gpt2", "gpt2")  # 256 positions
    records = [{"text": " ".join(["hello world data model"] * 120)} for _ in range(4)]
    on_event, events = collect()
    result = finetune(model=model_dir, data=records, max_steps=2, batch_size=2, max_seq_len=512, save_steps=0,
                      eval_steps=0, output_dir=str(tmp_path / "out"), on_event=on_event)
    assert ("`max_seq_len: 512` is above the 256 positions gpt2 was built for (`max_position_embeddings`): examples "
            "are cut at 256 tokens") in [note["text"] for note in notes(events)]
    assert result.config.max_seq_len == 256 and result.metrics["steps"] == 2

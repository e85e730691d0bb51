"""Checkpoints are atomic: a write killed half-way never hides or corrupts the last good one."""

import json

import pytest
import torch

import ftmagic.engine.checkpoint as ckpt
from ftmagic.engine.run import finetune
from ftmagic.errors import CheckpointError

from engine_helpers import collect, reversal_records, step_losses


def _parts(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, sched


def _save(root, step, model, opt, sched, keep=2):
    return ckpt.save_checkpoint(root, step=step, model=model, optimizer=opt, scheduler=sched, scaler=None,
                                state={"step": step}, keep=keep)


def test_kill_mid_write_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    model, opt, sched = _parts()
    good = _save(tmp_path, 2, model, opt, sched)
    saved_weight = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)

    real = ckpt._write_files

    def crash(tmp, **parts):
        (tmp / "trainable.safetensors").write_bytes(b"half a fi")  # a torn file
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "_write_files", crash)
    with pytest.raises(CheckpointError, match=r"checkpoint step 4 could not be written .*\(disk full\); the last "
                                              r"complete checkpoint \(step-00000002\) is intact"):
        _save(tmp_path, 4, model, opt, sched)
    monkeypatch.setattr(ckpt, "_write_files", real)

    # A SIGKILL leaves the temporary folder behind (no cleanup runs), and a folder without
    # its COMPLETE marker may exist; neither is taken for a checkpoint.
    (tmp_path / ".tmp-step-00000006-999").mkdir()
    (tmp_path / ".tmp-step-00000006-999" / "state.json").write_text("{")
    (tmp_path / "step-00000008").mkdir()
    (tmp_path / "step-00000008" / "state.json").write_text(json.dumps({"step": 8}))

    assert ckpt.latest_checkpoint(tmp_path) == good
    fresh, fresh_opt, fresh_sched = _parts(seed=1)
    state = ckpt.load_checkpoint(good, model=fresh, optimizer=fresh_opt, scheduler=fresh_sched, scaler=None)
    assert state == {"step": 2}
    assert torch.equal(fresh.weight, saved_weight)
    ckpt.clean_temporaries(tmp_path)
    assert not (tmp_path / ".tmp-step-00000006-999").exists()


def test_save_total_limit_keeps_the_newest(tmp_path):
    model, opt, sched = _parts()
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model, opt, sched, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]
    _save(tmp_path, 4, model, opt, sched, keep=2)  # the same step again replaces it in place
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003", "step-00000004"]


def test_checkpoint_holds_every_part(tmp_path):
    model, opt, sched = _parts()
    path = _save(tmp_path, 5, model, opt, sched)
    # No pickles: tensors in safetensors, everything else JSON.
    assert sorted(p.name for p in path.iterdir()) == ["COMPLETE", "state.json", "trainable.safetensors",
                                                      "training_state.safetensors"]


def test_crash_during_a_run_then_resume_is_exact(test_model_dir, tmp_path, monkeypatch):
    settings = dict(model=test_model_dir, data=reversal_records(16), method="lora", max_steps=6, batch_size=4,
                    lr=2e-2, lora_r=4, lora_dropout=0.1, save_steps=2, eval_steps=0, seed=3)
    on_event, events = collect()
    finetune(output_dir=str(tmp_path / "straight"), on_event=on_event, **settings)
    reference = step_losses(events)

    real = ckpt._write_files

    def crash_at_step_4(tmp, **parts):
        if parts["state"]["step"] == 4:
            real(tmp, **parts)
            raise RuntimeError("killed while writing")
        return real(tmp, **parts)

    monkeypatch.setattr(ckpt, "_write_files", crash_at_step_4)
    with pytest.raises(CheckpointError, match="killed while writing"):
        finetune(output_dir=str(tmp_path / "out"), **settings)
    monkeypatch.setattr(ckpt, "_write_files", real)
    assert ckpt.latest_checkpoint(tmp_path / "out" / "checkpoints").name == "step-00000002"

    on_event, events = collect()
    result = finetune(output_dir=str(tmp_path / "out"), resume=True, on_event=on_event, **settings)
    after = step_losses(events)
    assert sorted(after) == [3, 4, 5, 6]
    for step in after:
        assert after[step] == pytest.approx(reference[step], abs=1e-5)
    assert result.metrics["steps"] == 6


def test_best_weights_travel_with_the_checkpoint(tmp_path):
    model, opt, sched = _parts()
    best = ckpt.trainable_state(model)
    with torch.no_grad():
        model.weight.add_(1.0)  # the snapshot is a copy, not a view of the live weights
    assert not torch.equal(best["weight"], model.weight)
    path = ckpt.save_checkpoint(tmp_path, step=3, model=model, optimizer=opt, scheduler=sched, scaler=None,
                                state={"step": 3}, best=best)
    loaded = ckpt.load_best(path)
    assert torch.equal(loaded["weight"], best["weight"]) and torch.equal(loaded["bias"], best["bias"])
    assert ckpt.load_best(_save(tmp_path, 4, model, opt, sched)) is None

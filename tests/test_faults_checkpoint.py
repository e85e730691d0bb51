"""Fault injection on checkpoints: kills at every point of a write, a full disk, damaged and hostile files.

Whatever happens to the newest checkpoint, a resume ends exactly like a run that was never
interrupted (from the newest usable checkpoint, saying which one it skipped and why), and
nothing in a checkpoint is ever unpickled.
"""

import errno
import json
import os
import shutil

import pytest
import torch

import ftmagic.engine.checkpoint as ckpt
from ftmagic.cli import main
from ftmagic.engine.run import finetune
from ftmagic.errors import CheckpointError

from engine_helpers import collect, reversal_records, step_losses
from fault_helpers import KILLED, count_operations, in_child, needs_fork, operations, plant_pickle

SETTINGS = dict(method="lora", max_steps=6, batch_size=4, lr=2e-2, lora_r=4, lora_dropout=0.1, save_steps=2,
                save_total_limit=3, eval_steps=0, seed=3, scheduler="constant", warmup=0)


def _train(model_dir, out, **extra):
    on_event, events = collect()
    result = finetune(model=model_dir, data=reversal_records(16), output_dir=str(out), on_event=on_event,
                      **{**SETTINGS, **extra})
    return result, events


def _messages(events, level=None):
    return [e["text"] for e in events if e["event"] == "message" and (level is None or e["level"] == level)]


@pytest.fixture(scope="module")
def straight(test_model_dir, tmp_path_factory):
    """Losses of a run that was never interrupted."""
    _, events = _train(test_model_dir, tmp_path_factory.mktemp("straight") / "out")
    return step_losses(events)


@pytest.fixture(scope="module")
def stopped_at_4(test_model_dir, tmp_path_factory):
    """A run folder with checkpoints 2 and 4 (stopped at 4), copied by each test that damages it."""
    out = tmp_path_factory.mktemp("stopped") / "out"
    _train(test_model_dir, out, max_steps=4)
    return out


def _copy(template, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(template, out)
    return out


def _resume_matches(test_model_dir, out, straight, first_step):
    result, events = _train(test_model_dir, out, resume=True)
    start = next(e for e in events if e["event"] == "start")
    assert start["resumed_from_step"] == first_step - 1
    after = step_losses(events)
    assert sorted(after) == list(range(first_step, 7))
    for step in after:
        assert after[step] == pytest.approx(straight[step], abs=1e-5)
    return result, events


# --------------------------------------------------------------------------- no pickles


def test_checkpoints_hold_no_pickles(stopped_at_4):
    files = [p for p in (stopped_at_4 / "checkpoints").rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"trainable.safetensors", "training_state.safetensors", "state.json", "COMPLETE"}
    from safetensors import safe_open

    for path in files:
        # Every file is safetensors, JSON or text: nothing a loader would unpickle.
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                assert all(isinstance(v, str) for v in (handle.metadata() or {}).values())
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        else:
            assert path.name in ("COMPLETE", "README.md"), f"unexpected file {path.name}"
            path.read_text(encoding="utf-8")


@pytest.mark.parametrize("target", ["trainable.safetensors", "training_state.safetensors", "state.json",
                                    "adapter_model.safetensors", "rng.pt", "optimizer.pt", "scheduler.pt"])
def test_a_planted_pickle_never_runs_on_resume(test_model_dir, stopped_at_4, tmp_path, straight, target):
    out = _copy(stopped_at_4, tmp_path)
    marker = tmp_path / "code-ran"
    plant_pickle(out / "checkpoints" / "step-00000004" / target, marker)
    _, events = _train(test_model_dir, out, resume=True)
    assert not marker.exists(), f"a pickle planted as {target} was executed"
    start = next(e for e in events if e["event"] == "start")
    if target in ("trainable.safetensors", "training_state.safetensors", "state.json"):
        # A file the resume reads is now unreadable: the checkpoint before it is used, and the user is told.
        assert start["resumed_from_step"] == 2
        assert any(t.startswith(f"checkpoint step-00000004 cannot be read ({target}") and
                   t.endswith("; resuming from step-00000002 instead") for t in _messages(events, "warning"))
    else:
        assert start["resumed_from_step"] == 4  # never read on resume: harmless


# --------------------------------------------------------------------------- damaged files


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _wrong_shape(path):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(path))
    name = next(iter(weights))
    weights[name] = torch.zeros(3, 3)
    save_file(weights, str(path))


CORRUPTIONS = {
    "truncated weights": ("trainable.safetensors", _truncate),
    "garbage weights": ("trainable.safetensors", lambda p: p.write_bytes(b"\x00" * 64)),
    "weights of another shape": ("trainable.safetensors", _wrong_shape),
    "truncated training state": ("training_state.safetensors", _truncate),
    "garbage training state": ("training_state.safetensors", lambda p: p.write_bytes(os.urandom(256))),
    "state.json not JSON": ("state.json", lambda p: p.write_text("{\"step\": 4,")),
    "state.json a list": ("state.json", lambda p: p.write_text("[]")),
    "state.json missing keys": ("state.json", lambda p: p.write_text(json.dumps({"step": 4}))),
    "state.json wrong types": ("state.json", lambda p: p.write_text(json.dumps(
        {**json.loads(p.read_text()), "history": "x", "trained_tokens": "many"}))),
    "state.json of another step": ("state.json", lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "step": 9}))),
    "missing weights": ("trainable.safetensors", lambda p: p.unlink()),
    "missing training state": ("training_state.safetensors", lambda p: p.unlink()),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_damaged_newest_checkpoint_falls_back_to_the_one_before(test_model_dir, stopped_at_4, tmp_path, straight, kind):
    out = _copy(stopped_at_4, tmp_path)
    name, damage = CORRUPTIONS[kind]
    damage(out / "checkpoints" / "step-00000004" / name)
    _, events = _resume_matches(test_model_dir, out, straight, first_step=3)
    warnings = [t for t in _messages(events, "warning") if "step-00000004" in t]
    assert len(warnings) == 1 and warnings[0].endswith("resuming from step-00000002 instead")
    assert "\n" not in warnings[0]


def test_every_field_of_the_loop_state_is_checked_on_resume():
    import dataclasses

    from ftmagic.engine.loop import LoopState

    assert set(LoopState.JSON_TYPES) == {f.name for f in dataclasses.fields(LoopState)}
    saved = LoopState(step=3, history=[{"event": "step"}]).to_json(epoch=0, batch_index=3, order_seed=1)
    for name, value in saved.items():
        if name in LoopState.JSON_TYPES:
            assert isinstance(value, LoopState.JSON_TYPES[name]), name


def test_every_checkpoint_damaged_is_one_line(test_model_dir, stopped_at_4, tmp_path):
    out = _copy(stopped_at_4, tmp_path)
    record = (out / "ftmagic_run.json").read_bytes()
    for folder in (out / "checkpoints").iterdir():
        (folder / "state.json").write_text("garbage")
    with pytest.raises(CheckpointError) as info:
        _train(test_model_dir, out, resume=True)
    message = str(info.value)
    assert message.startswith(f"no checkpoint in {out / 'checkpoints'} can be used: checkpoint step-00000004 cannot be read")
    assert "(and 1 older)" in message and "\n" not in message
    assert (out / "ftmagic_run.json").read_bytes() == record  # a refused resume leaves the record as it was


def test_checkpoint_of_an_older_format_is_never_unpickled(tmp_path):
    folder = tmp_path / "step-00000003"
    folder.mkdir()
    (folder / "state.json").write_text(json.dumps({"step": 3}))
    (folder / "COMPLETE").write_text("3")
    plant_pickle(folder / "rng.pt", tmp_path / "code-ran")
    plant_pickle(folder / "optimizer.pt", tmp_path / "code-ran")
    with pytest.raises(CheckpointError, match="written by an older ftmagic and stores pickles, which are never loaded"):
        ckpt.read_checkpoint(folder)
    assert not (tmp_path / "code-ran").exists()


# --------------------------------------------------------------------------- a full disk


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                                  "message: \"No space left on device\" })")])
def test_disk_full_during_a_checkpoint_is_one_line_and_keeps_the_last_one(test_model_dir, tmp_path, monkeypatch,
                                                                          straight, failure):
    import safetensors.torch

    real = safetensors.torch.save_file
    calls = {"n": 0}

    def full_after_first_checkpoint(tensors, filename, *args, **kwargs):
        if "step-00000004" in str(filename):
            calls["n"] += 1
            raise failure
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full_after_first_checkpoint)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as info:
        _train(test_model_dir, out)
    assert calls["n"] == 1
    assert str(info.value) == (f"the disk is full: checkpoint step 4 could not be written to {out / 'checkpoints'}; "
                               "the last complete checkpoint (step-00000002) is intact, so `resume: true` continues "
                               "from it; free some space")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]  # no half-written folder left
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    _resume_matches(test_model_dir, out, straight, first_step=3)


def test_disk_full_through_the_cli_is_one_line(test_model_dir, tmp_path, monkeypatch, capsys):
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {test_model_dir}\ndata: {tmp_path / 'd.jsonl'}\nmax_steps: 2\nsave_steps: 1\n"
                      f"output_dir: {tmp_path / 'out'}\n")
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in reversal_records(8)))
    assert main(["train", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ftmagic: error: the disk is full: checkpoint step 1 could not be written")


# --------------------------------------------------------------------------- kills at every point of a write


def _parts(seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, sched


def _save(root, step, parts, tag):
    model, opt, sched = parts
    return ckpt.save_checkpoint(root, step=step, model=model, optimizer=opt, scheduler=sched, scaler=None,
                                state={"step": step, "tag": tag, "trained_tokens": 0, "best_eval": None, "bad_evals": 0,
                                       "history": [], "elapsed_s": 0.0}, keep=0)


@needs_fork
@pytest.mark.parametrize("scenario", ["new step", "same step replaced"])
@pytest.mark.parametrize("torn", [False, True], ids=["killed before the operation", "killed mid-write"])
def test_a_kill_at_any_point_of_a_checkpoint_write_loses_nothing(tmp_path, scenario, torn):
    old_parts, new_parts = _parts(0), _parts(1)
    template = tmp_path / "template"
    _save(template, 1, old_parts, "old-1")
    _save(template, 2, old_parts, "old-2")
    step = 3 if scenario == "new step" else 2
    dry = tmp_path / "dry"
    shutil.copytree(template, dry)
    names = count_operations(lambda: _save(dry, step, new_parts, "new"))
    assert "replace" in names and "save_file" in names
    outcomes = set()
    for k in range(len(names) + 1):
        root = tmp_path / f"run-{k}"
        shutil.copytree(template, root)

        def write():
            with operations(kill_at=k, torn=torn):
                _save(root, step, new_parts, "new")

        status = in_child(write)
        assert status in (0, KILLED)
        ckpt.recover(root)
        assert not [p.name for p in root.iterdir() if p.name.startswith(".")], "recover() left temporaries"
        found = ckpt.find_resumable(root, new_parts[0], warn=lambda text: None)
        tags = {p.name: ckpt.read_checkpoint(p).state["tag"] for p in ckpt.list_checkpoints(root)}
        # Nothing older is ever lost, and the newest is wholly old or wholly new.
        assert tags["step-00000001"] == "old-1"
        if scenario == "new step":
            assert tags.get("step-00000002") == "old-2" and tags.get("step-00000003", "new") == "new"
        else:
            assert tags["step-00000002"] in ("old-2", "new")
        expected = new_parts[0] if found.state["tag"] == "new" else old_parts[0]
        assert torch.equal(found.weights["weight"], expected.weight.detach())
        outcomes.add(found.state["tag"])
    assert outcomes == {"old-2", "new"}  # both sides of the commit point were hit


@needs_fork
def test_killed_between_the_two_renames_of_a_same_step_replacement(test_model_dir, tmp_path, straight):
    out = tmp_path / "out"
    _train(test_model_dir, out, max_steps=4)  # checkpoints 2 and 4
    # As if killed while it wrote its final outputs: its record does not say it finished.
    record = json.loads((out / "ftmagic_run.json").read_text(encoding="utf-8"))
    (out / "ftmagic_run.json").write_text(json.dumps({**record, "finished": False}), encoding="utf-8")
    replaces = {"n": 0}

    def resume_killed_between_renames():
        import os as _os

        real = _os.replace

        def replace(src, dst):
            real(src, dst)
            if "step-00000004" in str(dst) and ".old-" in str(dst):
                _os._exit(KILLED)  # the old step-4 is aside, the new one not yet in place
            replaces["n"] += 1

        _os.replace = replace
        # Its resume writes checkpoint 4 again as it ends: a same-step replacement.
        _train(test_model_dir, out, max_steps=4, resume=True)

    assert in_child(resume_killed_between_renames) == KILLED
    leftovers = sorted(p.name.split("-step")[0] for p in (out / "checkpoints").iterdir() if p.name.startswith("."))
    assert leftovers == [".old", ".tmp"] and not (out / "checkpoints" / "step-00000004").exists()
    assert (out / ".ftmagic-lock").exists()  # the killed run's lock stays behind; its process is gone
    _, events = _resume_matches(test_model_dir, out, straight, first_step=5)
    warnings = _messages(events, "warning")
    assert "checkpoint step 4 was being replaced when the run stopped; restored it" in warnings
    assert any(t.startswith(f"took over the lock of `{out}` left by a run that is gone (pid ") for t in warnings)


def test_disk_full_while_writing_the_final_outputs_is_one_line(test_model_dir, tmp_path, monkeypatch, straight):
    import ftmagic.engine.run as run

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run, "publish", full)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as info:
        _train(test_model_dir, out, max_steps=4)
    assert str(info.value).startswith(f"the trained model could not be written to {out} (the disk is full); the "
                                      f"partial outputs are in {out}/.ftmagic-staging-")
    assert str(info.value).endswith("the checkpoints are intact, so `resume: true` writes it again")
    monkeypatch.undo()
    result, _ = _train(test_model_dir, out, max_steps=4, resume=True)  # writes the outputs again
    assert (out / "adapter_model.safetensors").exists() and result.metrics["steps"] == 4

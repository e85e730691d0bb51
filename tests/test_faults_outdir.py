"""Fault injection on output folders: concurrent runs, crashed runs, user files, refused resumes.

Nothing a user had is removed or replaced, one run owns a folder at a time, and a run
that is refused or fails before it starts leaves the folder as it found it.
"""

import json
import os
import select
import signal
import socket
import time

import pytest

from ftmagic.cli import main
from ftmagic.engine.run import finetune
from ftmagic.errors import CheckpointError, DataError, ModelError

from engine_helpers import collect, reversal_records
from fault_helpers import needs_fork

SETTINGS = dict(method="lora", max_steps=4, batch_size=4, lr=1e-2, lora_r=4, save_steps=2, eval_steps=0, seed=5)


def _train(model_dir, out, on_event=None, **extra):
    settings = {**SETTINGS, "data": reversal_records(12), **extra}
    return finetune(model=model_dir, output_dir=str(out), on_event=on_event, **settings)


def _snapshot(folder):
    """Every file under ``folder`` with its bytes (what a user would notice changing)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- one run per folder


@pytest.mark.parametrize("second", [{}, {"resume": True}, {"overwrite": True}], ids=["plain", "resume", "overwrite"])
def test_a_second_run_on_a_busy_folder_is_refused_and_names_the_first(test_model_dir, tmp_path, second):
    out = tmp_path / "out"
    refused = []

    def start_another(event):
        if event.kind == "step" and event.step == 2 and not refused:
            with pytest.raises(CheckpointError) as info:
                _train(test_model_dir, out, **second)
            refused.append(str(info.value))

    result = _train(test_model_dir, out, on_event=start_another)
    assert len(refused) == 1
    assert refused[0].startswith(f"`output_dir: {out}` is in use by another run (pid {os.getpid()} on host "
                                 f"{socket.gethostname()}, started ")
    assert "wait for it to finish or choose another `output_dir`" in refused[0]
    # The first run was not disturbed: every checkpoint and output is there.
    assert result.metrics["steps"] == 4
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert not (out / ".ftmagic-lock").exists()  # released at the end


@needs_fork
def test_a_run_in_another_process_holds_the_folder_until_it_dies(test_model_dir, tmp_path):
    from ftmagic.engine import runlock

    out = tmp_path / "out"
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the other process
        try:
            os.close(read)
            runlock.RunLock.acquire(out)
            os.write(write, b"locked")
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(write)
    # the forked holder says when it holds the lock; one that hangs fails the test instead of the suite
    ready, _, _ = select.select([read], [], [], 120)
    if not ready:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked lock holder did not take the lock within 120 s")
    assert os.read(read, 6) == b"locked"
    os.close(read)
    try:
        with pytest.raises(CheckpointError, match=rf"is in use by another run \(pid {pid} on host "):
            _train(test_model_dir, out, resume=True)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    on_event, events = collect()
    _train(test_model_dir, out, on_event=on_event)  # the holder is gone: its lock is taken over
    texts = [e["text"] for e in events if e["event"] == "message"]
    assert any(t.startswith(f"took over the lock of `{out}` left by a run that is gone (pid {pid} on host ") for t in texts)


def test_a_lock_from_another_host_counts_while_its_holder_refreshes_it(tmp_path):
    from ftmagic.engine import runlock

    lock = tmp_path / runlock.LOCK_NAME
    lock.write_text(json.dumps({"pid": 12345, "host": "colab-vm-7", "started": time.time() - 600}))
    with pytest.raises(CheckpointError, match=r"in use by another run \(pid 12345 on host colab-vm-7, started "):
        runlock.RunLock.acquire(tmp_path)
    stale = time.time() - runlock.STALE_AFTER_S - 10
    os.utime(lock, (stale, stale))  # the other session dropped: no heartbeat any more
    notes = []
    taken = runlock.RunLock.acquire(tmp_path, note=notes.append)
    assert notes and notes[0].startswith(f"took over the lock of `{tmp_path}` left by a run that is gone (pid 12345 on "
                                         "host colab-vm-7")
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    taken.release()
    assert not lock.exists()


# --------------------------------------------------------------------------- never the user's files


def test_overwrite_never_removes_or_replaces_files_ftmagic_did_not_write(test_model_dir, tmp_path):
    out = tmp_path / "project"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "mine.pt").write_bytes(b"my own checkpoint")
    (out / "merged").mkdir()
    (out / "merged" / "model.bin").write_bytes(b"my merged model")
    (out / "README.md").write_text("my notes")
    (out / "config.yaml").write_text("model: mine\n")
    before = _snapshot(out)
    with pytest.raises(CheckpointError) as info:
        _train(test_model_dir, out, overwrite=True)
    assert str(info.value) == (f"`output_dir: {out}` holds README.md, checkpoints, config.yaml, merged, which ftmagic "
                               "did not write and would overwrite; they are never replaced: move them or choose another "
                               "`output_dir`")
    assert _snapshot(out) == before and sorted(os.listdir(out)) == ["README.md", "checkpoints", "config.yaml", "merged"]


def test_overwrite_replaces_only_what_the_earlier_run_wrote(test_model_dir, tmp_path):
    out = tmp_path / "out"
    _train(test_model_dir, out)
    written = set(json.loads((out / "ftmagic_run.json").read_text())["files"])
    assert {"checkpoints", "adapter_model.safetensors", "config.yaml", "metrics.json"} <= written
    (out / "notes.txt").write_text("mine")  # added by the user after the run
    (out / "eval").mkdir()
    (out / "eval" / "scores.csv").write_text("a,b\n")
    _train(test_model_dir, out, method="dora", overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "eval" / "scores.csv").read_text() == "a,b\n"
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True


def test_output_dir_dot_never_replaces_the_users_config(test_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in reversal_records(8)) + "\n")
    config = tmp_path / "config.yaml"
    config.write_text(f"model: {test_model_dir}\ndata: train.jsonl\nmax_steps: 2\noutput_dir: .\noverwrite: true\n")
    before = _snapshot(tmp_path)
    assert main(["train", "config.yaml", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ftmagic: error: `output_dir: .` holds config.yaml, which ftmagic did not write and would overwrite; "
                   "they are never replaced: move them or choose another `output_dir`"]
    assert _snapshot(tmp_path) == before


def test_publishing_outputs_never_replaces_an_unowned_file(tmp_path):
    from ftmagic.engine.outdir import publish

    out, staging = tmp_path / "out", tmp_path / "out" / ".ftmagic-staging-1"
    staging.mkdir(parents=True)
    (staging / "vocab.json").write_text("{}")
    (staging / "metrics.json").write_text("{}")
    (out / "vocab.json").write_text("the user's")
    with pytest.raises(CheckpointError, match="holds vocab.json, which ftmagic did not write; the trained outputs are kept in"):
        publish(staging, out, owned={"checkpoints"})
    assert (out / "vocab.json").read_text() == "the user's" and (staging / "metrics.json").exists()
    assert publish(staging, out, owned={"vocab.json"}) == ["metrics.json", "vocab.json"]


# --------------------------------------------------------------------------- crashed, stopped, refused runs


def test_rerunning_after_a_crash_keeps_the_checkpoints_and_says_how_to_continue(test_model_dir, tmp_path):
    out = tmp_path / "out"

    def crash(event):
        if event.kind == "step" and event.step == 3:
            raise RuntimeError("the kernel died")

    with pytest.raises(RuntimeError):
        _train(test_model_dir, out, on_event=crash)
    before = _snapshot(out)
    with pytest.raises(CheckpointError) as info:
        _train(test_model_dir, out)
    assert str(info.value) == (f"`output_dir: {out}` holds an unfinished run of this config (newest checkpoint: "
                               "step-00000002); set `resume: true` to continue it, or `overwrite: true` to start over "
                               "(its checkpoints are deleted)")
    assert _snapshot(out) == before
    result = _train(test_model_dir, out, resume=True)
    assert result.metrics["steps"] == 4


def test_a_stopped_run_is_not_restarted_from_zero_by_accident(test_model_dir, tmp_path):
    from engine_helpers import StopAt

    out = tmp_path / "out"
    stop = StopAt(2)
    _train(test_model_dir, out, on_event=stop, stop=stop)
    with pytest.raises(CheckpointError, match="holds an unfinished run of this config"):
        _train(test_model_dir, out)
    assert (out / "checkpoints" / "step-00000002" / "COMPLETE").exists()


@pytest.mark.parametrize("mistake", ["model", "data"])
def test_a_run_that_fails_before_it_starts_leaves_nothing_behind(test_model_dir, tmp_path, mistake):
    out = tmp_path / "out"
    wrong = {"model": {"model": str(tmp_path / "tiny-typo")}, "data": {"data": str(tmp_path / "missing.jsonl")}}[mistake]
    with pytest.raises((ModelError, DataError)):
        finetune(**{**SETTINGS, "model": test_model_dir, "data": reversal_records(12), **wrong, "output_dir": str(out)})
    assert not out.exists()
    assert _train(test_model_dir, out).metrics["steps"] == 4  # the corrected run is not "a different run"


@pytest.mark.parametrize("change, message", [
    ({"optimizer": "sgd"}, "was trained with `optimizer: adamw`; its checkpoints hold that optimizer's state, so "
                           "resume with `optimizer: adamw`"),
    ({"method": "dora"}, "holds a different run (`method: dora`, where it trained with `method: lora`)"),
    ({"data": reversal_records(12, seed=9)}, "the training data changed since the checkpoints in "),
])
def test_a_refused_resume_leaves_the_run_record_as_it_was(test_model_dir, tmp_path, change, message):
    out = tmp_path / "out"
    _train(test_model_dir, out, max_steps=2)
    before = _snapshot(out)
    with pytest.raises(CheckpointError) as info:
        _train(test_model_dir, out, resume=True, **change)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert _snapshot(out) == before
    assert _train(test_model_dir, out, resume=True).metrics["steps"] == 4  # the original config still resumes


def test_output_dir_expands_the_home_folder(test_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    result = _train(test_model_dir, "~/runs/x", max_steps=1, save_steps=0)
    assert (tmp_path / "home" / "runs" / "x" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "~").exists()
    assert result.output_dir == str(tmp_path / "home" / "runs" / "x")


def test_what_an_export_wrote_belongs_to_the_run(test_model_dir, tmp_path):
    out = tmp_path / "out"
    result = _train(test_model_dir, out, max_steps=1, save_steps=0)
    result.export("merged")
    assert "merged" in json.loads((out / "ftmagic_run.json").read_text())["files"]
    # Replacing the run removes its export too, instead of refusing `merged/` as a user's folder.
    _train(test_model_dir, out, max_steps=1, save_steps=0, method="dora", overwrite=True)
    assert not (out / "merged").exists()


def test_a_run_that_failed_before_any_checkpoint_is_started_again_by_the_same_config(test_model_dir, tmp_path):
    """A `$function` metric that fails at step 0 left only the run record: the corrected re-run was told
    to resume a run with nothing to continue from."""
    out = tmp_path / "out"

    def crash(event):
        if event.kind == "step":
            raise RuntimeError("a metric failed")

    with pytest.raises(RuntimeError):
        _train(test_model_dir, out, on_event=crash, save_steps=0)
    assert (out / "ftmagic_run.json").exists() and not (out / "checkpoints").exists()
    result = _train(test_model_dir, out, save_steps=0)
    assert result.metrics["steps"] == 4 and result.metrics["reason"] == "finished"

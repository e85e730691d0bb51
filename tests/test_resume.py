"""Exact resume: a run stopped and resumed ends with the same losses as one that never stopped."""

import json
import os
import signal
import threading
import time

import pytest
import torch

from ftmagic.engine.run import finetune

from engine_helpers import StopAt, reversal_records, step_losses

SETTINGS = dict(method="lora", max_steps=8, batch_size=3, grad_accum=2, lr=2e-2, lora_r=4, lora_alpha=8,
                lora_dropout=0.1,  # dropout draws from the RNG, so RNG state must be restored
                save_steps=3, eval_steps=2, warmup=2, scheduler="cosine", seed=7)


def _run(model, out, **extra):
    events = []
    stop = extra.pop("stop", None)

    def on_event(event):
        events.append(event.to_dict())
        if stop is not None:
            stop(event)

    result = finetune(model=model, data=reversal_records(20), eval_data=reversal_records(5, seed=3),
                      output_dir=str(out), on_event=on_event, stop=stop, **{**SETTINGS, **extra})
    return result, events


@pytest.fixture(scope="module")
def straight(test_model_dir, tmp_path_factory):
    return _run(test_model_dir, tmp_path_factory.mktemp("straight") / "out")


def test_stop_then_resume_matches_an_uninterrupted_run(test_model_dir, tmp_path, straight):
    full_result, full_events = straight
    reference = step_losses(full_events)
    assert sorted(reference) == list(range(1, 9))

    stopped, first_events = _run(test_model_dir, tmp_path / "out", stop=StopAt(5))
    assert stopped.metrics["stopped"] is True and stopped.metrics["reason"] == "stopped"
    assert stopped.metrics["steps"] == 5
    assert first_events[-1]["event"] == "end" and first_events[-1]["reason"] == "stopped"
    assert any(e["event"] == "checkpoint" and e["step"] == 5 for e in first_events)

    resumed, second_events = _run(test_model_dir, tmp_path / "out", resume=True)
    start = next(e for e in second_events if e["event"] == "start")
    assert start["resumed_from_step"] == 5
    after = step_losses(second_events)
    assert sorted(after) == [6, 7, 8]
    for step in (6, 7, 8):
        assert after[step] == pytest.approx(reference[step], abs=1e-5)
    assert resumed.metrics["train_loss"] == pytest.approx(full_result.metrics["train_loss"], abs=1e-5)
    assert resumed.metrics["eval_loss"] == pytest.approx(full_result.metrics["eval_loss"], abs=1e-5)
    assert resumed.metrics["trained_tokens"] == full_result.metrics["trained_tokens"]
    # The history spans the whole run, not only the part after the resume.
    assert [e["step"] for e in resumed.history if e["event"] == "step"] == list(range(1, 9))


def test_interrupt_saves_a_checkpoint_and_resumes_exactly(test_model_dir, tmp_path, straight):
    reference = step_losses(straight[1])

    def interrupt(event):
        if event.kind == "step" and event.step == 4:
            raise KeyboardInterrupt

    events = []

    def on_event(event):
        events.append(event.to_dict())
        interrupt(event)

    result = finetune(model=test_model_dir, data=reversal_records(20), eval_data=reversal_records(5, seed=3),
                      output_dir=str(tmp_path / "out"), on_event=on_event, **SETTINGS)
    assert result.metrics["reason"] == "interrupted" and result.metrics["stopped"] is True
    assert (tmp_path / "out" / "checkpoints" / "step-00000004" / "COMPLETE").is_file()
    assert (tmp_path / "out" / "checkpoints" / "step-00000004" / "adapter_model.safetensors").is_file()
    state = json.loads((tmp_path / "out" / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert (state["step"], state["epoch"], state["batch_index"], state["order_seed"]) == (4, 1, 1, 7)

    resumed, second = _run(test_model_dir, tmp_path / "out", resume=True)
    after = step_losses(second)
    assert sorted(after) == [5, 6, 7, 8]
    for step in after:
        assert after[step] == pytest.approx(reference[step], abs=1e-5)


def test_an_interrupt_in_the_middle_of_a_step_resumes_exactly(test_model_dir, tmp_path, straight, monkeypatch):
    """Ctrl-C during step 5's forward, after its dropout masks were drawn: the checkpoint of
    step 4 keeps the random states step 5 started from, so the resumed run draws them again."""
    import torch.nn.functional as F

    reference = step_losses(straight[1])
    attention, calls = F.scaled_dot_product_attention, []

    def interrupted_attention(*args, **kwargs):
        if calls and torch.is_grad_enabled():  # training, not the evaluation at step 4
            calls.append(1)
            if len(calls) > 3:  # a few attention calls (and their layers' dropout draws) into step 5
                raise KeyboardInterrupt
        return attention(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", interrupted_attention)
    result = finetune(model=test_model_dir, data=reversal_records(20), eval_data=reversal_records(5, seed=3),
                      output_dir=str(tmp_path / "out"), **SETTINGS,
                      on_event=lambda event: calls.append(1) if event.kind == "step" and event.step == 4 else None)
    assert result.metrics["reason"] == "interrupted" and result.metrics["steps"] == 4 and len(calls) == 4
    monkeypatch.setattr(F, "scaled_dot_product_attention", attention)
    _, second = _run(test_model_dir, tmp_path / "out", resume=True)
    after = step_losses(second)
    assert sorted(after) == [5, 6, 7, 8]
    for step in after:
        assert after[step] == pytest.approx(reference[step], abs=1e-5)


MAIN_THREAD_ONLY = pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                                      reason="signals reach the main thread only")


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler for the test, as in a terminal or a notebook: a process started in the
    background of a shell (`pytest &`) inherits SIGINT ignored, and Python then installs none."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@MAIN_THREAD_ONLY
def test_an_interrupt_during_the_update_waits_for_it_to_end(python_sigint):
    from ftmagic.engine.loop import interrupts_deferred

    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the signal is handled here, and waits
            done.append("the whole update")
    assert done == ["the whole update"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's own handler is back


@MAIN_THREAD_ONLY
def test_a_held_interrupt_goes_to_the_handler_that_was_there(monkeypatch):
    """A multi-process run turns the first Ctrl-C into a Stop (its own handler); an ignored SIGINT
    stays ignored; an error inside keeps going out; a second Ctrl-C does not wait."""
    from ftmagic.engine.loop import interrupts_deferred

    seen = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert seen == []  # held
        assert seen == [signal.SIGINT]  # then given to the run's own handler, no KeyboardInterrupt

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN

        signal.signal(signal.SIGINT, signal.default_int_handler)
        with pytest.raises(MemoryError):  # not replaced by the held interrupt
            with interrupts_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                raise MemoryError("out of memory in the update")
        steps = []
        with pytest.raises(KeyboardInterrupt):
            with interrupts_deferred():
                with interrupts_deferred():  # nested: the outer block holds
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(0.05)
                    steps.append("held once")
                    os.kill(os.getpid(), signal.SIGINT)  # asked twice: at once
                    time.sleep(0.05)
                    steps.append("never")
        assert steps == ["held once"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)

@MAIN_THREAD_ONLY
def test_an_interrupt_while_a_checkpoint_is_written_keeps_that_checkpoint(test_model_dir, tmp_path, straight,
                                                                           monkeypatch, python_sigint):
    """Ctrl-C while step 3's periodic checkpoint is being written: the write ends, the run stops
    with it (it used to be cut short and the stop wrote none, leaving nothing to resume)."""
    from ftmagic.engine import checkpoint as ckpt

    reference = step_losses(straight[1])
    fsync, sent = ckpt._fsync_file, []

    def interrupted_fsync(path):
        if not sent and "step-00000003" in str(path):
            sent.append(path)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the signal is handled here, in the middle of the write
        return fsync(path)

    monkeypatch.setattr(ckpt, "_fsync_file", interrupted_fsync)
    result, events = _run(test_model_dir, tmp_path / "out")
    assert sent and result.metrics["reason"] == "interrupted" and result.metrics["steps"] == 3
    assert (tmp_path / "out" / "checkpoints" / "step-00000003" / "COMPLETE").is_file()
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [3]
    monkeypatch.setattr(ckpt, "_fsync_file", fsync)
    _, second = _run(test_model_dir, tmp_path / "out", resume=True)
    after = step_losses(second)
    assert sorted(after) == [4, 5, 6, 7, 8]
    assert all(after[s] == pytest.approx(reference[s], abs=1e-5) for s in after)



def test_resume_without_checkpoint_starts_over(test_model_dir, tmp_path):
    result, events = _run(test_model_dir, tmp_path / "out", resume=True, max_steps=2)
    messages = [e["text"] for e in events if e["event"] == "message"]
    assert any(m.startswith("no checkpoint in") and m.endswith("starting from step 0") for m in messages)
    assert result.metrics["steps"] == 2


def test_resuming_a_finished_run_changes_nothing_unless_it_has_more_steps_to_go(test_model_dir, tmp_path):
    """`resume: true` on a finished run loaded its last checkpoint, ran the final evaluation again
    (a second eval point at the last step in every tracker) and rewrote the outputs."""
    out = tmp_path / "out"
    first, _ = _run(test_model_dir, out, max_steps=2, save_steps=2, eval_steps=2)
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again, events = _run(test_model_dir, out, max_steps=2, save_steps=2, eval_steps=2, resume=True)
    assert [e["event"] for e in events] == ["message", "end"]
    assert events[0]["text"] == ("this run already finished (2 of 2 steps); resume changes nothing: raise `max_steps` "
                                 "or `epochs` to train on, or run it without `resume: true` to train it again from step 0")
    assert events[1]["reason"] == "finished" and events[1]["metrics"] == first.metrics == again.metrics
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == written
    # `merge: true` added on resume: the run's end goes again to write the merged model (Colab's resume-and-merge).
    _run(test_model_dir, out, max_steps=2, save_steps=2, eval_steps=2, resume=True, merge=True)
    assert (out / "merged" / "config.json").is_file()
    # More steps than it ran: it continues from its last checkpoint, as before.
    longer, events = _run(test_model_dir, out, max_steps=3, save_steps=2, eval_steps=2, resume=True)
    assert next(e for e in events if e["event"] == "start")["resumed_from_step"] == 2
    assert sorted(step_losses(events)) == [3] and longer.metrics["steps"] == 3


def test_a_longer_resume_of_a_finished_run_follows_the_longer_schedule(test_model_dir, tmp_path):
    # The finished run's cosine schedule ended at 0; raised to 8 steps, steps 5-8 learn at the rates of an 8-step
    # schedule instead of applying the saved 0.
    from ftmagic.engine.loop import lr_factor

    out = tmp_path / "out"
    _run(test_model_dir, out, max_steps=4, save_steps=4, eval_steps=0, warmup=0)
    _, events = _run(test_model_dir, out, max_steps=8, save_steps=4, eval_steps=0, warmup=0, resume=True)
    rates = {e["step"]: e["lr"] for e in events if e["event"] == "step"}
    assert sorted(rates) == [5, 6, 7, 8]
    peak = SETTINGS["lr"]
    assert rates == pytest.approx({s: peak * lr_factor(s - 1, kind="cosine", warmup_steps=0, total_steps=8)
                                   for s in rates})
    assert rates[5] > 0.25 * peak  # the saved schedule had ended at 0


def test_qlora_resume_is_exact_too(test_model_dir, tmp_path):
    settings = dict(method="qlora", max_steps=4, save_steps=0, eval_steps=0)
    _, straight_events = _run(test_model_dir, tmp_path / "a", **settings)
    _run(test_model_dir, tmp_path / "b", stop=StopAt(2), **settings)
    _, resumed_events = _run(test_model_dir, tmp_path / "b", resume=True, **settings)
    reference, after = step_losses(straight_events), step_losses(resumed_events)
    assert sorted(after) == [3, 4]
    assert all(after[s] == pytest.approx(reference[s], abs=1e-5) for s in after)

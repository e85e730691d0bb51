"""Sweeps on Optuna: one run folder per trial, failed and skipped trials, pruning, resume, the CLI and the magic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine_helpers import StopAt, collect, reversal_records
from ftmagic.engine.sweep import SweepResult, pruned_message, sweep, trial_fit_problem
from ftmagic.textprogress import format_trial_line

BASE = dict(method="lora", batch_size=4, lr=1e-2, lora_r=4, save_steps=0, seed=5, max_steps=2, eval_steps=0)


def _sweep(model, out, block, **extra):
    on_event, events = collect()
    settings = {**BASE, "data": reversal_records(12), "eval_data": reversal_records(4, seed=2), **extra}
    return sweep(model=model, output_dir=str(out), sweep=block, on_event=on_event, **settings), events


def test_a_grid_gives_one_run_folder_per_trial_and_the_best_one(test_model_dir, tmp_path):
    result, events = _sweep(test_model_dir, tmp_path / "s", {"lr": [1e-3, 1e-2], "lora_r": [2, 4]})
    trials = [e for e in events if e["event"] == "trial" and e["state"] != "running"]
    assert len(trials) == 4 and {t["state"] for t in trials} == {"complete"}
    assert sorted((t["params"]["lr"], t["params"]["lora_r"]) for t in trials) == \
        [(1e-3, 2), (1e-3, 4), (1e-2, 2), (1e-2, 4)]
    for t in trials:
        folder = Path(t["output_dir"])
        assert folder.parent == tmp_path / "s" and folder.name == f"trial-{t['number']:03d}"
        saved = json.loads((folder / "metrics.json").read_text())
        assert saved["eval_loss"] == t["value"]
        assert json.loads((folder / "ftmagic_run.json").read_text())["finished"]
    best = min(trials, key=lambda t: t["value"])
    assert (result.best_number, result.best_value, result.best_params) == (best["number"], best["value"], best["params"])
    assert result.best.metrics["eval_loss"] == best["value"] and result.best.config.lr == best["params"]["lr"]
    end = events[-1]
    assert end["event"] == "sweep_end" and end["counts"] == {"complete": 4} and end["best_number"] == best["number"]
    summary = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert len(summary["trials"]) == 4 and summary["best"]["number"] == best["number"] and summary["finished"]
    assert (tmp_path / "s" / "sweep.optuna.log").exists()
    cell = result.best_cell({"model": "m", "data": "$records", "sweep": {"lr": [1e-3, 1e-2]}})
    assert cell.startswith("%%finetune --name ft\nmodel: m\ndata: $records\n") and f"lora_r: {best['params']['lora_r']}" in cell
    loaded = SweepResult.load(tmp_path / "s")
    assert loaded.best_params == result.best_params and len(loaded.table()) == 4
    assert len(loaded.study.trials) == 4  # Optuna's own view of the same storage


def test_a_crashed_trial_is_recorded_and_the_sweep_goes_on(test_model_dir, tmp_path):
    # BitFit on a Llama (no biases) fails at load time: one line, the next trial runs.
    result, events = _sweep(test_model_dir, tmp_path / "s", {"method": ["bitfit", "lora"], "sampler": "grid"})
    ended = {e["params"]["method"]: e for e in events if e["event"] == "trial" and e["state"] != "running"}
    assert ended["bitfit"]["state"] == "failed" and "`method: bitfit` trains bias terms" in ended["bitfit"]["message"]
    assert ended["lora"]["state"] == "complete" and result.best_params == {"method": "lora"}
    assert events[-1]["counts"] == {"failed": 1, "complete": 1}


def test_trials_that_will_not_fit_are_skipped_before_they_start(test_model_dir, tmp_path, monkeypatch):
    from ftmagic.engine import sweep as sweep_module
    from ftmagic.engine.device import DeviceCaps

    t4 = DeviceCaps(cuda_available=True, name="T4", compute_capability=(7, 5), total_memory=15 * 2**30)
    assert trial_fit_problem(_cfg(test_model_dir, max_seq_len=64), t4) is None
    problem = trial_fit_problem(_cfg(test_model_dir, max_seq_len=512, batch_size=4096), DeviceCaps(
        cuda_available=True, name="small", compute_capability=(8, 0), total_memory=2 * 2**30, bf16_supported=True))
    assert problem.startswith("does not fit this GPU")
    assert trial_fit_problem(_cfg(test_model_dir, batch_size=4096), DeviceCaps()) is None  # no GPU: nothing to check

    small = DeviceCaps(cuda_available=True, name="small", compute_capability=(8, 0), total_memory=2 * 2**30,
                       bf16_supported=True)
    monkeypatch.setattr(sweep_module, "detect_caps", lambda: small)  # the run itself still trains on the CPU
    result, events = _sweep(test_model_dir, tmp_path / "s", {"batch_size": [4, 4096]})
    ended = {e["params"]["batch_size"]: e for e in events if e["event"] == "trial" and e["state"] != "running"}
    assert ended[4096]["state"] == "skipped" and ended[4096]["message"].startswith("does not fit this GPU")
    assert not Path(ended[4096]["output_dir"]).exists()  # never started
    assert ended[4]["state"] == "complete" and result.best_params == {"batch_size": 4}


def _cfg(model, **changes):
    from ftmagic.config import FinetuneConfig

    return FinetuneConfig(model=model, **{**BASE, **changes})


def test_a_trial_behind_the_median_is_pruned(test_model_dir, tmp_path):
    # One prompt: each evaluation calls the metric once; steps 0 (base), 2 and 4 per trial.
    script = [0.0, 0.5, 0.6,  0.0, 0.5, 0.6,  0.0, 0.1,  0.0, 0.5, 0.7]
    calls = iter(script)

    def scripted(prediction, reference):
        return next(calls)

    result, events = _sweep(test_model_dir, tmp_path / "s", {"lr": [1e-3, 2e-3, 3e-3, 4e-3]},
                            eval_data=None, eval_prompts=reversal_records(1, seed=4), eval_metrics=[scripted],
                            max_steps=4, eval_steps=2, save_steps=0)
    ended = [e for e in events if e["event"] == "trial" and e["state"] != "running"]
    assert [e["state"] for e in ended] == ["complete", "complete", "pruned", "complete"]
    assert ended[2]["curve"] == [[0, 0.0], [2, 0.1]]
    assert ended[2]["message"] == ("pruned at step 2: scripted 0.1 trails the median of earlier trials there "
                                   "(below it; higher is better)")
    assert json.loads((Path(ended[2]["output_dir"]) / "metrics.json").read_text())["steps"] == 2
    assert result.best_value == 0.7 and result.metric == "scripted" and result.direction == "maximize"


def test_the_pruning_message_follows_the_metric_direction():
    # It said "below the median" for eval_loss too, where a pruned trial's loss is above it.
    assert pruned_message(4, "eval_loss", 2.5, "minimize") == (
        "pruned at step 4: eval_loss 2.5 trails the median of earlier trials there (above it; lower is better)")
    assert "(below it; higher is better)" in pruned_message(4, "exact_match", 0.2, "maximize")


def test_a_stopped_sweep_resumes_its_trial_from_the_checkpoint(test_model_dir, tmp_path):
    out = tmp_path / "s"
    block = {"lr": [1e-3, 1e-2]}
    stop = StopAt(1)
    on_event, events = collect()

    def listen(event):
        stop(event)
        on_event(event)

    settings = {**BASE, "data": reversal_records(12), "eval_data": reversal_records(4, seed=2), "max_steps": 3}
    first = sweep(model=test_model_dir, output_dir=str(out), sweep=block, on_event=listen, stop=stop, **settings)
    assert events[-1]["reason"] == "stopped" and first.best_number is None
    stopped = next(e for e in events if e["event"] == "trial" and e["state"] == "stopped")
    assert (Path(stopped["output_dir"]) / "checkpoints").is_dir()

    again, events = _sweep(test_model_dir, out, block, max_steps=3)
    assert any(e["event"] == "message" and "continues from its checkpoint" in e["text"] for e in events)
    resumed = next(e for e in events if e["event"] == "start")
    assert resumed["resumed_from_step"] == 1
    ended = [e for e in events if e["event"] == "trial" and e["state"] != "running"]
    assert ended[0]["output_dir"] == stopped["output_dir"] and ended[0]["params"] == stopped["params"]
    # The trial that takes over runs under a new number in the stopped one's folder, and says so.
    started = next(e for e in events if e["event"] == "trial" and e["state"] == "running")
    assert started["message"] == f"continues trial {stopped['number']} in {stopped['output_dir']}"
    assert format_trial_line(started).endswith(f"; continues trial {stopped['number']} in {stopped['output_dir']}")
    assert [e["state"] for e in ended] == ["complete", "complete"]
    assert again.summary["counts"] == {"stopped": 1, "complete": 2} and len(again.trials) == 3

    # The same sweep once more: nothing left to run.
    third, events = _sweep(test_model_dir, out, block, max_steps=3)
    assert not [e for e in events if e["event"] == "trial"] and third.best_number == again.best_number


def test_a_killed_process_leaves_a_trial_that_the_next_run_continues(test_model_dir, tmp_path):
    class Killed(BaseException):
        pass

    def kill_at_step_2(event):
        if event.kind == "step" and event.step == 2:
            raise Killed

    out = tmp_path / "s"
    settings = {**BASE, "data": reversal_records(12), "eval_data": reversal_records(4, seed=2), "max_steps": 3,
                "save_steps": 1}
    with pytest.raises(Killed):
        sweep(model=test_model_dir, output_dir=str(out), sweep={"lr": [1e-3]}, on_event=kill_at_step_2, **settings)
    on_event, events = collect()
    result = sweep(model=test_model_dir, output_dir=str(out), sweep={"lr": [1e-3]}, on_event=on_event, **settings)
    assert next(e for e in events if e["event"] == "start")["resumed_from_step"] in (1, 2)
    assert result.best_number is not None and result.summary["counts"] == {"interrupted": 1, "complete": 1}


def test_output_dir_protection(test_model_dir, tmp_path):
    from ftmagic.errors import CheckpointError, ConfigError

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"is not empty and holds no sweep"):
        _sweep(test_model_dir, tmp_path / "busy", {"lr": [1e-3]})
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    _sweep(test_model_dir, tmp_path / "s", {"lr": [1e-3]}, max_steps=1)
    with pytest.raises(CheckpointError, match=r"holds a different sweep"):
        _sweep(test_model_dir, tmp_path / "s", {"lr": [2e-3]}, max_steps=1)
    result, _ = _sweep(test_model_dir, tmp_path / "s", {"lr": [2e-3]}, max_steps=1, overwrite=True)
    assert result.best_params == {"lr": 2e-3} and len(result.trials) == 1
    with pytest.raises(ConfigError, match=r"use `ftmagic.sweep\(...\)`, `ftmagic sweep CONFIG.yaml`"):
        from ftmagic.engine.run import finetune

        finetune(model=test_model_dir, data=reversal_records(4), val_split=0.5, sweep={"lr": [1e-3]},
                 output_dir=str(tmp_path / "x"))


def test_cli_sweep(test_model_dir, tmp_path, capsys):
    from ftmagic.cli import main

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in reversal_records(12)))
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {test_model_dir}\ndata: {data}\nval_split: 0.25\nmax_steps: 1\nbatch_size: 4\n"
                      f"save_steps: 0\noutput_dir: {tmp_path / 's'}\nsweep:\n  lora_r: [2, 4]\n")
    assert main(["sweep", str(config), "--quiet", "--set", "sweep.n_trials=1"]) == 0
    out = capsys.readouterr().out
    assert "trial 0/1 complete: lora_r=" in out and "sweep finished: best trial 0 (eval_loss" in out
    assert f"%%finetune --name ft\nmodel: {test_model_dir}\ndata: {data}\n" in out
    assert (tmp_path / "s" / "best.yaml").read_text().startswith(f"model: {test_model_dir}\n")
    assert len(json.loads((tmp_path / "s" / "sweep.json").read_text())["trials"]) == 1

    config.write_text(f"model: {test_model_dir}\ndata: {data}\nval_split: 0.25\nsweep:\n  lora_r: [2, 4]\n"
                      "  sampler: bayes\n")
    assert main(["sweep", str(config)]) == 2
    assert capsys.readouterr().err == (f"ftmagic: error: {config}:6: `sweep.sampler: bayes` is not accepted; "
                                       "use one of grid, random, tpe\n")
    config.write_text(f"model: {test_model_dir}\ndata: {data}\n")
    assert main(["sweep", str(config)]) == 2
    assert "there is no `sweep:` block" in capsys.readouterr().err


def test_finetune_cell_with_a_sweep_block_binds_the_best_run(test_model_dir, tmp_path, capsys):
    from IPython.core.interactiveshell import InteractiveShell

    from ftmagic.engine.result import RunResult

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "ftmagic")
    shell.user_ns["records"] = reversal_records(12)
    try:
        shell.run_cell_magic("finetune", "--progress text --name tuned --max-steps 1",
                             f"model: {test_model_dir}\ndata: $records\nval_split: 0.25\nbatch_size: 4\n"
                             f"save_steps: 0\noutput_dir: {tmp_path / 's'}\nsweep:\n  lora_r: [2, 4]\n")
        out = capsys.readouterr().out
        best, everything = shell.user_ns["tuned"], shell.user_ns["tuned_sweep"]
        assert isinstance(best, RunResult) and best.output_dir == next(
            t["output_dir"] for t in everything.trials if t["number"] == everything.best_number)
        assert "best configuration, ready to run as a cell:\n%%finetune --name tuned\n" in out
        assert "data: $records" in out and "max_steps: '1'" not in out
        assert f"best run (trial {everything.best_number}) bound to `tuned`; every trial in `tuned_sweep`" in out
    finally:
        shell.run_line_magic("unload_ext", "ftmagic")


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_random_and_tpe_sample_ranges(test_model_dir, tmp_path, sampler):
    block = {"lr": {"log_uniform": [1e-4, 1e-2]}, "lora_r": {"int": [2, 8], "step": 2}, "n_trials": 2,
             "sampler": sampler}
    result, events = _sweep(test_model_dir, tmp_path / "s", block, max_steps=1)
    ended = [e for e in events if e["event"] == "trial" and e["state"] != "running"]
    assert [e["state"] for e in ended] == ["complete", "complete"]
    for e in ended:
        assert 1e-4 <= e["params"]["lr"] <= 1e-2 and e["params"]["lora_r"] in (2, 4, 6, 8)
        assert json.loads((Path(e["output_dir"]) / "config.yaml").read_text().split("lora_r: ")[1].split("\n")[0]) \
            == e["params"]["lora_r"]
    assert len({e["params"]["lr"] for e in ended}) == 2


def test_more_trials_continue_a_finished_study(test_model_dir, tmp_path):
    """`--set sweep.n_trials=4` after 2 finished trials: the 2 are kept and 2 more run (the trial
    count is how long a search runs, not which search it is)."""
    block = {"lr": [1e-3, 1e-2], "lora_r": [2, 4], "n_trials": 2}
    first, _ = _sweep(test_model_dir, tmp_path / "s", block)
    assert len(first.table()) == 2
    more, events = _sweep(test_model_dir, tmp_path / "s", {**block, "n_trials": 4})
    ran = [e for e in events if e["event"] == "trial" and e["state"] == "complete"]
    assert len(ran) == 2 and len(more.table()) == 4
    assert sorted((r["lr"], r["lora_r"]) for r in more.table()) == [(1e-3, 2), (1e-3, 4), (1e-2, 2), (1e-2, 4)]

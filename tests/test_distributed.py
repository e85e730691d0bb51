"""The same run on two CPU processes (gloo), started by accelerate's notebook_launcher.

A run of several processes forks the process that starts it, as notebook_launcher forks a
kernel. These tests fork from one clean interpreter (``clean``: spawned once for the module,
no thread but its own) rather than from the test process: a pytest-xdist worker has an I/O
thread, and a fork taken while it held a lock once left both forked processes waiting on it
forever. The forked processes still share what that interpreter imported and start in well
under a second. FSDP and DeepSpeed run
through accelerate on GPUs only (its FSDP plugin refuses a machine without an
accelerator, and its CPU processes always use DDP); their settings are tested in
test_strategies.py, their runs in test_engine_gpu.py where CUDA is present.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import pytest

import ftmagic
from ftmagic.engine import distributed
from ftmagic.engine.checkpoint import list_checkpoints, read_checkpoint
from ftmagic.errors import CheckpointError, DistributedError

from engine_helpers import collect, reversal_records, step_losses

# Packed tiny batches and no dropout: every difference left is float rounding of the summed gradients.
SETTINGS = dict(method="lora", lora_r=4, lora_dropout=0.0, lr=2e-2, batch_size=8, grad_accum=2, max_steps=4,
                save_steps=0, eval_steps=2, val_split=0.25, seed=3, max_seq_len=64)


def _run(test_model_dir, output_dir, **overrides):
    on_event, events = collect()
    settings = {**SETTINGS, "model": test_model_dir, "data": reversal_records(30), **overrides}
    result = ftmagic.finetune(output_dir=str(output_dir), on_event=on_event, **settings)
    return result, events


def _launch(test_model_dir, output_dir, **overrides):
    """``_run`` in the clean interpreter: the run's metrics and events (what pickles back)."""
    result, events = _run(test_model_dir, output_dir, **overrides)
    return result.metrics, events


CLEAN_TIMEOUT_S = 300


class CleanInterpreter:
    """One spawned interpreter, in a process group of its own, that runs this file's functions.

    A call that has not returned after ``CLEAN_TIMEOUT_S`` kills the interpreter and the
    processes it forked (the whole group) and fails its test; the next call starts a new one.
    """

    def __init__(self) -> None:
        self.pool = self.group = None

    def __call__(self, function, *args, **kwargs):
        if self.pool is None:
            self.pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=os.setsid)
            self.group = self.pool.submit(os.getpid).result(timeout=120)  # the worker leads its own group
        future = self.pool.submit(function, *args, **kwargs)
        try:
            return future.result(timeout=CLEAN_TIMEOUT_S)
        except TimeoutError:
            self.close(kill=True)
            pytest.fail(f"{function.__name__} did not end within {CLEAN_TIMEOUT_S} s; its processes were killed")

    def close(self, kill: bool = False) -> None:
        if self.pool is None:
            return
        if kill:
            try:
                os.killpg(self.group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.pool.shutdown(wait=not kill, cancel_futures=True)
        self.pool = self.group = None


@pytest.fixture(scope="module")
def clean():
    """``clean(function, *args)`` calls a module-level function of this file in a spawned interpreter."""
    interpreter = CleanInterpreter()
    yield interpreter
    interpreter.close()


def _eval_losses(events) -> dict:
    return {e["step"]: e["eval_loss"] for e in events if e["event"] == "eval"}


def test_two_processes_of_batch_4_end_with_the_losses_of_one_process_of_batch_8(test_model_dir, tmp_path, clean):
    one, one_events = _run(test_model_dir, tmp_path / "one")
    two_metrics, two_events = clean(_launch, test_model_dir, tmp_path / "two", processes=2)

    assert two_metrics["processes"] == 2 and two_metrics["distributed"] == "ddp"
    single, double = step_losses(one_events), step_losses(two_events)
    assert sorted(double) == [1, 2, 3, 4]
    for step in single:
        assert double[step] == pytest.approx(single[step], abs=1e-4)
    # evaluation is split across the processes and summed back
    assert _eval_losses(two_events) == pytest.approx(_eval_losses(one_events), abs=1e-4)
    assert two_metrics["trained_tokens"] == one.metrics["trained_tokens"]
    # one process wrote the outputs, the adapter the single process would have written
    from safetensors.torch import load_file

    a, b = (load_file(str(p / "adapter_model.safetensors")) for p in (tmp_path / "one", tmp_path / "two"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    # the widget's events: one stream, from the first process, in the single-process order
    kinds = [e["event"] for e in two_events]
    assert kinds[0] == "plan" and kinds[-1] == "end" and kinds.count("start") == 1
    plan = two_events[0]
    assert plan["processes"] == 2 and plan["distributed"] == "ddp"


def test_a_checkpoint_resumes_on_another_number_of_processes(test_model_dir, tmp_path, clean):
    settings = dict(save_steps=2, save_total_limit=0, eval_steps=0, val_split=0.0)
    _, reference = _run(test_model_dir, tmp_path / "reference", **settings)
    reference = step_losses(reference)

    for first, then in ((2, 1), (1, 2)):
        out = tmp_path / f"from-{first}-to-{then}"
        clean(_launch, test_model_dir, out, processes=first, **settings)
        # as if the run had stopped after step 2: its later checkpoint is gone
        shutil.rmtree(out / "checkpoints" / "step-00000004")
        assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000002"]
        metrics, events = clean(_launch, test_model_dir, out, processes=then, resume=True, **settings)
        resumed = step_losses(events)
        assert sorted(resumed) == [3, 4], (first, then)
        for step in resumed:
            assert resumed[step] == pytest.approx(reference[step], abs=1e-4), (first, then, step)
        assert metrics["steps"] == 4


def _stopped_at_step_2(test_model_dir, output_dir):
    stop = threading.Event()

    def on_event(event):
        if event.kind == "step" and event.step == 2:
            stop.set()  # the widget's Stop button sets this event in the notebook's process

    settings = {**SETTINGS, "model": test_model_dir, "data": reversal_records(30), "max_steps": 40, "eval_steps": 0}
    return ftmagic.finetune(output_dir=str(output_dir), processes=2, stop=stop, on_event=on_event, **settings).metrics


def test_stop_reaches_every_process_and_they_save_the_same_step(test_model_dir, tmp_path, clean):
    metrics = clean(_stopped_at_step_2, test_model_dir, tmp_path / "out")
    assert metrics["stopped"] and metrics["reason"] == "stopped"
    assert 2 <= metrics["steps"] < 40
    newest = list_checkpoints(tmp_path / "out" / "checkpoints")[-1]
    assert json.loads((newest / "state.json").read_text())["step"] == metrics["steps"]
    # every process's random state travels with the checkpoint
    assert len(read_checkpoint(newest).states["rank_rngs"]) == 2


def _rank_1_fails_at_its_second_step(test_model_dir, output_dir):
    real = distributed.Ranks.optimizer_step
    calls = {"n": 0}

    def fail_on_rank_1(self, *args, **kwargs):
        calls["n"] += 1  # counted per process (each has its own copy after the fork)
        if self.rank == 1 and calls["n"] == 2:
            raise ValueError("rank one broke on purpose")
        return real(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(distributed.Ranks, "optimizer_step", fail_on_rank_1)
        _run(test_model_dir, output_dir, processes=2, max_steps=40, eval_steps=0)


def test_a_process_that_raises_ends_the_run_with_one_line_naming_it(test_model_dir, tmp_path, clean):
    started = time.monotonic()
    with pytest.raises(DistributedError) as info:
        clean(_rank_1_fails_at_its_second_step, test_model_dir, tmp_path / "out")
    assert str(info.value) == "rank 1 of 2 failed: ValueError: rank one broke on purpose"
    assert "\n" not in str(info.value)
    assert "fail_on_rank_1" in info.value.details  # the failing process's traceback travels with the error
    assert time.monotonic() - started < 60  # the other process did not wait for it


def test_the_same_mistake_on_every_process_is_the_mistake(test_model_dir, tmp_path, clean):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="is not empty and was not written by ftmagic"):
        clean(_launch, test_model_dir, busy, processes=2)
    assert (busy / "notes.txt").read_text() == "mine"


def _rank_1_loss_nan_from_its_fifth_batch(test_model_dir, output_dir):
    real = distributed.Ranks.forward
    calls = {"n": 0}

    def nan_on_rank_1(self, batch):
        loss, metrics = real(self, batch)
        calls["n"] += 1
        return (loss * float("nan") if self.rank == 1 and calls["n"] >= 5 else loss), metrics

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(distributed.Ranks, "forward", nan_on_rank_1)
        return _launch(test_model_dir, output_dir, processes=2, max_steps=40, eval_steps=0, save_steps=2)[0]


def test_a_nan_loss_on_one_process_stops_every_process(test_model_dir, tmp_path, clean):
    metrics = clean(_rank_1_loss_nan_from_its_fifth_batch, test_model_dir, tmp_path / "out")
    # every process stopped at the NaN step and kept the weights of the last finite checkpoint
    assert (metrics["reason"], metrics["steps"]) == ("nonfinite", 2)
    # the NaN step was not saved over the last good checkpoint
    assert [p.name for p in list_checkpoints(tmp_path / "out" / "checkpoints")] == ["step-00000002"]


def test_early_stopping_is_decided_together(test_model_dir, tmp_path, clean):
    settings = dict(eval_steps=1, early_stopping_patience=1, lr=0.5, max_steps=12)  # a large lr soon stops improving
    one, _ = _run(test_model_dir, tmp_path / "one", **settings)
    two, _ = clean(_launch, test_model_dir, tmp_path / "two", processes=2, **settings)
    assert one.metrics["reason"] == "early_stopping"
    assert (two["reason"], two["steps"]) == (one.metrics["reason"], one.metrics["steps"])
    assert two["best_eval_loss"] == pytest.approx(one.metrics["best_eval_loss"], abs=1e-4)


def _answering_prompts(test_model_dir, output_dir, prompts, log):
    """A two-process run that evaluates by generation; each process logs how many prompts it answers."""
    from ftmagic.engine import generation

    real = generation.generate_batch

    def counting(model, tokenizer, texts, **kwargs):
        with open(log, "a") as f:  # one line per call, from whichever process makes it
            f.write(f"{os.getpid()} {len(texts)}\n")
        return real(model, tokenizer, texts, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(generation, "generate_batch", counting)
        return _launch(test_model_dir, output_dir, processes=2, eval_prompts=prompts, eval_steps=2,
                       eval_max_new_tokens=4)


def test_evaluation_by_generation_is_split_between_the_processes(test_model_dir, tmp_path, clean):
    from ftmagic.engine.result import RunResult

    prompts = reversal_records(7, seed=5)
    log = tmp_path / "answered.txt"
    metrics, events = clean(_answering_prompts, test_model_dir, tmp_path / "out", prompts, log)
    calls = [line.split() for line in log.read_text().splitlines()]
    assert len({pid for pid, _ in calls}) == 2
    # each evaluation (steps 0, 2 and 4): one process answered 4 prompts, the other 3
    assert sorted(int(n) for _, n in calls) == [3, 3, 3, 4, 4, 4]
    tables = [e for e in events if e["event"] == "generations"]
    assert [t["step"] for t in tables] == [0, 2, 4] and all(t["total"] == 7 for t in tables)
    # the last table is what the saved run answers (test_generation_eval.py checks the gathered
    # order with answers that all differ; these tiny answers may all be alike)
    assert [r["prompt"] for r in tables[-1]["rows"]] == [p["prompt"] for p in prompts[:len(tables[-1]["rows"])]]
    result = RunResult.load(str(tmp_path / "out"))
    rows = result.compare([r["prompt"] for r in tables[-1]["rows"]], max_new_tokens=4)
    assert [r["answer"] for r in tables[-1]["rows"]] == [r["tuned"] for r in rows]
    assert metrics["eval_metrics"]["exact_match"] == tables[-1]["metrics"]["exact_match"]


def _what_a_forked_process_can_collect(test_model_dir, output_dir, log):
    """A two-process launch whose processes, instead of training, list what their collector sees."""
    import gc

    import ftmagic.engine.run as run

    def probe(cfg, on_event=None, stop=None):
        names = sorted({type(o).__name__ for o in gc.get_objects() if "elastic" in type(o).__module__})
        with open(log, "a") as f:
            f.write(" ".join(names or ["nothing"]) + "\n")
        raise ftmagic.DataError("probed")

    from ftmagic.engine.launch import run_processes

    cfg = run.resolve_config(None, {**SETTINGS, "model": test_model_dir, "data": reversal_records(30),
                                    "output_dir": str(output_dir), "processes": 2})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run, "finetune", probe)  # what each forked process calls (launch._rank_main)
        with pytest.raises(DistributedError, match="probed"):
            run_processes(cfg)


def test_a_forked_process_never_collects_what_the_launch_built_before_the_fork(test_model_dir, tmp_path, clean):
    # The launcher thread builds torch.elastic's agent and store after run_processes froze the
    # collector; a forked process that collected them once waited forever in a destructor.
    log = tmp_path / "collectable.txt"
    clean(_what_a_forked_process_can_collect, test_model_dir, tmp_path / "out", log)
    assert log.read_text().splitlines() == ["nothing", "nothing"]


def _close_then_free_the_model(folder: str, cycles: int) -> None:
    """Two forked processes end a DDP run as ftmagic's does (a collective, the last barrier,
    ``Ranks.close``), then let go of their ``Ranks``: ``cycles`` times over."""
    import torch.multiprocessing as torch_mp

    torch_mp.start_processes(_close_cycles, args=(folder, cycles), nprocs=2, start_method="fork")


def _close_cycles(rank: int, folder: str, cycles: int) -> None:
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.sched_setaffinity(0, {rank % os.cpu_count()})  # one core each: the race is lost every time
    for cycle in range(cycles):
        dist.init_process_group("gloo", init_method=f"file://{folder}/store-{cycle}", rank=rank, world_size=2)
        ranks = distributed.Ranks.__new__(distributed.Ranks)  # only what barrier and close touch
        # Attributes set in the order that frees the handle before the model when the object goes.
        ranks._last_barrier = None
        ranks.accelerator = SimpleNamespace(free_memory=lambda: None)
        ranks.wrapped = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 8))
        ranks.wrapped(torch.randn(4, 8)).sum().backward()
        dist.all_reduce(torch.ones(1))  # the collective before the barrier, on a tensor Python owns
        ranks.barrier()
        assert ranks._last_barrier.is_completed()
        ranks.close()
        del ranks  # the model (whose DDP reducer held the group) went in close(); the handle goes now


def test_the_group_is_freed_while_the_last_barrier_is_held(clean, tmp_path):
    # A gloo thread frees a finished barrier if it holds the last reference, and freeing it takes
    # the GIL; the group's destructor, run on this thread holding the GIL, waits for that thread.
    # With neither the handle kept by Ranks.barrier nor the model freed in close(), this hung in
    # the first cycles (both processes waiting for ever); with the handle kept but the model freed
    # after it (the attribute order here), too.
    clean(_close_then_free_the_model, str(tmp_path), 20)


def test_batch_smaller_than_the_process_count_is_refused(test_model_dir, tmp_path):
    with pytest.raises(ftmagic.ConfigError, match=r"`batch_size: 1` is split across 2 processes"):
        _run(test_model_dir, tmp_path / "out", processes=2, batch_size=1)  # refused before anything forks


# ----------------------------------------------------------------------------- the CLI


def _cli_config(tmp_path, model_dir, body=""):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in reversal_records(24)))
    path = tmp_path / "run.yaml"
    base = (f"model: {model_dir}\ndata: {data}\nmethod: lora\nmax_steps: 3\nbatch_size: 4\nlora_r: 2\n"
            f"lora_dropout: 0.0\nsave_steps: 0\neval_steps: 0\noutput_dir: {tmp_path / 'out'}\n")
    given = {line.split(":", 1)[0] for line in body.splitlines()}  # ``body`` replaces those keys: each is given once
    path.write_text("".join(line + "\n" for line in base.splitlines() if line.split(":", 1)[0] not in given) + body)
    return path


def _cli_two_processes_with(tmp_path, model_dir, sitecustomize: str):
    """`ftmagic train --processes 2` where every interpreter first runs ``sitecustomize`` (the
    launched ones too: they find it on PYTHONPATH)."""
    folder = tmp_path / "inject"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(sitecustomize)
    return _cli(["train", str(_cli_config(tmp_path, model_dir)), "--processes", "2"], env_path=str(folder))


def _cli(args, env_path=None, cwd=None, script=None):
    """`ftmagic ...` in a fresh interpreter (a launch starts its processes as new interpreters too);
    ``script``, a file that calls ``ftmagic.cli.main``, runs instead of ``python -m ftmagic.cli``."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    paths = [p for p in (env_path, root, os.environ.get("PYTHONPATH")) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), OMP_NUM_THREADS="1")
    command = [sys.executable, str(script)] if script else [sys.executable, "-m", "ftmagic.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


@pytest.mark.parametrize("strategy,files", [("auto", {"accelerate_config.yaml"}),
                                            ("deepspeed_zero3", {"accelerate_config.yaml", "deepspeed_config.json"})])
def test_print_accelerate_config_writes_what_processes_n_uses(test_model_dir, tmp_path, capsys, strategy, files):
    import yaml

    from ftmagic.cli import main

    path = _cli_config(tmp_path, test_model_dir, f"method: full\ndistributed: {strategy}\n")
    folder = tmp_path / "launch"
    assert main(["train", str(path), "--processes", "8", "--set", "batch_size=8", "--print-accelerate-config",
                 str(folder)]) == 0
    assert {p.name for p in folder.iterdir()} == files
    config = yaml.safe_load((folder / "accelerate_config.yaml").read_text())
    assert config["num_processes"] == 8
    out = capsys.readouterr().out
    assert f"# launch: accelerate launch --config_file {folder / 'accelerate_config.yaml'} -m ftmagic.cli train" in out
    if strategy == "auto":  # full fine-tuning on GPUs: FSDP, with its settings from ftmagic/strategies.py
        assert config["distributed_type"] == "FSDP" and config["fsdp_config"]["fsdp_use_orig_params"] is True
        assert not (tmp_path / "out").exists()  # printing trains nothing
    else:
        ds = json.loads((folder / "deepspeed_config.json").read_text())
        assert config["deepspeed_config"]["deepspeed_config_file"] == str((folder / "deepspeed_config.json").resolve())
        assert ds["zero_optimization"]["stage"] == 3 and ds["train_batch_size"] == 8  # micro-batch 1 on 8 processes


def test_print_accelerate_config_needs_several_processes(test_model_dir, tmp_path, capsys):
    from ftmagic.cli import main

    path = _cli_config(tmp_path, test_model_dir)
    assert main(["train", str(path), "--print-accelerate-config", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == ("ftmagic: error: --print-accelerate-config: set `--processes N` "
                                               "(N > 1) or `processes: N` in the config")


@pytest.mark.slow
def test_cli_processes_2_trains_like_one_process(test_model_dir, tmp_path):
    path = _cli_config(tmp_path, test_model_dir)
    done = _cli(["train", str(path), "--processes", "2"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("cpu fp32 x 2 processes (ddp)") == 1  # one process prints
    assert done.stdout.strip().splitlines()[-1].startswith("finished after 3 steps")
    two = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (two["processes"], two["distributed"], two["steps"]) == (2, "ddp", 3)
    on_event, events = collect()
    ftmagic.finetune(str(path), output_dir=str(tmp_path / "one"), on_event=on_event)  # the same file, one process
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    launched = {h["step"]: h["loss"] for h in history if h["event"] == "step"}
    assert launched == pytest.approx(step_losses(events), abs=1e-4)


@pytest.mark.slow
def test_cli_a_failing_process_is_one_line_naming_it(test_model_dir, tmp_path):
    # The process of rank 1 fails at its first step.
    done = _cli_two_processes_with(
        tmp_path, test_model_dir,
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import ftmagic.engine.distributed as d\n"
        "    def broken(self, *args, **kwargs):\n"
        "        raise ftmagic.errors.DataError('row 7 of rank 1 is broken')\n"
        "    import ftmagic.errors\n"
        "    d.Ranks.optimizer_step = broken\n")
    assert done.returncode == 2
    assert done.stderr.strip() == "ftmagic: error: rank 1 of 2 failed: row 7 of rank 1 is broken"


def test_cli_processes_without_data_says_so_once_before_any_process_starts(test_model_dir, tmp_path, capsys):
    from ftmagic.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(f"model: {test_model_dir}\nmethod: lora\noutput_dir: {tmp_path / 'out'}\n")
    assert main(["train", str(path), "--processes", "2"]) == 2
    assert capsys.readouterr().err.strip() == ("ftmagic: error: `data` is not set: give a file path, a Hugging Face "
                                               "dataset id or a list of records")
    assert not (tmp_path / "out").exists()


def test_launched_processes_import_the_launchers_ftmagic_unless_every_interpreter_has_it(tmp_path):
    from ftmagic.engine.launch import process_script

    clone, site_packages = str(tmp_path / "clone"), str(tmp_path / "site-packages")
    assert f"for folder in [{clone!r}]:" in process_script(clone, [site_packages])
    assert "for folder in []:" in process_script(site_packages, [site_packages])  # found there anyway
    # by default: the folder this ftmagic came from, against this process's own path
    assert process_script() == process_script(os.path.dirname(os.path.dirname(ftmagic.__file__)))


def test_an_error_file_in_torchs_string_form_still_names_the_process():
    from types import SimpleNamespace

    from ftmagic.engine.launch import _cli_failure

    failures = {1: SimpleNamespace(error_file_data={"message": "RuntimeError: boom", "timestamp": 1}, exitcode=1,
                                   timestamp=1),
                0: SimpleNamespace(error_file_data={"message": "<NONE>"}, exitcode=-15, timestamp=2)}
    error = _cli_failure(SimpleNamespace(failures=failures), 2)
    assert str(error) == "rank 1 of 2 failed: RuntimeError: boom"


@pytest.mark.slow
def test_cli_processes_2_from_a_folder_holding_a_folder_named_ftmagic(test_model_dir, tmp_path):
    # `python -m` would put this folder first on the launched processes' sys.path, where this
    # `ftmagic` shadows the real one (as a clone of the repository does an editable install).
    (tmp_path / "ftmagic").mkdir()
    (tmp_path / "ftmagic" / "__init__.py").write_text("raise ImportError('the wrong ftmagic')\n")
    starter = tmp_path / "bin" / "start.py"  # the parent itself runs as a console script does: not from here
    starter.parent.mkdir()
    starter.write_text("import sys\nfrom ftmagic.cli import main\nsys.exit(main())\n")
    path = _cli_config(tmp_path, test_model_dir)
    done = _cli(["train", str(path), "--processes", "2"], cwd=tmp_path, script=starter)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["processes"] == 2


@pytest.mark.slow
def test_cli_a_process_that_cannot_import_ftmagic_names_the_import_error(test_model_dir, tmp_path):
    done = _cli_two_processes_with(
        tmp_path, test_model_dir,
        "import os, sys\n"
        "if os.environ.get('RANK'):  # the launched processes only\n"
        "    sys.modules['ftmagic.cli'] = None\n")
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"ftmagic: error: rank [01] of 2 failed: ModuleNotFoundError: import of ftmagic.cli halted; "
                        r"None in sys.modules", last), done.stderr[-3000:]
    assert done.stderr.count("Traceback (most recent call last)") == 1  # the failing process's, once


# ----------------------------------------------------------------------------- %%finetune --processes N


def _cell_stopped_from_its_widget(test_model_dir, output_dir):
    """A ``%%finetune --processes 2`` cell's run whose widget's Stop button is clicked at step 2."""
    from test_magics_engine import body

    from ftmagic.widgets.finetune import CellReporter, build_config, flag_overrides, parse_line, run_with_reporter
    from ftmagic.widgets.finetune import FinetuneMagics

    args = parse_line(FinetuneMagics.finetune, "--processes 2 --max-steps 40")
    config = build_config(body(test_model_dir, output_dir), flag_overrides(args), {"records": reversal_records(16)})
    holder = {}

    def click_stop_at_step_2(event):
        if event.kind == "step" and event.step == 2:
            holder["reporter"].widget.button.click()  # the widget lives in this process; the training does not

    reporter = CellReporter("widget", on_event=click_stop_at_step_2)
    holder["reporter"] = reporter
    result = run_with_reporter(config, reporter)
    reporter.finish(result, "ft")
    return dict(processes=config.processes, stop_set=reporter.stop.is_set(), metrics=result.metrics,
                last_step=reporter.state.last_step.step, plan_processes=reporter.state.plan.processes,
                html=reporter.widget.summary_bundle(result.metrics)["text/html"])


def test_finetune_cell_on_two_processes_feeds_one_widget_and_its_stop_reaches_every_process(test_model_dir, tmp_path,
                                                                                             clean):
    from ftmagic.engine.result import RunResult

    cell = clean(_cell_stopped_from_its_widget, test_model_dir, tmp_path / "cell")
    assert cell["processes"] == 2
    assert cell["stop_set"]
    metrics = cell["metrics"]
    assert metrics["reason"] == "stopped" and metrics["processes"] == 2
    assert cell["last_step"] == metrics["steps"] >= 2
    assert cell["plan_processes"] == 2
    assert "stopped" in cell["html"] and "--resume" in cell["html"]
    result = RunResult.load(str(tmp_path / "cell"))  # the result is read back from output_dir
    assert result.generate("reverse: abc", max_new_tokens=2) is not None


@pytest.mark.slow
def test_a_kernel_forks_two_processes_and_a_front_end_stop_click_reaches_them(test_model_dir, tmp_path):
    """A real kernel: %%finetune --processes 2 after a one-process run, clicked from the front end."""
    ipykernel = pytest.importorskip("ipykernel")
    if int(ipykernel.__version__.split(".")[0]) < 7:
        pytest.skip("routing widget messages during a running cell needs ipykernel 7 subshells")
    from test_magics_engine import Kernel, StopClicker, body, bound_to_ft

    kernel = Kernel(tmp_path)
    clicker = StopClicker(kernel)  # also keeps what the widget showed (its header names the processes)

    try:
        kernel.setup()
        # A one-process run first: its libraries (bitsandbytes among them) are loaded in the kernel.
        out = kernel.execute("%%finetune --max-steps 1 --progress none --name first\n" + body(test_model_dir, tmp_path / "a"))
        assert "Error" not in out, out
        cell = "%%finetune --processes 2 --max-steps 5000 --progress widget\n" + body(test_model_dir, tmp_path / "b")
        out = kernel.execute(cell, on_message=clicker)
        assert clicker.sent, out
        assert any("x 2 processes (ddp)" in text for text in clicker.widget_texts), clicker.widget_texts[:3]
        assert "Launching training" not in out
        assert bound_to_ft(out) and "run the cell again with `--resume`" in out, out
        report = kernel.execute("print(ft.metrics['reason'], ft.metrics['processes'], ft.metrics['steps'])").split()
        assert report[:2] == ["stopped", "2"] and int(report[2]) < 5000
    finally:
        kernel.close()

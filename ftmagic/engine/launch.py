"""Start the processes of a multi-process run through accelerate's launchers, and report them as one.

Two launchers, for the two ways a run starts:

* :func:`run_processes` (``finetune(..., processes=N)``, ``%%finetune --processes N``):
  ``accelerate.notebook_launcher`` forks N processes from this one, as Kaggle's 2xT4
  notebooks do, so a notebook's in-memory data needs no copying. The first process's
  events cross back as dicts (``Event.to_dict`` / ``event_from_dict``) and reach
  ``on_event`` here, on this thread, so a notebook's live widget is fed exactly as by a
  one-process run; Stop (or the kernel's interrupt) sets an event every process shares,
  and the processes agree on it at their next logging step.
* :func:`run_cli_processes` (``ftmagic train run.yaml --processes N``): accelerate's
  ``launch`` command runs ``ftmagic train`` in N new interpreters (torchrun underneath),
  with the accelerate config that ``--print-accelerate-config`` writes.

Either way, when a process fails, the others are ended by the launcher and the caller
gets one line naming the process and its error (:class:`~ftmagic.errors.DistributedError`);
when every process failed with the same mistake (say, a refused ``output_dir``), that
mistake's own error.

What a kernel needs for the fork: CUDA must not be initialised in it yet (no GPU cell
has run), since CUDA cannot be shared with forked processes. On a machine without CUDA
the check accelerate makes for that (bitsandbytes imported, which touches CUDA on a GPU
machine) does not apply and is skipped, so CPU processes can follow one-process runs in
the same kernel.

Example::

    result = run_processes(cfg.replace(processes=2), on_event=print)
    # or from a shell:  ftmagic train run.yaml --processes 2
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import queue as queue_module
import sys
import tempfile
import threading
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

from ftmagic.errors import ConfigError, DistributedError, FtmagicError
from ftmagic.events import event_from_dict

LAUNCHED_ENV = "FTMAGIC_LAUNCHED"  # set for processes started by ftmagic: their launcher reports their errors
POLL_SECONDS = 0.1  # how often the waiting process checks Stop while no event arrives


# ----------------------------------------------------------------------------- failures


def one_line(exc: BaseException) -> str:
    """An error as one line: an ftmagic error's own message, else ``Type: first line``."""
    if isinstance(exc, FtmagicError):
        return str(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def failure_record(exc: BaseException, rank: int, world: int) -> dict:
    """What a failing process tells its launcher (plain values: it crosses a process boundary)."""
    from ftmagic.engine.distributed import is_peer_failure

    return {"rank": rank, "world": world, "type": type(exc).__name__, "message": one_line(exc),
            "peer": is_peer_failure(exc), "agreed": bool(getattr(exc, "agreed", False)),
            "details": "".join(traceback.format_exception(exc))[-20000:]}


def failure_error(records: list, world: int, fallback: str = "") -> FtmagicError:
    """The one error to raise for a run whose processes failed (``records`` in arrival order).

    Example::

        >>> str(failure_error([{"rank": 1, "world": 2, "type": "ValueError", "message": "ValueError: bad row",
        ...                     "peer": False, "details": ""}], 2))
        'rank 1 of 2 failed: ValueError: bad row'
    """
    import ftmagic.errors as errors

    own = [r for r in records if not r.get("peer")]
    agreed = [r for r in own if r.get("agreed") and hasattr(errors, r["type"])]
    if agreed:
        # An error every process reached together (a refused output_dir, a NaN loss): the run's own
        # error, as one process would have raised it; the launcher may have ended the others first.
        return getattr(errors, agreed[0]["type"])(agreed[0]["message"])
    if own:
        first = own[0]
        # A user's mistake is its one line; anything else (a bug) keeps the failing process's traceback.
        details = "" if hasattr(errors, first["type"]) else first.get("details", "")
        return DistributedError(f"rank {first['rank']} of {world} failed: {first['message']}", details)
    if records:
        first = records[0]
        return DistributedError(f"rank {first['rank']} of {world} lost its connection to the others: "
                                f"{first['message']}", first.get("details", ""))
    return DistributedError(f"a process of the run failed: {fallback or 'it exited without saying why'}")


# ----------------------------------------------------------------------------- notebook_launcher (fork)


def check_fork_safe(processes: int, *, cuda_available: bool, cuda_initialized: bool, gpus: int) -> None:
    """Refuse, in one line, a fork that cannot work (pure, so it is tested without a GPU)."""
    if cuda_available and cuda_initialized:
        raise ConfigError(f"`processes: {processes}` forks this process, and CUDA is already in use in it (a GPU "
                          "cell ran before); restart the kernel and run the multi-process cell first, or use "
                          "`ftmagic train CONFIG.yaml --processes N` from a shell")
    if cuda_available and processes > gpus:
        raise ConfigError(f"`processes: {processes}` but {gpus} GPU{'s' if gpus != 1 else ''} are visible; "
                          f"use `processes: {gpus}` (one process per GPU)")


def run_processes(cfg, *, on_event: Optional[Callable] = None, stop=None):
    """Train ``cfg`` on ``cfg.processes`` processes forked by ``accelerate.notebook_launcher``.

    ``on_event`` receives the first process's events on this thread; ``stop`` (anything with
    ``is_set()``) and Ctrl-C here stop every process after the step they agree on. Returns the
    :class:`~ftmagic.engine.result.RunResult` read back from ``output_dir``.
    """
    import torch
    from accelerate.utils import is_cuda_available
    from accelerate.utils.other import get_free_port

    cuda = is_cuda_available()  # NVML-based: does not initialise CUDA in this process
    with _nvml_check():
        gpus = torch.cuda.device_count() if cuda else 0
    check_fork_safe(cfg.processes, cuda_available=cuda, cuda_initialized=cuda and torch.cuda.is_initialized(),
                    gpus=gpus)
    if not cuda:
        # Forked processes share what this one imported: on a CPU machine (where these imports touch
        # no GPU) importing the model libraries once here saves every process doing it again.
        import peft  # noqa: F401
        import transformers  # noqa: F401
    # A launch leaves torch.elastic's rendezvous store (whose server thread lives in this process)
    # waiting for garbage collection; a forked copy that collected it would wait forever for a
    # thread it does not have. So garbage is collected here, and what remains is frozen: the
    # forked processes' collector never looks at objects they inherited (Python's gc.freeze).
    # What the launch itself creates after this point is frozen again in each forked process
    # (_rank_main).
    gc.collect()
    gc.freeze()
    context = multiprocessing.get_context("fork")
    channel, shared_stop = context.Queue(), context.Event()
    outcome: dict = {}

    def launch() -> None:
        from accelerate import notebook_launcher

        try:
            with _quiet_launcher(cuda):
                notebook_launcher(_rank_main, args=(cfg, channel, shared_stop), num_processes=cfg.processes,
                                  use_port=str(get_free_port()))
        except BaseException as exc:  # reported by the waiting thread below
            outcome["error"] = exc

    thread = threading.Thread(target=launch, name="ftmagic-launcher", daemon=True)
    thread.start()
    try:
        failures = _pump(channel, thread, on_event or (lambda event: None), stop, shared_stop)
    finally:
        gc.unfreeze()
    if failures or "error" in outcome:
        error = outcome.get("error")
        raise failure_error(failures, cfg.processes, one_line(error) if error is not None else "") from None
    from ftmagic.engine.result import RunResult

    return RunResult.load(cfg.output_dir)


def _pump(channel, thread: threading.Thread, on_event: Callable, stop, shared_stop) -> list:
    """Feed the first process's events to ``on_event`` until the launch ends; pass Stop on. Returns failures."""
    failures, interrupted = [], False
    while True:
        try:
            if stop is not None and stop.is_set():
                shared_stop.set()
            try:
                kind, payload = channel.get(timeout=POLL_SECONDS)
            except queue_module.Empty:
                if not thread.is_alive():
                    break
                continue
            if kind == "event":
                on_event(event_from_dict(payload))
            elif kind == "failure":
                failures.append(payload)
        except KeyboardInterrupt:
            # The kernel's interrupt reaches this process only: it becomes a Stop for every process,
            # which then save a checkpoint; a second interrupt stops waiting.
            if interrupted:
                raise
            interrupted = True
            shared_stop.set()
    thread.join()
    return failures


def _rank_main(cfg, channel, shared_stop) -> None:
    """One forked process: run the config; the first process sends its events, any process its failure."""
    from ftmagic.engine.distributed import launch_info
    from ftmagic.engine.run import finetune

    # Everything inherited, including what the launcher thread built after run_processes froze
    # the collector (the elastic agent, its store), is frozen here too: collecting it in this
    # copy once left a process waiting forever in a destructor for a thread it does not have.
    gc.freeze()
    _quiet_process()
    info = launch_info()

    def send(event) -> None:
        channel.put(("event", event.to_dict()))

    try:
        finetune(cfg, on_event=send, stop=shared_stop)
    except BaseException as exc:
        channel.put(("failure", failure_record(exc, info.rank, info.world)))
        raise
    finally:
        channel.close()
        channel.join_thread()  # everything sent has left this process before it ends


def _quiet_process() -> None:
    """A forked process says nothing on the notebook's streams: its events and errors travel as messages."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(devnull, fd)
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)


@contextmanager
def _nvml_check():
    """Count GPUs through NVML, which does not initialise CUDA in this process (it will fork)."""
    previous = os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
        else:
            os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = previous


class _ThreadMuted:
    """A stream that drops what one thread writes (accelerate's launcher prints "Launching training on
    N CUDAs", also for CPU processes; the run's own plan line says where it runs)."""

    def __init__(self, stream, thread: threading.Thread) -> None:
        self._stream, self._thread = stream, thread

    def write(self, text: str) -> int:
        if threading.current_thread() is self._thread:
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextmanager
def _quiet_launcher(cuda: bool):
    """Around notebook_launcher: its print and torch.elastic's log lines stay out of the cell (the
    failure, if any, is reported as one line); without CUDA, its bitsandbytes check is skipped."""
    import accelerate.launchers as launchers

    loggers = [logging.getLogger(name) for name in ("torch.distributed.elastic", "torch.multiprocessing")]
    levels, stdout = [logger.level for logger in loggers], sys.stdout
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    sys.stdout = _ThreadMuted(stdout, threading.current_thread())
    check = launchers.are_libraries_initialized
    if not cuda:
        launchers.are_libraries_initialized = lambda *names: []
    try:
        yield
    finally:
        launchers.are_libraries_initialized = check
        if isinstance(sys.stdout, _ThreadMuted):
            sys.stdout = stdout
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


# ----------------------------------------------------------------------------- accelerate launch (CLI)


# What each launched process runs. A script, not ``python -m ftmagic.cli``: ``-m`` puts the current
# folder first on sys.path, and a folder there named ``ftmagic`` (a clone of the repository, say)
# shadows an editable install, so every process failed at its first import. A script puts its own
# folder first instead (the launch's temporary folder, which holds nothing else importable), then
# the folder this process imported ftmagic from (unless every interpreter finds it anyway), so
# every process runs the same ftmagic as the launcher. If ftmagic cannot be
# imported at all, the process still leaves the launcher its error in torch.elastic's error file,
# so the one line names it.
PROCESS_SCRIPT_NAME = "ftmagic_launched_process.py"
_PROCESS_SCRIPT = '''"""One process of `ftmagic train --processes N` (written by ftmagic.engine.launch)."""
import os
import sys

for folder in FOLDERS:
    sys.path.insert(1, folder)
try:
    from ftmagic.cli import main
except BaseException as exc:
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        raise
    ErrorHandler().record_exception(exc)
    sys.exit(1)
sys.exit(main())
'''


def process_script(package_folder: Optional[str] = None, search_path: Optional[list] = None) -> str:
    """The script each launched process runs (see ``PROCESS_SCRIPT_NAME``): it imports ftmagic from
    ``package_folder`` (default: where this process has it). That folder is added to its path
    unless it is on ``search_path`` already (default: this process's path after its first entry,
    the script's or current folder: site-packages, PYTHONPATH), which a launched process has too.

    Example::

        >>> "for folder in ['/src/ftmagic-clone']:" in process_script("/src/ftmagic-clone", [])
        True
    """
    folder = os.path.realpath(package_folder or str(Path(__file__).resolve().parents[2]))
    known = {os.path.realpath(p) for p in (sys.path[1:] if search_path is None else search_path) if p}
    return _PROCESS_SCRIPT.replace("FOLDERS", repr([] if folder in known else [folder]))


def run_cli_processes(config_path: str, child_args: list, accelerate_yaml: str, processes: int) -> None:
    """``ftmagic train CONFIG --processes N``: accelerate's launcher runs ``ftmagic train`` N times.

    ``accelerate_yaml`` is the config that ``--print-accelerate-config`` prints; ``child_args``
    the ``train`` arguments each process gets. Raises the one-line error of a failed process.
    """
    from accelerate.commands.launch import launch_command, launch_command_parser
    from accelerate.utils.other import get_free_port

    with tempfile.TemporaryDirectory(prefix="ftmagic-launch-") as folder:
        config_file = Path(folder) / "accelerate_config.yaml"
        config_file.write_text(accelerate_yaml, encoding="utf-8")
        script = Path(folder) / PROCESS_SCRIPT_NAME
        script.write_text(process_script(), encoding="utf-8")
        argv = ["--config_file", str(config_file), "--num_processes", str(processes),
                "--main_process_port", str(get_free_port()), str(script), "train", config_path, *child_args]
        args = launch_command_parser().parse_args(argv)
        os.environ[LAUNCHED_ENV] = "1"
        elastic = logging.getLogger("torch.distributed.elastic")
        level = elastic.level
        elastic.setLevel(logging.CRITICAL)  # its report of a failure is replaced by the one line below
        try:
            launch_command(args)
        except Exception as exc:
            error = _cli_failure(exc, processes)
            if getattr(error, "details", ""):
                print(error.details.rstrip(), file=sys.stderr)  # a bug keeps its traceback, as in one process
            raise error from None
        finally:
            os.environ.pop(LAUNCHED_ENV, None)
            elastic.setLevel(level)


def _cli_failure(exc: Exception, world: int) -> FtmagicError:
    """The failing processes' own records (their error files), as :func:`failure_error` reads them."""
    failures = getattr(exc, "failures", None)
    if not failures:
        return failure_error([], world, one_line(exc))
    import ftmagic.errors as errors

    records = []
    for rank, failure in sorted(failures.items(), key=lambda item: getattr(item[1], "timestamp", 0)):
        data = getattr(failure, "error_file_data", None) or {}
        if isinstance(data, dict) and isinstance(data.get("ftmagic"), dict):
            records.append(data["ftmagic"])  # written by record_cli_failure
            continue
        message = (data.get("message") or {}) if isinstance(data, dict) else {}
        # torch writes {"message": {"message": ..., "extraInfo": ...}}, or the message as a string
        # ("<NONE>" when nothing was recorded).
        text = message.get("message") if isinstance(message, dict) else (message if message != "<NONE>" else None)
        if not text:  # no record: ended by the launcher or by a broken connection, not its own fault
            records.append({"rank": rank, "world": world, "type": "", "peer": True, "details": "",
                            "message": f"exit code {getattr(failure, 'exitcode', '?')}"})
            continue
        kind, _, rest = text.partition(": ")
        extra = (message.get("extraInfo") or {}) if isinstance(message, dict) else {}
        records.append({"rank": rank, "world": world, "type": kind, "peer": False,
                        "details": str(extra.get("py_callstack") or "") if isinstance(extra, dict) else "",
                        "message": rest if hasattr(errors, kind) and rest else text})
    return failure_error(records, world)


def record_cli_failure(exc: BaseException) -> None:
    """In a launched ``ftmagic train`` process: leave the launcher a record of this process's own error.

    It goes into torch.elastic's error file (``TORCHELASTIC_ERROR_FILE``), in torch's format
    plus the record :func:`failure_error` reads; a broken connection to a process that died
    is not recorded, so the launcher names the process that failed first.
    """
    import json
    import time

    from ftmagic.engine.distributed import is_peer_failure, launch_info

    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if is_peer_failure(exc) or not path:
        return
    info = launch_info()
    record = failure_record(exc, info.rank, info.world)
    data = {"message": {"message": f"{type(exc).__name__}: {exc}",
                        "extraInfo": {"py_callstack": record["details"], "timestamp": str(int(time.time()))}},
            "ftmagic": record}
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle)


__all__ = ["LAUNCHED_ENV", "PROCESS_SCRIPT_NAME", "check_fork_safe", "failure_error",
           "failure_record", "one_line", "record_cli_failure", "run_cli_processes", "run_processes"]

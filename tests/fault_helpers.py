"""Fault injection for tests: die like a killed process at a chosen file-system operation.

``in_child(fn)`` runs ``fn`` in a forked copy of the test process and returns its exit
status; ``kill_at(k, torn=...)`` (used inside the child) patches the operations a
checkpoint write performs so the k-th one ends the process with ``os._exit`` (no
cleanup, no ``finally``, exactly like SIGKILL), optionally after leaving the file it was
writing half-written. ``count_operations(fn)`` counts those operations in a dry run.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

KILLED = 137

needs_fork = pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin",
                                reason="fault injection forks the test process (Linux only)")


CHILD_TIMEOUT_S = 300


def in_child(fn, timeout_s: float = CHILD_TIMEOUT_S) -> int:
    """Run ``fn()`` in a forked child; its exit status (0 when it returned).

    A child that has not ended after ``timeout_s`` is killed and the test fails: a fork from a
    process with other threads (a pytest-xdist worker) can inherit a lock nobody will release,
    and that must fail the test, not hang the suite.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        try:
            fn()
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the forked child did not end within {timeout_s:.0f} s and was killed")
        time.sleep(0.02)


class _Ops:
    """Wraps the operations a checkpoint write performs; the k-th one kills the process."""

    def __init__(self, kill_at=None, torn=False):
        self.count, self.kill_at, self.torn, self.names = 0, kill_at, torn, []

    def wrap(self, name, real, path_arg=None):
        ops = self

        def op(*args, **kwargs):
            index = ops.count
            ops.count += 1
            ops.names.append(name)
            if index == ops.kill_at and not ops.torn:
                os._exit(KILLED)
            result = real(*args, **kwargs)
            if index == ops.kill_at and ops.torn:
                target = path_arg(args, kwargs) if path_arg else None
                if target is not None and os.path.isfile(target):
                    size = os.path.getsize(target)
                    with open(target, "r+b") as handle:
                        handle.truncate(size // 2)
                os._exit(KILLED)
            return result

        return op


@contextmanager
def operations(kill_at=None, torn=False):
    """Patch file writes, fsyncs, renames and removals; yields the counter."""
    import safetensors.torch

    ops = _Ops(kill_at, torn)
    saved = {"save_file": safetensors.torch.save_file, "write_text": Path.write_text, "replace": os.replace,
             "fsync": os.fsync, "rmtree": shutil.rmtree, "mkdir": Path.mkdir}
    safetensors.torch.save_file = ops.wrap("save_file", saved["save_file"], lambda a, k: a[1] if len(a) > 1 else k.get("filename"))
    Path.write_text = ops.wrap("write_text", saved["write_text"], lambda a, k: a[0])
    os.replace = ops.wrap("replace", saved["replace"])
    os.fsync = ops.wrap("fsync", saved["fsync"])
    shutil.rmtree = ops.wrap("rmtree", saved["rmtree"])
    Path.mkdir = ops.wrap("mkdir", saved["mkdir"])
    try:
        yield ops
    finally:
        safetensors.torch.save_file = saved["save_file"]
        Path.write_text = saved["write_text"]
        os.replace = saved["replace"]
        os.fsync = saved["fsync"]
        shutil.rmtree = saved["rmtree"]
        Path.mkdir = saved["mkdir"]


def count_operations(fn) -> list:
    """The operations ``fn`` performs, in order (run in a child so nothing it writes matters)."""
    read, write = os.pipe()

    def child():
        os.close(read)
        with operations() as ops:
            fn()
        os.write(write, pickle.dumps(ops.names))
        os.close(write)

    status = in_child(child)
    os.close(write)
    with os.fdopen(read, "rb") as handle:
        data = handle.read()
    assert status == 0, "the dry run failed"
    return pickle.loads(data)


class Planted:
    """A pickle that, when unpickled, creates a folder: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def plant_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(Planted(marker)))

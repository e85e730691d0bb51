"""One run per ``output_dir`` at a time: a lock file that names its holder.

``<output_dir>/.ftmagic-lock`` is created with ``O_CREAT | O_EXCL`` (atomic on local
and network filesystems alike) and holds the holder's pid, host, process start time and
the time the run started. A second run on the same folder is refused with a line naming
the first. A lock whose holder is gone is taken over: on the same host when the pid is
dead (or now belongs to another process), from another host (a Colab session that
dropped, with the folder on Drive) when the holder stopped refreshing the lock's
modification time, which a live holder does every :data:`HEARTBEAT_S` seconds.

Written by hand because no dependency offers this: ``filelock`` releases on process
death but cannot say who holds a lock, and flock() does not cross hosts on network
filesystems.

Example::

    lock = RunLock.acquire("runs/a")      # CheckpointError if another run holds it
    try:
        ...                               # train
    finally:
        lock.release()
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from ftmagic.errors import CheckpointError

LOCK_NAME = ".ftmagic-lock"
HEARTBEAT_S = 30.0  # how often a live holder touches its lock
STALE_AFTER_S = 180.0  # a lock from another host untouched this long is taken over


def _process_start(pid: int) -> Optional[float]:
    """The start time of process ``pid`` (None when there is no such process or it cannot be told)."""
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except ImportError:
        return None
    except Exception:  # psutil.NoSuchProcess and friends
        return None


def _alive(pid: int) -> bool:
    try:
        import psutil

        return psutil.pid_exists(pid)
    except ImportError:
        pass
    if os.name != "posix":
        return True  # no safe probe (os.kill would end the process on Windows): trust the heartbeat
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def holder_is_alive(info: dict, lock_mtime: float, now: Optional[float] = None) -> bool:
    """Whether the run described by a lock file still runs (pure except for the pid probe).

    Example::

        holder_is_alive({"pid": 1, "host": "elsewhere"}, lock_mtime=time.time())   # True: fresh heartbeat
    """
    now = time.time() if now is None else now
    if info.get("host") != socket.gethostname():
        return now - lock_mtime < STALE_AFTER_S
    pid = info.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return now - lock_mtime < STALE_AFTER_S  # unreadable: trust only a fresh heartbeat
    if not _alive(pid):
        return False
    recorded, actual = info.get("process_start"), _process_start(pid)
    if isinstance(recorded, (int, float)) and actual is not None and abs(actual - recorded) > 2.0:
        return False  # the pid was reused by another process
    return True


def describe_holder(info: dict) -> str:
    """``pid 4242 on host gpu-1, started 2025-01-02 10:00:00``."""
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {when}"


class RunLock:
    """The lock of one ``output_dir``; see the module docstring."""

    def __init__(self, path: Path, info: dict):
        self.path, self.info = path, info
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="ftmagic-lock-heartbeat", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, folder, note: Optional[Callable[[str], None]] = None) -> "RunLock":
        """Take the lock of ``folder`` (created if missing) or raise a one-line CheckpointError."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOCK_NAME
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                "process_start": _process_start(os.getpid())}
        for _ in range(5):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder, mtime = _read(path)
                if holder is None and mtime is None:
                    continue  # released between our attempt and the read
                if holder_is_alive(holder or {}, mtime or 0.0):
                    raise CheckpointError(
                        f"`output_dir: {folder}` is in use by another run ({describe_holder(holder or {})}); "
                        "wait for it to finish or choose another `output_dir` (if that run is gone, delete "
                        f"{path})") from None
                if _take_over(path, holder) and note is not None:
                    note(f"took over the lock of `{folder}` left by a run that is gone ({describe_holder(holder or {})})")
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(info, handle)
            return cls(path, info)
        raise CheckpointError(f"`output_dir: {folder}`: could not take its lock ({path}); another run is starting there")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        """Remove the lock if it is still ours (idempotent)."""
        self._stop.set()
        holder, _ = _read(self.path)
        if holder is not None and holder.get("pid") == self.info["pid"] and holder.get("started") == self.info["started"]:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass


def _read(path: Path) -> tuple[Optional[dict], Optional[float]]:
    try:
        mtime = path.stat().st_mtime
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError):
        return {}, mtime  # being written, or garbage
    return (value if isinstance(value, dict) else {}), mtime


def _take_over(path: Path, judged: Optional[dict]) -> bool:
    """Move a dead holder's lock aside, making sure it is the one judged dead (not a fresh one)."""
    aside = path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return False
    moved, _ = _read(aside)
    if moved != judged:
        try:  # a new holder slipped in between: put its lock back
            os.link(aside, path)
        except OSError:
            pass
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True

"""How many CPU threads a run gives torch (``threads: auto``), and why, in one line.

torch starts one compute thread per core and every parallel operation waits for all of
them. When other work holds some of the cores (a shared server, a second notebook
kernel, a data loader on Colab's 2-vCPU runtime), each operation waits for a thread
that waits for a core: the demo's 60 steps took 275-351 s with torch's 2 threads on a
2-core machine whose cores were busy, and 13-17 s with one thread
(``python benchmarks/threads_busy.py`` measures it). ``threads: auto`` therefore uses only
the cores free when the run starts, and for a small model, whose operations are too
short to gain much from splitting, at most one thread per :data:`PARAMS_PER_THREAD`
parameters, so that work starting elsewhere mid-run cannot stall it.

:func:`choose_threads` is a pure function of the measured :class:`CpuLoad`, tested with
faked loads; :func:`measure_cpu_load` is the only part that looks at the machine.
The run sets torch's thread count for its own duration and puts the previous value back
afterwards (:func:`run_threads`), and the line it prints says so.

Example::

    >>> load = CpuLoad(cores=2, busy=1.8, torch_threads=2)
    >>> plan = choose_threads("auto", load, params=28_400_000, device="cpu")
    >>> plan.threads
    1
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Union

# A model gets one thread per this many parameters at most: below it, splitting each
# operation gains little and a core taken by other work mid-run costs a lot.
PARAMS_PER_THREAD = 4_000_000
# A core counts as free when at least this share of it is idle.
FREE_SHARE = 0.5


@dataclass(frozen=True)
class CpuLoad:
    """What the CPU looks like when a run starts; build one by hand to test the choice."""

    cores: int  # cores this process may use (affinity mask and cgroup CPU quota)
    busy: float  # cores' worth of CPU time other processes used over the sample
    torch_threads: int  # torch's thread count before the run


@dataclass(frozen=True)
class ThreadPlan:
    """The outcome of :func:`choose_threads`."""

    threads: Optional[int]  # torch threads for the run; None leaves torch's setting alone
    reason: str  # one line for the user


def choose_threads(requested: Union[str, int], load: CpuLoad, *, params: int, device: str) -> ThreadPlan:
    """Torch threads for a run on ``device`` of a model with ``params`` parameters.

    ``requested`` is ``"auto"`` or a number of threads. Off the CPU the accelerator does
    the work and torch's setting is left alone.

    Example::

        >>> choose_threads("auto", CpuLoad(cores=8, busy=0.1, torch_threads=8), params=10**9, device="cpu").threads
        8
        >>> choose_threads(3, CpuLoad(cores=8, busy=0.1, torch_threads=8), params=10**9, device="cpu").reason
        "threads: 3 (as asked; torch's 8 set back after the run)"
    """
    def line(threads: int, why: str) -> str:
        # Say so whenever torch's own setting changes for the run.
        if threads != load.torch_threads:
            why += f"; torch's {load.torch_threads} set back after the run"
        return f"threads: {threads} ({why})"

    if requested != "auto":
        return ThreadPlan(int(requested), line(int(requested), "as asked"))
    if device != "cpu":
        return ThreadPlan(None, f"threads: torch's {load.torch_threads} left as they are ({device} does the work)")
    by_size = max(1, math.ceil(params / PARAMS_PER_THREAD))
    if by_size == 1:  # whatever the load: one thread (plan_threads does not even sample it)
        return ThreadPlan(1, line(1, f"a {params / 1e6:.1f}M-parameter model gains little from more"))
    cores = max(1, load.cores)
    free = max(0.0, cores - load.busy)
    by_load = max(1, math.floor(free + (1 - FREE_SHARE)))
    threads = min(cores, by_load, by_size)
    why = [f"{load.busy:.1f} of {cores} cores busy with other work"]
    if by_size < min(cores, by_load):
        why.append(f"a {params / 1e6:.1f}M-parameter model gains little from more")
    return ThreadPlan(threads, line(threads, "; ".join(why)))


def usable_cores() -> int:
    """Cores this process may run on: the affinity mask, capped by a cgroup v2 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as handle:
            quota, period = handle.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def measure_cpu_load(interval: float = 0.1) -> CpuLoad:
    """Sample how busy this process's cores are with other work over ``interval`` seconds."""
    import psutil
    import torch

    cores = usable_cores()
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:
        allowed = None
    own = psutil.Process()
    before, own_before, start = psutil.cpu_times(percpu=True), own.cpu_times(), time.monotonic()
    time.sleep(interval)
    after, own_after, elapsed = psutil.cpu_times(percpu=True), own.cpu_times(), time.monotonic() - start
    busy = 0.0
    for index, (a, b) in enumerate(zip(before, after)):
        if allowed is not None and index not in allowed:
            continue
        total = sum(b) - sum(a)
        idle = (b.idle - a.idle) + (getattr(b, "iowait", 0.0) - getattr(a, "iowait", 0.0))
        if total > 0:
            busy += 1.0 - idle / total
    mine = (own_after.user - own_before.user + own_after.system - own_before.system) / max(elapsed, 1e-6)
    busy = min(float(cores), max(0.0, busy - mine))
    return CpuLoad(cores=cores, busy=round(busy, 2), torch_threads=torch.get_num_threads())


def plan_threads(requested: Union[str, int], *, params: int, device: str) -> ThreadPlan:
    """:func:`choose_threads` for this machine (the load is sampled only when ``auto`` on the CPU needs it)."""
    import torch

    if requested == "auto" and device == "cpu" and params > PARAMS_PER_THREAD:
        load = measure_cpu_load()
    else:
        load = CpuLoad(cores=usable_cores(), busy=0.0, torch_threads=torch.get_num_threads())
    return choose_threads(requested, load, params=params, device=device)


@contextmanager
def run_threads(plan: ThreadPlan):
    """Torch uses ``plan.threads`` inside the block; the previous count is set back on exit."""
    import torch

    if plan.threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(plan.threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)

"""The ipykernel 6 queue pump: comm messages handled now, everything else kept in order.

A real ipykernel 7 kernel is exercised in tests/test_magics_engine.py (the subshell route);
here a kernel-shaped object with a real jupyter_client Session checks the pump's rules.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

zmq = pytest.importorskip("zmq")
from jupyter_client.session import Session  # noqa: E402
from tornado.queues import Queue  # noqa: E402

from ftmagic.widgets.liveclicks import QueuePump, _queue_pump, open_side_channel  # noqa: E402


class ShellKernel:
    """Just what QueuePump touches on an ipykernel 6 Kernel."""

    def __init__(self):
        self.session = Session(key=b"secret")
        self.msg_queue = Queue()
        self.flushes = []
        self.shell_stream = SimpleNamespace(flush=self.flushes.append)
        self.comm_calls = []
        self.shell_handlers = {"comm_msg": lambda stream, idents, msg: self.comm_calls.append(msg["content"]),
                               "execute_request": lambda *a: pytest.fail("the pump must not run cells")}
        self.counter = 0

    async def dispatch_shell(self, msg):  # pragma: no cover - never awaited here
        raise AssertionError

    def receive(self, msg_type, content, dispatch=None):
        frames = self.session.serialize(self.session.msg(msg_type, content), ident=[b"front-end"])
        item = (self.counter, dispatch or self.dispatch_shell, ([zmq.Frame(f) for f in frames],))
        self.counter += 1
        self.msg_queue.put_nowait(item)
        return item


def test_pump_handles_comm_messages_and_keeps_the_rest_in_order():
    kernel = ShellKernel()
    first = kernel.receive("execute_request", {"code": "a = 1"})
    kernel.receive("comm_msg", {"comm_id": "button", "data": {"method": "custom", "content": {"event": "click"}}})
    second = kernel.receive("execute_request", {"code": "b = 2"})
    other = kernel.receive("comm_msg", {"comm_id": "x"}, dispatch=lambda *a: None)  # not a shell dispatch
    pump = QueuePump(kernel)
    pump.poll()
    assert kernel.flushes == [zmq.POLLIN]
    assert kernel.comm_calls == [{"comm_id": "button", "data": {"method": "custom", "content": {"event": "click"}}}]
    assert pump.handled == 1
    kept = [kernel.msg_queue.get_nowait() for _ in range(kernel.msg_queue.qsize())]
    assert kept == [first, second, other]
    # The kernel can still read the messages that were put back (peeking left no signature behind).
    for item in kept[:2]:
        idents, frames = kernel.session.feed_identities(item[2][0], copy=False)
        msg = kernel.session.deserialize(frames, content=True, copy=False)
        assert msg["header"]["msg_type"] == "execute_request"


def test_pump_with_an_empty_queue_does_nothing():
    kernel = ShellKernel()
    QueuePump(kernel).poll()
    assert kernel.msg_queue.qsize() == 0 and kernel.comm_calls == []


def test_which_kernels_get_a_pump():
    kernel = ShellKernel()
    assert isinstance(_queue_pump(kernel), QueuePump)
    kernel.shell_channel_thread = object()  # ipykernel 7: shell messages no longer go through msg_queue
    assert _queue_pump(kernel) is None
    assert _queue_pump(SimpleNamespace()) is None


def test_widget_polls_the_side_channel_throttled_and_stops_after_the_end(monkeypatch):
    from ftmagic.widgets.progress import TrainingProgress

    polls = []
    channel = SimpleNamespace(poll=lambda: polls.append(clock.now), close=lambda: polls.append("closed"))
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr("IPython.display.display", lambda obj, **kw: None)
    monkeypatch.setattr("ftmagic.widgets.liveclicks.open_side_channel", lambda widget: channel)
    progress = TrainingProgress(clock=lambda: clock.now)
    progress.show()
    for i in range(1, 6):
        clock.now = i * 0.04
        progress({"event": "step", "step": i, "max_steps": 10, "loss": 1.0})
    assert polls == [0.04, 0.16]  # at most every 0.1 s
    progress({"event": "end", "reason": "finished", "metrics": {}})
    clock.now = 5.0
    progress({"event": "message", "level": "info", "text": "late"})
    assert polls == [0.04, 0.16]
    progress.close()
    assert polls[-1] == "closed"


def test_a_failing_side_channel_is_dropped_not_raised(monkeypatch):
    from ftmagic.widgets.progress import TrainingProgress

    def broken():
        raise RuntimeError("kernel internals changed")

    monkeypatch.setattr("IPython.display.display", lambda obj, **kw: None)
    monkeypatch.setattr("ftmagic.widgets.liveclicks.open_side_channel",
                        lambda widget: SimpleNamespace(poll=broken, close=lambda: None))
    progress = TrainingProgress()
    progress.show()
    progress({"event": "step", "step": 1, "max_steps": 2, "loss": 1.0})
    assert progress._side_channel is None


def test_no_kernel_no_channel():
    assert open_side_channel(SimpleNamespace(comm=None)) is None

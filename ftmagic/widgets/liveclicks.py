"""Let a widget's clicks reach the kernel while the cell that shows it is still running.

A Jupyter kernel handles widget messages between cells, but ``%%finetune`` trains
inside the cell, so a Stop click would wait in the kernel's queue until the run is over.
Two ways around that, picked by what the kernel offers:

* ipykernel 7 runs extra message loops in their own threads ("subshells", JEP 91) and
  sends a comm's messages to the subshell the comm names. The click handler then runs
  on that thread; it only sets a ``threading.Event``, which is thread-safe.
* ipykernel 6 (Colab and many installed kernels) keeps incoming shell messages in a
  queue that the main thread works through between cells. :meth:`QueuePump.poll`,
  called from the training loop's events on the main thread, handles only the comm
  messages waiting there and puts every other message (a queued cell) back, in order.

Where neither applies, :func:`open_side_channel` returns None and the notebook's
interrupt button is the way to stop early (the engine saves a checkpoint on it too).

Example::

    channel = open_side_channel(stop_button)
    ...
    if channel: channel.poll()     # from the training loop's event callback
    ...
    if channel: channel.close()
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Optional

COMM_MESSAGES = ("comm_open", "comm_msg", "comm_close")


def current_kernel() -> Any:
    """The running ipykernel Kernel, or None (terminal IPython, plain Python)."""
    from IPython import get_ipython

    return getattr(get_ipython(), "kernel", None)


class SubshellRoute:
    """Route one comm's messages to a kernel subshell thread (ipykernel 7)."""

    def __init__(self, thread: Any, manager: Any, comm: Any, subshell_id: str) -> None:
        self._thread, self._manager, self._comm, self.subshell_id = thread, manager, comm, subshell_id

    def poll(self) -> None:
        """Nothing to do: the subshell thread handles the messages as they come."""

    def close(self) -> None:
        try:
            self._comm._reply_subshell_id = None
            self._thread.io_loop.add_callback(self._manager._delete_subshell, self.subshell_id)
        except Exception:  # best effort: the kernel may be shutting down
            pass


def _subshell_route(kernel: Any, widget: Any, timeout: float) -> Optional[SubshellRoute]:
    thread = getattr(kernel, "shell_channel_thread", None)
    manager = getattr(thread, "manager", None)
    comm = getattr(widget, "comm", None)
    if manager is None or comm is None or not hasattr(comm, "_reply_subshell_for") \
            or not hasattr(manager, "_create_subshell"):
        return None
    created = threading.Event()
    box: dict = {}

    def create() -> None:  # the subshell manager is only touched from its own thread
        try:
            box["id"] = manager._create_subshell()
        finally:
            created.set()

    thread.io_loop.add_callback(create)
    if not created.wait(timeout) or "id" not in box:
        return None
    # The kernel's shell-channel thread asks the comm which subshell its messages go to.
    comm._reply_subshell_id = box["id"]
    return SubshellRoute(thread, manager, comm, box["id"])


class QueuePump:
    """Handle the comm messages waiting in an ipykernel 6 shell queue (main thread only)."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.handled = 0

    def poll(self) -> None:
        kernel = self.kernel
        import zmq

        # Move messages that arrived on the socket into the kernel's queue, as its loop would.
        kernel.shell_stream.flush(zmq.POLLIN)
        queue = kernel.msg_queue
        kept = []
        while True:
            try:
                item = queue.get_nowait()
            except (asyncio.QueueEmpty, _tornado_queue_empty()):
                break
            if not self._handle(item):
                kept.append(item)
        for item in kept:  # everything else (a queued cell) runs after this one, in order
            queue.put_nowait(item)

    def _handle(self, item: Any) -> bool:
        """Handle ``item`` if it is a comm message; False leaves it for the kernel."""
        kernel = self.kernel
        if not (isinstance(item, tuple) and len(item) == 3):
            return False
        _, dispatch, args = item
        if dispatch != kernel.dispatch_shell or len(args) != 1:
            return False
        session = kernel.session
        idents, frames = session.feed_identities(args[0], copy=False)
        # Peek at the header without content: peeking does not record the signature, so the
        # kernel can still accept a message that is put back.
        header = session.deserialize(frames, content=False, copy=False)["header"]
        if header.get("msg_type") not in COMM_MESSAGES:
            return False
        msg = session.deserialize(frames, content=True, copy=False)
        handler = kernel.shell_handlers.get(header["msg_type"])
        if handler is None:
            return False
        handler(kernel.shell_stream, idents, msg)
        self.handled += 1
        return True

    def close(self) -> None:
        """Nothing to undo."""


def _tornado_queue_empty():
    try:
        from tornado.queues import QueueEmpty
    except ImportError:  # pragma: no cover
        return asyncio.QueueEmpty
    return QueueEmpty


def _queue_pump(kernel: Any) -> Optional[QueuePump]:
    needed = ("msg_queue", "shell_stream", "dispatch_shell", "shell_handlers", "session")
    if any(getattr(kernel, name, None) is None for name in needed):
        return None
    if getattr(kernel, "shell_channel_thread", None) is not None:
        return None  # ipykernel 7 moved shell messages off this queue
    return QueuePump(kernel)


def open_side_channel(widget: Any, timeout: float = 5.0):
    """A :class:`SubshellRoute` or :class:`QueuePump` for ``widget``, or None where none applies."""
    kernel = current_kernel()
    if kernel is None:
        return None
    try:
        return _subshell_route(kernel, widget, timeout) or _queue_pump(kernel)
    except Exception:  # a private kernel API changed: fall back to the kernel's interrupt
        return None


class LiveDisplay:
    """What the live training and sweep displays share: shown in the running cell with a Stop
    button that works while the cell is busy, replaced by static output when they end.

    A subclass builds ``widget`` (holding ``button``) and calls :meth:`show`; during the run
    :meth:`let_clicks_in` every ``poll_interval`` seconds at most; at the end
    :meth:`replace_with` a mime bundle that stays in the saved notebook.

    Example::

        class Progress(LiveDisplay):
            def __init__(self):
                self.button = ipywidgets.Button(description="Stop")
                self.widget = ipywidgets.VBox([self.button])
    """

    widget: Any = None
    button: Any = None
    handle: Any = None  # the display the static output replaces
    _side_channel: Any = None  # how a click reaches a busy kernel
    _last_poll: Optional[float] = None
    poll_interval = 0.1

    def show(self) -> None:
        """Display the widget in the current cell and open the way for its clicks."""
        from IPython.display import display

        self.handle = display(self.widget, display_id=True)
        self._side_channel = open_side_channel(self.button)

    def let_clicks_in(self, now: float) -> None:
        """Let a waiting Stop click in (kernels where clicks queue up behind the cell)."""
        if self._side_channel is None or (self._last_poll is not None and now - self._last_poll < self.poll_interval):
            return
        self._last_poll = now
        try:
            self._side_channel.poll()
        except Exception:
            # The click plumbing must never break a run; the kernel's interrupt still works.
            self._side_channel = None

    def replace_with(self, bundle: dict) -> None:
        """Put ``bundle`` where the widget was (or below, when it was never shown), then close it."""
        from IPython.display import display

        if self.handle is not None:
            self.handle.update(bundle, raw=True)
        else:
            display(bundle, raw=True)
        self.close()

    def close(self) -> None:
        """Close the widget and everything in it (frees their comms in the kernel)."""
        if self._side_channel is not None:
            self._side_channel.close()
            self._side_channel = None
        _close_tree(self.widget)


def _close_tree(widget) -> None:
    for child in getattr(widget, "children", ()):
        _close_tree(child)
    widget.close()

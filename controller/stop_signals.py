"""Ctrl-C and SIGTERM for the CLIs: a graceful stop once running, an interrupted start before that.

A running service stops by itself when `stop` is set: it commits what it holds and drains
its sinks. Before it runs, nothing waits for `stop`, so a start that hangs (a device server
that does not answer, a lost cancellation in a library) could only be ended with SIGKILL,
which leaves the private broker and the simulators behind. Until `running()` is called, a
signal therefore cancels the task that is starting the lab, and its cleanup runs as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator

log = logging.getLogger("hotlab.stop_signals")


class StopSignals:
    """SIGINT and SIGTERM handlers on the running loop, for the task that creates this object."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self._starting_task = asyncio.current_task()
        self._running = False
        #: Cancellations of the start that the signals asked for; each signal asks again, because
        #: a library may lose one (Python 3.11's `wait_for` does, as the awaited thing completes).
        self._cancels = 0
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._on_signal)

    @property
    def interrupted_start(self) -> bool:
        """True once a signal cancelled the start (the caller then ends quietly, not with an error)."""
        return self._cancels > 0

    def running(self) -> None:
        """From now on a signal only sets `stop`: the service stops gracefully."""
        self._running = True

    def _on_signal(self) -> None:
        self.stop.set()
        if self._running or self._starting_task is None or self._starting_task.done():
            return
        self._cancels += 1
        self._starting_task.cancel()

    @contextlib.contextmanager
    def interruptible_start(self) -> Iterator[None]:
        """Around the start and the run: a start cancelled by a signal ends here, quietly.

        Unless the start was failing already (a full disk, say) when the signal came: then that
        error is what the caller must see, not a quiet stop.
        """
        try:
            yield
        except asyncio.CancelledError as cancelled:
            task = self._starting_task
            if not self._cancels or task is None:
                raise  # somebody else's cancellation
            left = task.cancelling()
            for _ in range(self._cancels):
                left = task.uncancel()
            if left > 0:
                raise  # somebody else cancelled it too
            failure = cancelled.__context__
            if isinstance(failure, Exception):
                raise failure from None
            log.warning("stopped by a signal while starting")

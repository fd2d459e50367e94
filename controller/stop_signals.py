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
        #: True once a signal cancelled the start (the caller then ends quietly, not with an error).
        self.interrupted_start = False
        self._starting_task = asyncio.current_task()
        self._running = False
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._on_signal)

    def running(self) -> None:
        """From now on a signal only sets `stop`: the service stops gracefully."""
        self._running = True

    def _on_signal(self) -> None:
        self.stop.set()
        if self._running or self.interrupted_start or self._starting_task is None:
            return
        self.interrupted_start = True
        self._starting_task.cancel()

    @contextlib.contextmanager
    def interruptible_start(self) -> Iterator[None]:
        """Around the start and the run: a start cancelled by a signal ends here, quietly."""
        try:
            yield
        except asyncio.CancelledError:
            if not self.interrupted_start or self._starting_task is None:
                raise  # somebody else's cancellation
            self._starting_task.uncancel()
            log.warning("stopped by a signal while starting")

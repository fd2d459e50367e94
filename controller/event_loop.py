"""Which asyncio event loop the controller runs on: uvloop by default, the standard one on request.

The controller is one event loop serving every device, the MQTT client and the sinks, so the
loop's own overhead (callbacks, timers, socket transports) is a large part of its CPU per
reading. uvloop (libuv, in Cython) cut that enough to matter in bench/e2e.py
(docs/benchmarks.md). The standard loop stays selectable (`[service] event_loop = "asyncio"`)
for debugging and for platforms without uvloop; if uvloop cannot be imported the controller
says so and runs on the standard loop rather than not at all.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

EVENT_LOOPS = ("uvloop", "asyncio")
DEFAULT_EVENT_LOOP = "uvloop"

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory(name: str) -> LoopFactory:
    """A new-loop factory for `asyncio.Runner`; `name` is one of EVENT_LOOPS."""
    if name == "asyncio":
        return asyncio.new_event_loop
    if name != "uvloop":
        raise ValueError(f"unknown event loop {name!r}; known: {', '.join(EVENT_LOOPS)}")
    try:
        import uvloop
    except ImportError as exc:
        log.warning("uvloop is not available (%s); running on the standard asyncio loop", exc)
        return asyncio.new_event_loop
    return uvloop.new_event_loop

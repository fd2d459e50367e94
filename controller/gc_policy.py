"""Garbage-collector settings for the long-running controller process (`hotlab run`).

Why: with CPython's default thresholds (700/10/10) the young generation is collected whenever a
batch is in flight (an outbox read of 500 messages is thousands of objects that die together a
moment later), and every full collection walks the tens of thousands of objects that exist
from startup on, pausing the event loop for longer than a reading's whole latency budget; yet
the controller makes few reference cycles. docs/benchmarks.md has the measured cost.

So, once the controller has started: the objects alive then (modules, classes, config,
clients, device objects) move to the permanent generation, which the collector never walks
again, and the young generation is collected after 10,000 net allocations instead of 700.
Cycles are still collected, only less often. Only the service's own process does this; tests
and library users keep the interpreter's defaults.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)

#: Net allocations of tracked objects before a young-generation collection (default 700), and
#: the young (resp. middle) collections that trigger a middle (resp. full) one (default 10, 10).
SERVICE_THRESHOLDS: tuple[int, int, int] = (10_000, 50, 50)


def settle_after_startup() -> None:
    """Collect once, freeze what survives (it lives as long as the process), raise the thresholds."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*SERVICE_THRESHOLDS)
    log.info(
        "garbage collector: %d startup objects frozen, thresholds %s",
        gc.get_freeze_count(),
        "/".join(map(str, SERVICE_THRESHOLDS)),
    )

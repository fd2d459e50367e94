"""The history sink: moves the outbox's "history" queue into the permanent archive.

Archive first, then ack, so a crash in between only replays a batch that the archive ignores
(`INSERT OR IGNORE` on `msg_id`); see controller/archive.py.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3

from hotlab.backoff import Backoff
from hotlab.controller.archive import HistoryArchive
from hotlab.controller.outbox import AsyncOutbox

SINK_NAME = "history"
log = logging.getLogger(__name__)


async def run_history_sink(
    outbox: AsyncOutbox,
    archive: HistoryArchive,
    stop_event: asyncio.Event,
    *,
    batch_size: int = 500,
    idle_poll_s: float = 0.5,
    retry: Backoff = Backoff(0.5, 10.0),
) -> int:
    """Move messages from the outbox's "history" queue into the archive until `stop_event` is set.

    Archive first, then ack: a crash in between replays the batch, which the archive ignores.
    A failing archive or outbox (disk full, locked file) is logged and retried with backoff;
    the messages stay in the outbox meanwhile. Returns how many new messages were archived.
    """
    archived = 0
    failures = 0
    acked_through = 0  # each read continues here, so while the sink keeps up the outbox answers from memory
    while not stop_event.is_set():
        try:
            batch = await outbox.pending(SINK_NAME, batch_size, after_seq=acked_through)
            if not batch:
                await _wait(stop_event, idle_poll_s)
                continue
            archived += await asyncio.to_thread(archive.add_many, [stored.message for stored in batch])
            # An ack lost here (crash, error) only replays the batch, which the archive ignores.
            await outbox.ack(SINK_NAME, [stored.seq for stored in batch])
            acked_through = batch[-1].seq
        except sqlite3.Error as exc:
            delay = retry.delay(failures)
            failures += 1
            log.error("history: moving messages to the archive failed (%s); retrying in %.1f s", exc, delay)
            await _wait(stop_event, delay)
            continue
        failures = 0
    return archived


async def _wait(stop_event: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop_event.wait(), timeout=seconds)
    except TimeoutError:
        pass

"""The history sink: moves the outbox's "history" queue into the permanent archive, and keeps it in bounds.

Archive first, then ack, so a crash in between only replays a batch that the archive ignores
(`INSERT OR IGNORE` on `msg_id`); see controller/archive.py.

With a `retention` config the sink also runs the archive's retention (controller/archive_retention.py)
once it has caught up at start and then every `interval_s`: in a worker thread, one device-hour per
transaction, so the sink goes on archiving meanwhile. A pass starts only right after the sink has
acknowledged everything it archived, and touches only rows archived before that moment: none of
those can come back from the outbox after its summary. Each pass is logged, and one that changed the
archive is recorded as an `archive_retention` message through the outbox, like any other record.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time

from hotlab.backoff import Backoff
from hotlab.controller.archive import HistoryArchive
from hotlab.controller.archive_retention import RetentionPass, raw_cutoff_ns, retain
from hotlab.controller.config import RetentionConfig
from hotlab.controller.messages import Message, archive_retention_message, iso_utc
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
    retention: RetentionConfig | None = None,
    site: str | None = None,
) -> int:
    """Move messages from the outbox's "history" queue into the archive until `stop_event` is set.

    Archive first, then ack: a crash in between replays the batch, which the archive ignores.
    A failing archive or outbox (disk full, locked file) is logged and retried with backoff;
    the messages stay in the outbox meanwhile. With `retention` (and the `site` its records name),
    raw readings past the window are summarised as described above. Returns how many new messages
    were archived.
    """
    retainer = None
    if retention is not None:
        if site is None:
            raise ValueError("archive retention records name their site: pass site= with retention=")
        retainer = _Retention(outbox, archive, retention, site)
    archived = 0
    failures = 0
    acked_through = 0  # each read continues here, so while the sink keeps up the outbox answers from memory
    try:
        while not stop_event.is_set():
            try:
                batch = await outbox.pending(SINK_NAME, batch_size, after_seq=acked_through)
                if not batch:
                    if retainer is not None:
                        retainer.start_if_due()  # everything archived is acknowledged
                    await _wait(stop_event, idle_poll_s)
                    continue
                archived += await asyncio.to_thread(archive.add_many, [stored.message for stored in batch])
                # An ack lost here (crash, error) only replays the batch, which the archive ignores.
                await outbox.ack(SINK_NAME, [stored.seq for stored in batch])
                acked_through = batch[-1].seq
                if retainer is not None:
                    retainer.start_if_due()  # everything archived is acknowledged
            except sqlite3.Error as exc:
                delay = retry.delay(failures)
                failures += 1
                log.error("history: moving messages to the archive failed (%s); retrying in %.1f s", exc, delay)
                await _wait(stop_event, delay)
                continue
            failures = 0
    finally:
        if retainer is not None:
            await retainer.stop()
    return archived


class _Retention:
    """Starts retention passes when due, one at a time, and records each."""

    def __init__(self, outbox: AsyncOutbox, archive: HistoryArchive, config: RetentionConfig, site: str) -> None:
        self.outbox = outbox
        self.archive = archive
        self.config = config
        self.site = site
        self._next_at = float("-inf")  # the first pass as soon as the sink has caught up
        self._task: asyncio.Task[None] | None = None
        self._stop = threading.Event()

    def start_if_due(self) -> None:
        """Start a pass if none runs and one is due. Call only when every archived message is acknowledged:
        the pass leaves rows archived from now on alone."""
        if (self._task is not None and not self._task.done()) or time.monotonic() < self._next_at:
            return
        self._next_at = time.monotonic() + self.config.interval_s
        self._task = asyncio.create_task(self._run(archived_before_ns=time.time_ns()), name="history-retention")

    async def stop(self) -> None:
        """Let a running pass finish its chunk and record what it did."""
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _run(self, *, archived_before_ns: int) -> None:
        try:
            # The acks of what the pass may summarise must survive a power loss: a replay of readings
            # already summarised and deleted would be archived again and counted twice.
            await self.outbox.sync_to_disk()
            done = await asyncio.to_thread(
                retain,
                self.archive,
                raw_cutoff_ns(time.time_ns(), self.config.raw_days),
                archived_before_ns=archived_before_ns,
                stop=self._stop,
            )
        except (sqlite3.Error, OSError) as exc:
            log.error("history: archive retention failed (%s: %s); the next pass tries again", type(exc).__name__, exc)
            return
        except Exception:  # a bug here must not end the sink
            log.exception("history: archive retention failed; the next pass tries again")
            return
        log.info("history: %s", describe(done))
        if not done.changed:
            return
        try:
            await self.outbox.put(self._record(done))
        except Exception as exc:  # the log line above is then the only record of the pass
            log.error("history: the record of that retention pass was not stored (%s: %s)", type(exc).__name__, exc)

    def _record(self, done: RetentionPass) -> Message:
        return archive_retention_message(
            self.site,
            raw_days=self.config.raw_days,
            cutoff_ns=done.cutoff_ns,
            started_ns=done.started_ns,
            time_ns=time.time_ns(),
            readings=done.readings,
            minutes=done.minutes,
            statuses=done.statuses,
            chunks=done.chunks,
            complete=done.complete,
            freed_bytes=done.freed_bytes,
            archive_bytes=done.archive_bytes,
        )


def describe(done: RetentionPass) -> str:
    """One line saying what a pass did."""
    return (
        f"retention before {iso_utc(done.cutoff_ns)[:16]}Z: {done.readings} raw reading(s) summarised "
        f"into {done.minutes} minute row(s), {done.statuses} repeated status(es) dropped, "
        f"{done.chunks} chunk(s) in {done.duration_s:.2f} s, {done.freed_bytes / 1e6:.1f} MB freed, "
        f"archive {done.archive_bytes / 1e6:.1f} MB" + ("" if done.complete else " (stopped before the end)")
    )


async def _wait(stop_event: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop_event.wait(), timeout=seconds)
    except TimeoutError:
        pass

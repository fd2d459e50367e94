"""Publish the audit trail's head after every append, so a trail cut short can be told from a short one.

Why: the hash chain (controller/audit.py) proves that every record follows the one before it,
but deleting the last records leaves a shorter chain that is just as intact. An `audit_anchor`
message (controller/messages.py) records outside the file that "the trail reached record
`seq`, whose hash is `hash`"; through the outbox it is retained on MQTT, kept in the history
archive and written to InfluxDB, and `hotlab audit verify` checks the file against the newest
anchor it can reach (docs/audit-and-report.md).

Rules this module keeps:

* An anchor never holds up or fails a command: `offer` only notes the record, and one
  background task commits the anchors.
* Anchors of one trail are committed in increasing `seq`, and a burst of appends is anchored
  by its last record: a later head proves everything an earlier one does, and the retained
  MQTT anchor must never step back to an older head.
* A trail started again (deleted or rotated while the controller runs: the controller's next
  append writes a new first record) is a new trail: its seqs count from 1 again and are
  anchored from its first record on, not only once it grows past the old trail's head.
* Nothing is offered once `close` began: the outbox closes right after, so an anchor of an
  append that finished later is dropped (logged); the next run's first append anchors the head.
* An anchor that cannot be queued (outbox full, disk error, unreadable trail) is logged and
  dropped; the next append anchors its own head. The trail itself stays the record.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

from hotlab.controller.audit import AuditRecord, first_record_hash
from hotlab.controller.messages import Message, audit_anchor_message
from hotlab.controller.outbox import OutboxFull

log = logging.getLogger(__name__)

#: Commits messages durably (the service's group commit); raises OutboxFull, sqlite3.Error or OSError.
Commit = Callable[[list[Message]], Awaitable[None]]


class AnchorPublisher:
    """Commits an `audit_anchor` for the newest record offered; `offer` is the CommandHandler's audit hook."""

    def __init__(self, site: str, trail: Path, commit: Commit) -> None:
        self.site = site
        self.trail = trail.resolve()
        self._commit = commit
        self._latest: AuditRecord | None = None
        self._anchored_seq = 0
        #: The hash of the first record of the trail being anchored, once known.
        self._trail_id: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def offer(self, record: AuditRecord) -> None:
        """Note a record just appended to the trail; its anchor is committed in the background."""
        if self._closed:  # expected at shutdown (a command refused while stopping is audited too): not a warning
            log.info(
                "audit record #%d of %s written during shutdown: not anchored (the next run anchors the trail)",
                record.seq,
                self.trail,
            )
            return
        if record.seq == 1 and record.hash != self._trail_id:  # the first record of a trail started again
            self._trail_id = record.hash
            self._latest = record
            self._anchored_seq = 0
        elif self._latest is None or record.seq > self._latest.seq:
            self._latest = record
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._anchor_latest(), name="audit-anchor")

    async def close(self, timeout_s: float) -> None:
        """Offer nothing more, and let the anchor in progress be committed (for at most `timeout_s`):
        the outbox closes next."""
        self._closed = True
        task = self._task
        if task is None:
            return
        _done, late = await asyncio.wait({task}, timeout=timeout_s)
        for pending in late:
            log.error("audit anchor not committed within %.0f s; the trail itself is the record", timeout_s)
            pending.cancel()
        await asyncio.gather(*late, return_exceptions=True)

    async def _anchor_latest(self) -> None:
        while self._latest is not None and self._latest.seq > self._anchored_seq:
            record = self._latest
            self._anchored_seq = record.seq
            try:
                anchor = await self._message(record)
                if anchor is not None:
                    await self._commit([anchor])
            except (OutboxFull, sqlite3.Error, OSError) as exc:
                log.error(
                    "audit anchor #%d of %s not queued (%s: %s); the trail itself is the record",
                    record.seq,
                    self.trail,
                    type(exc).__name__,
                    exc,
                )
            except Exception:  # a bug here must not end anchoring, nor reach a command
                log.exception("audit anchor #%d of %s not queued", record.seq, self.trail)

    async def _message(self, record: AuditRecord) -> Message | None:
        """The anchor of `record`, or nothing (logged) when the trail's first record cannot be read."""
        trail_id = record.hash if record.seq == 1 else await asyncio.to_thread(first_record_hash, self.trail)
        self._trail_id = self._trail_id or trail_id
        if trail_id is None:
            log.error(
                "audit anchor #%d not built: the first record of %s is unreadable (run `hotlab audit verify`)",
                record.seq,
                self.trail,
            )
            return None
        return audit_anchor_message(
            self.site,
            trail=str(self.trail),
            trail_id=trail_id,
            seq=record.seq,
            hash_hex=record.hash,
            time_ns=record.time_ns,
        )

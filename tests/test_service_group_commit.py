"""Group commit in the service: many devices, few transactions, and still nothing confirmed before it is stored."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterable, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

import hotlab.controller.service
from hotlab.controller.config import parse_config
from hotlab.controller.messages import Message
from hotlab.controller.outbox import Outbox, StoredPayload
from hotlab.controller.service import ControllerService
from hotlab.controller.supervisor import Item
from hotlab.drivers.records import Reading
from tests.test_mqtt_delivery import passing_verdict_for

DEVICES = 30


class CountingOutbox(Outbox):
    """The real outbox, counting its write transactions."""

    instances: ClassVar[list[CountingOutbox]] = []

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.transactions = 0
        self.largest = 0
        CountingOutbox.instances.append(self)

    def put_many_stored(self, messages: Iterable[Message]) -> list[StoredPayload]:
        batch = list(messages)
        self.transactions += 1
        self.largest = max(self.largest, len(batch))
        return super().put_many_stored(batch)


def stored_msg_ids(path: Path) -> set[str]:
    """What a fresh connection sees on disk, i.e. only what was committed."""
    with closing(sqlite3.connect(path)) as db:
        return {row[0] for row in db.execute("SELECT json_extract(payload, '$.msg_id') FROM message")}


class CheckingSource:
    """Reads at once; on `delivered` checks that what it is told is stored really is on disk."""

    streaming = False

    def __init__(self, device: str, outbox_path: Path) -> None:
        self.device = device
        self.outbox_path = outbox_path
        self.reads = 0
        self.confirmed = 0
        self.confirmed_before_commit = 0

    async def connect(self) -> None:
        """Nothing to open."""

    async def read(self) -> Sequence[Item]:
        self.reads += 1
        return [Reading(self.device, "F-18", float(self.reads), float(self.reads), "Bq", time.time_ns(), b"x")]

    async def delivered(self, items: Sequence[Item]) -> None:
        on_disk = {(p_device, p_frame) for p_device, p_frame in _stored_frames(self.outbox_path)}
        for item in items:
            assert isinstance(item, Reading)
            self.confirmed += 1
            if (item.device, item.timestamp_ns) not in on_disk:
                self.confirmed_before_commit += 1

    async def close(self) -> None:
        """Nothing to close."""


def _stored_frames(path: Path) -> list[tuple[str, int]]:
    with closing(sqlite3.connect(path)) as db:
        return db.execute(
            "SELECT json_extract(payload, '$.device'), json_extract(payload, '$.time_ns') FROM message "
            "WHERE kind = 'reading'"
        ).fetchall()


@dataclass(frozen=True)
class Outcome:
    messages: tuple[Message, ...]


class RecordingStage:
    """A commit stage that derives one verdict per reading and checks the two-phase order on every call."""

    def __init__(self, outbox_path: Path) -> None:
        self.outbox_path = outbox_path
        self.processed = 0
        self.applied = 0
        self.largest_batch = 0
        self.applied_before_commit = 0

    def process(self, *messages: Message) -> Outcome:
        assert self.processed == self.applied, "a batch was judged before the previous one was applied"
        self.processed += 1
        self.largest_batch = max(self.largest_batch, len(messages))
        out: list[Message] = []
        for message in messages:
            out.append(message)
            if message.kind == "reading":
                out.append(passing_verdict_for(message))
        return Outcome(tuple(out))

    def apply(self, outcome: Outcome) -> None:
        self.applied += 1
        if not {m.msg_id for m in outcome.messages} <= stored_msg_ids(self.outbox_path):
            self.applied_before_commit += 1


async def test_many_devices_share_transactions_and_are_confirmed_only_after_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hotlab.controller.service, "Outbox", CountingOutbox)
    CountingOutbox.instances.clear()
    outbox_path = tmp_path / "outbox.sqlite3"
    config = parse_config(
        {
            "site": {"name": "local"},
            "device": [
                {
                    "name": f"cal-{i}",
                    "station": "s1",
                    "family": "vik202",
                    "transport": "/dev/null",
                    "poll_interval_s": 0.005,
                }
                for i in range(DEVICES)
            ],
            "outbox": {"path": "outbox.sqlite3"},
            "history": {"enabled": False},
        },
        base_dir=tmp_path,
    )
    sources = {f"cal-{i}": CheckingSource(f"cal-{i}", outbox_path) for i in range(DEVICES)}
    stage = RecordingStage(outbox_path)
    service = ControllerService(config, stage=stage, source_factory=lambda d: sources[d.name])
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    deadline = time.monotonic() + 30
    while sum(s.confirmed for s in sources.values()) < 20 * DEVICES and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 30)

    (outbox,) = CountingOutbox.instances
    confirmed = sum(s.confirmed for s in sources.values())
    assert confirmed >= 20 * DEVICES
    assert sum(s.confirmed_before_commit for s in sources.values()) == 0
    assert stage.applied_before_commit == 0 and stage.applied == stage.processed
    # Without group commit every reading is its own transaction (plus the statuses).
    assert outbox.transactions < confirmed / 3, (outbox.transactions, confirmed)
    assert stage.largest_batch > 1 and outbox.largest > 2
    with closing(sqlite3.connect(outbox_path)) as db:
        kinds = dict(db.execute("SELECT kind, COUNT(*) FROM message GROUP BY kind").fetchall())
    assert kinds["reading"] == sum(s.reads for s in sources.values())  # every reading read was stored
    assert kinds["qc_result"] == kinds["reading"]  # and judged once


async def test_a_stage_failing_after_the_commit_does_not_store_the_batch_twice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class ApplyFails(RecordingStage):
        def apply(self, outcome: Outcome) -> None:
            raise RuntimeError("state table corrupt")

    outbox_path = tmp_path / "outbox.sqlite3"
    config = parse_config(
        {
            "site": {"name": "local"},
            "device": [
                {
                    "name": f"cal-{i}",
                    "station": "s1",
                    "family": "vik202",
                    "transport": "/dev/null",
                    "poll_interval_s": 0.005,
                }
                for i in range(5)
            ],
            "outbox": {"path": "outbox.sqlite3"},
            "history": {"enabled": False},
        },
        base_dir=tmp_path,
    )
    sources = {f"cal-{i}": CheckingSource(f"cal-{i}", outbox_path) for i in range(5)}
    service = ControllerService(config, stage=ApplyFails(outbox_path), source_factory=lambda d: sources[d.name])
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    deadline = time.monotonic() + 30
    while sum(s.confirmed for s in sources.values()) < 50 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 30)
    assert "QC stage failed to take over" in caplog.text
    with closing(sqlite3.connect(outbox_path)) as db:
        ((readings, distinct),) = db.execute(
            "SELECT COUNT(*), COUNT(DISTINCT json_extract(payload, '$.msg_id')) FROM message WHERE kind = 'reading'"
        ).fetchall()
    assert readings == distinct == sum(s.reads for s in sources.values()) >= 50

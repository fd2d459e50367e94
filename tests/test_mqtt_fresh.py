"""The MQTT sink publishes what a commit just stored from memory, and reads the outbox otherwise.

Memory is only a shortcut: every message is in the outbox first, so whatever memory misses
(a commit made behind the AsyncOutbox's back, a reconnect) must still arrive, once per
connection, in seq order.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from hotlab.backoff import Backoff
from hotlab.controller.config import MqttConfig
from hotlab.controller.outbox import AsyncOutbox, Outbox, StoredPayload
from hotlab.controller.sinks.mqtt import SINK, MqttSink
from tests.mosquitto_service import MosquittoBroker, MqttCollector, mosquitto  # noqa: F401
from tests.test_mqtt_puback_timeout import _until, readings, sink_running

pytestmark = pytest.mark.integration


class CountingReads(Outbox):
    """The real outbox, counting the MQTT sink's reads of the database."""

    reads = 0

    def pending_json(self, sink: str, limit: int = 500, after_seq: int = 0) -> list[StoredPayload]:
        self.reads += 1
        return super().pending_json(sink, limit, after_seq)


async def test_committed_messages_go_out_from_memory_and_gaps_from_the_outbox(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    database = CountingReads(tmp_path / "outbox.sqlite3", sinks=(SINK,))
    outbox = AsyncOutbox(database)
    config = MqttConfig(host=mosquitto.host, port=mosquitto.port, client_id="ctl-fresh", inflight_window=32)
    sink = MqttSink(config, "site", outbox, backoff=Backoff(0.05, 0.2), rng=random.Random(1))
    sent = []
    async with MqttCollector(mosquitto.host, mosquitto.port) as collector:
        async with sink_running(sink, outbox) as run:
            await asyncio.wait_for(sink.connected.wait(), 10)
            await asyncio.wait_for(_until(lambda: database.reads >= 1), 10)  # the connection's first look
            reads_at_start = database.reads
            # Caught up: each commit goes out from memory. Its 20 messages fit the window of 32 with
            # room to spare, so no read ever fills the window (which makes the sink look again at
            # once, in the database if memory has nothing more).
            for start in range(0, 100, 20):
                batch = readings(start, 20)
                sent += batch
                await outbox.put_many(batch)
                sink.notify()
                await asyncio.wait_for(_until(lambda expected=len(sent): sink.published == expected), 20)
            assert database.reads == reads_at_start and outbox.reads_from_memory >= 5

            skipped = readings(100, 7)  # committed behind the AsyncOutbox's back: not in its memory
            await asyncio.to_thread(database.put_many, skipped)
            after = readings(107, 40)  # more than one window: memory must not skip the 7
            await outbox.put_many(after)
            sink.notify()
            sent += skipped + after
            await asyncio.wait_for(_until(lambda expected=len(sent): sink.published == expected), 20)
            assert database.reads > reads_at_start
            await collector.wait_for(lambda: len(collector.payloads("/reading")) >= len(sent), what="every reading")
            sink.drain(10.0)
            await asyncio.wait_for(run, 20)

    arrived = [p["msg_id"] for p in collector.payloads("/reading")]
    assert arrived == [m.msg_id for m in sent]  # each once, in commit order

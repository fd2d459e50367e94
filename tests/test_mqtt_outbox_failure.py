"""The outbox fails under the MQTT sink (a full disk refuses its acks): the sink reconnects, it does not die.

Before, a failed ack write ended `MqttSink.run()` with the SQLite error, and the service could
only log that the sink had crashed: nothing went to MQTT again until a restart. Here the
outbox refuses the first acks the way SQLite does on a full disk; the sink must say so, back
off, reconnect, send what was not acknowledged again, and get everything acknowledged once
the outbox works.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest

from hotlab.backoff import Backoff
from hotlab.controller.config import MqttConfig
from hotlab.controller.outbox import AsyncOutbox, Outbox
from hotlab.controller.sinks.mqtt import SINK, MqttSink
from tests.mosquitto_service import MosquittoBroker, MqttCollector, mosquitto  # noqa: F401
from tests.test_mqtt_puback_timeout import _until, readings, sink_running

pytestmark = pytest.mark.integration


class AcksRefused(Outbox):
    """An outbox whose first `refusals` ack writes fail as on a full disk."""

    def __init__(self, path: Path, refusals: int) -> None:
        super().__init__(path, sinks=(SINK,))
        self.refusals = refusals

    def ack(self, sink: str, seqs: Sequence[int]) -> None:
        if self.refusals > 0:
            self.refusals -= 1
            raise sqlite3.OperationalError("database or disk is full")
        super().ack(sink, seqs)


async def test_failed_acks_end_the_session_not_the_sink(
    tmp_path: Path, mosquitto: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hotlab.controller.sinks.mqtt")
    outbox = AsyncOutbox(AcksRefused(tmp_path / "outbox.sqlite3", refusals=3))
    config = MqttConfig(host=mosquitto.host, port=mosquitto.port, client_id="ctl-ack-refused", inflight_window=32)
    sink = MqttSink(config, "site", outbox, backoff=Backoff(0.05, 0.2), rng=random.Random(2))
    messages = readings(0, 20)
    async with MqttCollector(mosquitto.host, mosquitto.port) as collector, sink_running(sink, outbox) as run:
        await outbox.put_many(messages)
        sink.notify()
        await asyncio.wait_for(_until(lambda: sink.published == 20), 30)
        assert not run.done(), "the sink must keep running after the outbox failed"
        assert await outbox.pending_count(SINK) == 0
        await collector.wait_for(lambda: len(collector.payloads("/reading")) >= 20, what="the 20 readings")
        sink.drain(10.0)
        await asyncio.wait_for(run, 20)
    # Each session that ends with a refused ack is followed by another; the session's last attempt (when it
    # closes) may use up a second refusal, so three refusals end two or three sessions.
    ended_by_the_outbox = caplog.text.count("mqtt: the outbox failed (OperationalError: database or disk is full)")
    assert 2 <= ended_by_the_outbox <= 3 and sink.connections == ended_by_the_outbox + 1
    assert outbox.sync.refusals == 0  # type: ignore[attr-defined]
    arrived = [p["msg_id"] for p in collector.payloads("/reading")]
    assert list(dict.fromkeys(arrived)) == [m.msg_id for m in messages]  # all of them, in order by first arrival


async def test_a_drain_while_the_outbox_fails_goes_offline_at_once(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    """Shutting down with a full disk: no reconnecting until the drain budget is spent, but offline now."""
    outbox = AsyncOutbox(AcksRefused(tmp_path / "outbox.sqlite3", refusals=10**6))
    config = MqttConfig(host=mosquitto.host, port=mosquitto.port, client_id="ctl-drain-refused", inflight_window=32)
    sink = MqttSink(config, "site", outbox, backoff=Backoff(0.05, 0.2), rng=random.Random(3))
    async with MqttCollector(mosquitto.host, mosquitto.port) as collector, sink_running(sink, outbox) as run:
        await outbox.put_many(readings(0, 20))
        sink.notify()
        await collector.wait_for(lambda: len(collector.payloads("/reading")) >= 20, what="the 20 readings")
        loop = asyncio.get_running_loop()
        started = loop.time()
        sink.drain(8.0)
        await asyncio.wait_for(run, 20)
        drained_in = loop.time() - started
        assert await outbox.pending_count(SINK) == 20  # nothing could be acknowledged: all kept for the next start
        await collector.wait_for(
            lambda: collector.payloads("/controller/status", "controller_status")[-1]["state"] == "offline",
            what="the offline status",
        )
    assert drained_in < 4.0, f"the drain took {drained_in:.1f} s of its 8 s budget"
    assert collector.payloads("/controller/status", "controller_status")[-1]["backlog"] == 20

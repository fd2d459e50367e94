"""A broker that stops acknowledging: the MQTT sink gives up on the connection and resends.

The sink tracks PUBACKs itself (it publishes through paho directly, not through aiomqtt's
per-message publish with its timeout), so the timeout is its own code: this test holds
back everything the real Mosquitto sends to the controller, through a TCP relay, while the
controller's PUBLISHes still reach the broker. Keepalive is long (60 s), so only the PUBACK
timeout can end that connection within the test's time.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Self

import pytest

from hotlab.backoff import Backoff
from hotlab.controller.config import MqttConfig
from hotlab.controller.messages import Message, reading_message
from hotlab.controller.outbox import AsyncOutbox, Outbox
from hotlab.controller.sinks.mqtt import SINK, MqttSink
from hotlab.drivers.records import Reading
from tests.mosquitto_service import MosquittoBroker, MqttCollector, mosquitto  # noqa: F401

pytestmark = pytest.mark.integration

PUBLISH_TIMEOUT_S = 2.0


class SilencingRelay:
    """TCP relay to the broker; `silence()` drops what the broker sends on the connections open now."""

    def __init__(self, broker_host: str, broker_port: int) -> None:
        self.broker = (broker_host, broker_port)
        self.port = 0
        self.connections = 0
        self._silenced: set[int] = set()
        self._open: set[int] = set()
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for pump in list(self._pumps):
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        await self._server.wait_closed()

    def silence(self) -> None:
        self._silenced |= self._open

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        connection = self.connections
        self._open.add(connection)
        broker_reader, broker_writer = await asyncio.open_connection(*self.broker)
        pumps = [
            asyncio.create_task(self._pump(client_reader, broker_writer, None)),
            asyncio.create_task(self._pump(broker_reader, client_writer, connection)),
        ]
        self._pumps.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._open.discard(connection)
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._pumps.difference_update(pumps)
            for writer in (client_writer, broker_writer):
                writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, silenceable: int | None) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if silenceable is not None and silenceable in self._silenced:
                    continue  # read and dropped: the broker's close still ends this connection
                writer.write(data)
                await writer.drain()


def readings(start: int, count: int) -> list[Message]:
    return [
        reading_message("site", "hotcell-1", Reading("cal-1", "Tc-99m", float(n), float(n), "Bq", n))
        for n in range(start, start + count)
    ]


@pytest.mark.parametrize("from_memory", [False, True], ids=["read-from-the-database", "answered-from-memory"])
async def test_missing_pubacks_end_the_connection_and_everything_is_resent(
    tmp_path: Path, mosquitto: MosquittoBroker, from_memory: bool
) -> None:
    outbox = AsyncOutbox(Outbox(tmp_path / "outbox.sqlite3", sinks=(SINK,)))
    async with (
        SilencingRelay(mosquitto.host, mosquitto.port) as relay,
        MqttCollector(mosquitto.host, mosquitto.port) as collector,
    ):
        config = MqttConfig(
            host="127.0.0.1",
            port=relay.port,
            client_id="ctl-puback",
            keepalive_s=60,
            inflight_window=32,
            connect_timeout_s=5.0,
        )
        sink = MqttSink(
            config,
            "site",
            outbox,
            backoff=Backoff(0.05, 0.2),
            publish_timeout_s=PUBLISH_TIMEOUT_S,
            rng=random.Random(1),
        )

        async def commit(messages: list[Message]) -> None:
            if from_memory:
                await outbox.put_many(messages)
            else:  # behind AsyncOutbox's back: it can only read these from the database
                await asyncio.to_thread(outbox.sync.put_many, messages)
            sink.notify()

        async with sink_running(sink, outbox) as run:
            first = readings(0, 20)
            await commit(first)
            await collector.wait_for(lambda: len(collector.payloads("/reading")) >= 20, what="the first 20")
            await asyncio.wait_for(_until(lambda: sink.published == 20), 20)

            relay.silence()  # the broker still gets PUBLISHes; its PUBACKs no longer arrive
            second = readings(20, 20)
            await commit(second)
            loop = asyncio.get_running_loop()
            silenced_at = loop.time()
            await collector.wait_for(lambda: len(collector.payloads("/reading")) >= 40, what="the second 20")
            if sink.connections == 1:  # still the silenced connection: nothing may be acked yet
                assert sink.published == 20
                assert await outbox.pending_count(SINK) == 20

            await asyncio.wait_for(_until(lambda: sink.published == 40), 30)
            recovered_after = loop.time() - silenced_at
            sink.drain(10.0)
            await asyncio.wait_for(run, 20)

    assert sink.connections == 2 and relay.connections == 2
    assert (outbox.reads_from_memory > 0) == from_memory
    assert PUBLISH_TIMEOUT_S <= recovered_after < 30  # the PUBACK timeout, not the 60 s keepalive
    arrived = [p["msg_id"] for p in collector.payloads("/reading")]
    expected = [m.msg_id for m in first + second]
    assert list(dict.fromkeys(arrived)) == expected  # all of them, in order by first arrival
    assert len(arrived) > len(expected)  # the unacknowledged ones were sent again


@contextlib.asynccontextmanager
async def sink_running(sink: MqttSink, outbox: AsyncOutbox) -> AsyncIterator[asyncio.Task[None]]:
    """`sink.run()` as a task; afterwards it is cancelled (if still running) and the outbox closed."""
    run = asyncio.create_task(sink.run())
    try:
        yield run
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        await outbox.close()


async def _until(predicate: Callable[[], bool]) -> None:
    """Poll a sink counter (it has no event of its own); callers bound this with wait_for."""
    while not predicate():
        await asyncio.sleep(0.02)

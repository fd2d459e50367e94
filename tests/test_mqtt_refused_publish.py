"""A message the broker refuses (an MQTT 5 PUBACK with a failure reason code) stays in the outbox.

Over MQTT 5 a broker answers a QoS 1 PUBLISH it will not deliver (an ACL denies the topic, a
quota is exceeded) with a PUBACK whose reason code is 0x80 or more. That PUBACK completes the
exchange, and a sink that took it as delivery would drop the message from the outbox with no
word. Here mosquitto's ACL denies one device's topic: its reading must stay unacknowledged in
the outbox and the refusal must be logged, while the other readings are delivered.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from hotlab.backoff import Backoff
from hotlab.controller.config import MqttConfig
from hotlab.controller.messages import reading_message
from hotlab.controller.outbox import AsyncOutbox, Outbox
from hotlab.controller.sinks.mqtt import SINK, MqttSink
from hotlab.drivers.records import Reading
from tests.mosquitto_service import require_mosquitto
from tests.test_mqtt_puback_timeout import _until, sink_running
from tests.test_mqtt_schemas import validator

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


DENY_ONE_DEVICE = "topic deny hotlab/site/hotcell-1/denied/#\ntopic readwrite #\n"


class _Mosquitto:
    """A mosquitto on a fixed port whose ACL can be replaced by restarting it."""

    def __init__(self, tmp_path: Path, port: int) -> None:
        self.tmp_path = tmp_path
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, acl_text: str) -> None:
        acl = self.tmp_path / "acl"
        acl.write_text(acl_text)
        config = self.tmp_path / "mosquitto.conf"
        config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\nacl_file {acl}\n"
            f"log_dest file {self.tmp_path / 'mosquitto.log'}\nuser root\n"
        )
        self.process = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(config)])
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                assert time.monotonic() < deadline, (self.tmp_path / "mosquitto.log").read_text()
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


@pytest.fixture
def mosquitto_with_acl(tmp_path: Path) -> Iterator[_Mosquitto]:
    require_mosquitto()
    broker = _Mosquitto(tmp_path, _free_port())
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def broker_denying_one_device(mosquitto_with_acl: _Mosquitto) -> tuple[str, int]:
    """A mosquitto whose ACL lets anonymous clients write anything but the topics of device `denied`."""
    mosquitto_with_acl.start(DENY_ONE_DEVICE)
    return "127.0.0.1", mosquitto_with_acl.port


async def _retained(port: int, topic: str) -> dict[str, Any] | None:
    """The retained payload on `topic` (None if there is none)."""
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"probe-{random.getrandbits(32):08x}") as client:
        await client.subscribe(topic, qos=1)
        try:
            async with asyncio.timeout(1.0):
                async for message in client.messages:
                    assert isinstance(message.payload, bytes)
                    payload: dict[str, Any] = json.loads(message.payload)
                    return payload
        except TimeoutError:
            return None
    return None


async def test_a_refused_publish_is_not_acknowledged_and_is_logged(
    tmp_path: Path, broker_denying_one_device: tuple[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="hotlab.controller.sinks.mqtt")
    host, port = broker_denying_one_device
    outbox = AsyncOutbox(Outbox(tmp_path / "outbox.sqlite3", sinks=(SINK,)))
    config = MqttConfig(host=host, port=port, client_id="ctl-refused", inflight_window=32)
    sink = MqttSink(config, "site", outbox, backoff=Backoff(0.05, 0.2), rng=random.Random(4))
    allowed = [reading_message("site", "hotcell-1", Reading("cal-1", "Tc-99m", n, n, "Bq", n)) for n in (1, 2)]
    denied = reading_message("site", "hotcell-1", Reading("denied", "Tc-99m", 3.0, 3.0, "Bq", 3))
    async with sink_running(sink, outbox):
        await outbox.put_many([*allowed, denied])
        sink.notify()
        await asyncio.wait_for(_until(lambda: sink.published == 2), 30)
        await asyncio.wait_for(_until(lambda: "the broker refused outbox message" in caplog.text), 30)
        await asyncio.sleep(0.5)  # reconnections meanwhile send it again and are refused again
        pending = await outbox.pending(SINK, 10)
        assert [stored.message.msg_id for stored in pending] == [denied.msg_id]
        assert sink.published == 2
    assert "Not authorized" in caplog.text


async def test_a_refused_first_message_raises_a_retained_alarm_until_the_broker_takes_it(
    tmp_path: Path, mosquitto_with_acl: _Mosquitto
) -> None:
    """Denied FIRST: acks are by prefix, so every later message waits behind it; the alarm says so."""
    mosquitto_with_acl.start(DENY_ONE_DEVICE)
    port = mosquitto_with_acl.port
    outbox = AsyncOutbox(Outbox(tmp_path / "outbox.sqlite3", sinks=(SINK,)))
    config = MqttConfig(host="127.0.0.1", port=port, client_id="ctl-refused-first", inflight_window=32)
    sink = MqttSink(config, "site", outbox, backoff=Backoff(0.05, 0.2), rng=random.Random(5))
    denied = reading_message("site", "hotcell-1", Reading("denied", "Tc-99m", 3.0, 3.0, "Bq", 3))
    allowed = [reading_message("site", "hotcell-1", Reading("cal-1", "Tc-99m", n, n, "Bq", n)) for n in (1, 2)]
    async with sink_running(sink, outbox):
        await outbox.put_many([denied, *allowed])
        sink.notify()
        alarm: dict[str, Any] | None = None

        async def alarm_raised() -> None:
            nonlocal alarm
            while alarm is None or not alarm["active"]:
                alarm = await _retained(port, sink.refused_alarm_topic)

        await asyncio.wait_for(alarm_raised(), 30)
        assert alarm is not None
        validator("controller_alarm").validate(alarm)
        assert alarm["alarm"] == "mqtt_refused"
        assert alarm["topic"] == denied.topic
        assert "Not authorized" in alarm["reason"]
        await asyncio.sleep(0.5)  # reconnections meanwhile send it again and are refused again
        pending = await outbox.pending(SINK, 10)
        assert [stored.message.msg_id for stored in pending] == [denied.msg_id] + [m.msg_id for m in allowed]
        assert sink.published == 0

        # The ACL is fixed: the same broker address now takes everything.
        mosquitto_with_acl.stop()
        mosquitto_with_acl.start("topic readwrite #\n")
        await asyncio.wait_for(_until(lambda: sink.published == 3), 30)
        assert await outbox.pending(SINK, 10) == []

        async def alarm_cleared() -> None:
            nonlocal alarm
            while alarm is None or alarm["active"]:
                alarm = await _retained(port, sink.refused_alarm_topic)

        await asyncio.wait_for(alarm_cleared(), 30)
        assert alarm is not None
        validator("controller_alarm").validate(alarm)
        assert alarm["topic"] == denied.topic

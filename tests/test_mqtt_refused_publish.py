"""A message the broker refuses (an MQTT 5 PUBACK with a failure reason code) stays in the outbox.

Over MQTT 5 a broker answers a QoS 1 PUBLISH it will not deliver (an ACL denies the topic, a
quota is exceeded) with a PUBACK whose reason code is 0x80 or more. That PUBACK completes the
exchange, and a sink that took it as delivery would drop the message from the outbox with no
word. Here mosquitto's ACL denies one device's topic: its reading must stay unacknowledged in
the outbox and the refusal must be logged, while the other readings are delivered.
"""

from __future__ import annotations

import asyncio
import logging
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from hotlab.backoff import Backoff
from hotlab.controller.config import MqttConfig
from hotlab.controller.messages import reading_message
from hotlab.controller.outbox import AsyncOutbox, Outbox
from hotlab.controller.sinks.mqtt import SINK, MqttSink
from hotlab.drivers.records import Reading
from tests.mosquitto_service import require_mosquitto
from tests.test_mqtt_puback_timeout import _until, sink_running

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def broker_denying_one_device(tmp_path: Path) -> tuple[str, int]:
    """A mosquitto whose ACL lets anonymous clients write anything but the topics of device `denied`."""
    require_mosquitto()
    port = _free_port()
    acl = tmp_path / "acl"
    acl.write_text("topic deny hotlab/site/hotcell-1/denied/#\ntopic readwrite #\n")
    config = tmp_path / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nacl_file {acl}\n"
        f"log_dest file {tmp_path / 'mosquitto.log'}\nuser root\n"
    )
    process = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(config)])
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "mosquitto.log").read_text()
                time.sleep(0.05)
        yield "127.0.0.1", port
    finally:
        process.terminate()
        process.wait(10)


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

"""One outbox, three sinks: the same readings reach Mosquitto, InfluxDB (real influxd) and the history archive."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
from pathlib import Path

import pytest

from hotlab.controller.config import parse_config
from hotlab.controller.service import delivery_report
from tests.influx_service import InfluxService, influx_database, influx_server  # noqa: F401
from tests.mosquitto_service import MosquittoBroker, MqttCollector, mosquitto  # noqa: F401
from tests.test_mqtt_delivery import Lab

pytestmark = pytest.mark.integration


async def test_every_sink_gets_every_reading(
    tmp_path: Path,
    mosquitto: MosquittoBroker,
    influx_server: InfluxService,
    influx_database: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TEST_INFLUX_PASSWORD", influx_server.password)
    config = parse_config(
        {
            "site": {"name": "three-sinks"},
            "device": [
                {
                    "name": "cal-1",
                    "station": "s1",
                    "family": "vik202",
                    "transport": "/dev/null",
                    "poll_interval_s": 0.02,
                }
            ],
            "mqtt": {"host": mosquitto.host, "port": mosquitto.port, "client_id": "ctl-three"},
            "influx": {
                "url": influx_server.url,
                "username": influx_server.username,
                "password_env": "TEST_INFLUX_PASSWORD",
                "database": influx_database,
                "flush_interval_s": 0.2,
            },
            "outbox": {"path": "outbox.sqlite3"},
            "history": {"path": "history.sqlite3"},
            "service": {"drain_timeout_s": 10},
        },
        base_dir=tmp_path,
    )
    assert config.influx is not None and "hot-lab-secret" not in repr(config)

    async with MqttCollector(mosquitto.host, mosquitto.port) as collector:
        async with Lab(config) as running:
            await collector.wait_for(lambda: len(collector.payloads("/reading")) >= 30, what="30 readings")
            await running.shutdown()
        produced = len(running.sources["cal-1"].produced)
        await collector.wait_for(
            lambda: len({p["msg_id"] for p in collector.payloads("/reading")}) >= produced, what="all readings on MQTT"
        )

    def influx_count() -> int:
        rows = influx_server.rows('SELECT count("activity_bq") FROM "raw"."reading"', influx_database)
        return int(rows[0]["count"]) if rows else 0

    with sqlite3.connect(tmp_path / "outbox.sqlite3") as db:
        left = db.execute("SELECT COUNT(*) FROM delivery").fetchone()[0]
    assert left == 0  # the shutdown drained every sink, not just MQTT
    assert await asyncio.to_thread(influx_count) == produced  # each reading once (same series+time overwrite)
    with sqlite3.connect(tmp_path / "history.sqlite3") as db:
        archived = db.execute("SELECT COUNT(*) FROM message WHERE kind = 'reading'").fetchone()[0]
    assert archived == produced
    # The run's summary: every sink acknowledged every message once, none is left.
    delivered = {d.name: (d.delivered, d.left, d.silent) for d in running.service.deliveries}
    assert delivered == dict.fromkeys(("mqtt", "influx", "history"), (running.service.committed, 0, False))


async def test_an_influxdb_that_never_answers_is_reported_as_a_silent_sink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's summary: per sink what it acknowledged and what is left, and a WARNING for the one that took nothing."""
    monkeypatch.setenv("TEST_INFLUX_PASSWORD", "unchecked")
    with socket.socket() as probe:  # a port nobody listens on: connection refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = parse_config(
        {
            "site": {"name": "silent-influx"},
            "device": [
                {
                    "name": "cal-1",
                    "station": "s1",
                    "family": "vik202",
                    "transport": "/dev/null",
                    "poll_interval_s": 0.02,
                }
            ],
            "influx": {
                "url": f"http://127.0.0.1:{port}",
                "username": "hotlab",
                "password_env": "TEST_INFLUX_PASSWORD",
                "database": "hotlab",
                "timeout_s": 1.0,
            },
            "outbox": {"path": "outbox.sqlite3"},
            "history": {"path": "history.sqlite3"},
            "service": {"drain_timeout_s": 0.5},
        },
        base_dir=tmp_path,
    )
    async with Lab(config) as running:
        while len(running.sources["cal-1"].produced if "cal-1" in running.sources else ()) < 10:
            await asyncio.sleep(0.02)
        await running.shutdown()
    deliveries = {d.name: d for d in running.service.deliveries}
    assert set(deliveries) == {"mqtt", "influx", "history"}
    history, influx, mqtt = deliveries["history"], deliveries["influx"], deliveries["mqtt"]
    assert history.delivered > 0 and history.left == 0 and not history.silent
    assert influx.silent and influx.delivered == 0 and influx.left == history.delivered
    assert "refused" in influx.detail.lower()
    assert not mqtt.configured and not mqtt.silent and mqtt.left == history.delivered  # local-only: kept for a broker
    report = delivery_report(running.service.deliveries)
    assert f"  influx   0 delivered, {influx.left} left in the outbox; last error: " in report
    assert f"  mqtt     not configured: {mqtt.left} message(s) wait in the outbox for it" in report
    assert report.splitlines()[-1] == (
        "WARNING: the influx sink never acknowledged anything; its messages wait in the outbox"
    )

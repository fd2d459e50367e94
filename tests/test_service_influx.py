"""One outbox, three sinks: the same readings reach Mosquitto, InfluxDB (real influxd) and the history archive."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from hotlab.controller.config import parse_config
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
                "url": influx_server.v2_url,
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
        rows = influx_server.rows('SELECT count("activity_bq") FROM "reading"', influx_database)
        return int(rows[0]["count"]) if rows else 0

    with sqlite3.connect(tmp_path / "outbox.sqlite3") as db:
        left = db.execute("SELECT COUNT(*) FROM delivery").fetchone()[0]
    assert left == 0  # the shutdown drained every sink, not just MQTT
    assert await asyncio.to_thread(influx_count) == produced  # each reading once (same series+time overwrite)
    with sqlite3.connect(tmp_path / "history.sqlite3") as db:
        archived = db.execute("SELECT COUNT(*) FROM message WHERE kind = 'reading'").fetchone()[0]
    assert archived == produced

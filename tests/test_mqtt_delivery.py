"""The controller service against a real Mosquitto: payloads, order, outages, a full outbox.

Devices are an in-test `CountingSource` whose n-th reading carries activity n Bq, so order,
gaps and duplicates can be checked exactly. The service, outbox, MQTT sink and broker are real.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import jsonschema
import pytest

from hotlab.controller.config import DeviceConfig, LabConfig, parse_config
from hotlab.controller.messages import Message
from hotlab.controller.qc.limits import DEFAULT_LIMITS
from hotlab.controller.qc.result import QcResult
from hotlab.controller.service import ControllerService
from hotlab.controller.sinks.mqtt import MqttSink
from hotlab.controller.supervisor import Item
from hotlab.drivers.records import DeviceTimeout, Reading
from tests.mosquitto_service import MosquittoBroker, MqttCollector, mosquitto  # noqa: F401
from tests.test_faults_devices import archived_frame_times

pytestmark = pytest.mark.integration

SCHEMAS = Path(__file__).resolve().parent.parent / "controller" / "schemas"


def schema(kind: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / f"{kind}.json").read_text())


class CountingSource:
    """A polled device whose n-th reading is n Bq; `fail_every` makes every k-th read time out."""

    streaming = False

    def __init__(self, device: str, fail_every: int = 0) -> None:
        self.device = device
        self.fail_every = fail_every
        self.produced: list[int] = []
        self.calls = 0
        self.connects = 0

    async def connect(self) -> None:
        self.connects += 1

    async def read(self) -> Sequence[Item]:
        self.calls += 1
        if self.fail_every and self.calls % self.fail_every == 0:
            raise DeviceTimeout(f"{self.device}: no answer (injected)")
        n = len(self.produced) + 1
        self.produced.append(n)
        return [Reading(self.device, "Tc-99m", float(n), float(n), "Bq", time.time_ns(), b"!R %d\r\n" % n)]

    async def delivered(self, items: Sequence[Item]) -> None:
        pass

    async def close(self) -> None:
        pass


def lab(tmp_path: Path, broker: MosquittoBroker, devices: int = 1, poll_s: float = 0.01, **outbox: Any) -> LabConfig:
    data = {
        "site": {"name": "test-lab"},
        "device": [
            {
                "name": f"cal-{i}",
                "station": "hotcell-1",
                "family": "vik202",
                "transport": "socket://127.0.0.1:9",
                "poll_interval_s": poll_s,
            }
            for i in range(1, devices + 1)
        ],
        "mqtt": {"host": broker.host, "port": broker.port, "client_id": "ctl-under-test", "keepalive_s": 5},
        "outbox": {"path": str(tmp_path / "outbox.sqlite3"), **outbox},
        "service": {"drain_timeout_s": 10, "backoff_initial_s": 0.1, "backoff_max_s": 1.0},
        "history": {"enabled": False},
    }
    return parse_config(data, file="test", base_dir=tmp_path)


class Lab:
    """A running service with CountingSources, stopped cleanly at the end."""

    def __init__(self, config: LabConfig, processors: Sequence[Any] = (), fail_every: int = 0) -> None:
        self.sources: dict[str, CountingSource] = {}
        self.fail_every = fail_every
        self.service = ControllerService(config, processors=processors, source_factory=self._source)
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def _source(self, device: DeviceConfig) -> CountingSource:
        self.sources[device.name] = CountingSource(device.name, self.fail_every)
        return self.sources[device.name]

    async def __aenter__(self) -> Self:
        self.task = asyncio.create_task(self.service.run(self.stop))
        return self

    async def shutdown(self) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 40)

    async def __aexit__(self, *exc: object) -> None:
        if self.task is not None and not self.task.done():
            await self.shutdown()


def readings_by_device(collector: MqttCollector) -> dict[str, list[dict[str, Any]]]:
    result: dict[str, list[dict[str, Any]]] = {}
    for payload in collector.payloads("/reading", "reading"):
        result.setdefault(payload["device"], []).append(payload)
    return result


def first_occurrences(payloads: list[dict[str, Any]]) -> tuple[list[int], int]:
    """Values in order of first arrival per msg_id, and how many arrivals were repeats."""
    seen: set[str] = set()
    values: list[int] = []
    for payload in payloads:
        if payload["msg_id"] not in seen:
            seen.add(payload["msg_id"])
            values.append(int(payload["activity_bq"]))
    return values, len(payloads) - len(seen)


def passing_verdict_for(reading: Message) -> Message:
    """A constancy pass caused by `reading`, as the QC engine would build it (it must match its schema)."""
    p = reading.payload
    return QcResult(
        test="constancy",
        verdict="pass",
        measured=1.0,
        expected=1.0,
        deviation_pct=0.0,
        unit="Bq",
        limit=DEFAULT_LIMITS["constancy"],
        value_judged=0.0,
        time_ns=time.time_ns(),
        inputs={"reading": p["msg_id"]},
    ).to_message(p["site"], p["station"], p["device"])


async def test_payloads_match_schemas_and_topics(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    def qc_every_third(message: Message) -> list[Message]:
        if int(message.payload["activity_bq"]) % 3:
            return []
        return [passing_verdict_for(message)]

    async with MqttCollector(mosquitto.host, mosquitto.port) as collector:
        async with Lab(lab(tmp_path, mosquitto, devices=2, poll_s=0.02), processors=[qc_every_third]) as running:
            await collector.wait_for(
                lambda: (
                    all(len(v) >= 10 for v in readings_by_device(collector).values())
                    and len(readings_by_device(collector)) == 2
                ),
                what="10 readings per device",
            )
            await running.shutdown()
        await collector.wait_for(
            lambda: any(p["state"] == "offline" for p in collector.payloads("controller/status")), what="offline status"
        )

    validators = {
        kind: jsonschema.Draft202012Validator(schema(kind), format_checker=jsonschema.FormatChecker())
        for kind in ("reading", "qc_result", "device_status", "controller_status", "controller_alarm")
    }
    kinds_seen: set[str] = set()
    for topic, payload, _retained in collector.messages:
        kind = payload["schema"].split("/")[0].removeprefix("hotlab.")
        validators[kind].validate(payload)
        kinds_seen.add(kind)
        if kind in ("reading", "qc_result", "device_status"):
            leaf = {"reading": "reading", "qc_result": "qc", "device_status": "status"}[kind]
            assert topic == f"hotlab/test-lab/hotcell-1/{payload['device']}/{leaf}"
    assert kinds_seen == set(validators)
    statuses = [p["state"] for p in collector.payloads("hotlab/test-lab/controller/status")]
    assert statuses[0] == "online" and statuses[-1] == "offline"
    for device, payloads in readings_by_device(collector).items():
        values, repeats = first_occurrences(payloads)
        assert values == list(range(1, len(values) + 1)), f"{device} readings out of order"
        assert repeats == 0  # no outage in this test, so nothing may be resent
    qc = collector.payloads("/qc", "qc_result")
    assert qc and all(any(r["msg_id"] == q["inputs"]["reading"] for r in collector.payloads("/reading")) for q in qc)
    final = [p for p in collector.payloads("/status", "device_status")][-2:]
    assert {p["detail"] for p in final} == {"controller stopped"} and not any(p["up"] for p in final)


async def test_statuses_are_retained_for_late_subscribers(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    async with Lab(lab(tmp_path, mosquitto), fail_every=4) as running:
        await asyncio.sleep(0)  # let the service start
        async with MqttCollector(mosquitto.host, mosquitto.port, client_id="early") as early:
            await early.wait_for(lambda: len(early.payloads("/reading")) >= 20, what="20 readings")
        await running.shutdown()
    async with MqttCollector(
        mosquitto.host, mosquitto.port, topic="hotlab/test-lab/+/+/status", client_id="late"
    ) as late:
        await late.wait_for(lambda: len(late.messages) >= 1, what="retained device status")
    topic, payload, retained = late.messages[0]
    assert topic == "hotlab/test-lab/hotcell-1/cal-1/status" and retained
    assert payload["up"] is False and payload["detail"] == "controller stopped"
    assert payload["errors"] >= 4  # every 4th read timed out and was counted, yet the stream went on
    async with MqttCollector(
        mosquitto.host, mosquitto.port, topic="hotlab/test-lab/controller/#", client_id="late-ctl"
    ) as late_ctl:
        await late_ctl.wait_for(lambda: len(late_ctl.messages) >= 2, what="retained controller status and alarm")
    retained_states = {t.rsplit("/", 1)[1]: (p, r) for t, p, r in late_ctl.messages}
    assert retained_states["status"][0]["state"] == "offline" and retained_states["status"][1]
    assert retained_states["alarm"][0]["active"] is False and retained_states["alarm"][1]


async def test_broker_outage_loses_nothing_and_keeps_order(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    async with MqttCollector(mosquitto.host, mosquitto.port) as collector:
        async with Lab(lab(tmp_path, mosquitto, devices=2, poll_s=0.01)) as running:
            await collector.wait_for(lambda: len(collector.payloads("/reading")) >= 50, what="50 readings")
            await asyncio.to_thread(mosquitto.stop)
            produced_before = sum(len(s.produced) for s in running.sources.values())
            await asyncio.sleep(3.0)  # the outage itself: devices keep producing into the outbox
            backlog = await running.service.outbox.pending_count("mqtt")  # type: ignore[union-attr]
            await asyncio.to_thread(mosquitto.start)
            await collector.wait_for(
                lambda: len(collector.payloads("/reading")) >= produced_before + 100, what="readings after the outage"
            )
            await running.shutdown()
        produced = {name: list(source.produced) for name, source in running.sources.items()}
        total = sum(len(v) for v in produced.values())
        await collector.wait_for(
            lambda: len({p["msg_id"] for p in collector.payloads("/reading")}) >= total, what=f"all {total} readings"
        )

    assert backlog > 50, "the outage should have built a backlog in the outbox"
    assert running.service.mqtt is not None and running.service.mqtt.connections >= 2
    window = running.service.config.mqtt.inflight_window  # type: ignore[union-attr]
    for name, payloads in readings_by_device(collector).items():
        values, repeats = first_occurrences(payloads)
        assert values == produced[name]  # every reading, in order (by first arrival)
        # At-least-once: only what was in flight when the broker went away may arrive twice.
        assert repeats <= 2 * window, f"{name}: {repeats} repeats"


async def test_full_outbox_holds_device_data_and_raises_alarm(
    tmp_path: Path, mosquitto: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    config = lab(tmp_path, mosquitto, poll_s=0.005, max_bytes=64 * 1024, warn_fraction=0.5)
    async with MqttCollector(mosquitto.host, mosquitto.port) as collector:
        await asyncio.to_thread(mosquitto.stop)  # no broker: everything piles up in a small outbox
        async with Lab(config) as running:
            service = running.service
            while "OUTBOX FULL" not in caplog.text:
                await asyncio.sleep(0.05)
            held_at = len(running.sources["cal-1"].produced)
            await asyncio.sleep(0.5)
            assert len(running.sources["cal-1"].produced) == held_at, "a full outbox must pause reading"
            assert "OUTBOX ALARM" in caplog.text
            await asyncio.to_thread(mosquitto.start)
            await collector.wait_for(
                lambda: (
                    any(not p["active"] for p in collector.payloads("controller/alarm"))
                    and len(collector.payloads("/reading")) > held_at + 20
                ),
                what="alarm cleared and reading resumed",
            )
            await running.shutdown()
        produced = list(running.sources["cal-1"].produced)
        await collector.wait_for(
            lambda: len({p["msg_id"] for p in collector.payloads("/reading")}) >= len(produced), what="every reading"
        )
    values, _ = first_occurrences(collector.payloads("/reading"))
    assert values == produced  # the reading held while the outbox was full was not lost
    alarms = collector.payloads("controller/alarm")
    assert alarms[0]["active"] is True and alarms[0]["full_events"] >= 1
    assert alarms[-1]["active"] is False
    assert service._full_count >= 1


async def test_a_crashed_sink_is_started_again_and_loses_nothing(
    tmp_path: Path, mosquitto: MosquittoBroker, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug that ends the MQTT sink's run() must not leave the lab without MQTT until a restart."""
    crashes_left = [1]
    session = MqttSink._session

    async def crashing_session(self: MqttSink, client: Any) -> None:
        if crashes_left[0]:
            crashes_left[0] -= 1
            raise RuntimeError("a bug in the sink (injected)")
        await session(self, client)

    monkeypatch.setattr(MqttSink, "_session", crashing_session)
    async with MqttCollector(mosquitto.host, mosquitto.port) as collector:
        async with Lab(lab(tmp_path, mosquitto, devices=1, poll_s=0.01)) as running:
            await collector.wait_for(lambda: len(collector.payloads("/reading")) >= 30, what="30 readings")
            await running.shutdown()
        produced = running.sources["cal-1"].produced
        await collector.wait_for(
            lambda: len({p["msg_id"] for p in collector.payloads("/reading")}) >= len(produced),
            what=f"all {len(produced)} readings",
        )
    values, _repeats = first_occurrences(readings_by_device(collector)["cal-1"])
    assert values == produced
    assert "sink mqtt crashed (1 time(s) so far); starting it again" in caplog.text
    assert "RuntimeError: a bug in the sink (injected)" in caplog.text  # with its traceback


async def test_a_crashed_history_sink_reopens_its_archive_and_loses_nothing(
    tmp_path: Path, mosquitto: MosquittoBroker, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The history sink closes its archive when it ends; started again after a crash it must open it again."""
    import hotlab.controller.sinks.history

    crashes_left = [1]
    run_history_sink = hotlab.controller.sinks.history.run_history_sink

    async def crashing_once(*args: Any, **kwargs: Any) -> int:
        if crashes_left[0]:
            crashes_left[0] -= 1
            await asyncio.sleep(0.3)  # some readings wait in the outbox meanwhile
            raise RuntimeError("a bug in the history sink (injected)")
        return await run_history_sink(*args, **kwargs)

    monkeypatch.setattr(hotlab.controller.sinks.history, "run_history_sink", crashing_once)
    config = dataclasses.replace(lab(tmp_path, mosquitto), history_path=tmp_path / "history.sqlite3")
    async with Lab(config) as running:
        await asyncio.sleep(1.5)
        await running.shutdown()
    produced = running.sources["cal-1"].produced
    archived = await asyncio.to_thread(archived_frame_times, tmp_path / "history.sqlite3", "cal-1")
    assert len(archived) == len(produced) > 20
    assert "sink history crashed (1 time(s) so far); starting it again" in caplog.text

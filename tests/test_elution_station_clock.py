"""The station's clock against the controller's: a simulator set 90 s wrong, measured over real Modbus.

The simulator (`hotlab simulate station --clock-offset-s`, or `StationClock(offset_s=...)`) stamps
its times 90 s ahead while its physics runs on true time; the driver measures the offset at each
poll, and the station's source turns it into a clock alarm that a status announces at once, while
the offset's jitter from poll to poll publishes nothing. Bounds are derived here from the test's
own timestamps around each poll: the station read its clock somewhere between them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from hotlab.controller.config import DeviceConfig, parse_config
from hotlab.controller.device_clock import ClockAlarms
from hotlab.controller.messages import Message, device_status_message, elution_message
from hotlab.controller.sources import StationSource
from hotlab.controller.supervisor import DeviceState, DeviceSupervisor, Item
from hotlab.drivers.elution_station import ElutionStationDriver
from hotlab.drivers.modbus_links import ModbusTcpLink
from hotlab.drivers.station_registers import StationState
from hotlab.physics.utc_time import NS_PER_S
from hotlab.simulators.elution_station import ElutionStationSimulator, StationClock, StationModel
from hotlab.simulators.generator_physics import GeneratorColumn, get_profile
from tests.schema_check import validator_for
from tests.test_elution_station_cli import SERVING, start_cli, stop_cli

OFFSET_NS = 90 * NS_PER_S
#: The clock register holds milliseconds (docs/elution-station-registers.md: epoch seconds + ms).
MS = 1_000_000
DAY_NS = 86_400 * NS_PER_S
WHO = {"user": "r.curie", "reason": "clock test"}


class HeldClock(StationClock):
    """A station clock whose true time the test sets, so two stations can live the same instants."""

    def __init__(self, start_ns: int, offset_s: float) -> None:
        super().__init__(1.0, start_ns, offset_s=offset_s)
        self.true_ns = start_ns

    def now_ns(self) -> int:
        return self.true_ns


def column(now_ns: int) -> GeneratorColumn:
    return GeneratorColumn(
        get_profile("ge68"),
        generator_id="GE68-CLOCK-1",
        parent_cal_bq=1.85e9,
        cal_time_ns=now_ns - 30 * DAY_NS,
        last_elution_ns=now_ns - DAY_NS,
    )


async def test_a_station_90_s_ahead_is_measured_90_s_ahead_within_the_round_trip() -> None:
    process, banner = await start_cli("--tcp", "127.0.0.1:0", "--clock-offset-s", "90")
    try:
        assert "set +90 s wrong" in banner
        match = SERVING.search(banner)
        assert match, banner
        driver = ElutionStationDriver("cli-clock", ModbusTcpLink(match.group(1), int(match.group(2))), timeout_s=3.0)
        try:
            await driver.connect()
            uncertainties = []
            for _ in range(20):
                before = time.time_ns()
                poll = await driver.poll()
                after = time.time_ns()
                shown = poll.status.clock_ns
                # The station read its clock between `before` and `after` and truncated it to the ms:
                # it really is 90 s ahead.
                assert shown - after <= OFFSET_NS <= shown + MS - before
                # The driver's measurement holds 90 s within its own bound, which is inside the test's.
                assert abs(poll.clock.offset_ns - OFFSET_NS) <= poll.clock.uncertainty_ns
                assert poll.clock.uncertainty_ns <= (after - before + MS) // 2 + 1
                uncertainties.append(poll.clock.uncertainty_ns)
        finally:
            await driver.close()
        # On loopback a poll takes milliseconds, so the bound is that tight.
        assert min(uncertainties) < 50 * MS
    finally:
        assert await stop_cli(process) == 0


async def test_an_elution_is_stamped_with_the_wrong_clock_and_happens_on_the_true_one(tmp_path: Path) -> None:
    now = time.time_ns()
    true_clock, wrong_clock = HeldClock(now, 0.0), HeldClock(now, 90.0)
    right, wrong = StationModel(column(now), true_clock), StationModel(column(now), wrong_clock)
    for model in (right, wrong):
        model.execute(1, 5.0)  # START, 5 mL
    for step_s in (10, 30):  # past the priming, then past the end of the elution
        for clock in (true_clock, wrong_clock):
            clock.true_ns = now + step_s * NS_PER_S
        right.advance()
        wrong.advance()
    shown_right, shown_wrong = right.status(), wrong.status()
    assert shown_right.state is shown_wrong.state is StationState.DONE
    # The physics is the same; every time it reports is 90 s ahead.
    assert shown_wrong.eluate_activity_bq == shown_right.eluate_activity_bq
    for name in ("start_ns", "end_ns", "clock_ns"):
        assert getattr(shown_wrong, name) - getattr(shown_right, name) == OFFSET_NS, name
    assert shown_wrong.counter_epoch_ns - shown_right.counter_epoch_ns == OFFSET_NS

    # Over Modbus, as the driver records it: the station's clock, and the elution message says so.
    simulator = ElutionStationSimulator(
        StationModel(column(now), StationClock(50.0, offset_s=90.0))  # priming 0.16 s, elution 0.4 s
    )
    host, port = await simulator.start_tcp()
    driver = ElutionStationDriver("clock-station", ModbusTcpLink(host, port), timeout_s=3.0)
    try:
        await driver.start_elution(5.0, **WHO)
        async with asyncio.timeout(15):
            while not (poll := await driver.poll()).finished or poll.state is not StationState.DONE:
                await asyncio.sleep(0.02)
        record = poll.finished[-1]
        last = simulator.model.last
        assert last is not None
        # 90 s ahead of the true times, truncated to the milliseconds the registers hold.
        assert record.start_ns == (last.start_ns + OFFSET_NS) // MS * MS
        assert record.end_ns == (last.outcome.end_ns + OFFSET_NS) // MS * MS
        payload = elution_message("lab", record).payload
        assert payload["clock"] == dict.fromkeys(
            ("time_ns", "start_ns", "end_ns", "counter_epoch_ns"), "elution_station"
        )
        validator = validator_for("elution")
        assert validator is not None
        validator.validate(payload)
    finally:
        await driver.close()
        await simulator.stop()


# ------------------------------------------------------------------ the source, the supervisor and the alarm


def station_device(tmp_path: Path, port: int) -> DeviceConfig:
    config = parse_config(
        {
            "site": {"name": "clocklab"},
            "device": [
                {
                    "name": "gen-1",
                    "station": "elution-1",
                    "family": "elution_station",
                    "poll_interval_s": 0.02,
                    "transport": {"modbus": "tcp", "host": "127.0.0.1", "port": port},
                }
            ],
            "history": {"enabled": False},
            "service": {"state_dir": "state"},
        },
        base_dir=tmp_path,
    )
    return config.devices[0]


class Reported:
    """What the supervisor reported, as the service would commit it: the status, and the clock alarm's change."""

    def __init__(self, source: StationSource, device: DeviceConfig) -> None:
        self.source, self.device = source, device
        self.alarms = ClockAlarms("clocklab")
        self.statuses: list[dict[str, Any]] = []
        self.alarm_messages: list[Message] = []

    async def __call__(self, state: DeviceState) -> None:
        condition = self.source.condition
        status = device_status_message(
            "clocklab",
            self.device.station,
            self.device.name,
            up=state.up,
            latency_ms=state.latency_ms,
            errors=state.errors,
            detail=state.detail,
            station_state=condition.state if condition else None,
            fault_code=condition.fault_code if condition else None,
            clock=self.source.clock.status() if state.up else None,
        )
        changes = self.alarms.changes(self.device.station, self.device.name, self.source.clock, time.time_ns())
        self.statuses.append(status.payload)
        self.alarm_messages += changes
        self.alarms.committed(changes)


@pytest.fixture
async def wrong_station(
    tmp_path: Path,
) -> AsyncIterator[tuple[StationModel, StationSource, DeviceSupervisor, Reported]]:
    """A station 90 s ahead polled every 20 ms by a supervisor whose interval status is ten minutes away."""
    model = StationModel(column(time.time_ns()), StationClock(1.0, offset_s=90.0))
    simulator = ElutionStationSimulator(model)
    _, port = await simulator.start_tcp()
    device = station_device(tmp_path, port)
    source = StationSource(device, tmp_path / "state", max_clock_offset_s=10.0)
    reported = Reported(source, device)

    async def deliver(items: list[Item]) -> None:
        await source.delivered(items)

    supervisor = DeviceSupervisor(
        device.name,
        source,
        poll_interval_s=device.poll_interval_s,
        deliver=deliver,
        report_status=reported,
        status_interval_s=600.0,
        condition=lambda: source.condition,
    )
    task = asyncio.create_task(supervisor.run())
    try:
        yield model, source, supervisor, reported
    finally:
        supervisor.stop()
        await asyncio.wait_for(task, 10)
        await simulator.stop()


async def polls(supervisor: DeviceSupervisor, count: int, watch: Callable[[], None] = lambda: None) -> None:
    """Wait for `count` more reads, calling `watch` after each."""
    target = supervisor.reads + count
    async with asyncio.timeout(20):
        while supervisor.reads < target:
            seen = supervisor.reads
            while supervisor.reads == seen:
                await asyncio.sleep(0.005)
            watch()


async def test_the_clock_alarm_is_announced_at_once_and_the_offset_jitter_publishes_nothing(
    wrong_station: tuple[StationModel, StationSource, DeviceSupervisor, Reported],
) -> None:
    model, source, supervisor, reported = wrong_station
    estimates: set[tuple[int, int]] = set()

    def watch() -> None:
        if source.clock.offset is not None:
            estimates.add((source.clock.offset.offset_ns, source.clock.offset.uncertainty_ns))

    await polls(supervisor, 40, watch)
    # The offset moved from poll to poll, yet one status was published: the first, with the alarm raised.
    assert len(estimates) > 1
    assert len(reported.statuses) == 1
    first = reported.statuses[0]
    assert first["clock_alarm"] is True and first["max_clock_offset_s"] == 10.0
    assert abs(first["clock_offset_s"] - 90.0) <= first["clock_uncertainty_s"]
    assert [m.payload["active"] for m in reported.alarm_messages] == [True]

    def offset_set(seconds: int) -> None:
        model.clock.offset_ns = seconds * NS_PER_S  # someone sets the station's clock

    offset_set(7)  # under the limit, not under half of it: the alarm stays, nothing is published
    await polls(supervisor, 15)
    assert len(reported.statuses) == 1
    offset_set(2)  # under half the limit: cleared, published with the next poll's status
    await polls(supervisor, 15)
    assert [s["clock_alarm"] for s in reported.statuses] == [True, False]
    assert abs(reported.statuses[-1]["clock_offset_s"] - 2.0) <= reported.statuses[-1]["clock_uncertainty_s"]
    offset_set(7)  # back between half and the limit: stays cleared
    await polls(supervisor, 15)
    offset_set(-11)  # behind by more than the limit: raised again
    await polls(supervisor, 15)
    assert [s["clock_alarm"] for s in reported.statuses] == [True, False, True]
    assert [m.payload["active"] for m in reported.alarm_messages] == [True, False, True]
    for kind, payload in [("device_status", s) for s in reported.statuses] + [
        ("controller_alarm", m.payload) for m in reported.alarm_messages
    ]:
        validator = validator_for(kind)
        assert validator is not None
        validator.validate(payload)

"""Device sources: the adapters between a driver and the supervisor's `Source` protocol.

Why a module of its own: the service orchestrates, the supervisor polls, and these classes only
translate one driver's calls (read, confirm delivery, commands) into that protocol, with one
user of the device link at a time.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hotlab.controller.config import DeviceConfig
from hotlab.controller.device_clock import DEFAULT_MAX_CLOCK_OFFSET_S, DeviceClock
from hotlab.controller.supervisor import Item, Source
from hotlab.drivers.elution_station import CommandOutcome
from hotlab.drivers.records import ElutionRecord, Reading
from hotlab.drivers.station_registers import StationState, StationStatus


class _ExclusiveDevice:
    """A device link with one user at a time: the supervisor's polling or a command.

    A station command reads the state, writes and reads the acknowledgement back as one unit,
    and a calibrator's nuclide selection is a command/confirm exchange; a poll in between
    would take the other's reply.
    """

    driver: Any

    def __init__(self) -> None:
        self.access = asyncio.Lock()

    async def connect(self) -> None:
        async with self.access:
            await self.driver.connect()

    async def close(self) -> None:
        async with self.access:
            await self.driver.close()


class CalibratorSource(_ExclusiveDevice):
    """Adapts a dose calibrator driver (hotlab.drivers.calibrator.CALIBRATOR_DRIVERS) to `Source`.

    The configured `nuclide` labels readings whose frame does not name one (e.g. VIK-202 `!R`
    reports only Bq); it never overrides what the device said it measured.
    """

    def __init__(self, device: DeviceConfig) -> None:
        from hotlab.drivers.calibrator import CALIBRATOR_DRIVERS

        super().__init__()
        driver_class = CALIBRATOR_DRIVERS[device.family]
        url = device.transport.url  # type: ignore[union-attr]
        self.driver = driver_class(url, device.name, timeout_s=device.timeout_s, **device.options)
        self.streaming = bool(getattr(driver_class, "streaming", False))
        self.nuclide = device.nuclide
        #: The nuclide of the last reading, i.e. what the calibrator is set to as far as we know.
        self.last_nuclide: str | None = device.nuclide

    async def read(self) -> Sequence[Item]:
        async with self.access:
            reading: Reading = await self.driver.read()
        if reading.nuclide is None and self.nuclide is not None:
            reading = dataclasses.replace(reading, nuclide=self.nuclide)
        self.last_nuclide = reading.nuclide
        return [reading]

    async def delivered(self, items: Sequence[Item]) -> None:
        """A calibrator shows its value once; there is nothing to confirm."""

    async def select_nuclide(self, nuclide: str) -> tuple[str | None, str]:
        """Set the calibrator to `nuclide`; from then on its unlabelled readings carry that nuclide.

        Returns (nuclide before, nuclide after) for the audit trail.
        """
        async with self.access:
            before = self.last_nuclide
            await self.driver.select_nuclide(nuclide)
            # The configured label must follow, or readings whose frame names no nuclide (e.g. a
            # VIK-202 factor missing from the driver's table) would keep the nuclide set before.
            self.nuclide = self.last_nuclide = nuclide
        return before, nuclide


@dataclass(frozen=True, slots=True)
class StationCondition:
    """What an elution station said about itself at a poll, as its device_status carries it.

    The supervisor publishes a status at once when this changes, so it holds whether the station's
    clock alarm is raised but not the clock offset itself: that moves a little at every poll, and
    would publish a status at every poll.
    """

    #: The lower-case StationState name: idle, priming, eluting, done, fault.
    state: str
    #: The station's fault code register while in fault; None otherwise.
    fault_code: int | None
    #: Whether its clock is too far off the controller's (controller/device_clock.py DeviceClock.alarm).
    clock_alarm: bool = False

    @classmethod
    def of(cls, status: StationStatus, *, clock_alarm: bool = False) -> StationCondition:
        in_fault = status.state is StationState.FAULT
        return cls(status.state.name.lower(), status.fault_code if in_fault else None, clock_alarm)


class StationSource(_ExclusiveDevice):
    """Adapts the Modbus elution station driver: each poll yields the elution not yet delivered.

    The driver repeats the station's last elution until `mark_delivered`, which is called only
    after the outbox commit; the identity it persists (in `state_dir`: station serial, counter
    epoch, counter, end time) carries that across restarts. An elution whose counter started
    again comes with `ElutionRecord.counter_reset` set, for the service to raise an alarm on.
    Built on the event loop at start-up, so it touches no disk: the driver creates `state_dir`
    and its store file on a worker thread when it first needs them.

    Each poll also measures the station's clock against the controller's (`clock`, with the alarm
    above `max_clock_offset_s`): the station stamps its elutions with its own clock.
    """

    streaming = False

    def __init__(
        self, device: DeviceConfig, state_dir: Path, max_clock_offset_s: float = DEFAULT_MAX_CLOCK_OFFSET_S
    ) -> None:
        from hotlab.drivers.elution_station import ElutionStationDriver
        from hotlab.drivers.modbus_links import ModbusRtuLink, ModbusTcpLink, ModbusTlsLink

        super().__init__()
        link = device.transport  # config builds the driver's own link dataclasses
        if not isinstance(link, (ModbusTcpLink, ModbusTlsLink, ModbusRtuLink)):
            raise TypeError(f"device {device.name}: an elution station needs a Modbus transport, not {link}")
        self.driver = ElutionStationDriver(
            device.station,
            link,
            timeout_s=device.timeout_s,
            last_counter_path=state_dir / f"{device.name}.last_counter",
            **device.options,
        )
        #: The station's state at the last poll; None before the first. The supervisor reports a change.
        self.condition: StationCondition | None = None
        #: The station's clock against the controller's, as of the last poll.
        self.clock = DeviceClock(max_clock_offset_s)

    async def read(self) -> Sequence[Item]:
        async with self.access:
            poll = await self.driver.poll()
        self.clock.observe(poll.clock)
        self.condition = StationCondition.of(poll.status, clock_alarm=self.clock.alarm)
        return list(poll.finished)

    async def delivered(self, items: Sequence[Item]) -> None:
        for item in items:
            if isinstance(item, ElutionRecord):
                await self.driver.mark_delivered(item)

    async def start_elution(self, volume_ml: float, *, user: str, reason: str) -> CommandOutcome:
        async with self.access:
            return await self.driver.start_elution(volume_ml, user=user, reason=reason)

    async def abort(self, *, user: str, reason: str) -> CommandOutcome:
        async with self.access:
            return await self.driver.abort(user=user, reason=reason)

    async def acknowledge_fault(self, *, user: str, reason: str) -> CommandOutcome:
        async with self.access:
            return await self.driver.acknowledge_fault(user=user, reason=reason)


def driver_source(
    device: DeviceConfig, state_dir: Path, max_clock_offset_s: float = DEFAULT_MAX_CLOCK_OFFSET_S
) -> Source:
    """The production source for a configured device; a station's clock alarm is raised above `max_clock_offset_s`."""
    if device.is_station:
        return StationSource(device, state_dir, max_clock_offset_s)
    return CalibratorSource(device)

"""The instruments of the history fill: the lab's simulators on the fill's clock, read the way the controller reads them.

* The QC calibrator: its ion-chamber simulator, set on its front panel and loaded as the simulated QC
  officer loads it (controller/lab/qc_officer.py: the chamber empty EMPTY_S, the source in LOADED_S,
  out again), polled at the device's interval. Each poll is the frame its simulator would send, parsed
  by its driver's parser, then judged by the controller's plausibility check (`CheckedSource`, with
  the immediate re-read where the protocol has no checksum): the same `Reading`s as live. The serial
  line itself is left out: a streaming device sends on the wall clock, which the fill does not follow.
* Each elution station: its simulator serving real Modbus TCP on loopback, started and polled by the
  real driver (`start_elution` with the operator's name and reason, as the command path calls it), so
  an elution is the record the controller would have received, register encoding and all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from hotlab.controller.checked_source import CheckedSource, has_checksum
from hotlab.controller.config import DeviceConfig
from hotlab.controller.lab.history_clock import ChamberClock, StationTime, SteppedClock
from hotlab.controller.lab.history_plan import GeneratorLife
from hotlab.controller.lab.qc_officer import EMPTY_S, LOADED_S, ge68_responses
from hotlab.controller.plausibility import PlausibilityRules
from hotlab.controller.supervisor import Item
from hotlab.drivers.counter_store import MemoryCounterStore
from hotlab.drivers.elution_station import ElutionStationDriver
from hotlab.drivers.modbus_links import ModbusTcpLink
from hotlab.drivers.records import ElutionRecord, Reading
from hotlab.drivers.vdc404 import parse_line
from hotlab.errors import InputError
from hotlab.physics.nuclides import get_nuclide
from hotlab.simulators.calibrator_vdc404 import Vdc404Simulator
from hotlab.simulators.elution_station import ElutionStationSimulator, StationIdentity, StationModel
from hotlab.simulators.generator_physics import GeneratorColumn, get_profile
from hotlab.simulators.source import DEFAULT_RESPONSE_A_PER_BQ, ChamberSchedule, IonChamber, Source

#: Polls after the source came out: the reading back at background ends the measurement (controller/measurements.py).
AFTER_REMOVAL_POLLS = 2
#: Elution stations answer on this loopback interface.
LOOPBACK = "127.0.0.1"


class RespondingChamber(IonChamber):
    """An ion chamber whose response, relative to its acceptance, changes over time (`response(at_ns)`) and with
    the container in it (`container`): what a drifting, failing or repaired chamber, or another vial, shows."""

    def __init__(self, response: Callable[[int], float], **chamber: Any) -> None:
        super().__init__(None, **chamber)
        self.response = response
        self.container = 1.0

    def expected_display_bq(self, at_ns: int | None = None) -> float:
        at = self.clock.now_ns() if at_ns is None else at_ns
        return super().expected_display_bq(at) * self.response(at) * self.container


class HistoryCalibrator:
    """The QC calibrator (a VDC-404, as the demo's) as a `Source` of checked readings on the fill's clock."""

    streaming = True

    def __init__(self, device: DeviceConfig, clock: SteppedClock, response: Callable[[int], float]) -> None:
        if device.family != "vdc404":
            raise InputError(f"the history fill reads a VDC-404 QC calibrator; {device.name} is a {device.family}")
        self.device = device
        self.clock = clock
        chamber = RespondingChamber(
            response, clock=ChamberClock(clock), responses=ge68_responses(DEFAULT_RESPONSE_A_PER_BQ)
        )
        self.chamber = chamber
        self._display = Vdc404Simulator(chamber)
        self._poll_ns = round(device.poll_interval_s * 1e9)
        self._checked = CheckedSource(
            self,
            PlausibilityRules(device.family, device.plausibility_settings()),
            reread=not has_checksum(device.family, device.options),
        )

    async def measure(self, source: Source, setting: str, container: float = 1.0) -> list[Reading]:
        """The chamber empty, then `source` in, then out again, read on `setting`: one measurement's readings."""
        self.chamber.select(setting)
        self.chamber.container = container
        start = self.clock.now_ns()
        loaded = start + round(EMPTY_S * 1e9)
        removed = loaded + round(LOADED_S * 1e9)
        self.chamber.schedule = ChamberSchedule(((loaded, source), (removed, None)))
        end = removed + AFTER_REMOVAL_POLLS * self._poll_ns
        readings: list[Reading] = []
        try:
            while self.clock.now_ns() < end:
                readings += [item for item in await self._checked.read() if isinstance(item, Reading)]
        finally:
            self.chamber.schedule = None
        return readings

    # -- the Source protocol CheckedSource reads through: one frame per poll interval ----------------

    async def read(self) -> Sequence[Item]:
        self.clock.advance(self._poll_ns / 1e9)
        frame = self._display.line()
        shown = parse_line(frame)
        return [
            Reading(
                device=self.device.name,
                nuclide=shown.nuclide,
                activity_bq=shown.activity_bq,
                raw_value=shown.value,
                unit=shown.unit,
                timestamp_ns=self.clock.now_ns(),
                raw_frame=frame,
            )
        ]

    async def connect(self) -> None:
        """Nothing to open: the frames come straight from the simulator."""

    async def close(self) -> None:
        """Nothing to close."""

    async def delivered(self, items: Sequence[Item]) -> None:
        """A calibrator shows its value once; there is nothing to confirm."""


class HistoryStation:
    """One elution station: its simulator on Modbus TCP, driven by the real driver on the fill's clock."""

    def __init__(self, device: DeviceConfig, clock: SteppedClock) -> None:
        self.device = device
        self.clock = clock
        self._simulator: ElutionStationSimulator | None = None
        self._driver: ElutionStationDriver | None = None

    async def install(self, life: GeneratorLife) -> None:
        """Put a generator column on the station (a new station model: its serial is the generator's, as in the demo)."""
        column = GeneratorColumn(
            get_profile(life.profile),
            generator_id=life.generator_id,
            parent_cal_bq=life.calibration_bq,
            cal_time_ns=life.calibration_ns,
            last_elution_ns=life.last_elution_ns,
            elution_count=life.elutions_before,
        )
        model = StationModel(column, StationTime(self.clock), StationIdentity(serial=life.generator_id))
        if self._simulator is not None:
            self._simulator.model = model
            return
        self._simulator = ElutionStationSimulator(model)
        host, port = await self._simulator.start_tcp(LOOPBACK, 0)
        self._driver = ElutionStationDriver(
            self.device.station, ModbusTcpLink(host, port), counter_store=MemoryCounterStore()
        )

    async def elute(self, volume_ml: float, *, user: str, reason: str) -> ElutionRecord:
        """Start an elution now, let it run to its end on the station's clock, and read the finished record."""
        assert self._simulator is not None and self._driver is not None, "install a generator first"
        await self._driver.start_elution(volume_ml, user=user, reason=reason)
        profile = self._simulator.model.profile
        self.clock.advance(profile.priming_s + profile.elution_duration_s(volume_ml) + 1.0)
        poll = await self._driver.poll()
        if not poll.finished:
            raise RuntimeError(f"{self.device.name}: the elution did not finish (station {poll.state.name})")
        return poll.finished[0]

    async def delivered(self, record: ElutionRecord) -> None:
        """The record is committed: the driver stops handing it over, as after a live commit."""
        assert self._driver is not None
        await self._driver.mark_delivered(record)

    async def close(self) -> None:
        if self._driver is not None:
            await self._driver.close()
        if self._simulator is not None:
            await self._simulator.stop()


def source_of(record: ElutionRecord, part: str, *, aliquot_bq: float = 0.0, drawn_ns: int = 0) -> Source:
    """What an elution's vial holds: the eluate, its parent breakthrough, or an aliquot drawn from it (at most
    what the eluate still holds then).

    The Ge-68 in a Ga-68 eluate is the station's own figure at end of elution (`parent_bq`); after the 48 h a
    follow-up waits, the eluted Ga-68 has decayed to 2^-42 of itself and is left out, and the chamber reads the
    Ge-68 through the Ga-68 it feeds in equilibrium (`ge68_responses`), as the live QC officer's eluate does.
    """
    if part == "ge68":
        return Source(get_nuclide(record.parent_nuclide), float(record.parent_bq or 0.0), record.end_ns)
    daughter = get_nuclide(record.daughter_nuclide)
    eluate = Source(daughter, record.activity_bq, record.end_ns)
    if part == "aliquot":
        return Source(daughter, min(aliquot_bq, eluate.activity_bq(drawn_ns)), drawn_ns)
    return eluate

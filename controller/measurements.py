"""Measurements: what a radiopharmacist records, found in each calibrator's stream of good readings.

A calibrator is polled every few seconds, but what is recorded is a measurement: a vial is put in,
the reading rises from background and settles, the value is taken, the vial comes out. The detector
follows each calibrator through these phases, from its good readings only (a suspect reading,
controller/checked_source.py, is skipped as if it had not been taken):

    unknown --background--> empty --above background--> rising --N readings within the noise band--> settled
    settled --removal / level or setting change / dwell--> published (held until the source leaves)

* *empty*: readings at most `background_bq` (controller/plausibility.py). The last `settle_readings`
  of them give the measurement's `background_bq`.
* *rising*: from the first reading above background (`start_ns`) until the last `settle_readings`
  good readings, each decay-corrected to the newest one's time, all lie within the device's noise
  band of their mean (`settle_ns`: the newest one's time). The noise band and background are the
  plausibility check's, so the two never disagree about what is noise.
* *settled*: every further reading that follows from the previous one by decay within the noise band
  belongs to the plateau. The value is the mean of the plateau's readings, each decay-corrected to
  `settle_ns` with the setting's half-life, with their sample standard deviation and count.

When the measurement is published, and why: **once, at the first of**
  - removal: the reading steps back to background (`end: removed`, `removal_ns` set): a dose that is
    inserted, read and taken out;
  - `dwell_s` after settling with the source still in (`end: dwell`, `removal_ns` null): a check source
    left in the chamber. Its later removal publishes nothing more: it is held until it leaves;
  - a level or nuclide-setting change without passing background (a vial swapped between two polls,
    confirmed by the plausibility check's re-read, or the setting switched with the vial in;
    `end: changed` / `setting_changed`, `removal_ns` null): the new level or setting starts a new one.
So a dose and a check source each give exactly one measurement per insertion, and a dose's record
carries its removal time. Publishing at settle instead would never know the removal; publishing only
at removal would never record a source that stays in.

A source that is in the chamber when the detector starts (no background seen yet) is not measured:
nothing says when it went in or what the background was. Take it out and put it back.

Like the QC engine, the detector runs in two phases so its memory never runs ahead of the outbox:
`process` (pure) finds the measurements of a commit batch, each placed right after the reading that
completed it (so QC judges it in the same batch); `apply` takes the new state over after the commit.
After a restart `restore` replays the good readings committed in the last `dwell_s` + one hour
(history archive plus what the outbox has not archived yet): a reading and the measurement it
completed were committed together, so the replay rebuilds the state the detector had, and a
measurement found again there has the same name-based msg_id (messages.measurement_msg_id).
"""

from __future__ import annotations

import logging
import statistics
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from hotlab.controller.messages import MeasurementValues, Message, measurement_message
from hotlab.controller.plausibility import PlausibilityRules, Point

if TYPE_CHECKING:
    from hotlab.controller.archive import HistoryArchive
    from hotlab.controller.config import LabConfig

log = logging.getLogger(__name__)

#: Readings older than the longest dwell by more than this are not replayed by `restore`: a source
#: in the chamber for that long has been published (at its dwell) or never settled.
RESTORE_MARGIN_S = 3600.0
#: Published measurements remembered for label commands (older ones are found in the archive).
REMEMBERED_MEASUREMENTS = 4096
#: A measurement names at most this many of its plateau's first readings and as many of its last
#: (`n` counts them all): a source left in for a day at 0.5 s polls would otherwise put ~170 000
#: msg_ids into one message.
READING_IDS_KEPT = 50

Phase = Literal["unknown", "empty", "rising", "settled", "held"]
End = Literal["removed", "dwell", "changed", "setting_changed"]


@dataclass(frozen=True, slots=True)
class MeasurementSettings:
    """`[device.measurement]`: how many good readings make a settled value, and how long a source may stay."""

    settle_readings: int = 5
    dwell_s: float = 60.0


@dataclass(frozen=True, slots=True)
class DetectedDevice:
    """A calibrator the detector follows: where it is, its noise band and background, its settings."""

    name: str
    station: str
    rules: PlausibilityRules
    settings: MeasurementSettings = MeasurementSettings()


@dataclass(slots=True)
class _Track:
    """One calibrator's phase and the readings it needs (module docstring)."""

    phase: Phase = "unknown"
    background: list[float] = field(default_factory=list)
    setting: str | None = None
    start_ns: int = 0
    #: The empty-chamber readings just before the source went in (the measurement's background).
    start_background: tuple[float, ...] = ()
    settle_ns: int = 0
    #: rising: the last `settle_readings` readings; settled: the plateau so far. (point, reading msg_id)
    readings: list[tuple[Point, str]] = field(default_factory=list)
    last: Point | None = None

    def copy(self) -> _Track:
        return _Track(
            self.phase,
            list(self.background),
            self.setting,
            self.start_ns,
            self.start_background,
            self.settle_ns,
            list(self.readings),
            self.last,
        )

    def step(self, device: DetectedDevice, point: Point, msg_id: str) -> MeasurementValues | None:
        """Take one good reading; return the measurement it completes, if any."""
        rules = device.rules
        empty = rules.is_background(point.activity_bq)
        published: MeasurementValues | None = None
        if self.phase in ("settled", "held"):
            end = self._plateau_end(rules, point, empty)
            if end is None:
                self.last = point
                if self.phase == "settled":
                    self.readings.append((point, msg_id))
                    if point.time_ns - self.settle_ns >= device.settings.dwell_s * 1e9:
                        published = self._values(device, "dwell", None)
                        self.phase, self.readings = "held", []
                return published
            if self.phase == "settled":
                published = self._values(device, end, point.time_ns if end == "removed" else None)
        if empty:
            self._empty(device, point)
        elif self.phase == "unknown":
            self.last = point  # in the chamber since before the detector knew: not measured
        elif self.phase == "rising" and point.nuclide == self.setting:
            self._rise(device, point, msg_id)
        else:
            self._start(point, msg_id)
        return published

    def _plateau_end(self, rules: PlausibilityRules, point: Point, empty: bool) -> End | None:
        if empty:
            return "removed"
        if point.nuclide != self.setting:
            return "setting_changed"
        if self.last is not None and not rules.consistent(self.last, point):
            return "changed"
        return None

    def _empty(self, device: DetectedDevice, point: Point) -> None:
        kept = self.background if self.phase == "empty" else []
        self.background = [*kept, point.activity_bq][-device.settings.settle_readings :]
        self.phase, self.readings, self.last = "empty", [], point

    def _start(self, point: Point, msg_id: str) -> None:
        self.phase, self.setting, self.start_ns = "rising", point.nuclide, point.time_ns
        self.start_background = tuple(self.background)
        self.readings, self.last = [(point, msg_id)], point

    def _rise(self, device: DetectedDevice, point: Point, msg_id: str) -> None:
        self.readings = [*self.readings, (point, msg_id)][-device.settings.settle_readings :]
        self.last = point
        if len(self.readings) == device.settings.settle_readings and _settled(device.rules, self.readings):
            self.phase, self.settle_ns = "settled", point.time_ns

    def _values(self, device: DetectedDevice, end: End, removal_ns: int | None) -> MeasurementValues:
        corrected = [device.rules.carried(point, self.settle_ns) for point, _ in self.readings]
        return MeasurementValues(
            device=device.name,
            nuclide=self.setting,
            activity_bq=statistics.fmean(corrected),
            sd_bq=statistics.stdev(corrected) if len(corrected) > 1 else 0.0,
            n=len(corrected),
            background_bq=statistics.fmean(self.start_background) if self.start_background else 0.0,
            start_ns=self.start_ns,
            settle_ns=self.settle_ns,
            removal_ns=removal_ns,
            end=end,
            reading_ids=_capped_ids([msg_id for _, msg_id in self.readings]),
            background_readings=self.start_background,
        )


def _capped_ids(ids: Sequence[str]) -> tuple[str, ...]:
    """All of `ids`, or the first and last `READING_IDS_KEPT` of them when there are more than twice that."""
    if len(ids) <= 2 * READING_IDS_KEPT:
        return tuple(ids)
    return (*ids[:READING_IDS_KEPT], *ids[-READING_IDS_KEPT:])


def _settled(rules: PlausibilityRules, readings: Sequence[tuple[Point, str]]) -> bool:
    """True when every reading, decay-corrected to the newest one's time, lies in the noise band of their mean."""
    newest_ns = readings[-1][0].time_ns
    corrected = [rules.carried(point, newest_ns) for point, _ in readings]
    mean = statistics.fmean(corrected)
    return all(abs(value - mean) <= rules.band(mean) for value in corrected)


def _good_point(payload: Mapping[str, Any]) -> Point:
    nuclide = payload.get("nuclide")
    return Point(int(payload["time_ns"]), float(payload["activity_bq"]), None if nuclide is None else str(nuclide))


@dataclass(frozen=True, slots=True)
class DetectionOutcome:
    """What `MeasurementDetector.process` found in a batch; commit `messages`, then `apply` it.

    `messages` is the batch in order with each measurement right after the reading that completed it.
    """

    messages: tuple[Message, ...]
    measurements: tuple[Message, ...]
    _tracks: Mapping[str, _Track] = field(repr=False)


class MeasurementDetector:
    """Turns the good readings of the configured calibrators into measurement messages (module docstring)."""

    @classmethod
    def for_lab(cls, config: LabConfig) -> MeasurementDetector:
        """The detector of every calibrator of `config`, with its plausibility rules and measurement settings."""
        return cls(
            config.site,
            [
                DetectedDevice(
                    device.name,
                    device.station,
                    PlausibilityRules(device.family, device.plausibility_settings()),
                    device.measurement_settings(),
                )
                for device in config.devices
                if not device.is_station
            ],
        )

    def __init__(self, site: str, devices: Iterable[DetectedDevice]) -> None:
        self.site = site
        self.devices = {device.name: device for device in devices}
        self._tracks = {name: _Track() for name in self.devices}
        self._published: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def process(self, messages: Sequence[Message]) -> DetectionOutcome:
        """Find the measurements `messages` (one commit batch, in order) complete, without changing the detector."""
        staged: dict[str, _Track] = {}
        batch: list[Message] = []
        found: list[Message] = []
        for message in messages:
            batch.append(message)
            payload = message.payload
            device = self.devices.get(str(payload.get("device")))
            if message.kind != "reading" or device is None or payload.get("quality") != "good":
                continue
            track = staged.get(device.name) or self._tracks[device.name].copy()
            staged[device.name] = track
            try:
                values = track.step(device, _good_point(payload), message.msg_id)
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("measurements: reading %s of %s skipped: %s", payload.get("msg_id"), device.name, exc)
                continue
            if values is not None:
                measurement = measurement_message(self.site, device.station, values)
                batch.append(measurement)
                found.append(measurement)
        return DetectionOutcome(tuple(batch), tuple(found), staged)

    def apply(self, outcome: DetectionOutcome) -> None:
        """Take over the state of a committed outcome. Call once, after the commit succeeded."""
        self._tracks.update(outcome._tracks)
        for measurement in outcome.measurements:
            self._remember(measurement.payload)

    def published(self, msg_id: str) -> dict[str, Any] | None:
        """A measurement committed by this controller recently (or still waiting in the outbox at start), or None."""
        return self._published.get(msg_id)

    def restore(self, archive: HistoryArchive, unarchived: Iterable[Message], now_ns: int) -> int:
        """Rebuild each calibrator's phase from the good readings committed before a restart; return how many.

        `unarchived` are the messages still in the outbox that the history sink has not archived yet.
        Blocking SQLite I/O: from async code, run it in `asyncio.to_thread`, before the first `process`.
        """
        from hotlab.controller.archive import OPEN_END_NS, TimeRange

        if not self.devices:
            return 0
        longest_dwell_s = max(device.settings.dwell_s for device in self.devices.values())
        since_ns = now_ns - int((longest_dwell_s + RESTORE_MARGIN_S) * 1e9)
        pending = list(unarchived)
        readings = archive.query("reading", TimeRange(since_ns, OPEN_END_NS))
        archived_ids = {payload.get("msg_id") for payload in readings}
        readings += [m.payload for m in pending if m.kind == "reading" and m.payload.get("msg_id") not in archived_ids]
        timed: list[tuple[int, dict[str, Any]]] = []
        for payload in readings:
            try:
                time_ns = int(payload["time_ns"])
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("measurements: archived reading %s not replayed: %r", payload.get("msg_id"), exc)
                continue
            if time_ns >= since_ns:
                timed.append((time_ns, payload))
        timed.sort(key=lambda item: item[0])
        replayed = 0
        for _, payload in timed:
            device = self.devices.get(str(payload.get("device")))
            # A reading archived before readings carried a quality was taken as good.
            if device is None or payload.get("quality", "good") != "good":
                continue
            try:
                self._tracks[device.name].step(device, _good_point(payload), str(payload["msg_id"]))
            except (KeyError, TypeError, ValueError) as exc:  # like `process`: one bad payload stops nothing
                log.warning("measurements: reading %s of %s not replayed: %r", payload.get("msg_id"), device.name, exc)
                continue
            replayed += 1
        for message in pending:
            if message.kind == "measurement":
                self._remember(message.payload)
        log.info("measurements: replayed %d good reading(s) to restore each calibrator's phase", replayed)
        return replayed

    def _remember(self, payload: dict[str, Any]) -> None:
        self._published[str(payload["msg_id"])] = payload
        while len(self._published) > REMEMBERED_MEASUREMENTS:
            self._published.popitem(last=False)

"""What months of the demo lab's life consist of: a time-ordered list of what people and devices did.

Pure rules, no physics and no I/O: the fill (controller/lab/history_fill.py) carries each event out
on the real simulators, and the controller's own commit path records it. All times are the lab's
local time (`[qc.schedule] timezone`), as the QC schedule reads them.

The routine, every day of the window from its first whole morning (the acceptance day) to now:

* 06:45 the Tc-99m generator is eluted (every day); a new Mo-99/Tc-99m generator arrives each
  Friday at 18:00 (calibrated on arrival), the usual weekly supply of a 66 h parent;
* 07:00 the daily constancy check: the check source in the QC lab's calibrator (recognised by the
  controller, no command);
* 07:30 the Ga-68 generator is eluted on working days (a tenth of them skipped, so "most"), and
  again at 13:00 on Tuesdays and Thursdays; the first elution of each day is followed up 49 h later
  (at least 48 h: docs/qc.md, Ge-68 breakthrough) by measuring the eluate kept aside;
* on Mondays a linearity series (decay method) starts at 07:35 with that morning's Tc-99m eluate,
  read at 07:40, 10:00, 13:30 and 16:00 each day until it has decayed below the calibrator's
  `linearity_low_bq` (by Friday); only series that end before now are started, so none is left open;
* on the acceptance day, before anything else: a constancy baseline (06:50), the accuracy of the
  check source against its certificate (the daily check's measurement, labelled at 07:05), and
  the geometry test (07:10) with a Tc-99m aliquot in each container;
* one Saturday about 60 % into the window the morning check fails: the chamber lost 15 % of its
  response overnight (illustrative). It is repaired by 12:00, re-baselined at 13:30 and its
  geometry tested again at 13:50 (the schedule's rule: geometry after a repair; docs/qc.md,
  Baselines: a baseline "after a service"). Follow-ups due that morning wait for the repair.

The chamber drifts slowly between services (illustrative: a sealed chamber slowly losing gas pressure
reads low): linearly, reaching -3 % on the failure morning, then again from the repair at the same
rate, so every other check passes (limit +-5 %) and exactly one fails.

The generators end where the live lab takes over: the live lab's config seeds each generator's last
elution (`[qc.generators] last_elution`) and its station continues from there, so the history's
last elution of a station comes before the live generator's calibration or that seed. What the
station held before is an earlier generator of the same kind under an id of its own, with its own
`[qc.generators]` entry: the Ga-68 column used for a year before (its yield declining with age and
use: simulators/generator_physics.py, an illustrative model), the weekly Mo-99 columns.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any, Literal
from zoneinfo import ZoneInfo

from hotlab.controller.messages import iso_utc
from hotlab.errors import InputError
from hotlab.physics.decay import activity_at
from hotlab.physics.utc_time import NS_PER_S

if TYPE_CHECKING:
    from hotlab.controller.lab.simulated_lab import SimGenerator, SimLab
    from hotlab.controller.qc.engine import QcConfig

DAY_NS = 86_400 * NS_PER_S
HOUR_NS = 3_600 * NS_PER_S
MINUTE_NS = 60 * NS_PER_S

#: The fewest days a history can hold all of its story (a failure with days before and after, a
#: linearity week), and the most: a year, the life of the Ga-68 generator before the live one.
MIN_DAYS = 14
MAX_DAYS = 365

TC99M_ELUTION_AT = time(6, 45)
BASELINE_AT = time(6, 50)
DAILY_CHECK_AT = time(7, 0)
ACCURACY_LABEL_AT = time(7, 5)
GEOMETRY_AT = time(7, 10)
GA68_ELUTION_AT = time(7, 30)
LINEARITY_START_AT = time(7, 35)
LINEARITY_READINGS_AT = (time(7, 40), time(10, 0), time(13, 30), time(16, 0))
GA68_SECOND_ELUTION_AT = time(13, 0)
REPAIRED_AT = time(12, 0)
REBASELINE_AT = time(13, 30)
REGEOMETRY_AT = time(13, 50)
FOLLOW_UP_AT = time(14, 15)  # on the failure day: after the repair, the re-baseline and the geometry test
MO99_DELIVERY_AT = time(18, 0)
MONDAY, TUESDAY, THURSDAY, FRIDAY, SATURDAY = 0, 1, 3, 4, 5
GA68_SECOND_ELUTION_DAYS = (TUESDAY, THURSDAY)
#: A first Ga-68 elution of the day is followed up this long after it (the rule says at least 48 h).
FOLLOW_UP_AFTER_NS = 49 * HOUR_NS
#: Working days without a Ga-68 elution (no labelling that day); the draw is seeded, so a plan is reproducible.
GA68_SKIP_FRACTION = 0.1
PLAN_SEED = 68
#: Ga-68 elutions per working day before the history, for the earlier column's use count.
GA68_ELUTIONS_PER_WORKING_DAY = 1.4
#: The earlier Ga-68 column was used this long: 12 months, the shelf life Ge-68/Ga-68 generator SmPCs state
#: (e.g. GalliaPharm; illustrative, not checked against the text here).
GA68_COLUMN_LIFE_NS = 365 * DAY_NS
#: The last elution of a station comes at least this long before the live generator's seed or calibration.
HANDOVER_MARGIN_NS = HOUR_NS
#: Where in the window the failure falls (a fraction of it), and what the chamber does (illustrative).
FAILURE_AT_FRACTION = 0.6
DRIFT_AT_FAILURE = -0.03
FAILURE_RESPONSE = 0.85
#: Containers of the geometry test, the reference first, and how the chamber reads each relative to it
#: (illustrative; a real chamber's are measured at acceptance: docs/qc.md, Geometry).
GEOMETRIES: tuple[tuple[str, float], ...] = (("vial 10 mL", 1.0), ("syringe 3 mL", 1.025), ("vial 20 mL", 0.99))
GEOMETRY_STEP_NS = 5 * MINUTE_NS
#: The Tc-99m activity drawn from the latest eluate for the geometry test.
GEOMETRY_ALIQUOT_BQ = 400e6
#: A generator id's length limit: the station's `generator_id` input registers (drivers/station_registers.py).
GENERATOR_ID_CHARS = 16
#: A procedure's first measurement follows its start_qc by this much.
FIRST_STEP_NS = 5 * MINUTE_NS


@dataclass(frozen=True, slots=True)
class GeneratorLife:
    """One generator column on one station during the history (never the live one)."""

    generator_id: str
    device: str
    profile: str
    calibration_bq: float
    calibration_ns: int
    #: Its elutions before the history's first one, and the last of them (its calibration if none).
    elutions_before: int
    last_elution_ns: int
    volume_ml: float
    #: Its last elution comes before this (the next generator's arrival, or the live lab's).
    removed_ns: int

    def qc_table(self, parent: str) -> dict[str, str]:
        """Its `[qc.generators.<id>]` entry, as the lab's config held it while it was in use."""
        return {
            "parent": parent,
            "activity": f"{self.calibration_bq} Bq",
            "calibration_time": iso_utc(self.calibration_ns),
            "last_elution": iso_utc(self.last_elution_ns),
        }


@dataclass(frozen=True, slots=True)
class ChamberResponse:
    """The QC calibrator's response relative to its acceptance: a slow drift, one overnight failure, a repair."""

    accepted_ns: int
    failed_ns: int
    repaired_ns: int
    drift_per_day: float
    failure_response: float = FAILURE_RESPONSE

    def at(self, time_ns: int) -> float:
        if time_ns >= self.repaired_ns:
            return 1.0 + self.drift_per_day * (time_ns - self.repaired_ns) / DAY_NS
        drifted = 1.0 + self.drift_per_day * (time_ns - self.accepted_ns) / DAY_NS
        return drifted * (self.failure_response if time_ns >= self.failed_ns else 1.0)


@dataclass(frozen=True, slots=True)
class Install:
    at_ns: int
    life: GeneratorLife


@dataclass(frozen=True, slots=True)
class Elute:
    at_ns: int
    life: GeneratorLife
    #: The first Ga-68 elution of its day: the Ge-68 follow-up the schedule asks for is planned.
    followed_up: bool = False


@dataclass(frozen=True, slots=True)
class MeasureCheckSource:
    """The check source in the QC calibrator on its own setting: a daily check, or a baseline's step."""

    at_ns: int


@dataclass(frozen=True, slots=True)
class LabelAccuracy:
    """The last check-source measurement labelled as an accuracy test against the source's certificate."""

    at_ns: int


@dataclass(frozen=True, slots=True)
class StartProcedure:
    """A QC officer's start_qc: `kind` with its reason, setting, containers or elution."""

    at_ns: int
    kind: Literal["baseline", "linearity", "geometry", "ge68_breakthrough"]
    reason: str
    nuclide: str | None = None
    geometries: tuple[str, ...] = ()
    elution: Elute | None = None


@dataclass(frozen=True, slots=True)
class MeasureEluate:
    """Something from an elution's vial in the QC calibrator on `setting`.

    `part`: the whole eluate (a linearity series: skipped once the series has ended), the Ge-68 it
    holds (a follow-up), or an aliquot of `aliquot_bq` drawn at `drawn_ns` in a container the chamber
    reads `container_response` times right (a geometry step).
    """

    at_ns: int
    elution: Elute
    setting: str
    part: Literal["series", "ge68", "aliquot"]
    aliquot_bq: float = 0.0
    drawn_ns: int = 0
    container_response: float = 1.0


Event = Install | Elute | MeasureCheckSource | LabelAccuracy | StartProcedure | MeasureEluate


@dataclass(frozen=True, slots=True)
class HistoryPlan:
    start_ns: int
    end_ns: int
    #: The QC calibrator's installation: the local midnight of its acceptance day (the window's first whole morning).
    installed_ns: int
    #: The local day of the calibrator's acceptance and of its failure.
    acceptance_day: date
    failure_day: date
    chamber: ChamberResponse
    generators: tuple[GeneratorLife, ...]
    events: tuple[Event, ...]
    #: `[qc.generators]` and `[qc.schedule.devices]` entries the history's QC needs beside the live lab's.
    generators_table: dict[str, dict[str, str]] = field(default_factory=dict)
    schedule_devices: dict[str, dict[str, str]] = field(default_factory=dict)
    #: `[qc.sources]` keys changed for the history: the check source's certificate dated before its first use.
    source_changes: dict[str, dict[str, str]] = field(default_factory=dict)

    def qc_table(self, live: dict[str, Any]) -> dict[str, Any]:
        """The live lab's `[qc]` table with the history's earlier generators and the calibrator's installation."""
        table = dict(live)
        table["generators"] = dict(table.get("generators", {})) | self.generators_table
        sources = dict(table.get("sources", {}))
        table["sources"] = sources | {key: dict(sources[key]) | change for key, change in self.source_changes.items()}
        schedule = dict(table.get("schedule", {}))
        table["schedule"] = schedule | {"devices": dict(schedule.get("devices", {})) | self.schedule_devices}
        return table


class _Local:
    """The lab's local clock: instants of a local day."""

    def __init__(self, zone: ZoneInfo) -> None:
        self.zone = zone

    def at(self, day: date, at: time) -> int:
        return int(datetime.combine(day, at, tzinfo=self.zone).timestamp()) * NS_PER_S

    def day(self, time_ns: int) -> date:
        return datetime.fromtimestamp(time_ns // NS_PER_S, self.zone).date()

    def days(self, first: date, last: date) -> Iterator[date]:
        day = first
        while day <= last:
            yield day
            day += timedelta(days=1)


def plan_history(lab: SimLab, qc: QcConfig, days: int, now_ns: int) -> HistoryPlan:
    """The plan of `days` days up to `now_ns` for `lab`, whose live `[qc]` is `qc`; InputError if it cannot be made."""
    if not MIN_DAYS <= days <= MAX_DAYS:
        raise InputError(f"--history-days must be from {MIN_DAYS} to {MAX_DAYS}, got {days}")
    check = lab.check_source
    if check is None or check.device not in qc.devices:
        raise InputError("a history needs the lab's check source on a calibrator with QC ([qc.devices])")
    local = _Local(qc.schedule.timezone)
    start_ns = now_ns - days * DAY_NS
    first = local.day(start_ns)
    if local.at(first, TC99M_ELUTION_AT) < start_ns:
        first += timedelta(days=1)
    last = local.day(now_ns)
    events: list[Event] = []
    lives: list[GeneratorLife] = []
    generators_table: dict[str, dict[str, str]] = {}
    ga68_first_elutions: list[Elute] = []
    tc99m_by_day: dict[date, Elute] = {}
    rng = random.Random(PLAN_SEED)
    for generator in lab.generators:
        live = qc.generators.get(generator.generator_id)
        if live is None:
            raise InputError(f"generator {generator.generator_id} of the lab has no [qc.generators] entry")
        handover_ns = min(qc.last_elution_ns.get(generator.generator_id, live.calibration_ns), now_ns)
        handover_ns -= HANDOVER_MARGIN_NS
        if generator.profile == "ge68":
            life = _earlier_ga68(generator, live.calibration_bq, local, first, handover_ns)
            elutions = _ga68_elutions(life, local, first, last, rng)
            ga68_first_elutions += [e for e in elutions if e.followed_up]
            lives.append(life)
            events += [Install(start_ns, life), *elutions]
            generators_table[life.generator_id] = life.qc_table(live.parent.name)
        elif generator.profile == "mo99":
            for life in _weekly_mo99(generator, live.calibration_bq, local, first, handover_ns):
                lives.append(life)
                generators_table[life.generator_id] = life.qc_table(live.parent.name)
                events.append(Install(max(life.calibration_ns, start_ns), life))
                for day in local.days(first, last):
                    at = local.at(day, TC99M_ELUTION_AT)
                    if max(life.calibration_ns, start_ns) <= at < life.removed_ns:
                        elution = Elute(at, life)
                        events.append(elution)
                        tc99m_by_day[day] = elution
        else:
            raise InputError(f"no history routine for a {generator.profile} generator")
    if first not in tc99m_by_day:
        raise InputError("a history needs a Tc-99m generator eluted from its first day (linearity and geometry source)")
    installed_ns = local.at(first, time(0, 0))
    chamber, failure_day = _chamber(local, first, last, now_ns, days, tc99m_by_day)
    events += _acceptance(local, first, tc99m_by_day)
    events += [MeasureCheckSource(local.at(day, DAILY_CHECK_AT)) for day in local.days(first, last)]
    events += _repair(local, failure_day, tc99m_by_day)
    events += _linearity_weeks(local, first, last, now_ns, tc99m_by_day)
    events += _follow_ups(ga68_first_elutions, local, failure_day)
    ordered = sorted(enumerate(events), key=lambda pair: (pair[1].at_ns, pair[0]))
    return HistoryPlan(
        start_ns=start_ns,
        end_ns=now_ns,
        installed_ns=installed_ns,
        acceptance_day=first,
        failure_day=failure_day,
        chamber=chamber,
        generators=tuple(lives),
        events=tuple(event for _, event in ordered if event.at_ns < now_ns),
        generators_table=generators_table,
        schedule_devices={check.device: {"installed": iso_utc(installed_ns)}},
        source_changes={check.source_id: _certificate_before(qc, check.source_id, installed_ns)},
    )


def earlier_generator_id(live_id: str, calibration_ns: int, zone: ZoneInfo) -> str:
    """An earlier generator's id: the live one's without its serial number, with the calibration date (YYMMDD)
    instead, in the GENERATOR_ID_CHARS a station's register holds."""
    stem = re.sub(r"-?\d+$", "", live_id) or live_id
    day = f"-{datetime.fromtimestamp(calibration_ns // NS_PER_S, zone):%y%m%d}"
    return stem[: GENERATOR_ID_CHARS - len(day)] + day


def _certificate_before(qc: QcConfig, source_id: str, reference_ns: int) -> dict[str, str]:
    """The check source's certificate carried back to `reference_ns` by decay: the same source, whose certificate
    the demo dates at its start, must predate the acceptance test that compares with it (docs/qc.md, Accuracy)."""
    source = qc.sources[source_id]
    activity_bq = float(
        activity_at(source.reference_bq, source.nuclide, (reference_ns - source.reference_ns) / NS_PER_S)
    )
    return {"activity": f"{activity_bq!r} Bq", "reference_time": iso_utc(reference_ns)}


def _earlier_ga68(
    generator: SimGenerator, calibration_bq: float, local: _Local, first: date, handover_ns: int
) -> GeneratorLife:
    """The Ge-68/Ga-68 column in use until the live one: a year old when it goes, eluted on working days before."""
    calibration_ns = handover_ns - GA68_COLUMN_LIFE_NS
    working_days = [
        day
        for day in local.days(local.day(calibration_ns) + timedelta(days=1), first - timedelta(days=1))
        if day.weekday() < SATURDAY
    ]
    last_ns = local.at(working_days[-1], GA68_ELUTION_AT) if working_days else calibration_ns
    return GeneratorLife(
        generator_id=earlier_generator_id(generator.generator_id, calibration_ns, local.zone),
        device=generator.device,
        profile=generator.profile,
        calibration_bq=calibration_bq,
        calibration_ns=calibration_ns,
        elutions_before=round(len(working_days) * GA68_ELUTIONS_PER_WORKING_DAY),
        last_elution_ns=last_ns,
        volume_ml=generator.volume_ml,
        removed_ns=handover_ns,
    )


def _ga68_elutions(life: GeneratorLife, local: _Local, first: date, last: date, rng: random.Random) -> list[Elute]:
    elutions: list[Elute] = []
    for day in local.days(first, last):
        if day.weekday() >= SATURDAY or rng.random() < GA68_SKIP_FRACTION:
            continue
        morning = local.at(day, GA68_ELUTION_AT)
        if morning < life.removed_ns:
            elutions.append(Elute(morning, life, followed_up=True))
        afternoon = local.at(day, GA68_SECOND_ELUTION_AT)
        if day.weekday() in GA68_SECOND_ELUTION_DAYS and afternoon < life.removed_ns:
            elutions.append(Elute(afternoon, life))
    return elutions


def _weekly_mo99(
    generator: SimGenerator, calibration_bq: float, local: _Local, first: date, handover_ns: int
) -> list[GeneratorLife]:
    """The Mo-99 columns of the window: one arriving each Friday evening (the first one before the window)."""
    first_elution_ns = local.at(first, TC99M_ELUTION_AT)
    arrival = first - timedelta(days=(first.weekday() - FRIDAY) % 7 or 7)
    arrivals = []
    while local.at(arrival, MO99_DELIVERY_AT) < handover_ns - DAY_NS:
        arrivals.append(local.at(arrival, MO99_DELIVERY_AT))
        arrival += timedelta(days=7)
    lives = []
    for index, arrived_ns in enumerate(arrivals):
        before = [
            local.at(day, TC99M_ELUTION_AT)
            for day in local.days(local.day(arrived_ns) + timedelta(days=1), first - timedelta(days=1))
        ]
        before = [at for at in before if arrived_ns < at < first_elution_ns]
        lives.append(
            GeneratorLife(
                generator_id=earlier_generator_id(generator.generator_id, arrived_ns, local.zone),
                device=generator.device,
                profile=generator.profile,
                calibration_bq=calibration_bq,
                calibration_ns=arrived_ns,
                elutions_before=len(before),
                last_elution_ns=before[-1] if before else arrived_ns,
                volume_ml=generator.volume_ml,
                removed_ns=arrivals[index + 1] if index + 1 < len(arrivals) else handover_ns,
            )
        )
    return lives


def _chamber(
    local: _Local, first: date, last: date, now_ns: int, days: int, tc99m_by_day: dict[date, Elute]
) -> tuple[ChamberResponse, date]:
    """The failure morning: the Saturday nearest FAILURE_AT_FRACTION of the window, two days clear of its ends,
    with a Tc-99m eluate for the geometry test after the repair."""
    target = first + timedelta(days=round(FAILURE_AT_FRACTION * days))
    candidates = [
        day
        for day in local.days(first + timedelta(days=2), last - timedelta(days=2))
        if day.weekday() == SATURDAY and day in tc99m_by_day and local.at(day, FOLLOW_UP_AT) + HOUR_NS < now_ns
    ]
    if not candidates:
        raise InputError("the history's window has no Saturday for the calibrator's failure and repair")
    failure_day = min(candidates, key=lambda day: abs((day - target).days))
    accepted_ns = local.at(first, BASELINE_AT)
    failed_ns = local.at(failure_day, time(0, 0))
    drift = DRIFT_AT_FAILURE / ((local.at(failure_day, DAILY_CHECK_AT) - accepted_ns) / DAY_NS)
    return ChamberResponse(accepted_ns, failed_ns, local.at(failure_day, REPAIRED_AT), drift), failure_day


def _acceptance(local: _Local, day: date, tc99m_by_day: dict[date, Elute]) -> list[Event]:
    """The new calibrator's first morning: baseline, the first daily check labelled for accuracy, geometry."""
    baseline_ns = local.at(day, BASELINE_AT)
    return [
        StartProcedure(baseline_ns, "baseline", "acceptance: constancy baseline of the new calibrator"),
        MeasureCheckSource(baseline_ns + FIRST_STEP_NS),
        LabelAccuracy(local.at(day, ACCURACY_LABEL_AT)),
        *_geometry(local.at(day, GEOMETRY_AT), "acceptance: geometry of the new calibrator", tc99m_by_day[day]),
    ]


def _repair(local: _Local, day: date, tc99m_by_day: dict[date, Elute]) -> list[Event]:
    """After the repair (the chamber's response is right again: `ChamberResponse`), a baseline and geometry."""
    reason = "after repair of the chamber (constancy failed this morning)"
    rebaseline_ns = local.at(day, REBASELINE_AT)
    return [
        StartProcedure(rebaseline_ns, "baseline", f"re-baseline {reason}"),
        MeasureCheckSource(rebaseline_ns + FIRST_STEP_NS),
        *_geometry(local.at(day, REGEOMETRY_AT), f"geometry {reason}", tc99m_by_day[day]),
    ]


def _geometry(start_ns: int, reason: str, eluate: Elute) -> list[Event]:
    labels = tuple(label for label, _ in GEOMETRIES)
    steps: list[Event] = [StartProcedure(start_ns, "geometry", reason, nuclide="Tc-99m", geometries=labels)]
    for index, (_, response) in enumerate(GEOMETRIES):
        at = start_ns + FIRST_STEP_NS + index * GEOMETRY_STEP_NS
        steps.append(MeasureEluate(at, eluate, "Tc-99m", "aliquot", GEOMETRY_ALIQUOT_BQ, start_ns, response))
    return steps


def _linearity_weeks(
    local: _Local, first: date, last: date, now_ns: int, tc99m_by_day: dict[date, Elute]
) -> list[Event]:
    """Each Monday's series, from that morning's eluate, if its last possible reading (Friday) is before now."""
    events: list[Event] = []
    for monday in local.days(first, last):
        friday = monday + timedelta(days=FRIDAY)
        if monday.weekday() != MONDAY or monday not in tc99m_by_day:
            continue
        if local.at(friday, LINEARITY_READINGS_AT[-1]) + HOUR_NS >= now_ns:
            continue
        eluate = tc99m_by_day[monday]
        events.append(
            StartProcedure(
                local.at(monday, LINEARITY_START_AT), "linearity", "weekly linearity (decay method)", nuclide="Tc-99m"
            )
        )
        events += [
            MeasureEluate(local.at(day, at), eluate, "Tc-99m", "series")
            for day in local.days(monday, friday)
            for at in LINEARITY_READINGS_AT
        ]
    return events


def _follow_ups(elutions: list[Elute], local: _Local, failure_day: date) -> list[Event]:
    """Each first Ga-68 elution of a day: the eluate kept aside, measured 49 h later (after the repair, that day)."""
    events: list[Event] = []
    for elution in elutions:
        at = elution.at_ns + FOLLOW_UP_AFTER_NS
        if local.day(at) == failure_day and at < local.at(failure_day, FOLLOW_UP_AT):
            at = local.at(failure_day, FOLLOW_UP_AT)
        events.append(StartProcedure(at, "ge68_breakthrough", "Ge-68 follow-up of the kept eluate", elution=elution))
        events.append(MeasureEluate(at + FIRST_STEP_NS, elution, "Ga-68", "ge68"))
    return events

"""What QC is due, as a pure function of the QC records and the clock (issue 17, point 4).

Every calibrator with a check source has daily items (`daily_constancy`, `background`) and
interval items (`linearity`, `accuracy`, `geometry`); every Ga-68 elution the policy selects has
a `ge68_breakthrough/<elution msg_id>` follow-up. Each item is `done`, `due`, `overdue` or
`failed` at a given instant, computed here from `ScheduleFacts`: the latest passing and failing
record of each item, the elutions and the first patient measurement of each local day. The
facts are folded from committed messages (`Schedule.fold`) and merged commutatively
(`ScheduleFacts.merge`), so the live stage (schedule_stage.py) and `hotlab qc status`, which
rebuilds them from the archive, compute the same list.

Why local time: "daily" means the lab's day. Midnight and the daily deadline are taken in the
site's time zone (`[qc.schedule] timezone`), so a day can be 23 or 25 hours long. For the same
reason a bare date in `[qc.schedule]` (`installed = 2026-01-15`, a TOML date or the same text)
is local midnight of that date in the site's zone; a date-time must carry Z or an offset.

Rules (docs/qc.md, "Schedule"):
* daily items are due from local midnight and overdue at the daily deadline, or as soon as a
  measurement that belongs to no QC procedure (a patient measurement) is taken on that
  calibrator before they are done; a `complete` daily_constancy procedure that day does both,
  and a failing constancy result fails `daily_constancy` at once, whether its procedure
  completes or not;
* `background` is also done by any passing (or warning) background qc_result of that chamber on
  that local day, inside a procedure or not (a tagged empty-chamber reading), and a failing one
  fails it;
* an interval item (linearity, accuracy) is done until its last pass + interval, due until
  + grace, overdue after; never done since installation, it is due at installation (former
  10 CFR 35.50(b)(2),(3): "upon installation and at least annually / quarterly thereafter"); a
  test (pass or fail) dated before the installation date does not count;
* geometry is due at installation and after a repair;
* a Ge-68 follow-up is due `ge68_delay_h` after its end of elution and done by a breakthrough
  result measured at or after that time; a result from an earlier re-measurement neither does
  nor fails it. An undone (due, overdue, failed) follow-up stays listed until done, however old,
  so no alarm is dropped unanswered; a done one is listed until `ge68_track_days` after its result;
* `failed` (a failing record newer than the start of the last passing one) stays until a
  later pass, across days.

The schedule's clock follows the controller's own time stamps (a calibrator's readings,
measurements and results, procedure records, the stage's tick), never a station's: an elution
and what is judged at its end carry the station's clock, which may run ahead of the controller.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from hotlab.controller.config_table import ConfigTable, describe
from hotlab.controller.messages import Message
from hotlab.physics.utc_time import NS_PER_S, parse_utc_ns

State = Literal["done", "due", "overdue", "failed"]
Ge68Policy = Literal["every", "first_of_day", "weekly"]
GE68_POLICIES: tuple[Ge68Policy, ...] = ("every", "first_of_day", "weekly")

#: Item name -> the qc_result test it stands for (qc_status.test).
DAILY_ITEMS = {"daily_constancy": "constancy", "background": "background"}
INTERVAL_ITEMS = ("linearity", "accuracy")
GEOMETRY = "geometry"
GE68 = "ge68_breakthrough"
CALIBRATOR_ITEMS = (*DAILY_ITEMS, *INTERVAL_ITEMS, GEOMETRY)
#: qc_result test -> the calibrator item a result of it does (or fails); linearity by shielded sleeves
#: is linearity as much as the decay method is (AAPM TG-181 describes both).
ITEM_OF_TEST = {
    "linearity": "linearity",
    "linearity_sleeve": "linearity",
    "accuracy": "accuracy",
    GEOMETRY: GEOMETRY,
    "background": "background",
}

_HOUR_NS = 3600 * NS_PER_S
_DAY_NS = 24 * _HOUR_NS
#: Days a clinical-measurement fact is kept: today's and yesterday's are all that can count.
_CLINICAL_KEEP_DAYS = 2

_DEADLINE = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])$")

#: Where each default comes from (docs/qc.md repeats this table).
DEFAULT_SOURCES: dict[str, str] = {
    "timezone": "hotlab default (UTC); set the site's zone",
    "daily_deadline": "hotlab default 08:00 local; the rule itself is former 10 CFR 35.50(b)(1) "
    "(constancy 'at the beginning of each day of use', text as revised 2002-01-01)",
    "linearity_interval_days": "former 10 CFR 35.50(b)(3): linearity upon installation and at least quarterly "
    "(91 d); AAPM TG-181 also recommends quarterly (not checked against the report's text here)",
    "linearity_grace_days": "hotlab default",
    "accuracy_interval_days": "former 10 CFR 35.50(b)(2): accuracy upon installation and at least annually",
    "accuracy_grace_days": "hotlab default",
    "geometry_grace_days": "hotlab default; geometry upon installation: former 10 CFR 35.50(b)(4); after a repair: "
    "hotlab practice (TG-181 says so too; not checked against its text here)",
    "ge68_policy": "hotlab default (the first Ga-68 elution of each local day)",
    "ge68_delay_h": "Ph. Eur. 2464 practice: Ge-68 measured after the Ga-68 has decayed for at least 48 h (as in "
    "published release specifications; the monograph's own wording could not be checked against a public text)",
    "ge68_grace_h": "hotlab default",
    "ge68_track_days": "hotlab default: a done follow-up is listed this long after its result (undone ones until done)",
}


@dataclass(frozen=True, slots=True)
class DeviceDates:
    """When a calibrator was installed and last repaired (UTC epoch ns), from `[qc.schedule.devices.<id>]`.

    A bare date there is local midnight in the site's zone (module docstring).
    """

    installed_ns: int | None = None
    repaired_ns: int | None = None


@dataclass(frozen=True, slots=True)
class ScheduleConfig:
    """`[qc.schedule]`: the site's day, the intervals and the Ge-68 follow-up policy (defaults: DEFAULT_SOURCES)."""

    timezone: ZoneInfo = field(default_factory=lambda: ZoneInfo("UTC"))
    daily_deadline: time = time(8, 0)
    linearity_interval_days: float = 91.0
    linearity_grace_days: float = 7.0
    accuracy_interval_days: float = 365.0
    accuracy_grace_days: float = 30.0
    geometry_grace_days: float = 7.0
    ge68_policy: Ge68Policy = "first_of_day"
    ge68_delay_h: float = 48.0
    ge68_grace_h: float = 24.0
    ge68_track_days: float = 14.0
    devices: Mapping[str, DeviceDates] = field(default_factory=dict)
    #: Each setting's source: DEFAULT_SOURCES, or the config key for a value the site set.
    sources: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_SOURCES))

    @classmethod
    def from_table(cls, table: ConfigTable | None) -> ScheduleConfig:
        """Validate `[qc.schedule]` (None: all defaults); every problem is a ConfigError naming the key."""
        if table is None:
            return cls()
        zone = _zone(table)
        sources = {
            key: (f"site config {table.key(key)}" if key in table.data else source)
            for key, source in DEFAULT_SOURCES.items()
        }

        def days(name: str, default: float, *, interval: bool) -> float:
            return table.number(name, default, minimum=0.0, maximum=3650.0, exclusive_minimum=interval)

        config = cls(
            timezone=zone,
            daily_deadline=_deadline(table),
            linearity_interval_days=days("linearity_interval_days", 91.0, interval=True),
            linearity_grace_days=days("linearity_grace_days", 7.0, interval=False),
            accuracy_interval_days=days("accuracy_interval_days", 365.0, interval=True),
            accuracy_grace_days=days("accuracy_grace_days", 30.0, interval=False),
            geometry_grace_days=days("geometry_grace_days", 7.0, interval=False),
            ge68_policy=_policy(table),
            ge68_delay_h=table.number("ge68_delay_h", 48.0, minimum=0.0, maximum=24.0 * 30),
            ge68_grace_h=table.number("ge68_grace_h", 24.0, minimum=0.0, maximum=24.0 * 30),
            ge68_track_days=table.number("ge68_track_days", 14.0, minimum=1.0, maximum=366.0),
            devices=_devices(table, zone),
            sources=sources,
        )
        table.finish()
        return config

    def interval_ns(self, item: str) -> tuple[int, int]:
        """(interval, grace) of linearity or accuracy in ns."""
        interval, grace = {
            "linearity": (self.linearity_interval_days, self.linearity_grace_days),
            "accuracy": (self.accuracy_interval_days, self.accuracy_grace_days),
        }[item]
        return round(interval * _DAY_NS), round(grace * _DAY_NS)


def _zone(table: ConfigTable) -> ZoneInfo:
    name = table.string("timezone", "UTC")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise table.error("timezone", f"{name!r} is not a known IANA time zone (e.g. Europe/Berlin)") from None


def _deadline(table: ConfigTable) -> time:
    value = table.value("daily_deadline")
    if value is None:
        return time(8, 0)
    if isinstance(value, time) and value.tzinfo is None:
        return value.replace(second=0, microsecond=0)
    match = _DEADLINE.match(value) if isinstance(value, str) else None
    if match is None:
        raise table.error("daily_deadline", f'expected a local time HH:MM such as "08:00", got {describe(value)}')
    return time(int(match.group(1)), int(match.group(2)))


def _policy(table: ConfigTable) -> Ge68Policy:
    value = table.string("ge68_policy", "first_of_day", choices=GE68_POLICIES)
    return next(policy for policy in GE68_POLICIES if policy == value)


def _devices(table: ConfigTable, zone: ZoneInfo) -> dict[str, DeviceDates]:
    group = table.table("devices")
    if group is None:
        return {}
    devices: dict[str, DeviceDates] = {}
    for device in group.data:
        entry = group.table(device, required=True)
        assert entry is not None
        devices[device] = DeviceDates(_day_ns(entry, "installed", zone), _day_ns(entry, "repaired", zone))
        entry.finish()
    return devices


def _day_ns(table: ConfigTable, name: str, zone: ZoneInfo) -> int | None:
    """A date (local midnight in the site's zone) or a date-time with offset, as UTC epoch ns."""
    value = table.value(name)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = date.fromisoformat(value.strip())
        except ValueError:
            pass
    if isinstance(value, date) and not isinstance(value, datetime):
        return _local_ns(value, time(0, 0), zone)
    try:
        return parse_utc_ns(value)
    except ValueError as exc:
        raise table.error(name, f"expected a date such as 2026-01-15 or a date-time with offset: {exc}") from None


def _local_ns(day: date, at: time, zone: ZoneInfo) -> int:
    """UTC epoch ns of local `at` on `day`; a time a DST change skips is read with the offset before it (PEP 495)."""
    moment = datetime.combine(day, at, tzinfo=zone)
    seconds = int(moment.timestamp())
    return seconds * NS_PER_S


@dataclass(frozen=True, slots=True)
class Evidence:
    """One record that did (or failed) an item: `start_ns` is a procedure's start, else its own time."""

    time_ns: int
    record_id: str
    verdict: str | None
    start_ns: int

    def newer(self, other: Evidence | None) -> bool:
        return other is None or (self.time_ns, self.record_id) > (other.time_ns, other.record_id)


@dataclass(frozen=True, slots=True)
class Elution:
    """A Ga-68 elution a follow-up may belong to."""

    msg_id: str
    generator: str
    station: str
    end_ns: int


@dataclass(frozen=True, slots=True)
class Clinical:
    """The first measurement of a local day on a calibrator that belongs to no QC procedure."""

    time_ns: int
    msg_id: str


#: (owner, item): owner is the calibrator, or the elution msg_id for a Ge-68 follow-up.
Key = tuple[str, str]


@dataclass(slots=True)
class ScheduleFacts:
    """What the schedule remembers; every field merges by "latest wins" (or "earliest" for clinical)."""

    passes: dict[Key, Evidence] = field(default_factory=dict)
    fails: dict[Key, Evidence] = field(default_factory=dict)
    clinical: dict[tuple[str, date], Clinical] = field(default_factory=dict)
    elutions: dict[str, Elution] = field(default_factory=dict)
    clock_ns: int = 0

    def copy(self) -> ScheduleFacts:
        return ScheduleFacts(
            dict(self.passes), dict(self.fails), dict(self.clinical), dict(self.elutions), self.clock_ns
        )

    def merge(self, other: ScheduleFacts) -> None:
        """Take over what `other` knows; merging the same facts twice, or in any order, gives the same."""
        for mine, theirs in ((self.passes, other.passes), (self.fails, other.fails)):
            for key, evidence in theirs.items():
                if evidence.newer(mine.get(key)):
                    mine[key] = evidence
        for day_key, clinical in other.clinical.items():
            known = self.clinical.get(day_key)
            if known is None or (clinical.time_ns, clinical.msg_id) < (known.time_ns, known.msg_id):
                self.clinical[day_key] = clinical
        self.elutions.update(other.elutions)
        self.clock_ns = max(self.clock_ns, other.clock_ns)

    def record(self, book: dict[Key, Evidence], key: Key, evidence: Evidence) -> None:
        if evidence.newer(book.get(key)):
            book[key] = evidence


@dataclass(frozen=True, slots=True)
class ItemStatus:
    """One item's state at an instant, as a qc_status message carries it (docs/qc.md, "Schedule")."""

    device: str
    station: str
    item: str
    test: str
    state: State
    due_ns: int | None
    overdue_ns: int | None
    last_done_ns: int | None
    last_verdict: str | None
    last_record_id: str | None
    elution_id: str | None
    detail: str

    @property
    def alarm(self) -> bool:
        return self.state in ("overdue", "failed")

    @property
    def key(self) -> Key:
        return (self.device, self.item)

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> ItemStatus:
        """The status a qc_status payload carries (the stage reads back what it published)."""
        return cls(**{name: payload[name] for name in cls.__dataclass_fields__})

    def signature(self) -> tuple[Any, ...]:
        """What a new qc_status is published for when it changes (detail follows from these)."""
        return (self.station, self.state, self.due_ns, self.overdue_ns, self.last_record_id, self.last_verdict)


class Schedule:
    """The schedule of one site: which items exist, how records count, and each item's state at an instant.

    `calibrators` maps each calibrator with daily QC (one with a check source) to its station;
    `generators` are the generators whose elutions are Ga-68 (a follow-up's station is its elution's).
    """

    def __init__(
        self, site: str, config: ScheduleConfig, calibrators: Mapping[str, str], generators: Collection[str]
    ) -> None:
        self.site = site
        self.config = config
        self.calibrators = dict(calibrators)
        self.generators = frozenset(generators)
        self._day_bounds = functools.lru_cache(maxsize=64)(self._bounds)

    # -- folding records -------------------------------------------------------------------

    def fold(self, facts: ScheduleFacts, message: Message) -> bool:
        """Add what `message` means for the schedule to `facts`; True if it is a schedule record.

        Malformed fields raise KeyError/TypeError/ValueError; the stage logs and skips them.
        """
        payload = message.payload
        if payload.get("site") != self.site:
            return False
        time_ns = int(payload["time_ns"])
        if self._on_controller_clock(message):
            facts.clock_ns = max(facts.clock_ns, time_ns)
        if message.kind == "qc_procedure":
            return self._fold_procedure(facts, payload, time_ns)
        if message.kind == "qc_result":
            return self._fold_result(facts, payload, time_ns)
        if message.kind == "elution" and payload.get("generator") in self.generators:
            generator = str(payload["generator"])
            elution = Elution(message.msg_id, generator, str(payload["station"]), int(payload["end_ns"]))
            facts.elutions[elution.msg_id] = elution
            return True
        if message.kind == "measurement" and payload.get("device") in self.calibrators:
            if payload.get("procedure_id"):
                return False
            day_key = (str(payload["device"]), self.local_date(time_ns))
            known = facts.clinical.get(day_key)
            if known is None or time_ns < known.time_ns:
                facts.clinical[day_key] = Clinical(time_ns, message.msg_id)
            return True
        return False

    def _on_controller_clock(self, message: Message) -> bool:
        """Whether `message`'s time is the controller's (a calibrator's reading, measurement or result other
        than a dosage, a procedure or status record), so the schedule's clock may follow it. An elution and what is judged
        at its end carry the station's clock, which may run ahead: one such time must not make today's
        daily QC overdue."""
        if message.kind in ("qc_procedure", "qc_status"):
            return True
        if message.payload.get("device") not in self.calibrators:
            return False
        # A dosage verdict is timed at the administration, which may be tomorrow.
        return message.kind in ("reading", "measurement") or (
            message.kind == "qc_result" and message.payload.get("test") != "dosage"
        )

    def _fold_procedure(self, facts: ScheduleFacts, payload: Mapping[str, Any], time_ns: int) -> bool:
        device = payload.get("device")
        if (
            device not in self.calibrators
            or payload.get("procedure") != "daily_constancy"
            or payload.get("status") != "complete"
        ):
            return False
        verdict = payload.get("verdict")
        evidence = Evidence(time_ns, str(payload["msg_id"]), verdict, int(payload["started_ns"]))
        device = str(device)
        facts.record(facts.fails if verdict == "fail" else facts.passes, (device, "daily_constancy"), evidence)
        # The background item is done by the same procedure; a failing background result inside it
        # (a fail newer than this pass's start) still makes it failed (`_judged`).
        facts.record(facts.passes, (device, "background"), replace(evidence, verdict="pass"))
        return True

    def _fold_result(self, facts: ScheduleFacts, payload: Mapping[str, Any], time_ns: int) -> bool:
        test, verdict, device = payload.get("test"), payload.get("verdict"), payload.get("device")
        evidence = Evidence(time_ns, str(payload["msg_id"]), None if verdict is None else str(verdict), time_ns)
        book = facts.fails if verdict == "fail" else facts.passes
        if test == GE68:
            elution_id = (payload.get("inputs") or {}).get("elution_id")
            if not isinstance(elution_id, str) or not elution_id:
                return False
            facts.record(book, (elution_id, GE68), evidence)
            return True
        if device not in self.calibrators:
            return False
        if test == "constancy":
            # A daily check is done by its complete procedure (`_fold_procedure`); one setting failing fails
            # it at once, even if the procedure then times out or is ended before it completes.
            if verdict != "fail":
                return False
            facts.record(facts.fails, (str(device), "daily_constancy"), evidence)
            return True
        item = ITEM_OF_TEST.get(str(test))
        if item is None:
            return False
        facts.record(book, (str(device), item), evidence)
        return True

    def prune(self, facts: ScheduleFacts) -> None:
        """Forget what can no longer change any state: old clinical days, elutions no longer listed.

        Elutions are forgotten a whole policy period (generator and local day or ISO week) at a
        time, so the policy never selects a later elution of a period whose first was forgotten.
        """
        now = facts.clock_ns
        today = self.local_date(now)
        facts.clinical = {k: v for k, v in facts.clinical.items() if (today - k[1]).days < _CLINICAL_KEEP_DAYS}
        tracked_from = self.tracked_from(now)
        periods: dict[tuple[str, Any], list[Elution]] = {}
        for elution in sorted(facts.elutions.values(), key=lambda e: (e.end_ns, e.msg_id)):
            periods.setdefault(self._period(elution), []).append(elution)
        facts.elutions = {
            elution.msg_id: elution
            for members in periods.values()
            if members[-1].end_ns >= tracked_from
            or self._listed(self._ge68_status(facts, members[0], now), tracked_from)
            for elution in members
        }
        for book in (facts.passes, facts.fails):
            for key in [k for k in book if k[1] == GE68 and k[0] not in facts.elutions]:
                del book[key]

    # -- states ----------------------------------------------------------------------------

    def statuses(self, facts: ScheduleFacts, now_ns: int) -> list[ItemStatus]:
        """Every item's state at `now_ns`: each calibrator's items, then the Ge-68 follow-ups."""
        found = [status for device in self.calibrators for status in self.calibrator_statuses(facts, device, now_ns)]
        return found + self.ge68_statuses(facts, now_ns)

    def calibrator_statuses(self, facts: ScheduleFacts, device: str, now_ns: int) -> list[ItemStatus]:
        return [
            *self.daily_statuses(facts, device, now_ns),
            *(self._interval(facts, device, item, now_ns) for item in INTERVAL_ITEMS),
            self._geometry(facts, device, now_ns),
        ]

    def daily_statuses(self, facts: ScheduleFacts, device: str, now_ns: int) -> list[ItemStatus]:
        return [self._daily(facts, device, item, now_ns) for item in DAILY_ITEMS]

    def qc_state(self, facts: ScheduleFacts, device: str, now_ns: int) -> Literal["overdue", "failed"] | None:
        """What a reading or measurement of `device` at `now_ns` must carry: its daily QC failed or overdue."""
        if device not in self.calibrators:
            return None
        states = {status.state for status in self.daily_statuses(facts, device, now_ns)}
        return "failed" if "failed" in states else "overdue" if "overdue" in states else None

    def local_date(self, time_ns: int) -> date:
        return datetime.fromtimestamp(time_ns // NS_PER_S, self.config.timezone).date()

    def _bounds(self, day: date) -> tuple[int, int, int, int]:
        """(midnight, deadline, next midnight, next deadline) of a local day, UTC epoch ns."""
        zone, deadline = self.config.timezone, self.config.daily_deadline
        following = day + timedelta(days=1)
        return (
            _local_ns(day, time(0, 0), zone),
            _local_ns(day, deadline, zone),
            _local_ns(following, time(0, 0), zone),
            _local_ns(following, deadline, zone),
        )

    def _daily(self, facts: ScheduleFacts, device: str, item: str, now_ns: int) -> ItemStatus:
        key = (device, item)
        done = facts.passes.get(key)
        day = self.local_date(now_ns)
        start, deadline, next_start, next_deadline = self._day_bounds(day)
        when = (
            f"by {self.config.daily_deadline:%H:%M} {self.config.timezone.key} and before the first patient measurement"
        )
        if done is not None and done.time_ns >= start:
            state: State = "done"
            due_ns, overdue_ns = next_start, next_deadline
            detail = f"done today; due again tomorrow {when}"
        else:
            due_ns, overdue_ns = start, deadline
            clinical = facts.clinical.get((device, day))
            detail = f"due today {when}"
            if clinical is not None and clinical.time_ns < deadline:
                overdue_ns = clinical.time_ns
                detail = f"patient measurement {clinical.msg_id} was taken before today's daily QC"
            state = "overdue" if now_ns >= overdue_ns else "due"
        station, test = self.calibrators[device], DAILY_ITEMS[item]
        return self._judged(device, station, item, test, state, due_ns, overdue_ns, detail, *self._evidence(facts, key))

    def _interval(self, facts: ScheduleFacts, device: str, item: str, now_ns: int) -> ItemStatus:
        interval, grace = self.config.interval_ns(item)
        installed = self.config.devices.get(device, DeviceDates()).installed_ns
        done, failing = (
            evidence if evidence is not None and (installed is None or evidence.time_ns >= installed) else None
            for evidence in self._evidence(facts, (device, item))
        )
        every = f"every {interval / _DAY_NS:g} d ({self.config.sources[f'{item}_interval_days']})"
        state: State
        if done is not None:
            due_ns, overdue_ns = done.time_ns + interval, done.time_ns + interval + grace
            state = "done" if now_ns < due_ns else "due" if now_ns < overdue_ns else "overdue"
            detail = f"last done; {every}"
        elif installed is not None:
            due_ns, overdue_ns = installed, installed + grace
            state = "overdue" if now_ns >= overdue_ns else "due"
            detail = f"not done since installation: due upon installation, then {every}"
        else:
            state, due_ns, overdue_ns = "due", None, None
            detail = f"no record and no installation date ([qc.schedule.devices.{device}] installed); {every}"
        station = self.calibrators[device]
        return self._judged(device, station, item, item, state, due_ns, overdue_ns, detail, done, failing)

    def _geometry(self, facts: ScheduleFacts, device: str, now_ns: int) -> ItemStatus:
        key = (device, GEOMETRY)
        done = facts.passes.get(key)
        dates = self.config.devices.get(device, DeviceDates())
        events = [t for t in (dates.installed_ns, dates.repaired_ns) if t is not None]
        reference = max(events, default=None)
        if done is not None and (reference is None or done.time_ns >= reference):
            state: State = "done"
            due_ns = overdue_ns = None
            detail = "done since the last installation or repair; due again after a repair"
        elif reference is not None:
            due_ns, overdue_ns = reference, reference + round(self.config.geometry_grace_days * _DAY_NS)
            state = "overdue" if now_ns >= overdue_ns else "due"
            why = "repair" if reference == dates.repaired_ns else "installation"
            detail = f"due after the {why}"
        else:
            state, due_ns, overdue_ns = "due", None, None
            detail = f"no record and no installation date ([qc.schedule.devices.{device}] installed)"
        station = self.calibrators[device]
        return self._judged(
            device, station, GEOMETRY, GEOMETRY, state, due_ns, overdue_ns, detail, *self._evidence(facts, key)
        )

    def ge68_statuses(self, facts: ScheduleFacts, now_ns: int) -> list[ItemStatus]:
        """The follow-up of every elution the policy selects, oldest first, that is listed (`_listed`)."""
        tracked_from = self.tracked_from(now_ns)
        statuses = (self._ge68_status(facts, elution, now_ns) for elution in self._selected(facts.elutions.values()))
        return [status for status in statuses if self._listed(status, tracked_from)]

    def tracked_from(self, now_ns: int) -> int:
        """The start of the tracking window at `now_ns`: `ge68_track_days` before it."""
        return now_ns - round(self.config.ge68_track_days * _DAY_NS)

    @staticmethod
    def _listed(status: ItemStatus, tracked_from: int) -> bool:
        """A follow-up is listed until done, and once done until its result leaves the tracking window.

        Counting from the result (not the elution) means a follow-up done late is still published
        as done once, so its retained status never stays overdue.
        """
        return status.state != "done" or (status.last_done_ns is not None and status.last_done_ns >= tracked_from)

    def _ge68_status(self, facts: ScheduleFacts, elution: Elution, now_ns: int) -> ItemStatus:
        """One follow-up; only results measured at or after end of elution + delay count, pass or fail."""
        delay, grace = round(self.config.ge68_delay_h * _HOUR_NS), round(self.config.ge68_grace_h * _HOUR_NS)
        due_ns, overdue_ns = elution.end_ns + delay, elution.end_ns + delay + grace
        done, failing = (
            evidence if evidence is not None and evidence.time_ns >= due_ns else None
            for evidence in self._evidence(facts, (elution.msg_id, GE68))
        )
        state: State = "done" if done is not None else "overdue" if now_ns >= overdue_ns else "due"
        detail = (
            f"Ge-68 breakthrough of elution {elution.msg_id} ({self.config.ge68_policy} policy), "
            f"measured >= {self.config.ge68_delay_h:g} h after the end of elution"
        )
        item = f"{GE68}/{elution.msg_id}"
        return self._judged(
            elution.generator,
            elution.station,
            item,
            GE68,
            state,
            due_ns,
            overdue_ns,
            detail,
            done,
            failing,
            elution_id=elution.msg_id,
        )

    def _selected(self, elutions: Iterable[Elution]) -> list[Elution]:
        """The elutions the Ge-68 policy selects: all, or the first of each generator's local day or ISO week."""
        first: dict[tuple[str, Any], Elution] = {}
        for elution in sorted(elutions, key=lambda e: (e.end_ns, e.msg_id)):
            first.setdefault(self._period(elution), elution)
        return list(first.values())

    def _period(self, elution: Elution) -> tuple[str, Any]:
        """The period the policy selects one elution of: the elution itself, its local day or its ISO week."""
        if self.config.ge68_policy == "every":
            return (elution.generator, elution.msg_id)
        day = self.local_date(elution.end_ns)
        return (elution.generator, day if self.config.ge68_policy == "first_of_day" else day.isocalendar()[:2])

    @staticmethod
    def _evidence(facts: ScheduleFacts, key: Key) -> tuple[Evidence | None, Evidence | None]:
        """The last passing and the last failing record of an item."""
        return facts.passes.get(key), facts.fails.get(key)

    @staticmethod
    def _judged(
        device: str,
        station: str,
        item: str,
        test: str,
        state: State,
        due_ns: int | None,
        overdue_ns: int | None,
        detail: str,
        done: Evidence | None,
        failing: Evidence | None,
        *,
        elution_id: str | None = None,
    ) -> ItemStatus:
        """The status with the last record filled in, and `failed` when a failure is newer than the last pass began."""
        last = failing if failing is not None and failing.newer(done) else done
        if failing is not None and (done is None or failing.time_ns >= done.start_ns):
            state, last = "failed", failing
            detail = f"failed ({failing.record_id}); stays failed until a later pass"
        return ItemStatus(
            device=device,
            station=station,
            item=item,
            test=test,
            state=state,
            due_ns=due_ns,
            overdue_ns=overdue_ns,
            last_done_ns=None if done is None else done.time_ns,
            last_verdict=None if last is None else last.verdict,
            last_record_id=None if last is None else last.record_id,
            elution_id=elution_id,
            detail=detail,
        )

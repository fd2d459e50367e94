"""The streaming QC engine: every measurement, tagged reading and elution in, the QC verdicts they imply out.

Two phases, so that the engine's memory never runs ahead of the outbox:

    outcome = engine.process(*messages)          # pure: judges, changes nothing in the engine
    await outbox.put_many(outcome.messages)      # the inputs (or their replacements) + verdicts
    engine.apply(outcome)                        # only after the commit succeeded

If the commit fails, the outcome is dropped and the same messages processed again give the
same verdicts (an engine that advanced first would skip them as "already judged"). Messages
committed together go through one `process` call, so a second elution of a generator in the
same batch is judged against the first. `process` is synchronous on purpose: it does only
arithmetic on in-memory state (microseconds), never I/O, so it is safe on the event loop.

Generator state (last elution, residual on the column, yield history, recent eluates for
Ge-68 re-measurements) survives a restart through `restore`, which rebuilds it from the
history archive (controller/archive.py) and any messages still waiting in the outbox.

What a message means for QC:
- a calibrator's raw readings (polls) are never judged: QC reads *measurements*, the settled
  value of a source in the chamber (controller/measurements.py), so one insertion gets one
  verdict, not one per poll, and a suspect reading can never reach a verdict;
- a measurement from a calibrator that has a check source configured, taken on the check
  source's nuclide setting, is a constancy check (in a radiopharmacy nothing else is measured
  on the Cs-137/Co-57/Ba-133 setting);
- a measurement label (the `label_measurement` command, controller/measurement_labels.py) that
  names a certified reference source is an accuracy check of the labelled measurement, and one
  with a prescription (prescribed activity, administration time) a dosage check: the label
  record carries the measurement's setting, value and time;
- a reading tagged ``extra["qc"]`` = ``background`` | ``mo99`` | ``ge68_breakthrough`` is an
  explicit QC entry that names its own context, made by a processor (the station's Mo-99 eluate
  monitor, controller/lab/simulated_lab.py) or an integration, not a poll; it is judged by that
  rule (details in docs/qc.md) when its quality is good, and skipped when suspect;
- an elution from a configured generator gets an elution-yield verdict, a yield-trend
  verdict once enough elutions are known, and a `replacement`: the elution message with
  ``yield_pct`` filled (same ``msg_id``), which `QcOutcome.messages` commits in its place.

Bad input never raises out of `process`: it is logged, counted in `QcOutcome.rejected`
(added to `QcEngine.rejected` by `apply`), and yields no verdict, so one bad frame cannot
stop the controller.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, NamedTuple

from hotlab.controller.config_table import ConfigTable
from hotlab.controller.messages import Message, qc_baseline_message
from hotlab.controller.qc import baselines, calibrator_rules, dosage, generator_rules
from hotlab.controller.qc.baselines import Baseline
from hotlab.controller.qc.calibrator_rules import ReferenceSource, TimedReading
from hotlab.controller.qc.generator_rules import (
    GeneratorSpec,
    YieldPoint,
    available_activity,
    generator_pair,
)
from hotlab.controller.qc.limits import DEFAULT_PROFILE, PROFILES, YIELD_LIMIT_BY_DAUGHTER, Limit, load_limits
from hotlab.controller.qc.procedures import (
    UNSHIELDED,
    Procedure,
    Status,
    Step,
    recognised_procedure_id,
    within_band,
)
from hotlab.controller.qc.result import QcInputError, QcResult
from hotlab.controller.qc.schedule import ScheduleConfig
from hotlab.physics.decay import activity_at
from hotlab.physics.nuclides import Nuclide, UnknownNuclideError, get_nuclide
from hotlab.physics.units import UnitError, parse_activity
from hotlab.physics.utc_time import parse_utc_ns

if TYPE_CHECKING:
    from hotlab.controller.archive import HistoryArchive

log = logging.getLogger(__name__)

#: Elutions remembered per generator for the yield trend and later Ge-68 re-measurements.
HISTORY_LENGTH = 64


def parse_time_ns(value: Any, what: str) -> int:
    """UTC epoch ns from a TOML datetime or date, ISO 8601 text with an offset (or Z), or epoch ns.

    One parser for the whole project (`hotlab.physics.decay.parse_utc_ns`): naive times and epoch
    seconds are refused rather than guessed, so a config value can never silently shift a
    decay correction by hours or decades.
    """
    try:
        return parse_utc_ns(value)
    except ValueError as exc:  # TimeFormatError, NaiveDatetimeError
        raise QcInputError(f"{what}: {exc}") from None


def parse_activity_bq(value: Any, what: str, *, allow_zero: bool = False) -> float:
    """Becquerel from a number (Bq) or a quantity text such as ``7.4 MBq`` or ``200 mCi``; > 0 unless `allow_zero`."""
    if isinstance(value, bool):
        raise QcInputError(f"{what}: expected an activity, got {value!r}")
    if isinstance(value, (int, float)):
        bq = float(value)
    elif isinstance(value, str):
        try:
            bq = parse_activity(value)
        except UnitError as exc:
            raise QcInputError(f"{what}: {exc}") from None
    else:
        raise QcInputError(f"{what}: expected an activity such as '7.4 MBq', got {value!r}")
    if not (bq >= 0 if allow_zero else bq > 0):
        raise QcInputError(f"{what}: activity must be {'>= 0' if allow_zero else 'positive'}, got {value!r}")
    return bq


def _activity(table: ConfigTable, name: str) -> float:
    try:
        return parse_activity_bq(table.value(name, required=True), "")
    except QcInputError as exc:
        raise table.error(name, str(exc).removeprefix(": ")) from None


def _time(table: ConfigTable, name: str, *, required: bool = True) -> int | None:
    value = table.value(name, required=required)
    if value is None:
        return None
    try:
        return parse_time_ns(value, "")
    except QcInputError as exc:
        raise table.error(name, str(exc).removeprefix(": ")) from None


def _nuclide(table: ConfigTable, name: str) -> Nuclide:
    text = table.string(name, required=True)
    try:
        return get_nuclide(text)
    except UnknownNuclideError as exc:
        raise table.error(name, str(exc)) from None


def _entries(root: ConfigTable, name: str) -> list[tuple[str, ConfigTable]]:
    """The sub-tables of `[qc.<name>]`, keyed by id (a source, device or generator), each checked as a table."""
    group = root.table(name)
    if group is None:
        return []
    entries = [(key, group.table(key, required=True)) for key in group.data]
    return [(key, table) for key, table in entries if table is not None]


def _field(extra: Mapping[str, Any], key: str, tag: str) -> Any:
    try:
        return extra[key]
    except KeyError:
        raise QcInputError(f"a reading tagged qc={tag!r} needs extra[{key!r}]") from None


#: `[qc.devices.X] linearity_low_bq` default: a linearity series ends at or below 30 uCi (1.1 MBq), the
#: lowest activity of the range former 10 CFR 35.50(b)(3) required the test to cover.
DEFAULT_LINEARITY_LOW_BQ = 1.11e6
#: A Ge-68 follow-up's measurement reads at most this many times the limit's share of the eluate: at Ph. Eur.
#: 2464's 0.001 %, 1 % of the eluted Ga-68. A hotlab choice: a generator that bad is seen at elution by the
#: station's own figure, and a Ga-68 dose measured during the follow-up (tens of % of an eluate) is not taken.
GE68_PLAUSIBLE_LIMIT_MULTIPLE = 1000.0
#: `[qc] procedure_timeout_min` default: a daily check or baseline not finished in 30 min is incomplete.
DEFAULT_PROCEDURE_TIMEOUT_MIN = 30.0


@dataclass(frozen=True, slots=True)
class DeviceQc:
    """`[qc.devices.<calibrator>]`: its check source, the settings its daily check covers, its linearity end,
    and its linearity sleeves."""

    check_source: str | None
    settings: tuple[str, ...]
    linearity_low_bq: float = DEFAULT_LINEARITY_LOW_BQ
    #: The chamber's minimum detectable activity: the detectable level when the background is one value.
    minimum_detectable_bq: float = 0.0
    #: `[qc.devices.<id>.sleeves]`: label -> factor (activity / reading in that sleeve), in the configured order.
    sleeves: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class QcConfig:
    """Per-site QC configuration: limits (of `profile`), check/reference sources, calibrator and generator
    set-up, and the schedule of what QC is due (`[qc.schedule]`, controller/qc/schedule.py)."""

    profile: str = DEFAULT_PROFILE
    limits: Mapping[str, Limit] = field(default_factory=load_limits)
    sources: Mapping[str, ReferenceSource] = field(default_factory=dict)
    devices: Mapping[str, DeviceQc] = field(default_factory=dict)
    generators: Mapping[str, GeneratorSpec] = field(default_factory=dict)
    last_elution_ns: Mapping[str, int] = field(default_factory=dict)
    trend_horizon_days: float = 30.0
    trend_min_points: int = 5
    trend_min_span_days: float = 2.0
    procedure_timeout_min: float = DEFAULT_PROCEDURE_TIMEOUT_MIN
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> QcConfig:
        """Validate a ``[qc]`` table built in code (no file); see `from_table`."""
        return cls.from_table(ConfigTable(data or {}, "qc"))

    @classmethod
    def from_table(cls, root: ConfigTable) -> QcConfig:
        """Validate a ``[qc]`` TOML table (see docs/qc.md); every problem is a ConfigError naming the key."""
        profile = root.string("profile", DEFAULT_PROFILE, choices=PROFILES)
        limits = load_limits(root.table("limits"), profile)
        sources: dict[str, ReferenceSource] = {}
        for source_id, table in _entries(root, "sources"):
            uncertainty = table.number("uncertainty_pct", None, minimum=0.0)
            sources[source_id] = ReferenceSource(
                source_id=source_id,
                nuclide=_nuclide(table, "nuclide"),
                reference_bq=_activity(table, "activity"),
                reference_ns=_required_time(table, "reference_time"),
                certificate=table.string("certificate", ""),
                uncertainty_pct=uncertainty,
            )
            table.finish()
        devices = {device: _device_qc(table, sources) for device, table in _entries(root, "devices")}
        generators: dict[str, GeneratorSpec] = {}
        last_elution: dict[str, int] = {}
        for generator_id, table in _entries(root, "generators"):
            parent_text = table.string("parent", required=True)
            try:
                parent, daughter = generator_pair(parent_text, table.string("daughter"))
            except UnknownNuclideError as exc:
                raise table.error("parent", str(exc)) from None
            except QcInputError as exc:
                raise table.error("daughter" if "daughter" in table.data else "parent", str(exc)) from None
            generators[generator_id] = GeneratorSpec(
                generator_id=generator_id,
                parent=parent,
                daughter=daughter,
                calibration_bq=_activity(table, "activity"),
                calibration_ns=_required_time(table, "calibration_time"),
            )
            elution_ns = _time(table, "last_elution", required=False)
            if elution_ns is not None:
                last_elution[generator_id] = elution_ns
            table.finish()
        config = cls(
            profile=profile,
            limits=limits,
            sources=sources,
            devices=devices,
            generators=generators,
            last_elution_ns=last_elution,
            trend_horizon_days=root.number("trend_horizon_days", 30.0, minimum=0.0, exclusive_minimum=True),
            trend_min_points=root.integer("trend_min_points", 5, minimum=3),
            trend_min_span_days=root.number("trend_min_span_days", 2.0, minimum=0.0, maximum=365.0),
            procedure_timeout_min=root.number(
                "procedure_timeout_min",
                DEFAULT_PROCEDURE_TIMEOUT_MIN,
                minimum=0.0,
                exclusive_minimum=True,
                maximum=24 * 60.0,
            ),
            schedule=ScheduleConfig.from_table(root.table("schedule")),
        )
        root.finish()
        return config

    def check_source(self, device: str) -> ReferenceSource | None:
        """The check source configured for calibrator `device`, if any."""
        device_qc = self.devices.get(device)
        return None if device_qc is None or device_qc.check_source is None else self.sources[device_qc.check_source]

    def linearity_low_bq(self, device: str) -> float:
        device_qc = self.devices.get(device)
        return DEFAULT_LINEARITY_LOW_BQ if device_qc is None else device_qc.linearity_low_bq

    def minimum_detectable_bq(self, device: str) -> float:
        device_qc = self.devices.get(device)
        return 0.0 if device_qc is None else device_qc.minimum_detectable_bq

    def sleeves(self, device: str) -> Mapping[str, float]:
        """The linearity sleeves of calibrator `device` (label -> factor), in the configured order."""
        device_qc = self.devices.get(device)
        return {} if device_qc is None else device_qc.sleeves


def _device_qc(table: ConfigTable, sources: Mapping[str, ReferenceSource]) -> DeviceQc:
    """One `[qc.devices.X]`: the source's own setting is always checked, first; the others as listed."""
    low_bq = _optional_activity(table, "linearity_low_bq", DEFAULT_LINEARITY_LOW_BQ)
    minimum_bq = _optional_activity(table, "minimum_detectable_bq", 0.0)
    sleeves = _sleeves(table)
    source_id = table.string("check_source")
    if source_id is None:
        if "settings" in table.data:
            raise table.error("settings", "settings are the check source's: set check_source too")
        table.finish()
        return DeviceQc(None, (), low_bq, minimum_bq, sleeves)
    if source_id not in sources:
        raise table.error("check_source", f"no source {source_id!r} under [qc.sources]; known: {sorted(sources)}")
    own = sources[source_id].nuclide.name
    listed = table.value("settings", required=False)
    if listed is None:
        listed = [own]
    if not isinstance(listed, list) or not listed or not all(isinstance(item, str) for item in listed):
        raise table.error("settings", f'expected a list of nuclide settings such as ["{own}", "Tc-99m"]')
    settings = [own]
    for text in listed:
        try:
            name = get_nuclide(text).name
        except UnknownNuclideError as exc:
            raise table.error("settings", str(exc)) from None
        if name not in settings:
            settings.append(name)
    table.finish()
    return DeviceQc(source_id, tuple(settings), low_bq, minimum_bq, sleeves)


def _sleeves(table: ConfigTable) -> dict[str, float]:
    """`[qc.devices.X.sleeves]`: label = factor, each factor > 1 (a sleeve attenuates), in the file's order.

    A factor is the activity in the chamber divided by the reading in that sleeve, as `sleeve_factors`
    (controller/qc/calibrator_rules.py) sets it up from a decay series.
    """
    group = table.table("sleeves")
    if group is None:
        return {}
    if UNSHIELDED in group.data:
        raise group.error(UNSHIELDED, "is the reading without a sleeve; name the sleeve otherwise")
    factors: dict[str, float] = {}
    for label in group.data:
        factor = group.number(label)
        assert factor is not None  # the key is there
        if factor <= 1.0:
            raise group.error(
                label, f"a sleeve attenuates: its factor (activity / reading in it) is > 1, got {factor:g}"
            )
        factors[label] = factor
    if not factors:
        raise table.error("sleeves", "names no sleeve: give each as label = factor (activity / reading in it)")
    return factors


def _optional_activity(table: ConfigTable, name: str, default: float) -> float:
    value = table.value(name, required=False)
    try:
        return default if value is None else parse_activity_bq(value, "")
    except QcInputError as exc:
        raise table.error(name, str(exc).removeprefix(": ")) from None


def _required_time(table: ConfigTable, name: str) -> int:
    time_ns = _time(table, name)
    assert time_ns is not None  # required: a missing value raised
    return time_ns


def _background_readings(measurement: Mapping[str, Any]) -> list[float]:
    """A measurement's empty-chamber readings (their spread sets a detectable level), else its mean background
    alone (a measurement recorded before it carried them), which needs a configured minimum detectable level."""
    readings = measurement.get("background_readings")
    if readings is None:
        readings = [measurement["background_bq"]]
    return [float(value) for value in readings]


def _restorable(payload: Mapping[str, Any], keys: tuple[str, ...]) -> bool:
    """True if an archived payload has a finite number under every key (restore skips others)."""
    values = [payload.get(key) for key in keys]
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


class _Eluate(NamedTuple):
    """One remembered elution's eluate, for a later Ge-68 re-measurement of it; `msg_id` is the elution's."""

    msg_id: str
    counter: int
    end_ns: int
    eluted_bq: float


@dataclass(slots=True)
class _GeneratorState:
    """What the engine remembers of one generator between elutions.

    Eluates are keyed by the elution's msg_id, not its counter: a station's count can start
    again (drivers/records.py), so two remembered elutions may share a counter.
    """

    last_elution_ns: int | None
    last_counter: int | None = None
    residual_bq: float = 0.0
    history: deque[YieldPoint] = field(default_factory=lambda: deque(maxlen=HISTORY_LENGTH))
    eluates: dict[str, _Eluate] = field(default_factory=dict)

    def copy(self) -> _GeneratorState:
        return _GeneratorState(
            self.last_elution_ns,
            self.last_counter,
            self.residual_bq,
            deque(self.history, maxlen=HISTORY_LENGTH),
            dict(self.eluates),
        )

    def advance(
        self,
        msg_id: str,
        counter: int,
        end_ns: int,
        eluted_bq: float,
        available_bq: float | None,
        yield_pct: float | None,
    ) -> None:
        """Record one elution: the residual is what it left on the column (available - eluted)."""
        self.last_counter, self.last_elution_ns = counter, end_ns
        self.residual_bq = 0.0 if available_bq is None else max(available_bq - eluted_bq, 0.0)
        if yield_pct is not None:
            self.history.append(YieldPoint(end_ns, counter, yield_pct))
        self.eluates[msg_id] = _Eluate(msg_id, counter, end_ns, eluted_bq)
        while len(self.eluates) > HISTORY_LENGTH:  # elutions are advanced in time order: drop the oldest
            del self.eluates[next(iter(self.eluates))]

    def eluate(self, counter: int) -> _Eluate | None:
        """The newest remembered elution with `counter` (after a counter restart, the one of the new count)."""
        return max((e for e in self.eluates.values() if e.counter == counter), key=lambda e: e.end_ns, default=None)


Slot = tuple[str, str]


def slot_of(device: str, kind: str) -> Slot:
    """Where a procedure lives: a device runs one check (daily, baseline, Ge-68) and one linearity series at a time."""
    return (device, "series" if kind == "linearity" else "check")


@dataclass(slots=True)
class _Stage:
    """What one `process` or `tick` changed, for `apply` to take over after the commit.

    `procedures` maps a slot to its procedure after the batch (None: none open), `based_on` to the
    procedure_id the batch found there: `apply` takes a slot over only if it still holds that one.
    """

    generators: dict[str, _GeneratorState] = field(default_factory=dict)
    procedures: dict[Slot, Procedure | None] = field(default_factory=dict)
    based_on: dict[Slot, str | None] = field(default_factory=dict)
    baselines: dict[tuple[str, str, str], Baseline] = field(default_factory=dict)


class _Handled(NamedTuple):
    """What one input message became: messages before it, its replacement, messages after it, or dropped."""

    before: list[Message]
    replacement: Message | None
    after: list[Message]
    drop: bool = False


_NOTHING = _Handled([], None, [])


@dataclass(frozen=True, slots=True)
class QcOutcome:
    """What `QcEngine.process` (or `tick`) decided for a batch of messages; commit `messages`, then `apply` it.

    `messages` is the whole batch to commit, in order: every input message (or its `replacement`)
    with what it brought (a procedure's start record before the measurement that opened it; its
    verdicts, baselines and end record after). `results` are the qc_result verdicts alone and
    `replacements` maps an input's msg_id to the message committed instead of it (an elution with
    ``yield_pct`` filled, a measurement with its ``procedure_id``, a procedure's end record with its
    final results). `rejected` counts inputs that could not be judged.
    """

    messages: tuple[Message, ...]
    results: tuple[Message, ...]
    replacements: Mapping[str, Message]
    rejected: int
    _stage: _Stage = field(repr=False)


class QcEngine:
    """Turns measurement, tagged reading and elution messages into qc_result messages (see the module docstring)."""

    def __init__(self, site: str, config: QcConfig | None = None) -> None:
        self.site = site
        self.config = config or QcConfig()
        self.rejected = 0
        self._generators = {
            gid: _GeneratorState(self.config.last_elution_ns.get(gid)) for gid in self.config.generators
        }
        self._procedures: dict[Slot, Procedure] = {}
        self._baselines: dict[tuple[str, str, str], Baseline] = {}

    # -- read-only views for the start_qc / end_qc commands ------------------------------------

    def open_procedures(self, device: str) -> list[Procedure]:
        """The committed open procedures of `device` (copies)."""
        return [p.copy() for (name, _), p in self._procedures.items() if name == device]

    def baseline(self, device: str, source_id: str, setting: str) -> Baseline | None:
        return self._baselines.get((device, source_id, setting))

    def eluate_generator(self, elution_id: str) -> str | None:
        """The generator whose remembered elution has msg_id `elution_id`, if any."""
        return next((gid for gid, state in self._generators.items() if elution_id in state.eluates), None)

    # -- the two phases ---------------------------------------------------------------------

    def process(self, *messages: Message) -> QcOutcome:
        """Judge `messages` (one commit batch, in order) without changing the engine; see `apply`."""
        stage = _Stage()
        batch: list[Message] = []
        results: list[Message] = []
        replacements: dict[str, Message] = {}
        rejected = 0
        for message in messages:
            handled = _NOTHING
            try:
                handled = self._handle(message, stage)
            except (QcInputError, UnknownNuclideError, KeyError, TypeError, ValueError) as exc:
                rejected += 1
                log.warning("QC skipped %s message %s: %s", message.kind, message.payload.get("msg_id"), exc)
            if handled.drop:
                continue
            if handled.replacement is not None:
                replacements[message.msg_id] = handled.replacement
            batch.extend(handled.before)
            batch.append(handled.replacement or message)
            batch.extend(handled.after)
            results.extend(m for m in (*handled.before, *handled.after) if m.kind == "qc_result")
        return QcOutcome(tuple(batch), tuple(results), replacements, rejected, stage)

    def _handle(self, message: Message, stage: _Stage) -> _Handled:
        payload = message.payload
        if message.kind == "reading":
            self._watch_reading(payload, stage)
            return _Handled([], None, self._on_reading(payload, stage.generators))
        if message.kind == "measurement":
            return self._on_measurement(message, stage)
        if message.kind == "measurement_label":
            return _Handled([], None, self._on_label(payload))
        if message.kind == "elution":
            replacement, verdicts = self._on_elution(message, stage.generators)
            return _Handled([], replacement, verdicts)
        if message.kind == "qc_procedure":
            return self._on_procedure_record(message, stage)
        return _NOTHING

    def tick(self, now_ns: int) -> QcOutcome:
        """End every procedure whose time ran out by `now_ns` as incomplete; pure like `process`.

        Commit `messages` (the service does so every 30 s, through the QC stage, which takes the end
        records over), then `apply`. An end record that lost a race with the procedure's last step
        is dropped by `process`, so a procedure never gets two ends.
        """
        stage = _Stage()
        timeout_ns = int(self.config.procedure_timeout_min * 60e9)
        ended: list[Message] = []
        for slot, procedure in self._procedures.items():
            deadline = procedure.deadline_ns(timeout_ns)
            if deadline is None or now_ns < deadline:
                continue
            missing = ", ".join(procedure.missing) or "no setting"
            ended.append(
                procedure.end_message(  # ended at its deadline: the same end however late the tick that finds it
                    "incomplete",
                    deadline,
                    f"not finished within {self.config.procedure_timeout_min:g} min ([qc] procedure_timeout_min); "
                    f"no result for: {missing}",
                )
            )
            stage.based_on[slot], stage.procedures[slot] = procedure.procedure_id, None
        return QcOutcome(tuple(ended), (), {}, 0, stage)

    def apply(self, outcome: QcOutcome) -> None:
        """Take over the state of a committed outcome. Call once, after the commit succeeded.

        A generator state older than the engine's (an outcome applied twice, or out of order) is
        ignored; age is the last elution's end time, not its counter, since a count can start again.
        A procedure slot is taken over only if it still holds what the outcome found there.
        """
        self.rejected += outcome.rejected
        stage = outcome._stage
        for generator_id, state in stage.generators.items():
            current = self._generators[generator_id]
            if current.last_elution_ns is None or (
                state.last_elution_ns is not None and state.last_elution_ns > current.last_elution_ns
            ):
                self._generators[generator_id] = state.copy()
        for slot, procedure in stage.procedures.items():
            held = self._procedures.get(slot)
            if (None if held is None else held.procedure_id) != stage.based_on.get(slot):
                continue
            if procedure is None:
                self._procedures.pop(slot, None)
            else:
                self._procedures[slot] = procedure.copy()
        for key, baseline in stage.baselines.items():
            held_baseline = self._baselines.get(key)
            if held_baseline is None or baseline.baseline_ns >= held_baseline.baseline_ns:
                self._baselines[key] = baseline

    def restore(self, archive: HistoryArchive, unarchived: Iterable[Message] = ()) -> int:
        """Rebuild the engine's state from what was committed before a restart; return the elutions restored.

        Generators (below), the newest baseline per (calibrator, source, setting), and the procedures
        still open (`_restore_procedures`). Call once at start-up, before `process`; it does SQLite
        I/O, so from async code run it in `asyncio.to_thread`.
        """
        pending = [m for m in unarchived if m.payload.get("site") == self.site]
        restored = self._restore_generators(archive, pending)
        self._restore_baselines(archive, pending)
        self._restore_procedures(archive, pending)
        return restored

    def _restore_generators(self, archive: HistoryArchive, pending: list[Message]) -> int:
        """Rebuild each configured generator's state from what was committed before a restart.

        Sources: elution messages and elution_yield qc_results in `archive`, plus `unarchived`,
        the messages still in the outbox that the history sink has not archived yet (pass
        ``[s.message for s in outbox.pending("history", ...)]``). Each elution's residual and
        yield are taken from the verdict that judged it, so the state is what the engine had,
        even if the configuration changed since. An elution with no verdict (QC rejected it)
        is re-modelled from the state before it; if that fails its residual is taken as 0.
        Call once at start-up, before `process`; it does SQLite I/O, so from async code run it
        in `asyncio.to_thread`. A config `last_elution` later than the archive still wins.
        Returns how many elutions were restored.
        """
        restored = 0
        for generator_id, spec in self.config.generators.items():
            elutions = self._payloads(
                archive.query("elution", site=self.site, device=generator_id),
                [m.payload for m in pending if m.kind == "elution" and m.payload.get("generator") == generator_id],
            )
            verdicts = self._payloads(
                archive.query("qc_result", site=self.site, device=generator_id, test="elution_yield"),
                [
                    m.payload
                    for m in pending
                    if m.kind == "qc_result"
                    and m.payload.get("device") == generator_id
                    and m.payload.get("test") == "elution_yield"
                ],
            )
            usable = [e for e in elutions if _restorable(e, ("counter", "end_ns", "activity_bq"))]
            verdicts = [v for v in verdicts if _restorable(v, ("time_ns", "expected", "value_judged"))]
            if len(usable) < len(elutions):
                log.warning(
                    "restore: %d archived elution(s) of %s lack counter/end_ns/activity_bq; skipped",
                    len(elutions) - len(usable),
                    generator_id,
                )
            verdict_by_end_ns = {int(v["time_ns"]): v for v in verdicts}
            state = _GeneratorState(None)
            # In time order: a counter that started again (drivers/records.py) repeats earlier counters.
            kept = sorted(usable, key=lambda e: int(e["end_ns"]))[-HISTORY_LENGTH:]
            for elution in kept:
                msg_id = str(elution["msg_id"])
                counter, end_ns, eluted = int(elution["counter"]), int(elution["end_ns"]), float(elution["activity_bq"])
                verdict = verdict_by_end_ns.get(end_ns)
                if verdict is not None:
                    expected, judged = float(verdict["expected"]), float(verdict["value_judged"])
                    state.advance(msg_id, counter, end_ns, eluted, expected, judged)
                    continue
                try:
                    available: float | None = available_activity(spec, end_ns, state.last_elution_ns, state.residual_bq)
                except QcInputError as exc:
                    log.warning(
                        "restore: elution %s/%d cannot be re-modelled (%s); residual taken as 0",
                        generator_id,
                        counter,
                        exc,
                    )
                    available = None
                state.advance(msg_id, counter, end_ns, eluted, available, None)
            restored += len(kept)
            seed = self.config.last_elution_ns.get(generator_id)
            if seed is not None and (state.last_elution_ns is None or seed > state.last_elution_ns):
                state.last_elution_ns, state.residual_bq = seed, 0.0
            self._generators[generator_id] = state
            log.info("QC restored %s: %d elution(s), last counter %s", generator_id, len(kept), state.last_counter)
        return restored

    def _restore_baselines(self, archive: HistoryArchive, pending: list[Message]) -> None:
        for device in self.config.devices:
            payloads = self._payloads(
                archive.query("qc_baseline", site=self.site, device=device),
                [m.payload for m in pending if m.kind == "qc_baseline" and m.payload.get("device") == device],
            )
            for payload in payloads:
                try:
                    baseline = Baseline.from_payload(payload)
                except QcInputError as exc:
                    log.warning("restore: %s; skipped", exc)
                    continue
                held = self._baselines.get(baseline.key)
                if held is None or baseline.baseline_ns >= held.baseline_ns:
                    self._baselines[baseline.key] = baseline
        log.info("QC restored %d constancy baseline(s)", len(self._baselines))

    def _restore_procedures(self, archive: HistoryArchive, pending: list[Message]) -> None:
        """Reopen the procedures that started and have not ended, with the steps and results committed so far.

        Whether the chamber emptied while the controller was down is not known, so a restored
        procedure takes no setting change as a continuation until its next step.
        """
        from hotlab.controller.archive import OPEN_END_NS, TimeRange

        records = self._payloads(
            archive.query("qc_procedure", site=self.site),
            [m.payload for m in pending if m.kind == "qc_procedure"],
        )
        ended = {r.get("procedure_id") for r in records if r.get("status") != "started"}
        for record in records:
            if record.get("status") != "started" or record.get("procedure_id") in ended:
                continue
            try:
                procedure = Procedure.from_started(dict(record))
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("restore: procedure record %s cannot be read (%r); skipped", record.get("msg_id"), exc)
                continue
            since = TimeRange(procedure.started_ns, OPEN_END_NS)

            def linked(
                kind: str, procedure: Procedure = procedure, since: TimeRange = since
            ) -> list[Mapping[str, Any]]:
                archived = archive.query(kind, since, site=self.site, device=procedure.device)
                unsent = [m.payload for m in pending if m.kind == kind and m.payload.get("device") == procedure.device]
                found = self._payloads(archived, unsent)
                return [p for p in found if p.get("procedure_id") == procedure.procedure_id]

            for payload in linked("measurement"):
                procedure.steps.append(
                    Step(
                        str(payload["msg_id"]),
                        str(payload["nuclide"]),
                        float(payload["activity_bq"]),
                        int(payload["time_ns"]),
                        str(payload["end"]),
                    )
                )
            for payload in linked("qc_result"):
                procedure.results.append(str(payload["msg_id"]))
                procedure.verdicts.append(str(payload["verdict"]))
                setting = payload.get("inputs", {}).get("setting")
                if payload.get("test") == "constancy" and setting is not None:
                    procedure.done[str(setting)] = str(payload["msg_id"])
            for payload in linked("qc_baseline"):
                procedure.done[str(payload["setting"])] = str(payload["msg_id"])
            procedure.source_left = True
            self._procedures[slot_of(procedure.device, procedure.kind)] = procedure
            log.info(
                "QC restored open procedure %s (%s on %s)", procedure.procedure_id, procedure.kind, procedure.device
            )

    @staticmethod
    def _payloads(archived: list[dict[str, Any]], unarchived: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """Archived payloads plus the not yet archived ones, each msg_id once."""
        seen = {p["msg_id"] for p in archived}
        return [*archived, *(p for p in unarchived if p.get("msg_id") not in seen)]

    # -- measurements and readings ----------------------------------------------------------

    def _on_label(self, payload: Mapping[str, Any]) -> list[Message]:
        """A labelled measurement that names a reference source (accuracy) or a prescription (dosage)."""
        device, station = str(payload["device"]), str(payload["station"])
        measured: Mapping[str, Any] = payload["measurement"]
        activity, time_ns, setting = float(measured["activity_bq"]), int(measured["time_ns"]), measured["nuclide"]
        limits = self.config.limits
        if "reference_source" in payload:
            source = self._named_source(payload["reference_source"])
            if setting is None or get_nuclide(str(setting)).name != source.nuclide.name:
                raise QcInputError(
                    f"accuracy measurement taken on the {setting} setting, but source {source.source_id} "
                    f"is {source.nuclide.name}"
                )
            result = calibrator_rules.accuracy(source, [activity], time_ns, limits["accuracy"])
        elif "prescribed_bq" in payload:
            if setting is None:
                raise QcInputError("a dosage needs the measurement's nuclide setting")
            result = dosage.dosage_check(
                get_nuclide(str(setting)),
                activity,
                time_ns,
                parse_activity_bq(payload["prescribed_bq"], "prescribed_bq"),
                int(payload["administration_ns"]),
                limits["dosage"],
            )
        else:
            return []  # a label only names what was measured
        linked = {"measurement_id": str(payload["measurement_id"]), "label": payload["label"]}
        return [replace(result, inputs=dict(result.inputs) | linked).to_message(self.site, station, device)]

    def _on_reading(self, payload: Mapping[str, Any], staged: Mapping[str, _GeneratorState]) -> list[Message]:
        extra: Mapping[str, Any] = payload.get("extra") or {}
        tag = extra.get("qc")
        if tag is None:
            return []  # a poll: QC reads measurements
        if payload.get("quality") != "good":
            log.info("QC: %s reading %s is suspect and is not judged", tag, payload.get("msg_id"))
            return []
        device, station = str(payload["device"]), str(payload["station"])
        result = self._judge_reading(tag, payload, extra, staged)
        return [result.to_message(self.site, station, device)]

    def _judge_reading(
        self,
        tag: Any,
        payload: Mapping[str, Any],
        extra: Mapping[str, Any],
        staged: Mapping[str, _GeneratorState],
    ) -> QcResult:
        limits = self.config.limits
        activity, time_ns = float(payload["activity_bq"]), int(payload["time_ns"])
        setting = payload.get("nuclide")
        if tag == "background":
            return calibrator_rules.background(
                activity, time_ns, limits["background"], nuclide=None if setting is None else str(setting)
            )
        if tag == "mo99":
            return generator_rules.mo99_breakthrough(
                activity,
                parse_activity_bq(_field(extra, "tc99m_bq", tag), "extra.tc99m_bq"),
                time_ns,
                limits["mo99_breakthrough"],
                administration_ns=(
                    parse_time_ns(extra["administration_time"], "extra.administration_time")
                    if "administration_time" in extra
                    else None
                ),
            )
        if tag == "ge68_breakthrough":
            return self._ge68_breakthrough(str(payload["device"]), activity, time_ns, extra, staged)
        raise QcInputError(
            f"unknown QC tag {tag!r}; known: background, mo99, ge68_breakthrough (constancy, accuracy and "
            "dosage are judged from measurements and their labels)"
        )

    def _named_source(self, source_id: Any) -> ReferenceSource:
        try:
            return self.config.sources[str(source_id)]
        except KeyError:
            raise QcInputError(f"unknown source {source_id!r}; configured: {sorted(self.config.sources)}") from None

    def _ge68_breakthrough(
        self,
        device: str,
        activity: float,
        time_ns: int,
        extra: Mapping[str, Any],
        staged: Mapping[str, _GeneratorState],
    ) -> QcResult:
        generator_id = str(_field(extra, "generator", "ge68_breakthrough"))
        counter = int(_field(extra, "elution_counter", "ge68_breakthrough"))
        state = staged.get(generator_id) or self._committed_state(generator_id)
        eluate = state.eluate(counter)
        if eluate is None:
            raise QcInputError(f"elution {counter} of {generator_id} is not among the last {HISTORY_LENGTH} seen")
        result = generator_rules.ge68_breakthrough(
            eluate.eluted_bq,
            eluate.end_ns,
            activity,
            time_ns,
            self.config.limits["ge68_breakthrough"],
            background_bq=[float(_field(extra, "background_bq", "ge68_breakthrough"))],
            minimum_detectable_bq=self.config.minimum_detectable_bq(device),
            aliquot_fraction=float(extra.get("aliquot_fraction", 1.0)),
        )
        # The elution's msg_id is what the schedule's follow-up item of that elution is matched on.
        return replace(result, inputs=dict(result.inputs) | {"elution_id": eluate.msg_id, "generator": generator_id})

    # -- elutions -------------------------------------------------------------------------

    def _committed_state(self, generator_id: str) -> _GeneratorState:
        try:
            return self._generators[generator_id]
        except KeyError:
            raise QcInputError(f"generator {generator_id!r} is not configured under [qc.generators]") from None

    def _on_elution(self, message: Message, staged: dict[str, _GeneratorState]) -> tuple[Message | None, list[Message]]:
        payload = message.payload
        generator_id = str(payload["generator"])
        spec = self.config.generators.get(generator_id)
        if spec is None:
            log.info("no QC for elution of unconfigured generator %s", generator_id)
            return None, []
        state = staged.get(generator_id) or self._generators[generator_id]
        counter, end_ns = int(payload["counter"]), int(payload["end_ns"])
        # A re-delivery is the same msg_id; a counter at or below the last one is a re-delivery too,
        # unless the station says its count started again (`counter_reset`, drivers/records.py).
        if message.msg_id in state.eluates or (
            payload.get("counter_reset") is None and state.last_counter is not None and counter <= state.last_counter
        ):
            log.info("elution %s/%d already judged; not judging a re-delivery twice", generator_id, counter)
            return None, []
        yield_limit = self.config.limits[YIELD_LIMIT_BY_DAUGHTER[spec.daughter.name]]
        result = generator_rules.elution_yield(
            spec,
            float(payload["activity_bq"]),
            end_ns,
            yield_limit,
            last_elution_ns=state.last_elution_ns,
            residual_bq=state.residual_bq,
        )
        state = state.copy()
        state.advance(message.msg_id, counter, end_ns, result.measured, result.expected, result.value_judged)
        staged[generator_id] = state
        station = str(payload["station"])
        replacement = Message(message.kind, message.topic, dict(payload) | {"yield_pct": result.value_judged})
        verdicts = [result.to_message(self.site, station, generator_id)]
        try:
            trend = generator_rules.yield_trend(
                generator_id,
                list(state.history),
                yield_limit,
                self.config.trend_horizon_days,
                self.config.trend_min_points,
                self.config.trend_min_span_days,
            )
        except QcInputError as exc:  # the yield verdict above stands even when no trend can be fitted
            log.warning("no yield trend for %s: %s", generator_id, exc)
            trend = None
        if trend is not None:
            verdicts.append(trend.to_message(self.site, station, generator_id))
        reported = payload.get("breakthrough_pct")
        if spec.parent.name == "Ge-68" and reported is not None:
            station_figure = generator_rules.ge68_station_breakthrough(
                float(reported),
                end_ns,
                self.config.limits["ge68_breakthrough"],
                generator_id=generator_id,
                elution_id=message.msg_id,
            )
            verdicts.append(station_figure.to_message(self.site, station, generator_id))
        return replacement, verdicts

    # -- procedures -------------------------------------------------------------------------

    def _procedure(self, slot: Slot, stage: _Stage) -> Procedure | None:
        """The procedure open in `slot` as of this batch so far: staged, else a copy of the committed one."""
        if slot in stage.procedures:
            return stage.procedures[slot]
        committed = self._procedures.get(slot)
        return None if committed is None else committed.copy()

    def _stage_procedure(self, slot: Slot, procedure: Procedure | None, stage: _Stage) -> None:
        if slot not in stage.based_on:
            committed = self._procedures.get(slot)
            stage.based_on[slot] = None if committed is None else committed.procedure_id
        stage.procedures[slot] = procedure

    def _baseline_for(self, key: tuple[str, str, str], stage: _Stage) -> Baseline | None:
        return stage.baselines.get(key) or self._baselines.get(key)

    def _watch_reading(self, payload: Mapping[str, Any], stage: _Stage) -> None:
        """Note when a good reading shows the source was taken out since a procedure's last step."""
        if payload.get("quality") != "good" or payload.get("extra"):
            return
        device, activity = str(payload["device"]), float(payload["activity_bq"])
        for slot in (slot_of(device, "daily_constancy"), slot_of(device, "linearity")):
            procedure = self._procedure(slot, stage)
            if procedure is None or procedure.source_left or procedure.last_step is None:
                continue
            procedure.saw_reading(activity)
            if procedure.source_left:
                self._stage_procedure(slot, procedure, stage)

    def _on_measurement(self, message: Message, stage: _Stage) -> _Handled:
        """A measurement is a step of an open procedure it plausibly belongs to, or opens a daily check.

        A measurement of the check source on its own setting while no check is open is recognised
        as the first step of a daily constancy procedure (started_by null). Anything else is a
        measurement like any other (a patient dose) and gets no verdict.
        """
        payload = message.payload
        device = str(payload["device"])
        setting = None if payload.get("nuclide") is None else get_nuclide(str(payload["nuclide"])).name
        before: list[Message] = []
        for slot in (slot_of(device, "daily_constancy"), slot_of(device, "linearity")):
            procedure = self._procedure(slot, stage)
            if procedure is not None and self._is_step(procedure, payload, setting, stage):
                break
        else:
            source = self.config.check_source(device)
            slot = slot_of(device, "daily_constancy")
            if source is None or setting != source.nuclide.name or self._procedure(slot, stage) is not None:
                return _NOTHING
            procedure = self._recognised(payload, source)
            before.append(procedure.started_message())
        assert procedure is not None and setting is not None
        procedure = procedure.copy()  # a step the rules refuse below must not stay in the batch's staged procedure
        procedure.take(
            Step(message.msg_id, setting, float(payload["activity_bq"]), int(payload["time_ns"]), str(payload["end"]))
        )
        after, end = self._judge_step(procedure, payload, setting, stage)
        for record in after:
            if record.kind == "qc_result":
                procedure.add_result(record)
        if end is not None:
            status, detail = end
            after.append(procedure.end_message(status, int(payload["time_ns"]), detail))
        self._stage_procedure(slot, None if end is not None else procedure, stage)
        replacement = Message(message.kind, message.topic, dict(payload) | {"procedure_id": procedure.procedure_id})
        return _Handled(before, replacement, after)

    def _recognised(self, payload: Mapping[str, Any], source: ReferenceSource) -> Procedure:
        device = str(payload["device"])
        return Procedure(
            procedure_id=recognised_procedure_id(device, str(payload["msg_id"])),
            kind="daily_constancy",
            site=self.site,
            station=str(payload["station"]),
            device=device,
            started_by=None,
            started_ns=int(payload["start_ns"]),
            settings=self.config.devices[device].settings,
            source_id=source.source_id,
        )

    def _is_step(self, procedure: Procedure, payload: Mapping[str, Any], setting: str | None, stage: _Stage) -> bool:
        """Whether a measurement plausibly belongs to `procedure` (controller/qc/procedures.py says when)."""
        if setting is None or setting not in procedure.settings or int(payload["start_ns"]) < procedure.started_ns:
            return False
        activity, time_ns = float(payload["activity_bq"]), int(payload["time_ns"])
        if procedure.kind == "ge68_breakthrough":
            return not procedure.steps and activity <= self._ge68_ceiling_bq(procedure, stage)
        if procedure.step_labels:
            return self._is_labelled_step(procedure, activity, time_ns, setting)
        if procedure.kind == "linearity":
            last = procedure.last_step
            if last is None:
                return True
            nuclide = get_nuclide(setting)
            expected = float(activity_at(last.activity_bq, nuclide, (time_ns - last.time_ns) / 1e9))
            return time_ns > last.time_ns and within_band(activity, expected)
        if setting in procedure.done:
            return False
        source = self._named_source(procedure.source_id)
        if setting == source.nuclide.name or procedure.continues_setting_change(setting, int(payload["start_ns"])):
            return True
        baseline = self._baseline_for((procedure.device, source.source_id, setting), stage)
        return (
            baseline is not None
            and time_ns >= baseline.baseline_ns
            and within_band(activity, baseline.expected_at(time_ns))
        )

    def _is_labelled_step(self, procedure: Procedure, activity: float, time_ns: int, setting: str) -> bool:
        """The next labelled step: the first, or the first step's source again (decayed; through its sleeve)."""
        if not procedure.steps:
            return True
        first, last = procedure.steps[0], procedure.steps[-1]
        if not procedure.missing or time_ns <= last.time_ns:
            return False
        factor = self.config.sleeves(procedure.device).get(procedure.missing[0], 1.0)
        expected = float(activity_at(first.activity_bq, get_nuclide(setting), (time_ns - first.time_ns) / 1e9))
        return within_band(activity * factor, expected)

    def _judge_step(
        self, procedure: Procedure, payload: Mapping[str, Any], setting: str, stage: _Stage
    ) -> tuple[list[Message], tuple[Status, str] | None]:
        """The records one step brings, and how the procedure ends with it (None: it goes on)."""
        if procedure.step_labels:
            return self._labelled_steps_end(procedure) if not procedure.missing else ([], None)
        if procedure.kind == "linearity":
            return self._linearity_step(procedure, payload)
        if procedure.kind == "ge68_breakthrough":
            return self._ge68_step(procedure, payload, stage)
        station, device = procedure.station, procedure.device
        measurement_id = str(payload["msg_id"])
        measured: dict[str, Any] = {
            "measurement_id": measurement_id,
            "n": int(payload["n"]),
            "sd_bq": float(payload["sd_bq"]),
            "reading_ids": list(payload["reading_ids"]),
        }
        records: list[Message] = []
        if len(procedure.steps) == 1:  # the chamber's background before the source went in
            background = calibrator_rules.background(
                float(payload["background_bq"]),
                int(payload["start_ns"]),
                self.config.limits["background"],
                nuclide=setting,
            )
            background = replace(background, inputs=dict(background.inputs) | {"measurement_id": measurement_id})
            records.append(self._result(background, procedure))
        source = self._named_source(procedure.source_id)
        key = (device, source.source_id, setting)
        activity, time_ns = float(payload["activity_bq"]), int(payload["time_ns"])
        if procedure.kind == "baseline":
            assert procedure.started_by is not None  # a baseline is only ever started by a command
            record = qc_baseline_message(
                self.site,
                station,
                device,
                source_id=source.source_id,
                setting=setting,
                activity_bq=activity,
                baseline_ns=time_ns,
                measurement_id=measurement_id,
                procedure_id=procedure.procedure_id,
                taken_by=procedure.started_by,
                reason=procedure.reason or "",
                source_nuclide=source.nuclide.name,
                half_life_s=source.nuclide.half_life_s,
                half_life_source=source.nuclide.source,
            )
            stage.baselines[key] = Baseline.from_payload(record.payload)
            procedure.done[setting] = record.msg_id
            records.append(record)
        else:
            baseline = self._baseline_for(key, stage)
            if baseline is None:
                return records, (
                    "incomplete",
                    f"no constancy baseline of source {source.source_id} on the {setting} setting of {device}: "
                    "a QC officer takes one (start_qc procedure baseline)",
                )
            result = baselines.constancy(baseline, activity, time_ns, self.config.limits["constancy"], inputs=measured)
            records.append(self._result(result, procedure))
            procedure.done[setting] = records[-1].msg_id
        if procedure.missing:
            return records, None
        what = "baseline taken" if procedure.kind == "baseline" else "constancy judged"
        return records, ("complete", f"{what} on {len(procedure.settings)} setting(s): {', '.join(procedure.settings)}")

    def _linearity_step(
        self, procedure: Procedure, payload: Mapping[str, Any]
    ) -> tuple[list[Message], tuple[Status, str] | None]:
        low_bq = self.config.linearity_low_bq(procedure.device)
        if float(payload["activity_bq"]) > low_bq:
            return [], None
        return self._linearity_end(procedure, f"reached {low_bq:.4g} Bq ([qc.devices] linearity_low_bq)")

    def _linearity_end(self, procedure: Procedure, why: str) -> tuple[list[Message], tuple[Status, str]]:
        """Judge the series collected by the decay method, or end it incomplete (a rule's refusal too).

        The expectation comes from the last DECAY_NORMALISATION_POINTS readings (the low-activity end),
        so at least one more is needed for anything to be judged.
        """
        needed = calibrator_rules.DECAY_NORMALISATION_POINTS + 1
        if len(procedure.steps) < needed:
            return [], (
                "incomplete",
                f"{why} with {len(procedure.steps)} measurement(s); the decay method needs {needed}: "
                f"{calibrator_rules.DECAY_NORMALISATION_POINTS} at the low end to normalise, and one or more to judge",
            )
        series = [TimedReading(s.time_ns, s.activity_bq, s.measurement_id) for s in procedure.steps]
        try:
            result = calibrator_rules.linearity_decay(
                get_nuclide(procedure.settings[0]), series, self.config.limits["linearity"]
            )
        except QcInputError as exc:
            return [], ("incomplete", f"{why}: {exc}")
        return [self._result(result, procedure)], ("complete", f"{why}: {len(series)} points judged")

    def _labelled_steps_end(self, procedure: Procedure) -> tuple[list[Message], tuple[Status, str]]:
        """Judge a procedure whose every labelled step is measured; a rule's refusal ends it incomplete."""
        nuclide = get_nuclide(procedure.settings[0])
        labelled = list(zip(procedure.step_labels, procedure.steps, strict=True))
        readings = [TimedReading(step.time_ns, step.activity_bq, label) for label, step in labelled]
        reference, others = readings[0], readings[1:]
        limits = self.config.limits
        try:
            if procedure.kind == "geometry":
                result = calibrator_rules.geometry(nuclide, reference, others, limits["geometry"])
                done = f"{len(others)} geometry(ies) judged against the reference, {reference.label}"
            elif procedure.kind == "sleeve_linearity":
                factors = dict(self.config.sleeves(procedure.device))
                result = calibrator_rules.linearity_sleeve(
                    nuclide, factors, reference, others, limits["linearity_sleeve"]
                )
                done = f"unshielded and {len(others)} sleeve reading(s) judged"
            else:
                result = generator_rules.ga68_half_life(reference, others[0], limits["ga68_half_life"])
                done = "Ga-68 half-life judged from two readings"
        except QcInputError as exc:
            return [], ("incomplete", str(exc))
        linked: dict[str, Any] = {"measurement_ids": {label: step.measurement_id for label, step in labelled}}
        if procedure.elution_id is not None:
            linked |= {"elution_id": procedure.elution_id, "generator": procedure.generator}
        result = replace(result, inputs=dict(result.inputs) | linked)
        return [self._result(result, procedure)], ("complete", done)

    def _ge68_ceiling_bq(self, procedure: Procedure, stage: _Stage) -> float:
        """The most a kept eluate can plausibly read in a Ge-68 follow-up: GE68_PLAUSIBLE_LIMIT_MULTIPLE times
        the limit's share of the part of the eluate measured. A Ga-68 dose measured meanwhile reads far more."""
        state = stage.generators.get(str(procedure.generator)) or self._generators.get(str(procedure.generator))
        eluate = None if state is None else state.eluates.get(str(procedure.elution_id))
        if eluate is None:
            return math.inf  # the step ends the procedure incomplete: the elution is no longer remembered
        limit_pct = self.config.limits["ge68_breakthrough"].fail
        if limit_pct is None:
            return math.inf
        return GE68_PLAUSIBLE_LIMIT_MULTIPLE * limit_pct / 100.0 * eluate.eluted_bq * procedure.aliquot_fraction

    def _ge68_step(
        self, procedure: Procedure, payload: Mapping[str, Any], stage: _Stage
    ) -> tuple[list[Message], tuple[Status, str] | None]:
        """The eluate's re-measurement, background subtracted, judged by the Ge-68 breakthrough rule."""
        generator_id, elution_id = str(procedure.generator), str(procedure.elution_id)
        state = stage.generators.get(generator_id) or self._committed_state(generator_id)
        eluate = state.eluates.get(elution_id)
        if eluate is None:
            return [], ("incomplete", f"elution {elution_id} of {generator_id} is no longer remembered")
        try:
            result = generator_rules.ge68_breakthrough(
                eluate.eluted_bq,
                eluate.end_ns,
                float(payload["activity_bq"]),
                int(payload["time_ns"]),
                self.config.limits["ge68_breakthrough"],
                background_bq=_background_readings(payload),
                minimum_detectable_bq=self.config.minimum_detectable_bq(procedure.device),
                aliquot_fraction=procedure.aliquot_fraction,
            )
        except QcInputError as exc:
            return [], ("incomplete", str(exc))
        linked = {
            "elution_id": elution_id,
            "generator": generator_id,
            "measurement_id": str(payload["msg_id"]),
            "measured_bq": float(payload["activity_bq"]),
            "background_bq": float(payload["background_bq"]),
        }
        result = replace(result, inputs=dict(result.inputs) | linked)
        return [self._result(result, procedure)], ("complete", f"Ge-68 breakthrough of elution {elution_id} judged")

    def _result(self, result: QcResult, procedure: Procedure) -> Message:
        return replace(result, procedure_id=procedure.procedure_id).to_message(
            self.site, procedure.station, procedure.device
        )

    def _on_procedure_record(self, message: Message, stage: _Stage) -> _Handled:
        """A start record (from start_qc) opens a procedure; an end record (end_qc, a timeout) closes it.

        An end record is committed as the procedure's final record (same msg_id, its results and
        measurements as of now); one for a procedure that is no longer open lost a race with the
        procedure's own end and is dropped. A start while another check is open on the device (two
        start_qc commands at once) aborts the older one.
        """
        payload = message.payload
        slot = slot_of(str(payload["device"]), str(payload["procedure"]))
        current = self._procedure(slot, stage)
        procedure_id = str(payload["procedure_id"])
        if payload["status"] == "started":
            if current is not None and current.procedure_id == procedure_id:
                return _NOTHING
            before = []
            if current is not None:
                before.append(
                    current.end_message(
                        "aborted", int(payload["started_ns"]), f"superseded by procedure {procedure_id} started at once"
                    )
                )
            self._stage_procedure(slot, Procedure.from_started(payload), stage)
            return _Handled(before, None, [])
        if current is None or current.procedure_id != procedure_id:
            log.info("QC: end record of procedure %s dropped: it has ended already", procedure_id)
            return _Handled([], None, [], drop=True)
        status, detail, ended_ns = payload["status"], str(payload["detail"]), int(payload["ended_ns"])
        before = []
        if status == "aborted" and current.kind == "linearity":  # end_qc finishes a series
            before, (status, detail) = self._linearity_end(current, f"ended by end_qc ({detail})")
            for record in before:
                current.add_result(record)
        self._stage_procedure(slot, None, stage)
        return _Handled(before, current.end_message(status, ended_ns, detail, msg_id=message.msg_id), [])

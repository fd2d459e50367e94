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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, NamedTuple

from hotlab.controller.config_table import ConfigTable
from hotlab.controller.messages import Message
from hotlab.controller.qc import calibrator_rules, dosage, generator_rules
from hotlab.controller.qc.calibrator_rules import ReferenceSource
from hotlab.controller.qc.generator_rules import (
    MO99_DEFAULT_JUDGE_HORIZON_H,
    GeneratorSpec,
    YieldPoint,
    available_activity,
    generator_pair,
)
from hotlab.controller.qc.limits import YIELD_LIMIT_BY_DAUGHTER, Limit, load_limits
from hotlab.controller.qc.result import QcInputError, QcResult
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


@dataclass(frozen=True, slots=True)
class QcConfig:
    """Per-site QC configuration: limits, check/reference sources, calibrator and generator set-up."""

    limits: Mapping[str, Limit] = field(default_factory=load_limits)
    sources: Mapping[str, ReferenceSource] = field(default_factory=dict)
    check_source_by_device: Mapping[str, str] = field(default_factory=dict)
    generators: Mapping[str, GeneratorSpec] = field(default_factory=dict)
    last_elution_ns: Mapping[str, int] = field(default_factory=dict)
    trend_horizon_days: float = 30.0
    trend_min_points: int = 5
    trend_min_span_days: float = 2.0
    mo99_judge_horizon_h: float = MO99_DEFAULT_JUDGE_HORIZON_H

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> QcConfig:
        """Validate a ``[qc]`` table built in code (no file); see `from_table`."""
        return cls.from_table(ConfigTable(data or {}, "qc"))

    @classmethod
    def from_table(cls, root: ConfigTable) -> QcConfig:
        """Validate a ``[qc]`` TOML table (see docs/qc.md); every problem is a ConfigError naming the key."""
        limits_table = root.table("limits")
        limits = load_limits(limits_table) if limits_table is not None else load_limits()
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
        devices: dict[str, str] = {}
        for device, table in _entries(root, "devices"):
            source_id = table.string("check_source", required=True)
            if source_id not in sources:
                raise table.error(
                    "check_source", f"no source {source_id!r} under [qc.sources]; known: {sorted(sources)}"
                )
            devices[device] = source_id
            table.finish()
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
            limits=limits,
            sources=sources,
            check_source_by_device=devices,
            generators=generators,
            last_elution_ns=last_elution,
            trend_horizon_days=root.number("trend_horizon_days", 30.0, minimum=0.0, exclusive_minimum=True),
            trend_min_points=root.integer("trend_min_points", 5, minimum=3),
            trend_min_span_days=root.number("trend_min_span_days", 2.0, minimum=0.0, maximum=365.0),
            mo99_judge_horizon_h=root.number(
                "mo99_judge_horizon_h", MO99_DEFAULT_JUDGE_HORIZON_H, minimum=0.0, maximum=72.0
            ),
        )
        root.finish()
        return config


def _required_time(table: ConfigTable, name: str) -> int:
    time_ns = _time(table, name)
    assert time_ns is not None  # required: a missing value raised
    return time_ns


def _restorable(payload: Mapping[str, Any], keys: tuple[str, ...]) -> bool:
    """True if an archived payload has a finite number under every key (restore skips others)."""
    values = [payload.get(key) for key in keys]
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


class _Eluate(NamedTuple):
    """One remembered elution's eluate, for a later Ge-68 re-measurement of it."""

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
        self.eluates[msg_id] = _Eluate(counter, end_ns, eluted_bq)
        while len(self.eluates) > HISTORY_LENGTH:  # elutions are advanced in time order: drop the oldest
            del self.eluates[next(iter(self.eluates))]

    def eluate(self, counter: int) -> _Eluate | None:
        """The newest remembered elution with `counter` (after a counter restart, the one of the new count)."""
        return max((e for e in self.eluates.values() if e.counter == counter), key=lambda e: e.end_ns, default=None)


@dataclass(frozen=True, slots=True)
class QcOutcome:
    """What `QcEngine.process` decided for a batch of messages; commit `messages`, then `apply` it.

    `messages` is the whole batch to commit, in order: every input message (or its
    `replacement`) followed by its verdicts. `results` are the verdicts alone and
    `replacements` maps an input's msg_id to the message that must be committed instead of it
    (an elution with ``yield_pct`` filled). `rejected` counts inputs that could not be judged.
    """

    messages: tuple[Message, ...]
    results: tuple[Message, ...]
    replacements: Mapping[str, Message]
    rejected: int
    _generator_states: Mapping[str, _GeneratorState] = field(repr=False)


class QcEngine:
    """Turns measurement, tagged reading and elution messages into qc_result messages (see the module docstring)."""

    def __init__(self, site: str, config: QcConfig | None = None) -> None:
        self.site = site
        self.config = config or QcConfig()
        self.rejected = 0
        self._generators = {
            gid: _GeneratorState(self.config.last_elution_ns.get(gid)) for gid in self.config.generators
        }

    def process(self, *messages: Message) -> QcOutcome:
        """Judge `messages` (one commit batch, in order) without changing the engine; see `apply`."""
        staged: dict[str, _GeneratorState] = {}
        batch: list[Message] = []
        results: list[Message] = []
        replacements: dict[str, Message] = {}
        rejected = 0
        for message in messages:
            replacement: Message | None = None
            verdicts: list[Message] = []
            try:
                if message.kind == "reading":
                    verdicts = self._on_reading(message.payload, staged)
                elif message.kind == "measurement":
                    verdicts = self._on_measurement(message.payload)
                elif message.kind == "measurement_label":
                    verdicts = self._on_label(message.payload)
                elif message.kind == "elution":
                    replacement, verdicts = self._on_elution(message, staged)
            except (QcInputError, UnknownNuclideError, KeyError, TypeError, ValueError) as exc:
                rejected += 1
                log.warning("QC skipped %s message %s: %s", message.kind, message.payload.get("msg_id"), exc)
            if replacement is not None:
                replacements[message.msg_id] = replacement
            batch.append(replacement or message)
            batch.extend(verdicts)
            results.extend(verdicts)
        return QcOutcome(tuple(batch), tuple(results), replacements, rejected, staged)

    def apply(self, outcome: QcOutcome) -> None:
        """Take over the generator state of a committed outcome. Call once, after the commit succeeded.

        A state older than the engine's (an outcome applied twice, or out of order) is ignored.
        Age is the last elution's end time, not its counter, since a count can start again.
        """
        self.rejected += outcome.rejected
        for generator_id, state in outcome._generator_states.items():
            current = self._generators[generator_id]
            if current.last_elution_ns is None or (
                state.last_elution_ns is not None and state.last_elution_ns > current.last_elution_ns
            ):
                self._generators[generator_id] = state.copy()

    def restore(self, archive: HistoryArchive, unarchived: Iterable[Message] = ()) -> int:
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
        pending = [m for m in unarchived if m.payload.get("site") == self.site]
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

    @staticmethod
    def _payloads(archived: list[dict[str, Any]], unarchived: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """Archived payloads plus the not yet archived ones, each msg_id once."""
        seen = {p["msg_id"] for p in archived}
        return [*archived, *(p for p in unarchived if p.get("msg_id") not in seen)]

    # -- measurements and readings ----------------------------------------------------------

    def _on_measurement(self, payload: Mapping[str, Any]) -> list[Message]:
        """A measurement on the check source's setting of a calibrator with a check source is a constancy check."""
        device, station = str(payload["device"]), str(payload["station"])
        source, setting = self._mounted_source(device), payload.get("nuclide")
        if source is None or setting is None or get_nuclide(str(setting)).name != source.nuclide.name:
            return []
        n, sd_bq = int(payload["n"]), float(payload["sd_bq"])
        result = calibrator_rules.constancy(
            source, [float(payload["activity_bq"])], int(payload["time_ns"]), self.config.limits["constancy"]
        )
        result = replace(
            result,
            inputs=dict(result.inputs) | {"measurement_id": str(payload["msg_id"]), "n": n, "sd_bq": sd_bq},
            detail=f"{source.nuclide.name} source {source.source_id}: measurement {payload['msg_id']} "
            f"(mean of {n} settled readings, sd {sd_bq:.4g} Bq) vs certificate decay-corrected to its settle time",
        )
        return [result.to_message(self.site, station, device)]

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
                judge_horizon_h=self.config.mo99_judge_horizon_h,
            )
        if tag == "ge68_breakthrough":
            return self._ge68_breakthrough(activity, time_ns, extra, staged)
        raise QcInputError(
            f"unknown QC tag {tag!r}; known: background, mo99, ge68_breakthrough (constancy, accuracy and "
            "dosage are judged from measurements and their labels)"
        )

    def _mounted_source(self, device: str) -> ReferenceSource | None:
        source_id = self.config.check_source_by_device.get(device)
        return None if source_id is None else self.config.sources[source_id]

    def _named_source(self, source_id: Any) -> ReferenceSource:
        try:
            return self.config.sources[str(source_id)]
        except KeyError:
            raise QcInputError(f"unknown source {source_id!r}; configured: {sorted(self.config.sources)}") from None

    def _ge68_breakthrough(
        self, activity: float, time_ns: int, extra: Mapping[str, Any], staged: Mapping[str, _GeneratorState]
    ) -> QcResult:
        generator_id = str(_field(extra, "generator", "ge68_breakthrough"))
        counter = int(_field(extra, "elution_counter", "ge68_breakthrough"))
        state = staged.get(generator_id) or self._committed_state(generator_id)
        eluate = state.eluate(counter)
        if eluate is None:
            raise QcInputError(f"elution {counter} of {generator_id} is not among the last {HISTORY_LENGTH} seen")
        return generator_rules.ge68_breakthrough(
            eluate.eluted_bq,
            eluate.end_ns,
            activity,
            time_ns,
            self.config.limits["ge68_breakthrough"],
            aliquot_fraction=float(extra.get("aliquot_fraction", 1.0)),
        )

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
        return replacement, verdicts

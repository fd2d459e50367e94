"""The QC schedule as a two-phase commit stage: qc_status messages and `qc_state` on readings.

Chained after the QC engine (controller/qc/engine.py), it sees each commit batch as the engine
left it: measurements with their `procedure_id`, qc_result and qc_procedure records, elutions.
Like the engine it is two-phase:

    outcome = stage.process(*messages)       # pure: the batch with qc_state stamped + qc_status changes
    await outbox.put_many(outcome.messages)
    stage.apply(outcome)                     # only after the commit

`process` folds each message into a copy of the facts (controller/qc/schedule.py) and, after the
message that changed an item, places a qc_status for it; a reading or measurement of a calibrator
whose daily QC is overdue or failed at the message's own `time_ns` is replaced by a copy carrying
`qc_state`, so nobody takes a dose from it unknowingly. Its own time, not the stage's clock: a
reading taken before the deadline must not be marked because a tick or another device's message
moved the clock past it first (records already folded count, whatever their time). The facts
merge commutatively ("latest record wins"), so `apply` of the same outcome twice, or of a `tick`
outcome and a batch outcome computed from the same state, leaves the same state. `tick(now)`
finds the changes the clock alone makes (due -> overdue at the deadline, done -> due at
midnight); its qc_status messages can be committed through the ordinary commit path, where
`process` takes them as published.

`restore` rebuilds the facts and what was last published from the history archive, so a
restart neither forgets a done item nor publishes every status again; it reads each calibrator
item's newest passing and failing record and each item's newest qc_status, not the whole history,
so a restart (and each visit of the web panel's QC page) costs the same after years; `hotlab qc status` uses
the same `restore` and `current` on the archive alone.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hotlab.controller.messages import MSG_ID_NAMESPACE, Message, device_topic, envelope
from hotlab.controller.qc.schedule import (
    GE68,
    ITEM_OF_TEST,
    ItemStatus,
    Key,
    Schedule,
    ScheduleConfig,
    ScheduleFacts,
)

if TYPE_CHECKING:
    from hotlab.controller.archive import HistoryArchive
    from hotlab.controller.archive_reads import Scope
    from hotlab.controller.qc.engine import QcConfig

log = logging.getLogger(__name__)

_DAY_NS = 86_400 * 1_000_000_000
#: Clinical measurements older than this before `now` cannot make today's daily QC overdue.
_CLINICAL_LOOKBACK_NS = 2 * _DAY_NS


def _newest(archive: HistoryArchive, kind: str, scope: Scope, condition: str, *params: str) -> list[dict[str, Any]]:
    """The newest record of `kind` in `scope` matching `condition`, as a list of none or one."""
    from hotlab.controller.archive_reads import newest_payload

    found = newest_payload(archive, kind, scope, condition, params)
    return [] if found is None else [found]


def qc_status_message(site: str, status: ItemStatus, time_ns: int) -> Message:
    """One item's state, retained on hotlab/<site>/<station>/<device>/qc/status/<item>.

    The msg_id is name-based on the state and its time, so the same change built twice (a
    batch processed again after a failed commit) is the same message.
    """
    name = json.dumps(["qc_status", site, status.device, status.item, *status.signature(), int(time_ns)])
    payload = envelope("qc_status", time_ns, uuid.uuid5(MSG_ID_NAMESPACE, name).hex) | {
        "site": site,
        "station": status.station,
        "device": status.device,
        "item": status.item,
        "test": status.test,
        "state": status.state,
        "alarm": status.alarm,
        "due_ns": status.due_ns,
        "overdue_ns": status.overdue_ns,
        "last_done_ns": status.last_done_ns,
        "last_verdict": status.last_verdict,
        "last_record_id": status.last_record_id,
        "elution_id": status.elution_id,
        "detail": status.detail,
    }
    return Message("qc_status", device_topic(site, status.station, status.device, f"qc/status/{status.item}"), payload)


@dataclass(slots=True)
class _StageState:
    """The facts plus, per item, the time and signature of the last qc_status committed for it."""

    facts: ScheduleFacts = field(default_factory=ScheduleFacts)
    published: dict[Key, tuple[int, tuple[Any, ...]]] = field(default_factory=dict)

    def copy(self) -> _StageState:
        return _StageState(self.facts.copy(), dict(self.published))

    def merge(self, other: _StageState) -> None:
        self.facts.merge(other.facts)
        for key, (time_ns, signature) in other.published.items():
            known = self.published.get(key)
            if known is None or time_ns >= known[0]:
                self.published[key] = (time_ns, signature)

    def publish(self, status: ItemStatus, time_ns: int) -> bool:
        """Note `status` as published at `time_ns`; False if it is what was published last."""
        known = self.published.get(status.key)
        if known is not None and known[1] == status.signature():
            return False
        self.published[status.key] = (time_ns, status.signature())
        return True


@dataclass(frozen=True, slots=True)
class ScheduleOutcome:
    """What `process` or `tick` decided: commit `messages`, then `apply` the outcome.

    `messages` is the whole batch in order (inputs, some replaced with `qc_state`, each followed
    by the qc_status changes it caused); `statuses` are those qc_status messages alone.
    """

    messages: tuple[Message, ...]
    statuses: tuple[Message, ...]
    rejected: int
    _state: _StageState = field(repr=False)


def schedule_stage_for(site: str, qc: QcConfig, schedule: ScheduleConfig, stations: Mapping[str, str]) -> ScheduleStage:
    """The stage for a site's `[qc]`: every calibrator with a check source (`[qc.devices]`, station from
    `stations`, device -> station) and every generator whose daughter is Ga-68 (`[qc.generators]`).

    One place that says what is scheduled, for the controller and `hotlab qc status` alike.
    """
    calibrators = {
        device: stations.get(device, device) for device, spec in qc.devices.items() if spec.check_source is not None
    }
    generators = [gid for gid, spec in qc.generators.items() if spec.daughter.name == "Ga-68"]
    return ScheduleStage(site, schedule, calibrators, generators)


class ScheduleStage:
    """The schedule of one site as a commit stage (module docstring).

    `calibrators` maps each calibrator with daily QC (a check source) to its station;
    `generators` are the ids of generators that give Ga-68 (a mapping's keys will do).
    """

    def __init__(
        self, site: str, config: ScheduleConfig, calibrators: Mapping[str, str], generators: Collection[str]
    ) -> None:
        self.schedule = Schedule(site, config, calibrators, generators)
        self.site = site
        self.rejected = 0
        self._state = _StageState()

    def process(self, *messages: Message) -> ScheduleOutcome:
        """Fold one commit batch, in order, into a copy of the state; the stage itself is unchanged."""
        staged = self._state.copy()
        batch: list[Message] = []
        statuses: list[Message] = []
        rejected = 0
        for message in messages:
            out: Message = message
            changes: list[Message] = []
            try:
                out, changes = self._on_message(staged, message)
            except (KeyError, TypeError, ValueError) as exc:
                rejected += 1
                log.warning("QC schedule skipped %s message %s: %s", message.kind, message.payload.get("msg_id"), exc)
            batch.append(out)
            batch.extend(changes)
            statuses.extend(changes)
        return ScheduleOutcome(tuple(batch), tuple(statuses), rejected, staged)

    def tick(self, now_ns: int) -> ScheduleOutcome:
        """The qc_status changes the clock alone makes by `now_ns` (pure, like `process`)."""
        staged = self._state.copy()
        staged.facts.clock_ns = max(staged.facts.clock_ns, now_ns)
        changes = self._changes(staged, self.schedule.statuses(staged.facts, staged.facts.clock_ns))
        return ScheduleOutcome(tuple(changes), tuple(changes), 0, staged)

    def apply(self, outcome: ScheduleOutcome) -> None:
        """Take over a committed outcome (idempotent), then forget what can no longer change a state."""
        self.rejected += outcome.rejected
        self._state.merge(outcome._state)
        self._forget(self._state)

    def current(self, now_ns: int) -> list[ItemStatus]:
        """Every item's state at `now_ns`, from what was committed and applied."""
        return self.schedule.statuses(self._state.facts, now_ns)

    def restore(self, archive: HistoryArchive, unarchived: Iterable[Message] = (), now_ns: int | None = None) -> int:
        """Rebuild the facts and the last published statuses from the archive plus `unarchived`.

        `unarchived` are the outbox messages the history sink has not archived yet; records after
        `now_ns` (default: now) are left out, so `hotlab qc status --at` sees the past as it was.
        SQLite I/O: from async code run it in `asyncio.to_thread`. Returns how many records counted.
        """
        from hotlab.controller.archive import TimeRange
        from hotlab.controller.archive_reads import Scope

        now = time.time_ns() if now_ns is None else now_ns
        up_to = TimeRange(0, now + 1)
        recent = TimeRange(max(now - _CLINICAL_LOOKBACK_NS, 0), now + 1)
        site = self.site
        found: list[Message] = []

        def add(kind: Any, payloads: list[dict[str, Any]]) -> None:
            found.extend(Message(kind, "", payload) for payload in payloads)

        # A calibrator item's state depends on its newest passing and newest failing record only (facts keep the
        # newest of each: ScheduleFacts.record), so those are read, newest first, not the device's whole history.
        everything = Scope(up_to, site)
        daily = "json_extract(payload, '$.procedure') = 'daily_constancy' AND json_extract(payload, '$.status') = 'complete'"
        for device in self.schedule.calibrators:
            for failing in ("COALESCE(verdict, '') != 'fail'", "verdict = 'fail'"):
                add(
                    "qc_procedure",
                    _newest(archive, "qc_procedure", everything, f"device = ? AND {daily} AND {failing}", device),
                )
                for test in (*ITEM_OF_TEST, "constancy"):
                    add(
                        "qc_result",
                        _newest(
                            archive, "qc_result", everything, f"device = ? AND test = ? AND {failing}", device, test
                        ),
                    )
            add("measurement", archive.query("measurement", recent, site=site, device=device))
        add("qc_result", archive.query("qc_result", up_to, site=site, test=GE68))
        # Every elution: an undone follow-up stays listed however old (`prune` then forgets the rest).
        for generator in self.schedule.generators:
            add("elution", archive.query("elution", up_to, site=site, device=generator))
        # What was published last for each item: the newest qc_status of each (device, item).
        where, params = everything.where("qc_status")
        newest_status = archive.select(
            f"SELECT payload, MAX(time_ns) FROM message WHERE {where} GROUP BY device, json_extract(payload, '$.item')",
            params,
        )
        add("qc_status", [json.loads(payload) for payload, _ in newest_status])
        archived = {m.msg_id for m in found}
        found += [
            m
            for m in unarchived
            if m.msg_id not in archived and m.payload.get("site") == site and int(m.payload["time_ns"]) <= now
        ]
        state = _StageState()
        counted = 0
        for message in sorted(found, key=lambda m: (int(m.payload["time_ns"]), m.msg_id)):
            try:
                if message.kind == "qc_status":
                    self._take_published(state, message)
                elif self.schedule.fold(state.facts, message):
                    counted += 1
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("restore: archived %s %s skipped: %s", message.kind, message.payload.get("msg_id"), exc)
        self._forget(state)
        self._state = state
        log.info("QC schedule restored from %d record(s)", counted)
        return counted

    # -- one message ----------------------------------------------------------------------

    def _on_message(self, staged: _StageState, message: Message) -> tuple[Message, list[Message]]:
        if message.kind == "qc_status":
            self._take_published(staged, message)
            return message, []
        counted = self.schedule.fold(staged.facts, message)
        payload, now = message.payload, staged.facts.clock_ns
        device = payload.get("device")
        if message.kind in ("reading", "measurement") and device in self.schedule.calibrators:
            device = str(device)
            changes = self._changes(staged, self.schedule.daily_statuses(staged.facts, device, now))
            qc_state = self.schedule.qc_state(staged.facts, device, int(payload["time_ns"]))
            if qc_state is not None:
                message = Message(message.kind, message.topic, dict(payload) | {"qc_state": qc_state})
            return message, changes
        if not counted:
            return message, []
        affected = (
            self.schedule.calibrator_statuses(staged.facts, str(device), now)
            if device in self.schedule.calibrators
            else []
        )
        if message.kind == "elution" or payload.get("test") == GE68:
            affected += self.schedule.ge68_statuses(staged.facts, now)
        return message, self._changes(staged, affected)

    def _changes(self, staged: _StageState, statuses: Iterable[ItemStatus]) -> list[Message]:
        now = staged.facts.clock_ns
        return [qc_status_message(self.site, s, now) for s in statuses if staged.publish(s, now)]

    def _forget(self, state: _StageState) -> None:
        """Prune the facts, and what was published for follow-ups no longer listed."""
        self.schedule.prune(state.facts)
        listed = {s.key for s in self.schedule.ge68_statuses(state.facts, state.facts.clock_ns)}
        for key in [k for k in state.published if k[1].startswith(f"{GE68}/") and k not in listed]:
            del state.published[key]

    def _take_published(self, state: _StageState, message: Message) -> None:
        """A qc_status committed before (archived, or from a tick): what subscribers see for that item."""
        if message.payload.get("site") != self.site:
            return
        status = ItemStatus.from_payload(message.payload)
        time_ns = int(message.payload["time_ns"])
        known = state.published.get(status.key)
        if known is None or time_ns >= known[0]:
            state.published[status.key] = (time_ns, status.signature())

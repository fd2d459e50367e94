"""The controller service behind `hotlab run`: devices in, outbox in the middle, sinks out.

    device supervisors ──items──> processors, measurement detector, QC stage ──> outbox.put_many ──> sinks

Rules this module enforces:

* Every calibrator's source is wrapped in a `CheckedSource` (controller/checked_source.py): each
  reading leaves with its quality, `good` or `suspect` and why, and where the protocol has no
  checksum a doubtful reading is read again at once. Suspect readings are committed and published
  like any other, counted per device (in its status), and raise a retained `suspect_readings` alarm
  when too many of the recent ones are suspect (controller/suspect_alarm.py); the alarm change is
  committed with the reading that caused it.
* The measurement detector (controller/measurements.py) turns each calibrator's good readings into
  measurements; like the QC stage it judges each transaction's whole batch and takes its state over
  only after the commit, and the QC stage sees its measurements in the same batch.

* Nothing reaches a sink that was not committed first: a reading, and every message the
  processors and the QC stage derived from it, are committed together in one transaction,
  then the sinks are woken. Sinks only ever read the outbox.
* Group commit (controller/outbox.py `GroupCommit`): what all devices hand over while a
  commit runs goes into the next transaction, so the fsync is paid per batch, not per
  reading; each device still waits for the transaction that holds its own messages.
* Two kinds of hooks: simple processors (`Message -> list[Message]`, sync or async) add
  messages; the commit stage (the QC engine) sees each transaction's whole batch (device
  statuses pass through it unchanged), may replace an input (an elution with its yield
  filled in) and is told to `apply` only after the commit, so its memory never runs ahead
  of the outbox.
* A failing processor or stage is logged; the reading itself is still committed.
* The device is told (`Source.delivered`) only after the commit, so the elution station stops
  repeating an elution only once it is safely stored.
* An elution whose count started again (`ElutionRecord.counter_reset`: a restarted, serviced or
  replaced station) raises the station's retained `elution_counter_reset` alarm, committed with
  that elution; the next elution that continues the count clears it. After a start the
  controller does not know whether the alarm is raised, so the first such elution clears it.
* The outbox is bounded. Above `warn_fraction` a retained alarm goes to
  hotlab/<site>/controller/alarm and a warning to the log; when it is full the supervisor
  holds the device's data and retries (see controller/supervisor.py).
* One controller per outbox (an flock), so two processes never send the same backlog.
* Control commands from MQTT (controller/commands.py), signed by a [[command_sender]] for a person
  with an active account in the lab's user store ([users]), reach a device only through its source,
  which holds one lock per device around connect, read, close and every command, so a
  command and a poll never interleave on the wire and a failed command leaves polling alone.
  Every attempt is audited in `[commands] audit_path` (default `<state_dir>/audit.jsonl`),
  and the trail's new head is committed as an `audit_anchor` (controller/audit_anchor.py).
* Shutdown (SIGINT/SIGTERM or `--duration`): refuse new commands and let those in progress
  finish (and their audit anchor be committed), stop reading devices (the item in hand is
  committed), commit an "offline" status per device, give the sinks `drain_timeout_s` to
  send the backlog, publish the controller's offline status, close the outbox. What was not
  sent stays on disk and goes first after the next start. `deliveries` then says, per sink, what
  it acknowledged in this run and what is left, and a configured sink that had messages and
  acknowledged none is logged as a WARNING (`SinkDelivery.silent`; the CLIs decide what it means).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import inspect
import logging
import os
import random
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from hotlab.backoff import Backoff
from hotlab.controller.audit import AuditKeyError, AuditLog, load_hmac_key
from hotlab.controller.audit_anchor import AnchorPublisher
from hotlab.controller.checked_source import CheckedSource, has_checksum
from hotlab.controller.commands import Authoriser, CommandHandler, CommandTarget
from hotlab.controller.config import (
    TOKEN_MIGRATION_DOC,
    DeviceConfig,
    InfluxSection,
    LabConfig,
)
from hotlab.controller.device_clock import ClockAlarms
from hotlab.controller.event_loop import DEFAULT_EVENT_LOOP, loop_factory
from hotlab.controller.measurement_labels import CalibratorCommands, MeasurementLabeller
from hotlab.controller.measurements import DetectionOutcome, MeasurementDetector
from hotlab.controller.messages import (
    SCHEMA_VERSION,
    Message,
    counter_reset_alarm_message,
    device_status_message,
    elution_message,
    elution_msg_id,
    iso_utc,
    reading_message,
    suspect_alarm_message,
)
from hotlab.controller.outbox import AsyncOutbox, GroupCommit, Outbox, OutboxFull, OutboxUsage
from hotlab.controller.plausibility import PlausibilityRules
from hotlab.controller.qc.engine import QcConfig
from hotlab.controller.qc.procedure_commands import ProcedureCommands
from hotlab.controller.qc.stage import QcStage
from hotlab.controller.sinks.mqtt import SINK as MQTT_SINK
from hotlab.controller.sinks.mqtt import MqttSink
from hotlab.controller.sources import StationSource, driver_source
from hotlab.controller.supervisor import DeviceState, DeviceSupervisor, Item, Source
from hotlab.controller.suspect_alarm import SuspectRate
from hotlab.controller.users import AccountError, UserStore
from hotlab.drivers.records import ElutionRecord, Reading
from hotlab.errors import HotlabError
from hotlab.physics.units import format_activity

log = logging.getLogger(__name__)

ProcessorResult = list[Message] | Awaitable[list[Message]]
Processor = Callable[[Message], ProcessorResult]
SourceFactory = Callable[[DeviceConfig], Source]


class StagedOutcome(Protocol):
    @property
    def messages(self) -> Sequence[Message]:
        """Everything to commit, in order: the inputs (or their replacements) and what was derived."""
        ...


class CommitStage(Protocol):
    """A two-phase processor (the QC engine): judge a batch, commit `outcome.messages`, then `apply`.

    `process` must not change the stage, so a failed commit can simply be retried; `apply`
    runs only after the commit succeeded (controller/qc/engine.py explains why). The QC stage
    (controller/qc/stage.py) is also ticked every QC_TICK_S (procedures time out, QC items turn
    overdue) and its engine runs the start_qc/end_qc commands.
    """

    def process(self, *messages: Message) -> StagedOutcome: ...

    def apply(self, outcome: Any) -> None: ...


#: How often the QC engine's clock ticks: a procedure that timed out ends at most this much later.
QC_TICK_S = 30.0
#: Below this fraction of warn_fraction an active usage alarm clears (hysteresis, so it does not flap).
ALARM_CLEAR_RATIO = 0.9
#: An alarm for failing commits clears once commits have worked for this long: on a disk that is
#: all but full, a small commit can get through now and then between failing ones.
COMMIT_ERROR_CLEAR_S = 5.0


class ServiceError(HotlabError, RuntimeError):
    """The service cannot start (outbox unusable, or already in use by another controller)."""


def run_to_exit_code(main: Coroutine[Any, Any, None], prog: str, event_loop: str = DEFAULT_EVENT_LOOP) -> int:
    """Run a service coroutine on `event_loop` to the end and map how it ended to the CLI's exit code.

    0 after a clean stop. A HotlabError (a ServiceError, bad input such as an InputError, ...)
    is a known condition whose message is enough: printed on one line, it ends with the error's
    own `exit_code` (1 for a runtime failure, 2 for bad input). So is an OSError that got this far
    (a full disk, a read-only or missing directory, no permission: the machine, not the code; its
    traceback is logged at DEBUG), exit 1; anything else is a bug, logged with its traceback, exit 1.
    """
    try:
        with asyncio.Runner(loop_factory=loop_factory(event_loop)) as runner:
            loop_type = type(runner.get_loop())
            log.info("%s: event loop %s.%s", prog, loop_type.__module__, loop_type.__name__)
            runner.run(main)
    except HotlabError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        log.debug("%s failed", prog, exc_info=True)
        print(f"{prog}: {exc} (--log-level DEBUG shows where)", file=sys.stderr)
        return 1
    except Exception:
        log.exception("%s failed", prog)
        return 1
    return 0


@contextlib.contextmanager
def _exclusive_lock(outbox_path: Path) -> Iterator[None]:
    """One controller per outbox: two would publish the same backlog twice and race on acks.

    An flock on `<outbox>.lock`; the kernel releases it when the process dies, even by kill -9,
    so a crash never leaves a stale lock behind.
    """
    lock_path = outbox_path.with_name(outbox_path.name + ".lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = lock_path.open("a+")
    except OSError as exc:
        raise ServiceError(f"cannot create the outbox lock {lock_path}: {exc.strerror}") from exc
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise ServiceError(
                f"outbox {outbox_path} is in use by another hotlab controller (pid {holder}); "
                "run one controller per outbox"
            ) from None
        try:  # unbuffered, so that a failed write is not tried again when the file is closed
            os.ftruncate(handle.fileno(), 0)
            os.write(handle.fileno(), str(os.getpid()).encode())
        except OSError as exc:
            raise ServiceError(f"cannot write the outbox lock {lock_path}: {exc.strerror}") from exc
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _no_detail() -> str:
    return ""


@dataclass
class _SinkRunner:
    """A sink task. `stop(budget_s)` ends it; a sink that cannot drain by itself (`self_draining`
    False) is only stopped once its backlog is empty or the drain budget is spent. `detail` says
    what the sink knows about its trouble, for the end-of-run summary."""

    name: str
    run: Callable[[], Coroutine[Any, Any, Any]]
    stop: Callable[[float], None]
    self_draining: bool = False
    detail: Callable[[], str] = _no_detail


class _TalliedOutbox(AsyncOutbox):
    """The service's outbox, counting what each sink acknowledged in this run (for `deliveries`)."""

    def __init__(self, outbox: Outbox) -> None:
        super().__init__(outbox)
        self.acked: Counter[str] = Counter()

    async def ack(self, sink: str, seqs: Sequence[int]) -> None:
        await super().ack(sink, seqs)
        self.acked[sink] += len(seqs)


@dataclass(frozen=True, slots=True)
class SinkDelivery:
    """One sink's run: messages it acknowledged (`delivered`), messages still waiting for it (`left`; None if
    the outbox could not tell), and what it knows about why not more (`detail`)."""

    name: str
    #: False for the MQTT sink without a broker (local-only mode): its messages wait for one.
    configured: bool
    delivered: int
    left: int | None
    detail: str = ""

    @property
    def silent(self) -> bool:
        """A configured sink that had messages to send and acknowledged none of them."""
        return self.configured and self.delivered == 0 and bool(self.left)

    def line(self) -> str:
        left = "an unknown number" if self.left is None else str(self.left)
        if not self.configured:
            return f"  {self.name:<8} not configured: {left} message(s) wait in the outbox for it"
        text = f"  {self.name:<8} {self.delivered} delivered, {left} left in the outbox"
        return text + (f"; {self.detail}" if self.detail else "")


def delivery_report(deliveries: Sequence[SinkDelivery]) -> str:
    """The end-of-run summary, one line per sink, and a WARNING line per silent one."""
    lines = ["sink deliveries in this run:"] + [delivery.line() for delivery in deliveries]
    lines += [
        f"WARNING: the {d.name} sink never acknowledged anything; its messages wait in the outbox" for d in deliveries
        if d.silent
    ]  # fmt: skip
    return "\n".join(lines)


class ControllerService:
    def __init__(
        self,
        config: LabConfig,
        *,
        processors: Sequence[Processor] = (),
        stage: CommitStage | None = None,
        source_factory: SourceFactory | None = None,
        on_started: Callable[[], None] | None = None,
    ) -> None:
        """`on_started` is called once the outbox, the sinks and every device task exist."""
        self.config = config
        self.on_started = on_started
        self.processors = list(processors)
        self.stage = stage
        self.source_factory = source_factory or (
            lambda device: driver_source(device, config.service.state_dir, config.service.max_clock_offset_s)
        )
        self.backoff = Backoff(config.service.backoff_initial_s, config.service.backoff_max_s)
        self.sink_names = self._sink_names()
        self.outbox: AsyncOutbox | None = None
        #: Per sink, what it delivered in the run and what is left; set once the service has stopped.
        self.deliveries: tuple[SinkDelivery, ...] = ()
        self.group_commit: GroupCommit | None = None
        self.mqtt: MqttSink | None = None
        self.supervisors: dict[str, DeviceSupervisor] = {}
        #: Each device's source as the factory built it (commands use it; the supervisor polls it checked).
        self.sources: dict[str, Source] = {}
        #: Suspect readings per calibrator (controller/suspect_alarm.py), as of the last commit.
        self.suspects: dict[str, SuspectRate] = {}
        #: Each station's clock alarm as last committed (raised and cleared with its status).
        self.clock_alarms = ClockAlarms(config.site)
        #: Per station, whether its elution_counter_reset alarm is raised, as of the last commit; a
        #: station is absent until its first elution since the start (not known: it may be raised).
        self._counter_alarms: dict[str, bool] = {}
        self.measurements = MeasurementDetector.for_lab(config)
        self._labeller = MeasurementLabeller(
            config.site,
            self.measurements.published,
            self._commit_messages,
            config.history_path,
            {source_id: source.nuclide.name for source_id, source in QcConfig.from_mapping(config.qc).sources.items()},
        )
        self._procedures = ProcedureCommands(
            config.site, stage.engine if isinstance(stage, QcStage) else None, self._commit_messages
        )
        #: Seconds between QC stage ticks (QC_TICK_S; tests shorten it).
        self.qc_tick_s = QC_TICK_S
        self.commands: CommandHandler | None = None
        self._accounts: UserStore | None = None
        self.anchors: AnchorPublisher | None = None
        self._audit_key: bytes | None = None
        self.committed = 0
        self._alarm_active = False
        self._full_count = 0
        self._full_count_published = 0
        #: The last commit's SQLite or OS error (a full disk, an I/O error); None again once commits
        #: have worked for COMMIT_ERROR_CLEAR_S.
        self._commit_error: str | None = None
        self._commit_error_published: str | None = None
        self._commit_failed_at = 0.0
        self._unavailable_count = 0
        self._last_usage: OutboxUsage | None = None
        self._usage_unreadable = False
        self._alarm_published = False
        #: Told after each commit (the MQTT sink publishes at once instead of at its next turn).
        self._wake: list[Callable[[], None]] = []

    def _sink_names(self) -> tuple[str, ...]:
        # "mqtt" is always a sink: without a broker (local-only mode) messages wait in the outbox for one.
        names = [MQTT_SINK]
        if self.config.influx is not None:
            names.append("influx")
        if self.config.history_path is not None:
            names.append("history")
        return tuple(names)

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set, then shut down gracefully (see module docstring)."""
        with _exclusive_lock(self.config.outbox.path):
            await self._run_locked(stop)

    async def _run_locked(self, stop: asyncio.Event) -> None:
        cfg = self.config
        try:
            self._audit_key = await asyncio.to_thread(load_hmac_key)
        except AuditKeyError as exc:
            raise ServiceError(f"audit trail: {exc}") from exc
        try:
            sync_outbox = await asyncio.to_thread(Outbox, cfg.outbox.path, self.sink_names, cfg.outbox.max_bytes)
        except (sqlite3.Error, OSError) as exc:
            raise ServiceError(f"cannot open the outbox {cfg.outbox.path}: {exc}") from exc
        outbox = _TalliedOutbox(sync_outbox)
        self.outbox = outbox
        self.group_commit = GroupCommit(self._commit_batch)
        backlog = await outbox.pending_count(MQTT_SINK)
        log.info(
            "outbox %s: sinks %s, %d message(s) waiting from earlier runs",
            cfg.outbox.path,
            ", ".join(self.sink_names),
            backlog,
        )
        await asyncio.to_thread(_warn_about_orphaned_deliveries, cfg.outbox.path, self.sink_names)
        await self._restore(outbox)
        sinks = await self._start_sinks(outbox)
        sink_tasks = [asyncio.create_task(self._keep_running(sink), name=f"sink-{sink.name}") for sink in sinks]
        monitor = asyncio.create_task(self._watch_usage(), name="outbox-usage")
        qc_clock = asyncio.create_task(self._tick_qc(), name="qc-clock")
        device_tasks = [self._start_device(device) for device in cfg.devices]
        if self.on_started is not None:
            self.on_started()
        try:
            await stop.wait()
        finally:
            log.info(
                "stopping: %d device task(s), draining sinks for up to %.1f s",
                len(device_tasks),
                cfg.service.drain_timeout_s,
            )
            if self.commands is not None:
                await self.commands.close()
            if self.anchors is not None:
                await self.anchors.close(cfg.service.drain_timeout_s)
            await self._stop_devices(device_tasks)
            await self._commit_final_statuses()
            monitor.cancel()
            qc_clock.cancel()
            await asyncio.gather(monitor, qc_clock, return_exceptions=True)
            await asyncio.gather(*(self._drain(sink, task, outbox) for sink, task in zip(sinks, sink_tasks)))
            await self._await_sinks(sink_tasks)
            # Only now: until the MQTT sink stopped, a command can still arrive, and is authorised
            # (the account read here) before it is refused because the controller is stopping.
            if self._accounts is not None:
                await asyncio.to_thread(self._accounts.close)
            self.deliveries = await self._deliveries(outbox, sinks)
            left = await self._backlog(outbox, MQTT_SINK)
            await outbox.close()
            log.info(
                "stopped; %s message(s) kept in the outbox for the next start",
                "an unknown number of" if left is None else left,
            )

    async def _restore(self, outbox: AsyncOutbox) -> None:
        """Let the measurement detector and the QC engine rebuild their state from the archive before the
        first reading; without an archive each calibrator starts unknown (controller/measurements.py)."""
        history_path = self.config.history_path
        if history_path is None:
            log.info("no [history] archive: measurements start afresh (a source already in a chamber is not measured)")
            return
        from hotlab.controller.archive import HistoryArchive

        unarchived = [stored.message for stored in await outbox.pending("history", limit=1_000_000)]
        restore_stage = getattr(self.stage, "restore", None)

        def run() -> int | None:
            archive = HistoryArchive(history_path)
            try:
                self.measurements.restore(archive, unarchived, time.time_ns())
                return None if restore_stage is None else int(restore_stage(archive, unarchived))
            finally:
                archive.close()

        restored = await asyncio.to_thread(run)
        if restored is not None:
            log.info("QC: restored the state of %d elution(s) from the history archive", restored)

    async def _deliveries(self, outbox: _TalliedOutbox, sinks: Sequence[_SinkRunner]) -> tuple[SinkDelivery, ...]:
        """Each sink's deliveries in this run; a silent one is logged as a WARNING with its detail."""
        runners = {sink.name: sink for sink in sinks}
        deliveries = []
        for name in self.sink_names:
            runner = runners.get(name)
            delivery = SinkDelivery(
                name,
                runner is not None,
                outbox.acked[name],
                await self._backlog(outbox, name),
                "" if runner is None else runner.detail(),
            )
            if delivery.silent:
                log.warning(
                    "the %s sink never acknowledged anything in this run: %s message(s) wait in the outbox%s",
                    name,
                    delivery.left,
                    f" ({delivery.detail})" if delivery.detail else "",
                )
            deliveries.append(delivery)
        return tuple(deliveries)

    async def _drain(self, sink: _SinkRunner, task: asyncio.Task[Any], outbox: AsyncOutbox) -> None:
        budget = self.config.service.drain_timeout_s
        if not sink.self_draining:
            deadline = time.monotonic() + budget
            while not task.done() and time.monotonic() < deadline and await self._backlog(outbox, sink.name):
                await asyncio.sleep(0.1)
        sink.stop(budget)

    @staticmethod
    async def _backlog(outbox: AsyncOutbox, sink: str) -> int | None:
        """What `sink` has left in the outbox; None if the outbox cannot tell (a shutdown goes on regardless)."""
        try:
            return await outbox.pending_count(sink)
        except (sqlite3.Error, OSError) as exc:
            log.error("outbox: the %s backlog cannot be read (%s: %s)", sink, type(exc).__name__, exc)
            return None

    async def _keep_running(self, sink: _SinkRunner) -> None:
        """Run a sink until it ends as asked; if it crashes instead (a bug), log that and start it again.

        A dead sink would let its messages pile up in the outbox until the outbox is full and
        holds every device. Started again, after a backoff, it resumes from its last ack
        (at-least-once). A sink that was told to stop meanwhile finishes its drain when it
        comes back, or ends at once.
        """
        rng = random.Random()
        crashes = 0
        while True:
            try:
                await sink.run()
                return
            except Exception:
                delay = self.backoff.delay(crashes, rng)
                crashes += 1
                log.exception(
                    "sink %s crashed (%d time(s) so far); starting it again in %.2f s, its messages wait in the outbox",
                    sink.name,
                    crashes,
                    delay,
                )
                await asyncio.sleep(delay)

    async def _stop_devices(self, tasks: list[asyncio.Task[None]]) -> None:
        """Let each supervisor commit what it holds; cancel any that does not finish in time."""
        for supervisor in self.supervisors.values():
            supervisor.stop()
        if not tasks:
            return
        # A supervisor retries a failing commit for up to drain_timeout_s after stop(): wait for that.
        grace_s = self.config.service.drain_timeout_s + 2.0
        _done, late = await asyncio.wait(tasks, timeout=grace_s)
        for task in late:
            log.error("%s did not stop within %.0f s; cancelling it", task.get_name(), grace_s)
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for task, result in zip(tasks, results):
            if isinstance(result, Exception):
                log.error("%s ended with %r", task.get_name(), result)

    async def _start_sinks(self, outbox: AsyncOutbox) -> list[_SinkRunner]:
        cfg = self.config
        sinks: list[_SinkRunner] = []
        if cfg.mqtt is not None:
            self.mqtt = MqttSink(cfg.mqtt, cfg.site, outbox, backoff=self.backoff)
            self.commands = self._command_handler(self.mqtt, await self._open_accounts())
            self.mqtt.route_commands(self.commands)
            mqtt = self.mqtt
            sinks.append(
                _SinkRunner(
                    MQTT_SINK,
                    mqtt.run,
                    mqtt.drain,
                    self_draining=True,
                    detail=lambda: "" if mqtt.connections else "never connected to the broker",
                )
            )
            self._wake.append(self.mqtt.notify)
        else:
            log.warning("no [mqtt] configured: local-only mode, messages are kept in the outbox %s", cfg.outbox.path)
        if cfg.influx is not None:
            sinks.append(_influx_runner(cfg.influx, outbox))
        if cfg.history_path is not None:
            sinks.append(await _history_runner(cfg.history_path, outbox, cfg))
        return sinks

    async def _open_accounts(self) -> UserStore | None:
        """The lab's user store, which names the people signed commands may run for ([users], controller/users.py).

        Only with [[command_sender]]s: without one no command is authenticated anyway. A store that
        cannot be opened stops commands (each is refused as `failed`), not the measurements.
        """
        cfg = self.config
        if not cfg.senders:
            return None
        audit_path = cfg.commands.resolved_audit_path(cfg.service.state_dir)
        path = cfg.users.resolved_path(audit_path)
        try:
            store = await asyncio.to_thread(
                UserStore,
                path,
                AuditLog(audit_path, key=self._audit_key),
                min_password_chars=cfg.users.min_password_chars,
                max_failed_passwords=cfg.users.max_failed_passwords,
                lockout_min=cfg.users.lockout_min,
            )
        except (AccountError, sqlite3.Error, OSError) as exc:
            log.error("user store %s cannot be opened (%s): every control command will be refused", path, exc)
            return None
        self._accounts = store
        log.info("signed commands run for the accounts in %s", path)
        return store

    def _command_handler(self, mqtt: MqttSink, accounts: UserStore | None) -> CommandHandler:
        """Commands need MQTT (they arrive there); without [[command_sender]]s every one is refused, and audited."""
        cfg = self.config
        audit_path = cfg.commands.resolved_audit_path(cfg.service.state_dir)
        if not cfg.senders:
            log.warning(
                "no [[command_sender]] configured: every signed MQTT control command will be refused (and audited)"
            )
        if cfg.commands.accept_token_commands:
            log.warning(
                "[commands] accept_token_commands = true: commands with an [[operator]]'s token in their payload run, "
                "and every subscriber can read those tokens; end the migration soon (%s)",
                TOKEN_MIGRATION_DOC,
            )
        self.anchors = AnchorPublisher(cfg.site, audit_path, self._commit_messages)
        authoriser = Authoriser(
            cfg.commands.min_role,
            senders=cfg.senders,
            accounts=accounts,
            operators=cfg.operators,
            accept_token_commands=cfg.commands.accept_token_commands,
        )
        handler = CommandHandler(
            cfg.site,
            authoriser,
            AuditLog(audit_path, key=self._audit_key),
            mqtt.publish_reply,
            self._command_target,
            max_age_s=cfg.commands.max_age_s,
            on_audited=self.anchors.offer,
        )
        log.info("control commands on %s, audited in %s", handler.topic_filter, audit_path)
        return handler

    def _command_target(self, device_name: str) -> CommandTarget | None:
        supervisor = self.supervisors.get(device_name)
        device = next((d for d in self.config.devices if d.name == device_name), None)
        if supervisor is None or device is None:
            return None
        source: Any = self.sources[device_name]
        control = source if device.is_station else CalibratorCommands(device, source, self._labeller, self._procedures)
        return CommandTarget(device, control, lambda: supervisor.up)

    async def _await_sinks(self, tasks: list[asyncio.Task[Any]]) -> None:
        if not tasks:
            return
        # Sinks bound their own drain; the margin covers one last publish/write timeout.
        _done, pending = await asyncio.wait(tasks, timeout=self.config.service.drain_timeout_s + 15.0)
        for task in pending:
            log.error("sink task %s did not stop in time; cancelling it", task.get_name())
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def _start_device(self, device: DeviceConfig) -> asyncio.Task[None]:
        try:
            source = self.source_factory(device)
        except Exception as exc:  # e.g. a driver rejecting an option value: this device only
            log.exception(
                "device %s: cannot create its %s driver; the other devices run on", device.name, device.family
            )
            return asyncio.create_task(
                self._report_unusable(device, f"driver not created: {exc}"), name=f"device-{device.name}"
            )

        self.sources[device.name] = source
        if not device.is_station:
            settings = device.plausibility_settings()
            rules = PlausibilityRules(device.family, settings)
            source = CheckedSource(source, rules, reread=not has_checksum(device.family, device.options))
            self.suspects[device.name] = SuspectRate(settings.alarm_window, settings.alarm_fraction)

        async def deliver(items: Sequence[Item]) -> None:
            await self.commit(device, items)

        async def report_status(state: DeviceState) -> None:
            messages = [self._status_message(device, state)]
            station_source = self.sources.get(device.name)
            if isinstance(station_source, StationSource):
                messages += self.clock_alarms.changes(device.station, device.name, station_source.clock, time.time_ns())
            await self._commit_messages(messages)
            self.clock_alarms.committed(messages)

        station = source if isinstance(source, StationSource) else None
        supervisor = DeviceSupervisor(
            device.name,
            source,
            poll_interval_s=device.poll_interval_s,
            deliver=deliver,
            report_status=report_status,
            backoff=self.backoff,
            status_interval_s=self.config.service.status_interval_s,
            # Generous: a streaming device waits up to timeout_s for its next line by design.
            watchdog_s=max(10.0, 5.0 * device.timeout_s),
            stop_commit_s=self.config.service.drain_timeout_s,
            condition=None if station is None else lambda: station.condition,
        )
        self.supervisors[device.name] = supervisor
        return asyncio.create_task(supervisor.run(), name=f"device-{device.name}")

    async def _report_unusable(self, device: DeviceConfig, detail: str) -> None:
        try:
            await self._commit_messages(
                [self._status_message(device, DeviceState(device.name, False, None, 1, detail))]
            )
        except OutboxFull:
            log.error("device %s: status not stored, outbox full", device.name)

    def _status_message(self, device: DeviceConfig, state: DeviceState) -> Message:
        """The device_status of `state`; a station that answers adds its state as of its last poll."""
        suspects = self.suspects.get(device.name)
        station = self.sources.get(device.name)
        condition = station.condition if isinstance(station, StationSource) and state.up else None
        return device_status_message(
            self.config.site,
            device.station,
            device.name,
            up=state.up,
            latency_ms=state.latency_ms,
            errors=state.errors,
            detail=state.detail,
            suspect_readings=None if suspects is None else suspects.total,
            suspect_fraction=None if suspects is None else suspects.fraction,
            station_state=None if condition is None else condition.state,
            fault_code=None if condition is None else condition.fault_code,
            clock=station.clock.status() if isinstance(station, StationSource) and state.up else None,
        )

    async def commit(self, device: DeviceConfig, items: Sequence[Item]) -> None:
        """Build messages for `items`, run the processors, and commit them; return once they are durable.

        The commit is shared with whatever other devices handed over meanwhile (`GroupCommit`),
        but these messages are still stored all or nothing, and this returns (so the supervisor
        confirms the items to the device) only after that transaction committed.
        """
        messages: list[Message] = []
        counter_alarms: list[Message] = []
        for item in items:
            if isinstance(item, ElutionRecord):
                # A name-based id: a replayed elution (crash before mark_delivered) is the same message.
                message = elution_message(self.config.site, item, msg_id=elution_msg_id(item))
            else:
                message = reading_message(self.config.site, device.station, item)
            messages.append(message)
            messages.extend(await self._process(message))
            alarm = self._counter_reset_alarm(device, item, message.msg_id, counter_alarms)
            if alarm is not None:
                counter_alarms.append(alarm)
                messages.append(alarm)
        suspects = self.suspects.get(device.name)
        counted = None
        if suspects is not None:
            counted = suspects.observe([item.quality_reason for item in items if isinstance(item, Reading)])
            if counted.active != suspects.active:
                messages.append(self._suspect_alarm(device, counted))
        await self._commit_messages(messages)
        for alarm in counter_alarms:  # taken over once stored, like the suspect count below
            self._counter_reset_alarm_committed(device, alarm.payload)
        if suspects is None or counted is None:
            return
        # Counted once the readings are stored: a retried commit must not count them twice.
        self.suspects[device.name] = counted
        if counted.active != suspects.active:
            (log.warning if counted.active else log.info)(
                "device %s: SUSPECT READINGS alarm %s: %d of the last %d readings suspect (last: %s)",
                device.name,
                "raised" if counted.active else "cleared",
                sum(counted.recent),
                len(counted.recent),
                counted.last_reason,
            )

    def _counter_reset_alarm(
        self, device: DeviceConfig, item: Item, elution_id: str, earlier: Sequence[Message]
    ) -> Message | None:
        """The change of the station's elution-counter alarm that elution `item` brings, if any.

        Raised by an elution whose count started again, cleared by one that continues it while
        the alarm is raised or not known (module docstring). `earlier` are the alarms of this
        commit's earlier elutions, which the committed state does not hold yet.
        """
        if not isinstance(item, ElutionRecord):
            return None
        raised = earlier[-1].payload["active"] if earlier else self._counter_alarms.get(device.name)
        if item.counter_reset is None and raised is False:
            return None
        return counter_reset_alarm_message(self.config.site, device.name, item, elution_id=elution_id)

    def _counter_reset_alarm_committed(self, device: DeviceConfig, alarm: dict[str, Any]) -> None:
        """Remember a committed elution-counter alarm's state and say so in the log."""
        self._counter_alarms[device.name] = bool(alarm["active"])
        if alarm["active"]:
            log.warning(
                "device %s: ELUTION COUNTER RESET alarm raised: the count of %s started again (%s);"
                " elution %d of the new count recorded",
                device.name,
                alarm["generator"],
                alarm["reason"],
                alarm["counter"],
            )
        else:
            log.info(
                "device %s: elution counter alarm cleared: elution %d continues the count",
                device.name,
                alarm["counter"],
            )

    def _suspect_alarm(self, device: DeviceConfig, rate: SuspectRate) -> Message:
        recent = sum(rate.recent)
        return suspect_alarm_message(
            self.config.site,
            device.station,
            device.name,
            active=rate.active,
            recent_suspect=recent,
            window=rate.window,
            threshold=rate.threshold,
            total=rate.total,
            reason=rate.last_reason,
            time_ns=time.time_ns(),
        )

    async def _process(self, message: Message) -> list[Message]:
        derived: list[Message] = []
        for processor in self.processors:
            try:
                result = processor(message)
                if inspect.isawaitable(result):
                    result = await result
                derived.extend(result)
            except Exception:
                log.exception(
                    "processor %r failed on %s %s; the %s itself is still stored",
                    processor,
                    message.kind,
                    message.msg_id,
                    message.kind,
                )
        return derived

    async def _commit_messages(self, messages: list[Message]) -> None:
        """One producer's messages, through the group commit; `OutboxFull` is this producer's own.

        A SQLite or OS error (the disk is full, say) raises the outbox alarm until commits have
        worked for COMMIT_ERROR_CLEAR_S: the status messages that would tell a dashboard go
        through this outbox too.
        """
        assert self.group_commit is not None
        try:
            await self.group_commit.submit(messages)
        except OutboxFull:
            self._full_count += 1
            await self._check_usage()
            raise
        except (sqlite3.Error, OSError) as exc:
            self._unavailable_count += 1
            self._commit_failed_at = time.monotonic()
            first = self._commit_error is None
            self._commit_error = f"{type(exc).__name__}: {exc}"
            if first:  # later ones reach the alarm at the next periodic check (no usage scan per failure)
                await self._check_usage()
            raise
        if self._commit_error is not None and time.monotonic() - self._commit_failed_at >= COMMIT_ERROR_CLEAR_S:
            self._commit_error = None
            await self._check_usage()

    async def _commit_batch(self, messages: list[Message]) -> None:
        """Commit one group: the QC stage judges it as one batch, and takes it over only once it is stored.

        Runs in the group commit's single flusher, so `process` and `apply` of successive
        batches never interleave: each batch is judged against the state of all batches
        committed before it (controller/qc/engine.py).
        """
        assert self.outbox is not None
        detected: DetectionOutcome | None = None
        try:
            detected = self.measurements.process(messages)
            messages = list(detected.messages)
        except Exception:
            log.exception("measurement detection failed on %d message(s); they are stored without it", len(messages))
        staged, outcome = messages, None
        if self.stage is not None:
            try:
                outcome = self.stage.process(*messages)
                staged = list(outcome.messages)
            except Exception:
                log.exception("QC stage failed on %d message(s); they are stored without QC", len(messages))
                staged, outcome = messages, None
        await self.outbox.put_many(staged)
        # Committed: from here nothing may raise, or the group commit would store the batch again.
        if detected is not None:
            self._take_over_measurements(detected)
        if outcome is not None:
            assert self.stage is not None
            try:
                self.stage.apply(outcome)
            except Exception:
                log.exception("QC stage failed to take over %d committed message(s); its state may lag", len(staged))
        self.committed += len(staged)
        for wake in self._wake:
            wake()

    def _take_over_measurements(self, detected: DetectionOutcome) -> None:
        try:
            self.measurements.apply(detected)
        except Exception:
            log.exception("measurement detection failed to take over a committed batch; its state may lag")
            return
        for measurement in detected.measurements:
            p = measurement.payload
            log.info(
                "device %s: measurement %s %s, sd %.3g Bq, n %d (%s)",
                p["device"],
                format_activity(p["activity_bq"]),
                p["nuclide"] or "(no nuclide setting)",
                p["sd_bq"],
                p["n"],
                p["end"],
            )

    async def _commit_final_statuses(self) -> None:
        messages = [
            self._status_message(
                device,
                DeviceState(device.name, False, None, self.supervisors[device.name].errors, "controller stopped"),
            )
            for device in self.config.devices
            if device.name in self.supervisors
        ]
        if not messages:
            return
        try:
            await self._commit_messages(messages)
        except OutboxFull:
            log.error("outbox full: final device statuses not stored")
        except (sqlite3.Error, OSError) as exc:  # the drain that follows must still run
            log.error("outbox unavailable: final device statuses not stored (%s: %s)", type(exc).__name__, exc)

    async def _tick_qc(self) -> None:
        """What the QC clock decides (procedures that timed out end, items turn overdue): tick, commit, apply.

        The messages pass the QC stage in their commit like any batch, which closes the procedures
        and takes the statuses as published; a procedure that finished meanwhile drops its stale
        end record there.
        """
        stage = self.stage
        if not isinstance(stage, QcStage):
            return
        while True:
            await asyncio.sleep(self.qc_tick_s)
            outcome = stage.tick(time.time_ns())
            if not outcome.messages:
                continue
            try:
                await self._commit_messages(list(outcome.messages))
            except (OutboxFull, sqlite3.Error, OSError) as exc:  # tried again at the next tick
                log.error("QC: %d clock change(s) not committed now: %s", len(outcome.messages), exc)
                continue
            stage.apply(outcome)

    async def _watch_usage(self, interval_s: float = 1.0) -> None:
        while True:
            await self._check_usage()
            await asyncio.sleep(interval_s)

    async def _read_usage(self) -> OutboxUsage | None:
        """The outbox's usage, or the last known one if it cannot be read now (logged once per outage)."""
        assert self.outbox is not None
        try:
            usage = await self.outbox.usage()
        except (sqlite3.Error, OSError) as exc:  # never raised: this runs on the commit path too
            if not self._usage_unreadable:
                log.error(
                    "outbox usage cannot be read (%s: %s); the alarm shows the last known usage",
                    type(exc).__name__,
                    exc,
                )
            self._usage_unreadable = True
            return self._last_usage
        self._usage_unreadable = False
        self._last_usage = usage
        return usage

    async def _check_usage(self) -> None:
        """Raise or clear the outbox alarm (retained on MQTT, and in the log); publish its state once at start."""
        usage = await self._read_usage()
        if usage is None:
            return
        warn = self.config.outbox.warn_fraction
        active = self._alarm_active
        if usage.fraction >= warn:
            active = True
        elif usage.fraction < warn * ALARM_CLEAR_RATIO:
            active = False
        changed = active != self._alarm_active
        self._alarm_active = active
        if changed and active:
            log.warning(
                "OUTBOX ALARM: %.1f %% of %d bytes used (%d messages waiting); sinks are not keeping up",
                usage.fraction * 100,
                usage.max_bytes,
                usage.pending_messages,
            )
        elif changed:
            log.warning("outbox alarm cleared: %.1f %% used", usage.fraction * 100)
        full_reported = self._full_count == self._full_count_published
        failing = self._commit_error
        if self.mqtt is None or (
            self._alarm_published and not changed and full_reported and failing == self._commit_error_published
        ):
            return
        now = time.time_ns()
        self.mqtt.set_alarm(
            {
                "schema": f"hotlab.controller_alarm/{SCHEMA_VERSION}",
                "site": self.config.site,
                "alarm": "outbox_usage",
                "active": active or failing is not None,
                "commit_failing": failing is not None,
                "commit_error": failing,
                "unavailable_events": self._unavailable_count,
                "fraction": round(usage.fraction, 6),
                "warn_fraction": warn,
                "payload_bytes": usage.payload_bytes,
                "max_bytes": usage.max_bytes,
                "pending_messages": usage.pending_messages,
                "full_events": self._full_count,
                "time_ns": now,
                "time": iso_utc(now),
            }
        )
        self._alarm_published = True
        self._full_count_published = self._full_count
        self._commit_error_published = failing


def _warn_about_orphaned_deliveries(path: Path, sinks: Sequence[str]) -> None:
    """Deliveries for a sink that is no longer configured keep their messages (and bytes) forever.

    That happens when e.g. [influx] is removed from the config while a backlog was waiting for
    it. Nothing is deleted automatically (that data may still be wanted): the operator is told.
    """
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT sink, COUNT(*) FROM delivery GROUP BY sink").fetchall()
    for sink, count in rows:
        if sink not in sinks:
            log.warning(
                "outbox %s holds %d message(s) for sink %r, which is not configured any more; they use "
                "outbox space until that sink is configured again and has sent them",
                path,
                count,
                sink,
            )


def _influx_runner(section: InfluxSection, outbox: AsyncOutbox) -> _SinkRunner:
    from hotlab.controller.sinks.influx import InfluxConfig, InfluxSink

    sink = InfluxSink(InfluxConfig.from_section(section), outbox)
    return _SinkRunner("influx", sink.run, lambda _budget: sink.stop(), detail=sink.stats.detail)


async def _history_runner(path: Path, outbox: AsyncOutbox, cfg: LabConfig) -> _SinkRunner:
    """The history sink, which also runs the archive's retention; its archive is opened now, off the
    event loop (SQLite DDL with fsync), so an archive that cannot be opened stops the start."""
    from hotlab.controller.archive import HistoryArchive
    from hotlab.controller.sinks.history import run_history_sink

    stop = asyncio.Event()
    first_archive = [await asyncio.to_thread(HistoryArchive, path)]

    async def run() -> None:
        # A run after a crash (_keep_running) opens the archive again: the last run closed it.
        archive = first_archive.pop() if first_archive else await asyncio.to_thread(HistoryArchive, path)
        try:
            await run_history_sink(outbox, archive, stop, retention=cfg.history_retention, site=cfg.site)
        finally:
            await asyncio.to_thread(archive.close)

    return _SinkRunner("history", run, lambda _budget: stop.set())

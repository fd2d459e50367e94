"""Generator elution station over Modbus (TCP, TCP with TLS, or RTU on a tty or through a serial device server).

The register map and its codec are in hotlab.drivers.station_registers, the links in
hotlab.drivers.modbus_links and the delivered-counter stores in hotlab.drivers.counter_store;
this module is the driver and the command types it reports with.

Two promises the controller relies on:

* No finished elution is lost. The station only keeps its last elution, identified by the
  station's serial number, its counter epoch (when the count last started from 0), the elution
  counter and the end time. `poll()` returns that elution as an ElutionRecord until the
  controller calls `mark_delivered(record)` after its outbox commit succeeded, which persists
  that identity per (station, generator). A crash or dropped connection anywhere before that
  point means the record comes again, so delivery from the driver is at-least-once; the message
  id derived from the identity (hotlab.controller.messages.elution_msg_id) makes the sinks drop
  the replay, which is what makes the stored result exactly-once. A counter that started again
  (station restarted without keeping it, serviced, replaced, rolled over) is not mistaken for
  a repeat: the elution is returned with `counter_reset` saying why, and a warning is logged.
  Elutions the station finished while nobody polled are gone from the station itself; the
  driver logs the gap.
* Commands that move radioactivity are never sent casually: each needs a named user and a
  reason, is checked against the station state first, written as one sequenced Modbus
  request, and confirmed by reading the station's command acknowledgement back. The result
  says who asked for what, when and why, and the state before and after, for the audit trail.
  If the write's reply is lost the station may still have run it, so the driver still looks
  for the acknowledgement; only when that cannot be read either does it raise
  CommandOutcomeUnknown, which carries everything needed to audit the command as unconfirmed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.pdu import ModbusPDU

from hotlab.backoff import Backoff
from hotlab.drivers.clock_offset import ClockOffset, measure_offset
from hotlab.drivers.counter_store import CounterStore, DeliveredElution, MemoryCounterStore, SqliteCounterStore
from hotlab.drivers.modbus_links import ModbusClient, ModbusLink, describe_link, make_client
from hotlab.drivers.modbus_words import WordOrder
from hotlab.drivers.records import (
    DeviceDisconnected,
    DeviceRefused,
    DeviceTimeout,
    DriverError,
    ElutionRecord,
    FrameError,
)
from hotlab.drivers.station_registers import (
    INPUT_REGISTERS,
    NS_PER_MS,
    CommandCode,
    CommandResult,
    StationState,
    StationStatus,
    decode_status,
    encode_command,
)

log = logging.getLogger(__name__)

#: How often an acknowledgement is re-read: 20 ms after the write, doubling to 250 ms.
_ACK_POLL = Backoff(0.02, 0.25)
#: States in which a new elution may be started.
STARTABLE_STATES = frozenset({StationState.IDLE, StationState.DONE})
#: States in which there is something to abort.
ABORTABLE_STATES = frozenset({StationState.PRIMING, StationState.ELUTING})


#: What the station's clock register holds of a second (input register `clock_ns`: epoch seconds + milliseconds).
CLOCK_RESOLUTION_NS = NS_PER_MS


@dataclass(frozen=True, slots=True)
class StationPoll:
    """One poll: the decoded status, how long the read took, and the finished elution not yet marked delivered.

    `clock` is the station's clock against the controller's, measured by this read: its `clock_ns`
    register read between the request and the reply (hotlab.drivers.clock_offset).
    """

    station: str
    received_ns: int
    latency_ms: float
    status: StationStatus
    clock: ClockOffset
    finished: list[ElutionRecord] = field(default_factory=list)

    @property
    def state(self) -> StationState:
        return self.status.state

    @property
    def elution_counter(self) -> int:
        return self.status.elution_counter

    @property
    def line_dose_rate_usv_h(self) -> float:
        return self.status.line_dose_rate_usv_h


@dataclass(frozen=True, slots=True)
class AuthorisedRequest:
    """Who asks for a control action and why; both are required and end up in the audit trail."""

    user: str
    reason: str


class NotAuthorised(DriverError, PermissionError):
    """A control command arrived without a named user or a reason; nothing was sent to the station."""


class CommandRefused(DeviceRefused):
    """The command was not carried out: wrong station state, bad parameter, or no confirmation.

    `reason` is the plain-language cause; `state` the station state at the time, if known.
    """

    def __init__(self, reason: str, state: StationState | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.state = state


class CommandOutcomeUnknown(DriverError):
    """A command was sent but whether the station ran it cannot be known: audit it as unconfirmed.

    Raised when the reply to the command write was lost (timeout or dropped link) and the
    station's acknowledgement could not be read back within the confirmation time either. The
    station may well be eluting; this is deliberately not a CommandRefused, which means
    "not carried out". It carries who asked for what and why, so the refusal path cannot drop
    the audit entry.
    """

    def __init__(
        self,
        message: str,
        *,
        action: str,
        station: str,
        user: str,
        reason: str,
        seq: int,
        requested_ns: int,
        old_state: StationState,
        parameters: dict[str, float],
    ) -> None:
        super().__init__(message)
        self.action = action
        self.station = station
        self.user = user
        self.reason = reason
        self.seq = seq
        self.requested_ns = requested_ns
        self.old_state = old_state
        self.parameters = parameters


@dataclass(frozen=True, slots=True)
class CommandOutcome:
    """A confirmed command, as the controller audits it (actor/action/target/reason + before/after)."""

    action: str
    station: str
    user: str
    reason: str
    requested_ns: int
    confirmed_ns: int
    sequence: int
    old_state: StationState
    new_state: StationState
    parameters: dict[str, float] = field(default_factory=dict)


#: Audit action names, as used by hotlab.controller.audit.
ACTION_NAMES = {
    CommandCode.START: "elution.start",
    CommandCode.ABORT: "elution.abort",
    CommandCode.ACK_FAULT: "fault.acknowledge",
}

_T = TypeVar("_T", bound=ModbusPDU)


class ElutionStationDriver:
    """Async driver for one elution station; never blocks the event loop, raises DriverError subclasses."""

    def __init__(
        self,
        station: str,
        link: ModbusLink,
        *,
        counter_store: CounterStore | None = None,
        last_counter_path: Path | str | None = None,
        timeout_s: float = 2.0,
        confirm_timeout_s: float = 5.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
    ) -> None:
        if counter_store is not None and last_counter_path is not None:
            raise ValueError("give either counter_store or last_counter_path, not both")
        self.station = station
        self.link = link
        self.order = WordOrder(link.word_order)
        self.device_id = link.device_id
        self.timeout_s = timeout_s
        self.confirm_timeout_s = confirm_timeout_s
        #: None until the SqliteCounterStore at `last_counter_path` is first needed: opening it creates its
        #: file and table, disk I/O that `_store()` runs on a worker thread rather than here, on the loop.
        self._counter_store: CounterStore | None = counter_store
        if counter_store is None and last_counter_path is None:
            self._counter_store = MemoryCounterStore()
        self._counter_path = None if last_counter_path is None else Path(last_counter_path)
        #: Set when the transport reports the link lost, so a request in flight fails at once
        #: (pymodbus itself would leave it waiting for its full timeout).
        self._link_lost = asyncio.Event()
        self._client: ModbusClient | None = None
        #: Reconnect waits double from backoff_initial_s to backoff_max_s with each failed connect in a
        #: row: the shared policy's ceiling, without jitter.
        self._backoff = Backoff(backoff_initial_s, backoff_max_s)
        self._failed_connects = 0
        self._next_connect_at = 0.0
        self._command_lock = asyncio.Lock()
        #: Write-through cache of the store, per generator id, so a poll only touches disk on news.
        self._last_delivered: dict[str, DeliveredElution | None] = {}
        #: Per generator, the elution whose gap or counter restart was already logged, so a record
        #: awaiting delivery does not repeat the warning on every poll.
        self._logged: dict[str, DeliveredElution] = {}

    # ---- connection ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    async def connect(self) -> None:
        """Connect now, or raise DeviceDisconnected; failed attempts back off exponentially."""
        if self.connected:
            return
        now = time.monotonic()
        if now < self._next_connect_at:
            raise DeviceDisconnected(
                f"{self.station}: not connected; next attempt in {self._next_connect_at - now:.1f} s"
            )
        if self._client is not None:
            self._client.close()
            self._client = None
        self._link_lost = asyncio.Event()
        problem = ""
        try:  # a TLS link reads its certificate and key (on a worker thread) at each connect: a renewed one is used
            self._client = await make_client(self.link, self.timeout_s, self._on_connection_change)
            ok = await self._client.connect()
        except (OSError, ModbusException) as exc:
            ok = False
            problem = f": {exc}"
            log.debug("%s: connect raised %s", self.station, exc)
        if not ok:
            self._next_connect_at = time.monotonic() + self._backoff.ceiling(self._failed_connects)
            self._failed_connects += 1
            raise DeviceDisconnected(f"{self.station}: cannot connect to {describe_link(self.link)}{problem}")
        self._failed_connects = 0
        self._next_connect_at = 0.0

    async def close(self) -> None:
        """Close the link; an explicit close also clears the reconnect backoff (the caller now owns the timing)."""
        self._failed_connects = 0
        self._next_connect_at = 0.0
        if self._client is not None:
            self._client.close()
            self._client = None

    async def __aenter__(self) -> ElutionStationDriver:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _on_connection_change(self, connected: bool) -> None:
        if not connected:
            self._link_lost.set()

    async def _request(self, what: str, call: Callable[[ModbusClient], Awaitable[_T]]) -> _T:
        """Run one Modbus request and translate every failure into the driver's typed errors."""
        await self.connect()
        client = self._client
        assert client is not None
        request = asyncio.ensure_future(call(client))
        link_lost = asyncio.ensure_future(self._link_lost.wait())
        try:
            async with asyncio.timeout(self.timeout_s + 1.0):
                await asyncio.wait((request, link_lost), return_when=asyncio.FIRST_COMPLETED)
            if not request.done():
                raise DeviceDisconnected(f"{self.station}: connection lost during {what}")
            response = request.result()
        except (ModbusIOException, TimeoutError):
            if not client.connected:
                raise DeviceDisconnected(f"{self.station}: connection lost during {what}") from None
            raise DeviceTimeout(f"{self.station}: no reply to {what} within {self.timeout_s:g} s") from None
        except ConnectionException:
            raise DeviceDisconnected(f"{self.station}: connection lost during {what}") from None
        except ModbusException as exc:
            raise FrameError(f"{self.station}: malformed reply to {what}: {exc}") from None
        finally:
            request.cancel()
            link_lost.cancel()
        if response.isError():
            code = getattr(response, "exception_code", 0)
            name = ExcCodes(code).name if code in ExcCodes._value2member_map_ else "unknown"
            raise DeviceRefused(f"{self.station}: {what} refused with Modbus exception {code} ({name})")
        return response

    async def read_status(self) -> StationStatus:
        """Read and decode the whole input-register block in one request."""
        count = INPUT_REGISTERS.count
        response = await self._request(
            f"read input registers 0..{count - 1}",
            lambda c: c.read_input_registers(0, count=count, device_id=self.device_id),
        )
        return decode_status(response.registers, self.order)

    # ---- polling and elution delivery --------------------------------------------------------

    async def poll(self) -> StationPoll:
        """Read the station; the last finished elution is in `finished` until it is marked delivered."""
        sent_ns = time.time_ns()
        started = time.monotonic_ns()  # the round trip on the monotonic clock: a wall-clock step cannot shorten it
        status = await self.read_status()
        round_trip_ns = time.monotonic_ns() - started
        clock = measure_offset(status.clock_ns, sent_ns, round_trip_ns, CLOCK_RESOLUTION_NS)
        finished: list[ElutionRecord] = []
        record = await self._undelivered_elution(status)
        if record is not None:
            finished.append(record)
        return StationPoll(self.station, time.time_ns(), round_trip_ns / 1e6, status, clock, finished)

    async def mark_delivered(self, record: ElutionRecord) -> None:
        """Record that `record` reached the controller's outbox; later polls no longer return it.

        Call only after the outbox commit succeeded, in the order the polls returned the records.
        The identity is persisted off the event loop before the cache changes, so a failed write
        leaves the record pending rather than lost. Marking an earlier elution of the count
        already marked changes nothing; a record flagged `counter_reset` starts the new count.
        """
        if record.station != self.station:
            raise ValueError(f"{self.station}: cannot mark an elution of station {record.station!r} delivered")
        held = _identity(record)
        last = await self._delivered(record.generator_id)
        already = last is not None and held.same_count(last) and held.counter <= last.counter
        if already and record.counter_reset is None:
            return
        store = await self._store()
        await asyncio.to_thread(store.set_last_delivered, self.station, record.generator_id, held)
        self._last_delivered[record.generator_id] = held

    async def _delivered(self, generator_id: str) -> DeliveredElution | None:
        if generator_id not in self._last_delivered:
            store = await self._store()
            self._last_delivered[generator_id] = await asyncio.to_thread(
                store.last_delivered, self.station, generator_id
            )
        return self._last_delivered[generator_id]

    async def _store(self) -> CounterStore:
        """The counter store, opened on a worker thread the first time it is needed."""
        if self._counter_store is None:
            assert self._counter_path is not None
            self._counter_store = await asyncio.to_thread(SqliteCounterStore, self._counter_path)
        return self._counter_store

    async def _undelivered_elution(self, status: StationStatus) -> ElutionRecord | None:
        """The station's last elution as a record, unless it was delivered before.

        With nothing stored yet for this (station, generator) — a first install or a new
        generator — the last elution the station holds is returned.
        """
        if status.elution_counter == 0:
            return None
        generator = status.generator_id
        record = ElutionRecord(
            station=self.station,
            generator_id=generator,
            parent_nuclide=status.parent_nuclide,
            daughter_nuclide=status.daughter_nuclide,
            counter=status.elution_counter,
            activity_bq=status.eluate_activity_bq,
            volume_ml=status.eluate_volume_ml,
            start_ns=status.start_ns,
            end_ns=status.end_ns,
            line_dose_rate_usv_h=status.eluate_peak_dose_rate_usv_h,
            parent_bq=status.eluate_parent_bq,
            station_serial=status.serial,
            counter_epoch_ns=status.counter_epoch_ns,
        )
        last = await self._delivered(generator)
        if last is None:
            return record
        held = _identity(record)
        reset = held.restart_reason(last)
        if reset is None and held.counter <= last.counter:
            return None
        if self._logged.get(generator) != held:
            self._logged[generator] = held
            self._log_discontinuity(generator, last, held, reset)
        return dataclasses.replace(record, counter_reset=reset)

    def _log_discontinuity(
        self, generator: str, last: DeliveredElution, held: DeliveredElution, reset: str | None
    ) -> None:
        """Warn, once per elution, of a counter that started again or skipped elutions."""
        if reset is not None:
            log.warning(
                "%s: elution counter of %s started again (%s): last delivered: serial %s, counter %d;"
                " now: serial %s, counter %d; recording elution %d of the new count",
                self.station,
                generator,
                reset,
                last.station_serial,
                last.counter,
                held.station_serial,
                held.counter,
                held.counter,
            )
        elif held.counter > last.counter + 1:
            log.warning(
                "%s: elution counter jumped from %d to %d on %s; the station keeps only the last elution,"
                " so %d elution(s) in between cannot be recorded",
                self.station,
                last.counter,
                held.counter,
                generator,
                held.counter - last.counter - 1,
            )

    # ---- commands ---------------------------------------------------------------------------

    async def start_elution(
        self, volume_ml: float, *, user: str | None = None, reason: str | None = None
    ) -> CommandOutcome:
        """Start an elution of `volume_ml`; refused unless the station is idle or done."""
        return await self._command(CommandCode.START, volume_ml, _authorise(user, reason), STARTABLE_STATES)

    async def abort(self, *, user: str | None = None, reason: str | None = None) -> CommandOutcome:
        """Abort a priming or running elution."""
        return await self._command(CommandCode.ABORT, 0.0, _authorise(user, reason), ABORTABLE_STATES)

    async def acknowledge_fault(self, *, user: str | None = None, reason: str | None = None) -> CommandOutcome:
        """Acknowledge a fault after the cause was dealt with; the station returns to idle."""
        return await self._command(
            CommandCode.ACK_FAULT, 0.0, _authorise(user, reason), frozenset({StationState.FAULT})
        )

    async def _command(
        self,
        code: CommandCode,
        volume_ml: float,
        request: AuthorisedRequest,
        allowed: frozenset[StationState],
    ) -> CommandOutcome:
        action = ACTION_NAMES[code]
        async with self._command_lock:
            requested_ns = time.time_ns()
            before = await self.read_status()
            if before.state not in allowed:
                detail = f" (fault code {before.fault_code})" if before.state is StationState.FAULT else ""
                raise CommandRefused(
                    f"{self.station}: {action} refused: station is {before.state.name.lower()}{detail};"
                    f" allowed only when {' or '.join(sorted(s.name.lower() for s in allowed))}",
                    before.state,
                )
            seq = before.cmd_ack_seq % 0xFFFF + 1  # 1..65535; 0 means "no command yet"
            parameters = {"volume_ml": float(volume_ml)} if code is CommandCode.START else {}
            write_problem = ""
            try:
                await self._request(
                    f"{action} command write",
                    lambda c: c.write_registers(
                        0, encode_command(seq, code, volume_ml, self.order), device_id=self.device_id
                    ),
                )
            except (DeviceTimeout, DeviceDisconnected) as lost:
                # The request may have reached the station with only the reply lost; the
                # acknowledgement registers tell, so look there before giving up.
                write_problem = f"reply to command {seq} lost ({lost}) and "
                log.warning(
                    "%s: reply to %s command %d lost (%s); reading the acknowledgement", self.station, action, seq, lost
                )
            after = await self._await_ack(seq, action)
            if after is None:
                raise CommandOutcomeUnknown(
                    f"{self.station}: {action} by {request.user} unconfirmed: {write_problem}no acknowledgement"
                    f" readable within {self.confirm_timeout_s:g} s; the station may have carried it out",
                    action=action,
                    station=self.station,
                    user=request.user,
                    reason=request.reason,
                    seq=seq,
                    requested_ns=requested_ns,
                    old_state=before.state,
                    parameters=parameters,
                )
            if after.cmd_result != CommandResult.ACCEPTED:
                reasons: dict[int, str] = {
                    CommandResult.REFUSED_STATE: f"station state was {after.state.name.lower()}",
                    CommandResult.REFUSED_VOLUME: f"volume {volume_ml:g} mL outside the station's range",
                    CommandResult.UNKNOWN_COMMAND: "station does not know the command",
                }
                why = reasons.get(after.cmd_result, f"result code {after.cmd_result}")
                raise CommandRefused(f"{self.station}: {action} refused by the station: {why}", after.state)
            return CommandOutcome(
                action=action,
                station=self.station,
                user=request.user,
                reason=request.reason,
                requested_ns=requested_ns,
                confirmed_ns=time.time_ns(),
                sequence=seq,
                old_state=before.state,
                new_state=after.state,
                parameters=parameters,
            )

    async def _await_ack(self, seq: int, action: str) -> StationStatus | None:
        """Re-read the status until the station acknowledges `seq`, for at most confirm_timeout_s.

        Read failures (timeouts, a dropped link, refused reconnects) are retried until the
        deadline, because a command the station may have run must not end in a bare transport
        error; None means no status could be read at the end. A station that answers but never
        acknowledges raises CommandRefused: it has the write and did not act on it.
        """
        deadline = time.monotonic() + self.confirm_timeout_s
        reads = 0
        while True:
            try:
                status = await self.read_status()
            except DriverError as exc:
                log.debug("%s: acknowledgement of %s command %d not readable yet: %s", self.station, action, seq, exc)
            else:
                if status.cmd_ack_seq == seq:
                    return status
                if time.monotonic() >= deadline:
                    raise CommandRefused(
                        f"{self.station}: {action} not confirmed: station did not acknowledge command {seq}"
                        f" within {self.confirm_timeout_s:g} s (last acknowledged {status.cmd_ack_seq})",
                        status.state,
                    )
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(_ACK_POLL.ceiling(reads))  # soon after the write, then less often
            reads += 1


def _authorise(user: str | None, reason: str | None) -> AuthorisedRequest:
    if not user or not user.strip():
        raise NotAuthorised("control command refused: no user given (who is asking?)")
    if not reason or not reason.strip():
        raise NotAuthorised(f"control command refused: user {user!r} gave no reason (why?)")
    return AuthorisedRequest(user.strip(), reason.strip())


def _identity(record: ElutionRecord) -> DeliveredElution:
    return DeliveredElution(record.counter, record.end_ns, record.station_serial, record.counter_epoch_ns)

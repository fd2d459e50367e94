"""Generator elution station over Modbus (TCP, or RTU on a tty or through a serial device server).

The register map (docs/elution-station-registers.md) is defined here once, as constants and as
the `encode_status` / `decode_status` pair, so the driver and the simulator cannot drift apart.

Two promises the controller relies on:

* No finished elution is lost. The station only keeps its last elution, identified by its
  elution counter. `poll()` returns that elution as an ElutionRecord for as long as its counter
  is above the last one *delivered* for that (station, generator); the controller calls
  `mark_delivered(record)` after its outbox commit succeeded, which persists the counter. A
  crash or dropped connection anywhere before that point means the record comes again, so
  delivery from the driver is at-least-once; the message id derived from (station, generator,
  counter) (hotlab.controller.messages.elution_msg_id) makes the sinks drop the replay, which is what
  makes the stored result exactly-once. Elutions the station finished while nobody polled are
  gone from the station itself; the driver logs the gap.
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
import enum
import logging
import math
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, TypeVar

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU

from hotlab.drivers.modbus_words import (
    RegisterValueError,
    WordOrder,
    float32_to_registers,
    registers_to_float32,
    registers_to_string,
    registers_to_uint32,
    string_to_registers,
    uint32_to_registers,
)
from hotlab.drivers.records import (
    DeviceDisconnected,
    DeviceRefused,
    DeviceTimeout,
    DriverError,
    ElutionRecord,
    FrameError,
)

log = logging.getLogger(__name__)

NS_PER_S = 1_000_000_000
NS_PER_MS = 1_000_000

# --------------------------------------------------------------------------------------------
# Register map, version 1. Addresses are PDU addresses (0-based, as on the wire); tools that
# count from 1 (mbpoll without -0, "3x0001" notation) add one.
# --------------------------------------------------------------------------------------------

REGISTER_MAP_VERSION = 1


class IR:
    """Input registers (function code 04): identity, generator and live state, read in one request."""

    MAP_VERSION = 0
    MODEL = 1  # string, 8 registers
    SERIAL = 9  # string, 8 registers
    FIRMWARE = 17  # string, 4 registers
    GENERATOR_ID = 21  # string, 8 registers
    PARENT_CODE = 29
    DAUGHTER_CODE = 30
    CAL_ACTIVITY = 31  # float32 Bq
    CAL_TIME = 33  # uint32 epoch s
    STATE = 35
    FAULT_CODE = 36
    OUTPUTS = 37  # bit field, see Output
    ELUTION_COUNTER = 38  # uint32
    ELUATE_ACTIVITY = 40  # float32 Bq, daughter, at end of last elution
    ELUATE_VOLUME = 42  # float32 mL
    ELUATE_PARENT = 44  # float32 Bq, parent breakthrough in the last eluate
    START_S = 46  # uint32 epoch s + uint16 ms at 48
    START_MS = 48
    END_S = 49  # uint32 epoch s + uint16 ms at 51
    END_MS = 51
    REQUESTED_VOLUME = 52  # float32 mL, of the running/last elution
    LINE_DOSE_RATE = 54  # float32 uSv/h
    CLOCK_S = 56  # uint32 epoch s + uint16 ms at 58: the station's clock when the block was read
    CLOCK_MS = 58
    CMD_ACK_SEQ = 59
    CMD_ACK_CODE = 60
    CMD_RESULT = 61
    ELUATE_PEAK_DOSE_RATE = 62  # float32 uSv/h, highest line dose rate during the last elution
    COUNT = 64

    STRING_LENGTHS = {MODEL: 8, SERIAL: 8, FIRMWARE: 4, GENERATOR_ID: 8}


class HR:
    """Holding registers (function codes 03/06/16): one sequenced command, written in one FC16 request."""

    CMD_SEQ = 0
    CMD_CODE = 1
    CMD_VOLUME = 2  # float32 mL
    COUNT = 4


class Coil:
    """Coils (function codes 01/05/15): momentary panel commands, self-clearing, not sequenced."""

    START = 0
    ABORT = 1
    ACK_FAULT = 2
    COUNT = 3


class DiscreteInput(enum.IntEnum):
    """Discrete inputs (function code 02); the same bits are in input register OUTPUTS."""

    VALVE_ELUENT = 0
    VALVE_WASTE = 1
    VALVE_PRODUCT = 2
    PUMP = 3
    FAULT = 4


class StationState(enum.IntEnum):
    IDLE = 0
    PRIMING = 1
    ELUTING = 2
    DONE = 3
    FAULT = 4


class CommandCode(enum.IntEnum):
    START = 1
    ABORT = 2
    ACK_FAULT = 3


class CommandResult(enum.IntEnum):
    NONE = 0
    ACCEPTED = 1
    REFUSED_STATE = 2
    REFUSED_VOLUME = 3
    UNKNOWN_COMMAND = 4


class FaultCode(enum.IntEnum):
    NONE = 0
    OVERPRESSURE = 1
    VALVE_POSITION = 2
    PUMP_STALL = 3
    ELUENT_EMPTY = 4
    LINE_DOSE_RATE_HIGH = 5


#: Nuclide codes in PARENT_CODE / DAUGHTER_CODE (vendor enumeration, documented in the map).
NUCLIDE_CODES: dict[int, str] = {
    1: "Ge-68",
    2: "Ga-68",
    3: "Mo-99",
    4: "Tc-99m",
    5: "Sr-82",
    6: "Rb-82",
}
NUCLIDE_NUMBERS: dict[str, int] = {name: code for code, name in NUCLIDE_CODES.items()}

#: States in which a new elution may be started.
STARTABLE_STATES = frozenset({StationState.IDLE, StationState.DONE})
#: States in which there is something to abort.
ABORTABLE_STATES = frozenset({StationState.PRIMING, StationState.ELUTING})


@dataclass(frozen=True, slots=True)
class StationStatus:
    """Everything in the input-register block, decoded into SI-ish units (Bq, mL, ns, uSv/h)."""

    model: str
    serial: str
    firmware: str
    generator_id: str
    parent_nuclide: str
    daughter_nuclide: str
    cal_activity_bq: float
    cal_time_ns: int
    state: StationState
    fault_code: int
    outputs: int
    elution_counter: int
    eluate_activity_bq: float
    eluate_volume_ml: float
    eluate_parent_bq: float
    start_ns: int
    end_ns: int
    requested_volume_ml: float
    line_dose_rate_usv_h: float
    clock_ns: int
    cmd_ack_seq: int
    cmd_ack_code: int
    cmd_result: int
    eluate_peak_dose_rate_usv_h: float

    def output_on(self, output: DiscreteInput) -> bool:
        return bool(self.outputs >> output & 1)


def _time_to_registers(time_ns: int, order: WordOrder) -> list[int]:
    seconds, rest = divmod(max(int(time_ns), 0), NS_PER_S)
    return uint32_to_registers(seconds, order) + [rest // NS_PER_MS]


def _registers_to_time(registers: Sequence[int], order: WordOrder) -> int:
    if registers[2] > 999:
        raise RegisterValueError(f"millisecond register holds {registers[2]}, above 999")
    return registers_to_uint32(registers[:2], order) * NS_PER_S + registers[2] * NS_PER_MS


def encode_status(status: StationStatus, order: WordOrder) -> list[int]:
    """The input-register block for `status`, as a station with word order `order` serves it."""
    regs = [0] * IR.COUNT

    def put(address: int, values: list[int]) -> None:
        regs[address : address + len(values)] = values

    put(IR.MAP_VERSION, [REGISTER_MAP_VERSION])
    for address, text in (
        (IR.MODEL, status.model),
        (IR.SERIAL, status.serial),
        (IR.FIRMWARE, status.firmware),
        (IR.GENERATOR_ID, status.generator_id),
    ):
        put(address, string_to_registers(text, IR.STRING_LENGTHS[address], order))
    put(IR.PARENT_CODE, [NUCLIDE_NUMBERS[status.parent_nuclide], NUCLIDE_NUMBERS[status.daughter_nuclide]])
    put(IR.CAL_ACTIVITY, float32_to_registers(status.cal_activity_bq, order))
    put(IR.CAL_TIME, uint32_to_registers(status.cal_time_ns // NS_PER_S, order))
    put(IR.STATE, [int(status.state), status.fault_code, status.outputs])
    put(IR.ELUTION_COUNTER, uint32_to_registers(status.elution_counter, order))
    put(IR.ELUATE_ACTIVITY, float32_to_registers(status.eluate_activity_bq, order))
    put(IR.ELUATE_VOLUME, float32_to_registers(status.eluate_volume_ml, order))
    put(IR.ELUATE_PARENT, float32_to_registers(status.eluate_parent_bq, order))
    put(IR.START_S, _time_to_registers(status.start_ns, order))
    put(IR.END_S, _time_to_registers(status.end_ns, order))
    put(IR.REQUESTED_VOLUME, float32_to_registers(status.requested_volume_ml, order))
    put(IR.LINE_DOSE_RATE, float32_to_registers(status.line_dose_rate_usv_h, order))
    put(IR.CLOCK_S, _time_to_registers(status.clock_ns, order))
    put(IR.CMD_ACK_SEQ, [status.cmd_ack_seq, status.cmd_ack_code, status.cmd_result])
    put(IR.ELUATE_PEAK_DOSE_RATE, float32_to_registers(status.eluate_peak_dose_rate_usv_h, order))
    return regs


def decode_status(regs: Sequence[int], order: WordOrder) -> StationStatus:
    """Decode the input-register block; anything outside the map raises FrameError with the raw registers."""
    if len(regs) != IR.COUNT:
        raise FrameError(f"input-register block has {len(regs)} registers, expected {IR.COUNT}")
    try:
        if regs[IR.MAP_VERSION] != REGISTER_MAP_VERSION:
            raise RegisterValueError(
                f"register map version {regs[IR.MAP_VERSION]}, driver speaks {REGISTER_MAP_VERSION}"
            )

        def text(address: int) -> str:
            return registers_to_string(regs[address : address + IR.STRING_LENGTHS[address]], order)

        def f32(address: int) -> float:
            # Every float in the map is a physical quantity; a NaN or infinity is a station fault
            # or a word-order mistake, and would also break the outbox's strict JSON downstream.
            value = registers_to_float32(regs[address : address + 2], order)
            if not math.isfinite(value):
                raise RegisterValueError(f"non-finite float32 {value!r} at input register {address}")
            return value

        def nuclide(address: int) -> str:
            try:
                return NUCLIDE_CODES[regs[address]]
            except KeyError:
                raise RegisterValueError(f"unknown nuclide code {regs[address]} at input register {address}") from None

        try:
            state = StationState(regs[IR.STATE])
        except ValueError:
            raise RegisterValueError(f"unknown station state {regs[IR.STATE]}") from None
        return StationStatus(
            model=text(IR.MODEL),
            serial=text(IR.SERIAL),
            firmware=text(IR.FIRMWARE),
            generator_id=text(IR.GENERATOR_ID),
            parent_nuclide=nuclide(IR.PARENT_CODE),
            daughter_nuclide=nuclide(IR.DAUGHTER_CODE),
            cal_activity_bq=f32(IR.CAL_ACTIVITY),
            cal_time_ns=registers_to_uint32(regs[IR.CAL_TIME : IR.CAL_TIME + 2], order) * NS_PER_S,
            state=state,
            fault_code=regs[IR.FAULT_CODE],
            outputs=regs[IR.OUTPUTS],
            elution_counter=registers_to_uint32(regs[IR.ELUTION_COUNTER : IR.ELUTION_COUNTER + 2], order),
            eluate_activity_bq=f32(IR.ELUATE_ACTIVITY),
            eluate_volume_ml=f32(IR.ELUATE_VOLUME),
            eluate_parent_bq=f32(IR.ELUATE_PARENT),
            start_ns=_registers_to_time(regs[IR.START_S : IR.START_S + 3], order),
            end_ns=_registers_to_time(regs[IR.END_S : IR.END_S + 3], order),
            requested_volume_ml=f32(IR.REQUESTED_VOLUME),
            line_dose_rate_usv_h=f32(IR.LINE_DOSE_RATE),
            clock_ns=_registers_to_time(regs[IR.CLOCK_S : IR.CLOCK_S + 3], order),
            cmd_ack_seq=regs[IR.CMD_ACK_SEQ],
            cmd_ack_code=regs[IR.CMD_ACK_CODE],
            cmd_result=regs[IR.CMD_RESULT],
            eluate_peak_dose_rate_usv_h=f32(IR.ELUATE_PEAK_DOSE_RATE),
        )
    except RegisterValueError as exc:
        raise FrameError(f"bad elution-station status block ({exc})", bytes(str(list(regs)), "ascii")) from None


def encode_command(seq: int, code: CommandCode, volume_ml: float, order: WordOrder) -> list[int]:
    """The holding-register block HR 0..3 for one command."""
    return [seq, int(code), *float32_to_registers(volume_ml, order)]


# --------------------------------------------------------------------------------------------
# Transport configuration. The driver needs only the attributes of the ModbusLink protocol;
# hotlab.controller.config builds ModbusTcpLink / ModbusRtuLink directly as a station's transport.
# --------------------------------------------------------------------------------------------


class ModbusLink(Protocol):
    """What the driver reads from a link description (any object with these attributes will do).

    Read-only properties, so frozen dataclasses such as the controller's config links match.
    """

    @property
    def kind(self) -> str: ...

    @property
    def device_id(self) -> int: ...

    @property
    def word_order(self) -> str: ...


@dataclass(frozen=True, slots=True)
class ModbusTcpLink:
    host: str
    port: int = 502
    device_id: int = 1
    word_order: str = "ABCD"
    kind: Literal["modbus_tcp"] = "modbus_tcp"


@dataclass(frozen=True, slots=True)
class ModbusRtuLink:
    """RTU framing on a serial URL: a tty path, or socket://host:port (RTU through a TCP device server)."""

    url: str
    baudrate: int = 19200
    device_id: int = 1
    word_order: str = "ABCD"
    kind: Literal["modbus_rtu"] = "modbus_rtu"


def make_client(
    link: ModbusLink, timeout_s: float, on_connection_change: Callable[[bool], None] | None = None
) -> AsyncModbusTcpClient | AsyncModbusSerialClient:
    """A pymodbus client for `link`, with pymodbus' own retries and reconnects off: the driver owns both."""
    common = {"timeout": timeout_s, "retries": 0, "reconnect_delay": 0, "trace_connect": on_connection_change}
    if link.kind == "modbus_tcp":
        return AsyncModbusTcpClient(link.host, port=link.port, framer=FramerType.SOCKET, **common)  # type: ignore[attr-defined]
    if link.kind != "modbus_rtu":
        raise ValueError(f"an elution station needs a Modbus link, not {link.kind!r}")
    url: str = link.url  # type: ignore[attr-defined]
    if url.startswith("socket://"):
        host, _, port = url.removeprefix("socket://").rpartition(":")
        return AsyncModbusTcpClient(host, port=int(port), framer=FramerType.RTU, **common)
    return AsyncModbusSerialClient(url, framer=FramerType.RTU, baudrate=link.baudrate, **common)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------
# Delivery bookkeeping: the last elution counter the controller confirmed per (station, generator).
# --------------------------------------------------------------------------------------------


class CounterStore(Protocol):
    """Where the driver remembers the last elution counter delivered; must survive restarts to be useful."""

    def last_counter(self, station: str, generator_id: str) -> int | None: ...

    def set_last_counter(self, station: str, generator_id: str, counter: int) -> None: ...


class MemoryCounterStore:
    """Process-lifetime store: no replay across reconnects, but a restart replays the last elution (tests, dry runs)."""

    def __init__(self) -> None:
        self._counters: dict[tuple[str, str], int] = {}

    def last_counter(self, station: str, generator_id: str) -> int | None:
        return self._counters.get((station, generator_id))

    def set_last_counter(self, station: str, generator_id: str, counter: int) -> None:
        self._counters[(station, generator_id)] = counter


class SqliteCounterStore:
    """Durable store: one row per (station, generator) in a small SQLite file, committed per update.

    A connection is opened per call, so the store can be used from worker threads
    (the driver calls it through asyncio.to_thread to keep disk syncs off the event loop).
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS last_elution ("
                " station TEXT NOT NULL, generator_id TEXT NOT NULL, counter INTEGER NOT NULL,"
                " updated_ns INTEGER NOT NULL, PRIMARY KEY (station, generator_id))"
            )

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=10.0)

    def last_counter(self, station: str, generator_id: str) -> int | None:
        with self._connect() as db:
            row = db.execute(
                "SELECT counter FROM last_elution WHERE station = ? AND generator_id = ?", (station, generator_id)
            ).fetchone()
        return None if row is None else int(row[0])

    def set_last_counter(self, station: str, generator_id: str, counter: int) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT INTO last_elution (station, generator_id, counter, updated_ns) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (station, generator_id) DO UPDATE SET counter = excluded.counter,"
                " updated_ns = excluded.updated_ns",
                (station, generator_id, counter, time.time_ns()),
            )


# --------------------------------------------------------------------------------------------
# Poll and command results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StationPoll:
    """One poll: the decoded status, how long the read took, and the finished elution not yet marked delivered."""

    station: str
    received_ns: int
    latency_ms: float
    status: StationStatus
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
        if counter_store is not None:
            self.counter_store: CounterStore = counter_store
        elif last_counter_path is not None:
            self.counter_store = SqliteCounterStore(last_counter_path)
        else:
            self.counter_store = MemoryCounterStore()
        #: Set when the transport reports the link lost, so a request in flight fails at once
        #: (pymodbus itself would leave it waiting for its full timeout).
        self._link_lost = asyncio.Event()
        self._client: AsyncModbusTcpClient | AsyncModbusSerialClient | None = None
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._backoff_s = 0.0
        self._next_connect_at = 0.0
        self._command_lock = asyncio.Lock()
        #: Write-through cache of the store, per generator id, so a poll only touches disk on news.
        self._last_delivered: dict[str, int | None] = {}
        #: Per generator, the counter whose gap was already logged, so a record awaiting delivery
        #: does not repeat the warning on every poll.
        self._gap_logged: dict[str, int] = {}

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
        self._link_lost = asyncio.Event()
        self._client = make_client(self.link, self.timeout_s, self._on_connection_change)
        try:
            ok = await self._client.connect()
        except (OSError, ModbusException) as exc:
            ok = False
            log.debug("%s: connect raised %s", self.station, exc)
        if not ok:
            self._backoff_s = min(max(self._backoff_s * 2, self._backoff_initial_s), self._backoff_max_s)
            self._next_connect_at = time.monotonic() + self._backoff_s
            raise DeviceDisconnected(f"{self.station}: cannot connect to {self._describe_link()}")
        self._backoff_s = 0.0
        self._next_connect_at = 0.0

    async def close(self) -> None:
        """Close the link; an explicit close also clears the reconnect backoff (the caller now owns the timing)."""
        self._backoff_s = 0.0
        self._next_connect_at = 0.0
        if self._client is not None:
            self._client.close()
            self._client = None

    async def __aenter__(self) -> ElutionStationDriver:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _describe_link(self) -> str:
        if self.link.kind == "modbus_tcp":
            return f"modbus tcp {self.link.host}:{self.link.port}"  # type: ignore[attr-defined]
        return f"modbus rtu {self.link.url}"  # type: ignore[attr-defined]

    def _on_connection_change(self, connected: bool) -> None:
        if not connected:
            self._link_lost.set()

    async def _request(
        self, what: str, call: Callable[[AsyncModbusTcpClient | AsyncModbusSerialClient], Awaitable[_T]]
    ) -> _T:
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
        response = await self._request(
            f"read input registers 0..{IR.COUNT - 1}",
            lambda c: c.read_input_registers(0, count=IR.COUNT, device_id=self.device_id),
        )
        return decode_status(response.registers, self.order)

    # ---- polling and elution delivery --------------------------------------------------------

    async def poll(self) -> StationPoll:
        """Read the station; the last finished elution is in `finished` until it is marked delivered."""
        started = time.perf_counter()
        status = await self.read_status()
        latency_ms = (time.perf_counter() - started) * 1000.0
        finished: list[ElutionRecord] = []
        record = await self._undelivered_elution(status)
        if record is not None:
            finished.append(record)
        return StationPoll(self.station, time.time_ns(), latency_ms, status, finished)

    async def mark_delivered(self, record: ElutionRecord) -> None:
        """Record that `record` reached the controller's outbox; later polls no longer return it.

        Call only after the outbox commit succeeded. The counter is persisted off the event loop
        before the cache changes, so a failed write leaves the record pending rather than lost.
        Marking an older counter than one already delivered changes nothing.
        """
        if record.station != self.station:
            raise ValueError(f"{self.station}: cannot mark an elution of station {record.station!r} delivered")
        last = await self._delivered_counter(record.generator_id)
        if last is not None and record.counter <= last:
            return
        await asyncio.to_thread(self.counter_store.set_last_counter, self.station, record.generator_id, record.counter)
        self._last_delivered[record.generator_id] = record.counter

    async def _delivered_counter(self, generator_id: str) -> int | None:
        if generator_id not in self._last_delivered:
            self._last_delivered[generator_id] = await asyncio.to_thread(
                self.counter_store.last_counter, self.station, generator_id
            )
        return self._last_delivered[generator_id]

    async def _undelivered_elution(self, status: StationStatus) -> ElutionRecord | None:
        """The station's last elution as a record, unless it was delivered before.

        With nothing stored yet for this (station, generator) — a first install or a new
        generator — the last elution the station holds is returned.
        """
        counter = status.elution_counter
        if counter == 0:
            return None
        generator = status.generator_id
        last = await self._delivered_counter(generator)
        if last is not None and counter <= last:
            return None
        if last is not None and counter > last + 1 and self._gap_logged.get(generator) != counter:
            self._gap_logged[generator] = counter
            log.warning(
                "%s: elution counter jumped from %d to %d on %s; the station keeps only the last elution,"
                " so %d elution(s) in between cannot be recorded",
                self.station,
                last,
                counter,
                generator,
                counter - last - 1,
            )
        return ElutionRecord(
            station=self.station,
            generator_id=generator,
            parent_nuclide=status.parent_nuclide,
            daughter_nuclide=status.daughter_nuclide,
            counter=counter,
            activity_bq=status.eluate_activity_bq,
            volume_ml=status.eluate_volume_ml,
            start_ns=status.start_ns,
            end_ns=status.end_ns,
            line_dose_rate_usv_h=status.eluate_peak_dose_rate_usv_h,
            parent_bq=status.eluate_parent_bq,
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
                        HR.CMD_SEQ, encode_command(seq, code, volume_ml, self.order), device_id=self.device_id
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
            result = CommandResult(after.cmd_result) if after.cmd_result in CommandResult._value2member_map_ else None
            if result is not CommandResult.ACCEPTED:
                why = {
                    CommandResult.REFUSED_STATE: f"station state was {after.state.name.lower()}",
                    CommandResult.REFUSED_VOLUME: f"volume {volume_ml:g} mL outside the station's range",
                    CommandResult.UNKNOWN_COMMAND: "station does not know the command",
                }.get(result, f"result code {after.cmd_result}")  # type: ignore[arg-type]
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
        delay = 0.02
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
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)


def _authorise(user: str | None, reason: str | None) -> AuthorisedRequest:
    if not user or not user.strip():
        raise NotAuthorised("control command refused: no user given (who is asking?)")
    if not reason or not reason.strip():
        raise NotAuthorised(f"control command refused: user {user!r} gave no reason (why?)")
    return AuthorisedRequest(user.strip(), reason.strip())

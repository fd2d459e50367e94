"""A generator elution station that speaks real Modbus: TCP, TCP with TLS, RTU over TCP, or RTU on a pty.

The station is a pymodbus 3.16 server (SimDevice/SimData datastore) whose block sizes, encoding
and command decoding all come from the table in hotlab.drivers.station_registers, which the
driver decodes with. A SimDevice `action` hook runs before every request: it advances the
station's state machine to "now", re-renders the input registers and discrete inputs from the
model, turns holding-register and coil writes into commands, and applies injected faults
(exception responses, raw register overrides such as a NaN float). Silent replies, and lost
replies to commands the station did carry out, are injected one layer lower, by swallowing the
outgoing frame, so the client sees a genuine timeout.

Time: the station has its own clock, which runs `acceleration` times faster than wall time
from the moment the simulator starts. Priming and elution durations are realistic (tens of
seconds) on that clock; tests compress them with a large acceleration, and every timestamp the
station reports, and all decay it computes, use the same clock, so the physics stays exact.
A clock that is set wrong (`StationClock(offset_s=...)`, `--clock-offset-s`) is what the
station reports, not what happens: the times it stamps (`clock_ns`, an elution's start and end,
its counter epoch) are off by the offset, while the column decays and fills on true time, as on
a real station whose clock nobody set right.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import pty
import time
import tty
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer, ModbusTlsServer
from pymodbus.simulator import DataType, SimData, SimDevice

from hotlab.drivers.elution_station import STARTABLE_STATES
from hotlab.drivers.modbus_links import modbus_tls_context
from hotlab.drivers.modbus_words import WordOrder
from hotlab.drivers.station_registers import (
    COIL_COMMANDS,
    COILS,
    DISCRETE_INPUTS,
    HOLDING_REGISTERS,
    INPUT_REGISTERS,
    NS_PER_S,
    CommandCode,
    CommandResult,
    DiscreteInput,
    FaultCode,
    StationState,
    StationStatus,
    decode_command,
    encode_status,
)
from hotlab.simulators.generator_physics import ElutionOutcome, GeneratorColumn

READ_INPUT_REGISTERS = 4
READ_DISCRETE_INPUTS = 2
HOLDING_WRITES = frozenset({6, 16, 23})
COIL_WRITES = frozenset({5, 15})
#: A holding-register write that covers this address is a command.
_CMD_SEQ = HOLDING_REGISTERS["cmd_seq"].address


class StationClock:
    """The station's time: `start_ns` (default: wall time) at start, then running `acceleration` times faster.

    `offset_s` sets the station's clock wrong by that much (positive: ahead): `now_ns` stays the
    true time the physics runs on, `displayed_ns` is what the station reads off its clock.
    """

    def __init__(self, acceleration: float = 1.0, start_ns: int | None = None, *, offset_s: float = 0.0) -> None:
        if not acceleration > 0:
            raise ValueError(f"time acceleration must be > 0, got {acceleration!r}")
        if not math.isfinite(offset_s):
            raise ValueError(f"a clock offset must be a finite number of seconds, got {offset_s!r}")
        self.acceleration = acceleration
        self.offset_ns = round(offset_s * NS_PER_S)
        self._start_ns = time.time_ns() if start_ns is None else start_ns
        self._mono0 = time.monotonic_ns()

    def now_ns(self) -> int:
        return self._start_ns + int((time.monotonic_ns() - self._mono0) * self.acceleration)

    def displayed_ns(self, true_ns: int) -> int:
        """What the station's clock reads at the true time `true_ns`."""
        return true_ns + self.offset_ns


@dataclass(frozen=True, slots=True)
class StationIdentity:
    model: str = "HL-ES100"
    serial: str = "SIM-0001"
    firmware: str = "1.4.2"


@dataclass(frozen=True, slots=True)
class FinishedElution:
    start_ns: int
    outcome: ElutionOutcome
    #: The line dose rate peaks as the elution ends, with the whole eluate past the detector.
    peak_dose_rate_usv_h: float


class StationModel:
    """The station's state machine over a generator column; pure logic, no I/O.

    idle/done --start--> priming --(priming_s)--> eluting --(volume/flow)--> done
    priming --abort--> idle;  eluting --abort--> done (partial elution, recorded)
    any --fault--> fault (an interrupted elution is recorded as partial) --ack--> idle

    The "last elution" fields and the counter change together, at the end of an elution, so a
    client reading the block in one request always sees a consistent record.

    The station does not keep its elution counter over a power cycle (`restart`): it counts
    the column's elutions from 0 again under a new counter epoch, the time it restarted, as
    station firmware without non-volatile memory for the counter does.
    """

    def __init__(self, column: GeneratorColumn, clock: StationClock, identity: StationIdentity | None = None) -> None:
        self.column = column
        self.profile = column.profile
        self.clock = clock
        self.identity = identity or StationIdentity()
        self.state = StationState.IDLE
        self.fault_code = FaultCode.NONE
        self.stuck = False
        self.requested_volume_ml = 0.0
        self._phase_end_ns = 0
        self._eluting_since_ns = 0
        self.last: FinishedElution | None = None
        self.cmd_ack_seq = 0
        self.cmd_ack_code = 0
        self.cmd_result = CommandResult.NONE
        #: The column's elutions before the counter last started from 0.
        self._counted_from = 0
        self.counter_epoch_ns = self._whole_second_now()

    @property
    def elution_counter(self) -> int:
        return self.column.elution_count - self._counted_from

    def _whole_second_now(self) -> int:
        """The station clock's now as it reads it, in the whole seconds the counter epoch register holds."""
        return self.clock.displayed_ns(self.clock.now_ns()) // NS_PER_S * NS_PER_S

    def restart(self) -> None:
        """A power cycle: what was running stops unrecorded, the last elution and the command
        acknowledgement are forgotten, and the counter starts from 0 under a new epoch."""
        self.state = StationState.IDLE
        self.fault_code = FaultCode.NONE
        self.stuck = False
        self.requested_volume_ml = 0.0
        self.last = None
        self.cmd_ack_seq = 0
        self.cmd_ack_code = 0
        self.cmd_result = CommandResult.NONE
        self._counted_from = self.column.elution_count
        self.counter_epoch_ns = self._whole_second_now()

    def advance(self) -> None:
        """Run the state machine up to the station clock's now (phases end at their exact times)."""
        if self.stuck:
            return
        now = self.clock.now_ns()
        if self.state is StationState.PRIMING and now >= self._phase_end_ns:
            self._begin_eluting(self._phase_end_ns)
        if self.state is StationState.ELUTING and now >= self._phase_end_ns:
            self._finish(self._phase_end_ns, 1.0)
            self.state = StationState.DONE

    def _begin_eluting(self, at_ns: int) -> None:
        self.state = StationState.ELUTING
        self._eluting_since_ns = at_ns
        self._phase_end_ns = at_ns + int(self.profile.elution_duration_s(self.requested_volume_ml) * NS_PER_S)

    def _progress(self, at_ns: int) -> float:
        span = self._phase_end_ns - self._eluting_since_ns
        return min(max((at_ns - self._eluting_since_ns) / span, 0.0), 1.0) if span > 0 else 1.0

    def _finish(self, end_ns: int, volume_fraction: float) -> None:
        outcome = self.column.elute(end_ns, self.requested_volume_ml, volume_fraction)
        peak = self.profile.line_dose_rate_usv_h(outcome.daughter_bq)
        self.last = FinishedElution(self._eluting_since_ns, outcome, peak)

    def command(self, seq: int, code: int, volume_ml: float) -> None:
        """A sequenced command from the holding registers; a repeated sequence number is not re-run."""
        if seq == self.cmd_ack_seq:
            return
        self.cmd_result = self.execute(code, volume_ml)
        self.cmd_ack_seq = seq
        self.cmd_ack_code = code

    def execute(self, code: int, volume_ml: float) -> CommandResult:
        self.advance()
        now = self.clock.now_ns()
        if code == CommandCode.START:
            if self.state not in STARTABLE_STATES:
                return CommandResult.REFUSED_STATE
            if not self.profile.min_volume_ml <= volume_ml <= self.profile.max_volume_ml:
                return CommandResult.REFUSED_VOLUME
            self.requested_volume_ml = volume_ml
            self.state = StationState.PRIMING
            self._phase_end_ns = now + int(self.profile.priming_s * NS_PER_S)
            return CommandResult.ACCEPTED
        if code == CommandCode.ABORT:
            if self.state is StationState.PRIMING:
                self.state = StationState.IDLE
                return CommandResult.ACCEPTED
            if self.state is StationState.ELUTING:
                self._finish(now, self._progress(now))
                self.state = StationState.DONE
                return CommandResult.ACCEPTED
            return CommandResult.REFUSED_STATE
        if code == CommandCode.ACK_FAULT:
            if self.state is not StationState.FAULT:
                return CommandResult.REFUSED_STATE
            self.state = StationState.IDLE
            self.fault_code = FaultCode.NONE
            return CommandResult.ACCEPTED
        return CommandResult.UNKNOWN_COMMAND

    def raise_fault(self, code: FaultCode) -> None:
        """Put the station into fault, as a pressure switch or valve sensor would."""
        self.advance()
        if self.state is StationState.ELUTING:
            now = self.clock.now_ns()
            self._finish(now, self._progress(now))
        self.state = StationState.FAULT
        self.fault_code = code

    def outputs(self) -> int:
        on: set[DiscreteInput] = set()
        if self.state is StationState.PRIMING:
            on |= {DiscreteInput.VALVE_ELUENT, DiscreteInput.VALVE_WASTE, DiscreteInput.PUMP}
        elif self.state is StationState.ELUTING:
            on |= {DiscreteInput.VALVE_ELUENT, DiscreteInput.VALVE_PRODUCT, DiscreteInput.PUMP}
        elif self.state is StationState.FAULT:
            on.add(DiscreteInput.FAULT)
        return sum(1 << bit for bit in on)

    def line_dose_rate_usv_h(self, now_ns: int) -> float:
        if self.state is not StationState.ELUTING:
            return self.profile.line_dose_rate_usv_h(0.0)
        in_line = self.column.preview(now_ns, self.requested_volume_ml, self._progress(now_ns)).daughter_bq
        return self.profile.line_dose_rate_usv_h(in_line)

    def status(self) -> StationStatus:
        """The input registers now: times as the station's clock reads them (`StationClock.displayed_ns`)."""
        now = self.clock.now_ns()
        shown = self.clock.displayed_ns
        last = self.last
        return StationStatus(
            model=self.identity.model,
            serial=self.identity.serial,
            firmware=self.identity.firmware,
            generator_id=self.column.generator_id,
            parent_nuclide=self.profile.parent,
            daughter_nuclide=self.profile.daughter,
            cal_activity_bq=self.column.parent_cal_bq,
            cal_time_ns=self.column.cal_time_ns,
            state=self.state,
            fault_code=int(self.fault_code),
            outputs=self.outputs(),
            elution_counter=self.elution_counter,
            eluate_activity_bq=last.outcome.daughter_bq if last else 0.0,
            eluate_volume_ml=last.outcome.volume_ml if last else 0.0,
            eluate_parent_bq=last.outcome.parent_bq if last else 0.0,
            start_ns=shown(last.start_ns) if last else 0,
            end_ns=shown(last.outcome.end_ns) if last else 0,
            requested_volume_ml=self.requested_volume_ml,
            line_dose_rate_usv_h=self.line_dose_rate_usv_h(now),
            clock_ns=shown(now),
            cmd_ack_seq=self.cmd_ack_seq,
            cmd_ack_code=self.cmd_ack_code,
            cmd_result=int(self.cmd_result),
            eluate_peak_dose_rate_usv_h=last.peak_dose_rate_usv_h if last else 0.0,
            counter_epoch_ns=self.counter_epoch_ns,
        )


class _Receiver(Protocol):
    """What the pty transport calls; pymodbus' ModbusProtocol has it, though its asyncio.BaseProtocol base does not."""

    def data_received(self, data: bytes) -> None: ...


class _PtyTransport(asyncio.Transport):
    """The master side of a pty as an asyncio transport, so a pymodbus server protocol can sit on it.

    pymodbus' serial server opens a port by name, but a pty master has no name; this adapter
    hands the master fd's bytes to the protocol and writes its replies back. A reply the pty
    cannot take at once (nobody reading the slave) is dropped, as on a real RS-485 line.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, protocol: _Receiver) -> None:
        super().__init__()
        self._loop = loop
        self._fd = fd
        self._protocol = protocol
        self._closing = False
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._read_ready)

    def _read_ready(self) -> None:
        try:
            data = os.read(self._fd, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # EIO while no process holds the slave open
            return
        if data:
            self._protocol.data_received(data)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if data and not self._closing:
            with contextlib.suppress(BlockingIOError):
                os.write(self._fd, data)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._loop.remove_reader(self._fd)


class ElutionStationSimulator:
    """A StationModel served over Modbus, with fault injection; one transport per instance."""

    def __init__(self, model: StationModel, *, device_id: int = 1, word_order: WordOrder = WordOrder.ABCD) -> None:
        self.model = model
        self.device_id = device_id
        self.word_order = word_order
        self._server: ModbusTcpServer | ModbusSerialServer | None = None
        self._pty_fds: tuple[int, int] | None = None
        self._exception_code: ExcCodes | None = None
        self._exceptions_left = 0
        self._silent_replies_left = 0
        self._command_replies_to_lose = 0
        self._lose_by_disconnect = False
        self._silent_after_lost_reply = 0
        #: Set by a command write whose reply is to be lost; consumed when that reply is sent.
        self._lose_next_reply = False
        self._ignore_commands = False
        self._input_overrides: dict[int, list[int]] = {}
        #: Last written holding registers (the coil commands take their volume from here).
        self._holding = [0] * HOLDING_REGISTERS.count
        self.requests_seen = 0

    # ---- datastore -------------------------------------------------------------------------

    def _device(self) -> SimDevice:
        blocks = (
            [SimData(0, count=COILS.count, values=False, datatype=DataType.BITS)],
            [SimData(0, count=DISCRETE_INPUTS.count, values=False, datatype=DataType.BITS)],
            [SimData(0, count=HOLDING_REGISTERS.count, values=0, datatype=DataType.REGISTERS)],
            [SimData(0, count=INPUT_REGISTERS.count, values=0, datatype=DataType.REGISTERS, readonly=True)],
        )
        return SimDevice(self.device_id, simdata=blocks, action=self._on_request)

    async def _on_request(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """pymodbus SimDevice action: runs before every request touches `registers` (the addressed block)."""
        self.requests_seen += 1
        if self._exceptions_left and self._exception_code is not None:
            self._exceptions_left -= 1
            return self._exception_code
        self.model.advance()
        if function_code == READ_INPUT_REGISTERS:
            block = encode_status(self.model.status(), self.word_order)
            for start, words in self._input_overrides.items():
                block[start : start + len(words)] = words
            registers[: INPUT_REGISTERS.count] = block
        elif function_code == READ_DISCRETE_INPUTS:
            registers[0] = self.model.outputs()
        elif function_code in HOLDING_WRITES and values is not None:
            self._holding_write(address, registers, [int(v) for v in values])
            if self._command_replies_to_lose:
                self._command_replies_to_lose -= 1
                self._lose_next_reply = True
        elif function_code in COIL_WRITES and values is not None:
            self._coil_write(address, values)
        return None

    def _holding_write(self, address: int, registers: list[int], values: list[int]) -> None:
        """A write that covers the sequence register is a command (a NaN volume is refused as out of range)."""
        merged = list(registers[: HOLDING_REGISTERS.count])
        merged[address : address + len(values)] = values
        self._holding = merged
        if address <= _CMD_SEQ < address + len(values) and not self._ignore_commands:
            command = decode_command(merged, self.word_order)
            self.model.command(command.cmd_seq, command.cmd_code, command.cmd_volume_ml)

    def _coil_write(self, address: int, values: list[int] | list[bool]) -> None:
        """Momentary panel buttons: each set coil runs its command once and reads back as off."""
        volume = decode_command(self._holding, self.word_order).cmd_volume_ml
        for index, value in enumerate(values):
            code = COIL_COMMANDS.get(address + index)
            if value and code is not None:
                self.model.cmd_result = self.model.execute(code, volume)
                self.model.cmd_ack_code = code
            values[index] = False

    def _trace_packet(self, sending: bool, packet: bytes) -> bytes:
        if sending and self._lose_next_reply:
            self._lose_next_reply = False
            self._silent_replies_left = self._silent_after_lost_reply
            if self._lose_by_disconnect:
                asyncio.get_running_loop().call_soon(self.drop_connections)
            return b""
        if sending and self._silent_replies_left:
            self._silent_replies_left -= 1
            return b""
        return packet

    # ---- transports ------------------------------------------------------------------------

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 0, *, rtu_framing: bool = False) -> tuple[str, int]:
        """Serve Modbus TCP (or RTU frames over TCP, as a serial device server would); returns (host, port)."""
        self._require_stopped()
        server = ModbusTcpServer(
            self._device(),
            framer=FramerType.RTU if rtu_framing else FramerType.SOCKET,
            address=(host, port),
            trace_packet=self._trace_packet,
        )
        return await self._serve_in_background(server)

    async def _serve_in_background(self, server: ModbusTcpServer) -> tuple[str, int]:
        await server.serve_forever(background=True)
        self._server = server
        bound = server.transport.sockets[0].getsockname()  # type: ignore[attr-defined]
        return bound[0], bound[1]

    async def start_tls(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        ca_file: Path | str,
        cert_file: Path | str,
        key_file: Path | str,
    ) -> tuple[str, int]:
        """Serve MODBUS/TCP Security: TLS with `cert_file`, answering only clients whose certificate `ca_file` verifies.

        A client without a certificate, with one from another CA, or speaking plain Modbus TCP
        is dropped before any request reaches the station. Returns (host, port).
        """
        self._require_stopped()
        server = ModbusTlsServer(
            self._device(),
            framer=FramerType.TLS,
            address=(host, port),
            sslctx=modbus_tls_context("server", ca_file, cert_file, key_file),
            trace_packet=self._trace_packet,
        )
        return await self._serve_in_background(server)

    async def start_rtu_pty(self) -> str:
        """Serve Modbus RTU on a new pty; returns the slave path for the client (e.g. /dev/pts/7)."""
        self._require_stopped()
        master, slave = pty.openpty()
        tty.setraw(slave)
        path = os.ttyname(slave)
        server = ModbusSerialServer(self._device(), framer=FramerType.RTU, port=path, trace_packet=self._trace_packet)
        protocol = server.handle_new_connection()
        protocol.connection_made(_PtyTransport(asyncio.get_running_loop(), master, protocol))
        self._server = server
        self._pty_fds = (master, slave)
        return path

    def _require_stopped(self) -> None:
        if self._server is not None:
            raise RuntimeError("simulator already serving; one transport per simulator instance")

    async def stop(self) -> None:
        if self._server is None:
            return
        for connection in list(self._server.active_connections.values()):
            connection.close()
        await self._server.shutdown()
        self._server = None
        if self._pty_fds is not None:
            for fd in self._pty_fds:
                os.close(fd)
            self._pty_fds = None

    # ---- fault injection -------------------------------------------------------------------

    def inject_exception(self, code: ExcCodes = ExcCodes.DEVICE_FAILURE, count: int = 1) -> None:
        """Answer the next `count` requests with a Modbus exception response."""
        self._exception_code = code
        self._exceptions_left = count

    def inject_silence(self, count: int = 1) -> None:
        """Process but do not answer the next `count` requests (the client times out)."""
        self._silent_replies_left = count

    def lose_command_replies(self, count: int = 1, *, disconnect: bool = False, silent_after: int = 0) -> None:
        """Carry out the next `count` holding-register writes but lose their replies.

        The command runs and is acknowledged in the input registers, as when a reply frame is
        corrupted on the line. With `disconnect` the TCP connection also drops right after, as
        when a switch port or serial device server resets mid-exchange; with `silent_after` the
        station then leaves that many further requests unanswered, as a controller board that
        hangs right after acting on a command.
        """
        if disconnect and self._pty_fds is not None:
            raise RuntimeError("a pty has no connection to drop; lose the reply without disconnect")
        self._command_replies_to_lose = count
        self._lose_by_disconnect = disconnect
        self._silent_after_lost_reply = silent_after

    def power_cycle(self) -> None:
        """Switch the station off and on: connections drop and its counter starts again (StationModel.restart)."""
        if self._pty_fds is None:
            self.drop_connections()
        self.model.restart()

    def drop_connections(self) -> None:
        """Close every client TCP connection now, as a station reboot or a pulled network cable does."""
        if self._pty_fds is not None:
            raise RuntimeError("a pty has no connection to drop; use inject_silence() for a dead serial line")
        if self._server is None:
            return
        for connection in list(self._server.active_connections.values()):
            connection.close()

    def override_input_registers(self, overrides: dict[int, list[int]]) -> None:
        """Serve these raw words at these input-register addresses (a failing ADC, a firmware bug)
        instead of what the model says, until called again with {}."""
        count = INPUT_REGISTERS.count
        for start, words in overrides.items():
            if start < 0 or start + len(words) > count or not all(0 <= w <= 0xFFFF for w in words):
                raise ValueError(f"override at {start} does not fit the {count}-register block as 16-bit words")
        self._input_overrides = {start: list(words) for start, words in overrides.items()}

    def set_stuck(self, stuck: bool = True) -> None:
        """Freeze the state machine: the station keeps reporting its current state forever."""
        self.model.stuck = stuck

    def ignore_commands(self, ignore: bool = True) -> None:
        """Accept command writes on the wire but never act on them, like a hung controller board."""
        self._ignore_commands = ignore

    def raise_fault(self, code: FaultCode = FaultCode.OVERPRESSURE) -> None:
        self.model.raise_fault(code)

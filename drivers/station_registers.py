"""The generator elution station's Modbus register map (version 2), as one declarative table.

Why one table: the driver's decoder, the encoders, the simulator's datastore and the register
tables in docs/elution-station-registers.md are all derived from `REGISTERS`, so a register
cannot move or change type in one of them only. tests/test_station_registers.py fails when the
doc's tables differ from `render_markdown()`; `python -m hotlab.drivers.station_registers`
prints them.

Addresses are PDU addresses (0-based, as on the wire); tools that count from 1 (mbpoll without
-0, "3x0001" notation) add one.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

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
from hotlab.drivers.records import FrameError
from hotlab.physics.utc_time import NS_PER_S as NS_PER_S  # re-exported until its importers take it from physics

NS_PER_MS = 1_000_000

#: 2 added input register `counter_epoch_ns` after the version 1 block; no address of version 1 moved.
REGISTER_MAP_VERSION = 2


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


class DiscreteInput(enum.IntEnum):
    """Discrete-input addresses; the same bits are in input register `outputs`."""

    VALVE_ELUENT = 0
    VALVE_WASTE = 1
    VALVE_PRODUCT = 2
    PUMP = 3
    FAULT = 4


#: Nuclide codes in the parent and daughter registers (vendor enumeration).
NUCLIDE_CODES: dict[int, str] = {
    1: "Ge-68",
    2: "Ga-68",
    3: "Mo-99",
    4: "Tc-99m",
    5: "Sr-82",
    6: "Rb-82",
}
NUCLIDE_NUMBERS: dict[str, int] = {name: code for code, name in NUCLIDE_CODES.items()}


@dataclass(frozen=True, slots=True)
class StationStatus:
    """Everything in the input-register block, decoded into SI-ish units (Bq, mL, ns, uSv/h).

    Each field is the input register of the same name, which is how the codec pairs them.
    """

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
    counter_epoch_ns: int

    def output_on(self, output: DiscreteInput) -> bool:
        return bool(self.outputs >> output & 1)


@dataclass(frozen=True, slots=True)
class CommandWords:
    """A command as the holding registers hold it; the code stays raw so an unknown one reaches the station."""

    cmd_seq: int
    cmd_code: int
    cmd_volume_ml: float


# --------------------------------------------------------------------------------------------
# What a table entry says
# --------------------------------------------------------------------------------------------


class RegisterType(enum.Enum):
    """The four Modbus data tables (Modbus Application Protocol v1.1b3, section 4.3)."""

    INPUT = ("input register", "Input registers (function code 04)", False)
    DISCRETE_INPUT = ("discrete input", "Discrete inputs (function code 02)", False)
    HOLDING = ("holding register", "Holding registers (function codes 03, 06, 16)", True)
    COIL = ("coil", "Coils (function codes 01, 05, 15)", True)

    def __init__(self, label: str, title: str, writable: bool) -> None:
        self.label = label
        self.title = title
        self.writable = writable

    @property
    def holds_bits(self) -> bool:
        return self in (RegisterType.DISCRETE_INPUT, RegisterType.COIL)


class DataType(enum.Enum):
    """How a register's words carry a value, and what the value is in Python."""

    #: A coil or discrete input.
    BIT = enum.auto()
    UINT16 = enum.auto()
    #: A uint16 standing for one of the register's `codes`; an unknown code is a bad frame.
    CODE = enum.auto()
    UINT32 = enum.auto()
    #: IEEE 754 binary32 times the register's `scale`.
    FLOAT32 = enum.auto()
    #: uint32 epoch seconds; integer epoch nanoseconds in Python.
    EPOCH_S = enum.auto()
    #: uint32 epoch seconds and a uint16 of milliseconds (0-999): millisecond resolution
    #: without a 64-bit type, good until 2106. Integer epoch nanoseconds in Python.
    EPOCH_MS = enum.auto()
    #: ASCII, two characters per register, NUL-padded; the register's `length` says how many.
    STRING = enum.auto()

    @property
    def width(self) -> int:
        """Registers taken; 0 for STRING, whose entries give their own length."""
        match self:
            case DataType.STRING:
                return 0
            case DataType.UINT32 | DataType.FLOAT32 | DataType.EPOCH_S:
                return 2
            case DataType.EPOCH_MS:
                return 3
        return 1


@dataclass(frozen=True, slots=True)
class Codes:
    """What the values of a coded register stand for; `what` names them in error messages."""

    what: str
    meanings: Mapping[int, object]

    @classmethod
    def of(cls, what: str, enumeration: type[enum.IntEnum]) -> Codes:
        return cls(what, {int(member): member for member in enumeration})

    def meaning(self, code: int, where: str) -> object:
        try:
            return self.meanings[code]
        except KeyError:
            raise RegisterValueError(f"unknown {self.what} {code} at {where}") from None

    def code(self, meaning: object) -> int:
        for code, known in self.meanings.items():
            if known == meaning:
                return code
        raise KeyError(meaning)

    def describe(self) -> str:
        """'0 idle, 1 priming, …' for the doc."""
        return ", ".join(f"{code} {_label(meaning)}" for code, meaning in self.meanings.items())


def _label(meaning: object) -> str:
    return meaning.name.lower().replace("_", " ") if isinstance(meaning, enum.Enum) else str(meaning)


@dataclass(frozen=True, slots=True)
class Register:
    """One entry of the map: where a value sits on the wire, how it is encoded, and what it means."""

    #: For input registers, the StationStatus field it fills; for holding registers, the CommandWords field.
    name: str
    kind: RegisterType
    address: int
    dtype: DataType
    description: str
    unit: str = ""
    #: Physical value = raw float32 x scale (only float32 quantities are scaled).
    scale: float = 1.0
    codes: Codes | None = None
    #: Registers taken by a STRING.
    length: int = 0

    @property
    def count(self) -> int:
        return self.dtype.width or self.length

    @property
    def end(self) -> int:
        return self.address + self.count

    @property
    def type_name(self) -> str:
        """The wire type, as the doc names it."""
        match self.dtype:
            case DataType.UINT16 | DataType.CODE:
                return "uint16"
            case DataType.UINT32 | DataType.EPOCH_S:
                return "uint32"
            case DataType.EPOCH_MS:
                return "uint32 + uint16"
            case DataType.STRING:
                return f"string[{2 * self.length}]"
        return self.dtype.name.lower()

    @property
    def word_order(self) -> str:
        """'station' where the station's configured word order applies, 'bytes' where only its byte swap does."""
        if self.dtype is DataType.STRING:
            return "bytes"
        return "station" if self.count > 1 else "—"

    @property
    def access(self) -> str:
        return "R/W" if self.kind.writable else "R"

    @property
    def where(self) -> str:
        return f"{self.kind.label} {self.address}"


def _output(output: DiscreteInput, description: str) -> Register:
    return Register(output.name.lower(), RegisterType.DISCRETE_INPUT, int(output), DataType.BIT, description)


def _button(command: CommandCode, address: int, description: str) -> Register:
    """A coil that runs `command` once when set; it is named after the command (see COIL_COMMANDS)."""
    return Register(command.name.lower(), RegisterType.COIL, address, DataType.BIT, description)


# Short names, so that each entry of the table fits on one line.
_IN, _HOLD = RegisterType.INPUT, RegisterType.HOLDING
_U16, _U32, _F32, _CODE = DataType.UINT16, DataType.UINT32, DataType.FLOAT32, DataType.CODE
_STR, _TIME, _TIME_UNIT = DataType.STRING, DataType.EPOCH_MS, "s + ms (epoch)"
_DATE, _DATE_UNIT = DataType.EPOCH_S, "s (epoch)"
_NUCLIDE = Codes("nuclide code", NUCLIDE_CODES)
_COMMAND = Codes.of("command", CommandCode)
_RESULT = Codes.of("command result", CommandResult)

# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------

REGISTERS: tuple[Register, ...] = (
    # Input registers: identity, generator and live state, read in one request. The "last
    # elution" registers change together when an elution ends, so one read is consistent.
    Register("map_version", _IN, 0, _U16, f"Register map version ({REGISTER_MAP_VERSION})"),
    Register("model", _IN, 1, _STR, "Station model", length=8),
    Register("serial", _IN, 9, _STR, "Station serial number", length=8),
    Register("firmware", _IN, 17, _STR, "Firmware version", length=4),
    Register("generator_id", _IN, 21, _STR, "Generator id (the column's serial number)", length=8),
    Register("parent_nuclide", _IN, 29, _CODE, "Parent nuclide", codes=_NUCLIDE),
    Register("daughter_nuclide", _IN, 30, _CODE, "Daughter nuclide", codes=_NUCLIDE),
    Register("cal_activity_bq", _IN, 31, _F32, "Parent activity at calibration (generator certificate)", "Bq"),
    Register("cal_time_ns", _IN, 33, _DATE, "Calibration date", _DATE_UNIT),
    Register("state", _IN, 35, _CODE, "State", codes=Codes.of("station state", StationState)),
    Register("fault_code", _IN, 36, _U16, "Fault code", codes=Codes.of("fault code", FaultCode)),
    Register("outputs", _IN, 37, _U16, "Outputs: bit n is discrete input n", "bits"),
    Register("elution_counter", _IN, 38, _U32, "Elution counter (finished elutions of this generator)"),
    Register("eluate_activity_bq", _IN, 40, _F32, "Last eluate: daughter activity at end of elution", "Bq"),
    Register("eluate_volume_ml", _IN, 42, _F32, "Last eluate: volume", "mL"),
    Register("eluate_parent_bq", _IN, 44, _F32, "Last eluate: parent activity (breakthrough)", "Bq"),
    Register("start_ns", _IN, 46, _TIME, "Last elution: start (eluent reaches the column, after priming)", _TIME_UNIT),
    Register("end_ns", _IN, 49, _TIME, "Last elution: end", _TIME_UNIT),
    Register("requested_volume_ml", _IN, 52, _F32, "Requested volume of the running or last elution", "mL"),
    Register("line_dose_rate_usv_h", _IN, 54, _F32, "Dose rate at the eluate line detector", "µSv/h"),
    Register("clock_ns", _IN, 56, _TIME, "Station clock when the block was read", _TIME_UNIT),
    Register("cmd_ack_seq", _IN, 59, _U16, "Sequence number of the last executed command (0 = none yet)"),
    Register("cmd_ack_code", _IN, 60, _U16, "Code of the last executed command", codes=_COMMAND),
    Register("cmd_result", _IN, 61, _U16, "Result of the last executed command", codes=_RESULT),
    Register("eluate_peak_dose_rate_usv_h", _IN, 62, _F32, "Last elution: peak of `line_dose_rate_usv_h`", "µSv/h"),
    # Version 2. With `serial`, it tells a counter that started again from one that went on.
    Register("counter_epoch_ns", _IN, 64, _DATE, "When `elution_counter` last restarted from 0", _DATE_UNIT),
    # Discrete inputs: the bits of input register `outputs`, for panels and PLCs that prefer bits.
    _output(DiscreteInput.VALVE_ELUENT, "Eluent valve open"),
    _output(DiscreteInput.VALVE_WASTE, "Waste valve open (priming path)"),
    _output(DiscreteInput.VALVE_PRODUCT, "Product valve open (to the eluate vial)"),
    _output(DiscreteInput.PUMP, "Pump running"),
    _output(DiscreteInput.FAULT, "Fault active"),
    # Holding registers: one sequenced command, written in one FC16 request.
    Register("cmd_seq", _HOLD, 0, _U16, "Command sequence number (1–65535)"),
    Register("cmd_code", _HOLD, 1, _U16, "Command", codes=_COMMAND),
    Register("cmd_volume_ml", _HOLD, 2, _F32, "Requested eluate volume (start only)", "mL"),
    # Coils: momentary panel buttons, self-clearing, not sequenced.
    _button(CommandCode.START, 0, "Start elution with the volume in holding register `cmd_volume_ml`"),
    _button(CommandCode.ABORT, 1, "Abort"),
    _button(CommandCode.ACK_FAULT, 2, "Acknowledge fault"),
)


@dataclass(frozen=True, slots=True)
class Block:
    """One register type's entries of REGISTERS: addresses 0 to count - 1, looked up by name."""

    kind: RegisterType
    registers: tuple[Register, ...]
    count: int

    @classmethod
    def of(cls, kind: RegisterType) -> Block:
        registers = tuple(register for register in REGISTERS if register.kind is kind)
        return cls(kind, registers, max(register.end for register in registers))

    def __getitem__(self, name: str) -> Register:
        for register in self.registers:
            if register.name == name:
                return register
        raise KeyError(f"no {self.kind.label} named {name!r}")

    def __iter__(self) -> Iterator[Register]:
        return iter(self.registers)


INPUT_REGISTERS = Block.of(RegisterType.INPUT)
DISCRETE_INPUTS = Block.of(RegisterType.DISCRETE_INPUT)
HOLDING_REGISTERS = Block.of(RegisterType.HOLDING)
COILS = Block.of(RegisterType.COIL)
#: In the order the doc lists them.
BLOCKS = (INPUT_REGISTERS, DISCRETE_INPUTS, HOLDING_REGISTERS, COILS)

#: Coil address -> the command that setting it runs once.
COIL_COMMANDS: dict[int, CommandCode] = {coil.address: CommandCode[coil.name.upper()] for coil in COILS}

_MAP_VERSION = INPUT_REGISTERS["map_version"]
_STATUS_REGISTERS = tuple(register for register in INPUT_REGISTERS if register is not _MAP_VERSION)

# --------------------------------------------------------------------------------------------
# Codec
# --------------------------------------------------------------------------------------------

#: A register's value in Python: an int, float, str or a code's meaning, as its data type says.
#: The table is data, so the codec is typed loosely here; the tests round-trip every register.
RegisterValue: TypeAlias = Any


def _time_to_registers(time_ns: int, order: WordOrder) -> list[int]:
    """Epoch nanoseconds as uint32 seconds + uint16 milliseconds (truncated; negative times as 0)."""
    seconds, rest = divmod(max(int(time_ns), 0), NS_PER_S)
    return uint32_to_registers(seconds, order) + [rest // NS_PER_MS]


def _registers_to_time(registers: Sequence[int], order: WordOrder) -> int:
    if registers[2] > 999:
        raise RegisterValueError(f"millisecond register holds {registers[2]}, above 999")
    return registers_to_uint32(registers[:2], order) * NS_PER_S + registers[2] * NS_PER_MS


def encode_value(register: Register, value: RegisterValue, order: WordOrder) -> list[int]:
    """The words of `register` holding `value`, as a station with word order `order` serves them."""
    match register.dtype:
        case DataType.UINT32:
            return uint32_to_registers(value, order)
        case DataType.FLOAT32:
            return float32_to_registers(value / register.scale, order)
        case DataType.EPOCH_S:
            return uint32_to_registers(value // NS_PER_S, order)
        case DataType.EPOCH_MS:
            return _time_to_registers(value, order)
        case DataType.STRING:
            return string_to_registers(value, register.length, order)
        case DataType.CODE:
            assert register.codes is not None
            return [register.codes.code(value)]
    return [int(value)]


def decode_value(register: Register, block: Sequence[int], order: WordOrder) -> RegisterValue:
    """The value of `register` in `block`, the words of its whole register type from address 0."""
    words = block[register.address : register.end]
    match register.dtype:
        case DataType.UINT32:
            return registers_to_uint32(words, order)
        case DataType.FLOAT32:
            return registers_to_float32(words, order) * register.scale
        case DataType.EPOCH_S:
            return registers_to_uint32(words, order) * NS_PER_S
        case DataType.EPOCH_MS:
            return _registers_to_time(words, order)
        case DataType.STRING:
            return registers_to_string(words, order)
        case DataType.CODE:
            assert register.codes is not None
            return register.codes.meaning(words[0], register.where)
    return words[0]


def _encode_block(block: Block, values: object, order: WordOrder) -> list[int]:
    """The words of `block`, each register taking the attribute of `values` of its name."""
    words = [0] * block.count
    for register in block:
        value = REGISTER_MAP_VERSION if register is _MAP_VERSION else getattr(values, register.name)
        words[register.address : register.end] = encode_value(register, value, order)
    return words


def encode_status(status: StationStatus, order: WordOrder) -> list[int]:
    """The input-register block for `status`, as a station with word order `order` serves it."""
    return _encode_block(INPUT_REGISTERS, status, order)


def decode_status(regs: Sequence[int], order: WordOrder) -> StationStatus:
    """Decode the input-register block; anything outside the map raises FrameError with the raw registers."""
    if len(regs) != INPUT_REGISTERS.count:
        raise FrameError(f"input-register block has {len(regs)} registers, expected {INPUT_REGISTERS.count}")
    try:
        version = decode_value(_MAP_VERSION, regs, order)
        if version != REGISTER_MAP_VERSION:
            raise RegisterValueError(f"register map version {version}, driver speaks {REGISTER_MAP_VERSION}")
        fields: dict[str, RegisterValue] = {}
        for register in _STATUS_REGISTERS:
            value = decode_value(register, regs, order)
            # Every float in the map is a physical quantity; a NaN or infinity is a station fault
            # or a word-order mistake, and would also break the outbox's strict JSON downstream.
            if isinstance(value, float) and not math.isfinite(value):
                raise RegisterValueError(f"non-finite float32 {value!r} at {register.where}")
            fields[register.name] = value
        return StationStatus(**fields)
    except RegisterValueError as exc:
        raise FrameError(f"bad elution-station status block ({exc})", bytes(str(list(regs)), "ascii")) from None


def encode_command(seq: int, code: CommandCode, volume_ml: float, order: WordOrder) -> list[int]:
    """The holding-register block for one command, written in one request from address 0."""
    return _encode_block(HOLDING_REGISTERS, CommandWords(seq, int(code), volume_ml), order)


def decode_command(regs: Sequence[int], order: WordOrder) -> CommandWords:
    """The command in a holding-register block; a NaN volume stays NaN, for the station to refuse."""
    return CommandWords(**{register.name: decode_value(register, regs, order) for register in HOLDING_REGISTERS})


# --------------------------------------------------------------------------------------------
# The doc's tables
# --------------------------------------------------------------------------------------------

_COLUMNS = ("Address", "Name", "Type", "Scale", "Word order", "Access", "Unit", "Description")


def _row(register: Register) -> str:
    span = str(register.address) if register.count == 1 else f"{register.address}–{register.end - 1}"
    scale = f"{register.scale:g}" if register.dtype is DataType.FLOAT32 else "—"
    description = register.description
    if register.codes is not None:
        description += f": {register.codes.describe()}"
    cells = (span, f"`{register.name}`", register.type_name, scale, register.word_order, register.access)
    return "| " + " | ".join((*cells, register.unit or "—", description)) + " |"


def render_markdown() -> str:
    """The register tables of docs/elution-station-registers.md, between its `registers` markers."""
    sections = []
    for block in BLOCKS:
        size = f"{block.count} {'bits' if block.kind.holds_bits else 'registers'}"
        lines = [
            f"### {block.kind.title} — {size}",
            "",
            "| " + " | ".join(_COLUMNS) + " |",
            "|---:|" + "---|" * (len(_COLUMNS) - 1),
            *(_row(register) for register in block),
        ]
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + "\n"


if __name__ == "__main__":
    print(render_markdown(), end="")

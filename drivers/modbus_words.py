"""32-bit numbers and strings <-> 16-bit Modbus registers, in any of the four byte/word orders.

Modbus (Modbus Application Protocol v1.1b3, section 4.2) only defines 16-bit big-endian
registers; how a 32-bit value is split over two of them is left to each vendor. Four
layouts occur in the field, named by where the bytes A B C D of the big-endian value
(A = most significant) end up in register 0 and register 1:

    ABCD  [AB, CD]  big-endian words, big-endian bytes (pymodbus word_order="big", mbpoll -B)
    CDAB  [CD, AB]  word-swapped, the mbpoll default and common on PLCs
    BADC  [BA, DC]  byte-swapped within each word
    DCBA  [DC, BA]  fully little-endian

A station's order is a configuration value, so both the driver and the simulator use these
functions instead of hard-coding one. Strings are byte sequences, not numbers: word order does
not apply to them, but the byte-swapped orders (BADC, DCBA) swap the two characters of each
register, which is what such devices do to text too.
"""

from __future__ import annotations

import enum
import math
import struct
from collections.abc import Sequence

from hotlab.errors import InputError


class WordOrder(enum.Enum):
    """Where bytes A B C D of a big-endian 32-bit value sit in two registers."""

    ABCD = "ABCD"
    CDAB = "CDAB"
    BADC = "BADC"
    DCBA = "DCBA"

    @property
    def swaps_bytes(self) -> bool:
        return self in (WordOrder.BADC, WordOrder.DCBA)

    @property
    def swaps_words(self) -> bool:
        return self in (WordOrder.CDAB, WordOrder.DCBA)


class RegisterValueError(InputError):
    """A value does not fit its register type, or registers do not hold a valid value."""


UINT16_MAX = 0xFFFF
UINT32_MAX = 0xFFFF_FFFF


def _swap16(word: int) -> int:
    return ((word & 0xFF) << 8) | (word >> 8)


def _check_registers(registers: Sequence[int], expected: int, what: str) -> None:
    if len(registers) != expected:
        raise RegisterValueError(f"{what} needs {expected} registers, got {len(registers)}")
    for register in registers:
        if not isinstance(register, int) or not 0 <= register <= UINT16_MAX:
            raise RegisterValueError(f"register value {register!r} is not a 16-bit unsigned integer")


def _bytes_to_registers(big_endian: bytes, order: WordOrder) -> list[int]:
    words = [int.from_bytes(big_endian[i : i + 2], "big") for i in range(0, len(big_endian), 2)]
    if order.swaps_words:
        words.reverse()
    if order.swaps_bytes:
        words = [_swap16(word) for word in words]
    return words


def _registers_to_bytes(registers: Sequence[int], order: WordOrder) -> bytes:
    words = list(registers)
    if order.swaps_bytes:
        words = [_swap16(word) for word in words]
    if order.swaps_words:
        words.reverse()
    return b"".join(word.to_bytes(2, "big") for word in words)


def float32_to_registers(value: float, order: WordOrder = WordOrder.ABCD) -> list[int]:
    """Encode an IEEE 754 binary32 value; finite values too large for float32 are refused."""
    value = float(value)
    if math.isfinite(value) and abs(value) > 3.4028234663852886e38:
        raise RegisterValueError(f"{value!r} is outside the float32 range")
    return _bytes_to_registers(struct.pack(">f", value), order)


def registers_to_float32(registers: Sequence[int], order: WordOrder = WordOrder.ABCD) -> float:
    _check_registers(registers, 2, "float32")
    return float(struct.unpack(">f", _registers_to_bytes(registers, order))[0])


def uint32_to_registers(value: int, order: WordOrder = WordOrder.ABCD) -> list[int]:
    if not isinstance(value, int) or not 0 <= value <= UINT32_MAX:
        raise RegisterValueError(f"{value!r} is not a 32-bit unsigned integer")
    return _bytes_to_registers(value.to_bytes(4, "big"), order)


def registers_to_uint32(registers: Sequence[int], order: WordOrder = WordOrder.ABCD) -> int:
    _check_registers(registers, 2, "uint32")
    return int.from_bytes(_registers_to_bytes(registers, order), "big")


def string_to_registers(text: str, register_count: int, order: WordOrder = WordOrder.ABCD) -> list[int]:
    """Encode ASCII text into exactly `register_count` registers, NUL-padded; too long is an error."""
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise RegisterValueError(f"{text!r} is not ASCII") from None
    if b"\x00" in raw:
        raise RegisterValueError(f"{text!r} contains a NUL character")
    capacity = 2 * register_count
    if len(raw) > capacity:
        raise RegisterValueError(f"{text!r} is {len(raw)} characters; {register_count} registers hold {capacity}")
    raw = raw.ljust(capacity, b"\x00")
    words = [int.from_bytes(raw[i : i + 2], "big") for i in range(0, capacity, 2)]
    return [_swap16(word) for word in words] if order.swaps_bytes else words


def registers_to_string(registers: Sequence[int], order: WordOrder = WordOrder.ABCD) -> str:
    """Decode NUL-padded ASCII; anything after the first NUL is padding and is dropped."""
    _check_registers(registers, len(registers), "string")
    words = [_swap16(word) for word in registers] if order.swaps_bytes else list(registers)
    raw = b"".join(word.to_bytes(2, "big") for word in words).split(b"\x00", 1)[0]
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise RegisterValueError(f"registers hold non-ASCII text {raw!r}") from None

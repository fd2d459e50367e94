"""Word-order conversions: known vectors, round trips, agreement with pymodbus, bad input."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymodbus.client import ModbusTcpClient

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

ORDERS = list(WordOrder)
FAST = settings(max_examples=150, deadline=None)

float32s = st.floats(width=32, allow_nan=False)
uint32s = st.integers(min_value=0, max_value=0xFFFF_FFFF)
ascii_texts = st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=127), max_size=16)


@pytest.mark.parametrize(
    ("order", "expected"),
    [
        (WordOrder.ABCD, [0x3F80, 0x0000]),
        (WordOrder.CDAB, [0x0000, 0x3F80]),
        (WordOrder.BADC, [0x803F, 0x0000]),
        (WordOrder.DCBA, [0x0000, 0x803F]),
    ],
)
def test_float_one_lands_where_each_order_says(order: WordOrder, expected: list[int]) -> None:
    assert float32_to_registers(1.0, order) == expected
    assert registers_to_float32(expected, order) == 1.0


@pytest.mark.parametrize(
    ("order", "expected"),
    [
        (WordOrder.ABCD, [0x1122, 0x3344]),
        (WordOrder.CDAB, [0x3344, 0x1122]),
        (WordOrder.BADC, [0x2211, 0x4433]),
        (WordOrder.DCBA, [0x4433, 0x2211]),
    ],
)
def test_uint32_byte_positions(order: WordOrder, expected: list[int]) -> None:
    assert uint32_to_registers(0x11223344, order) == expected


@FAST
@given(value=float32s, order=st.sampled_from(ORDERS))
def test_float32_round_trip(value: float, order: WordOrder) -> None:
    decoded = registers_to_float32(float32_to_registers(value, order), order)
    assert decoded == value or (value == 0 and decoded == 0)
    assert math.copysign(1, decoded) == math.copysign(1, value)


@FAST
@given(value=uint32s, order=st.sampled_from(ORDERS))
def test_uint32_round_trip(value: int, order: WordOrder) -> None:
    assert registers_to_uint32(uint32_to_registers(value, order), order) == value


@FAST
@given(text=ascii_texts, order=st.sampled_from(ORDERS))
def test_string_round_trip(text: str, order: WordOrder) -> None:
    registers = string_to_registers(text, 8, order)
    assert len(registers) == 8
    assert registers_to_string(registers, order) == text


@FAST
@given(value=float32s)
def test_big_and_word_swapped_agree_with_pymodbus(value: float) -> None:
    float32 = ModbusTcpClient.DATATYPE.FLOAT32
    assert ModbusTcpClient.convert_from_registers(float32_to_registers(value, WordOrder.ABCD), float32, "big") == value
    assert (
        ModbusTcpClient.convert_from_registers(float32_to_registers(value, WordOrder.CDAB), float32, "little") == value
    )


def test_float_rounds_to_nearest_float32() -> None:
    registers = float32_to_registers(0.1)
    assert registers_to_float32(registers) == struct.unpack(">f", struct.pack(">f", 0.1))[0]


def test_strings_swap_characters_in_byte_swapped_orders() -> None:
    assert string_to_registers("AB", 1, WordOrder.ABCD) == [0x4142]
    assert string_to_registers("AB", 1, WordOrder.DCBA) == [0x4241]


@pytest.mark.parametrize(
    "call",
    [
        lambda: uint32_to_registers(-1),
        lambda: uint32_to_registers(2**32),
        lambda: float32_to_registers(1e39),
        lambda: string_to_registers("too long for two", 2),
        lambda: string_to_registers("Ge-68 µ", 8),
        lambda: registers_to_float32([1]),
        lambda: registers_to_uint32([1, 70000]),
        lambda: registers_to_string([0xFFFF]),
    ],
)
def test_bad_values_raise_a_typed_error(call) -> None:
    with pytest.raises(RegisterValueError):
        call()

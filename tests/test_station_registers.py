"""The elution station's register table: its shape, the wire it pins, and the doc generated from it."""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hotlab.drivers.modbus_words import WordOrder
from hotlab.drivers.records import FrameError
from hotlab.drivers.station_registers import (
    BLOCKS,
    COIL_COMMANDS,
    COILS,
    DISCRETE_INPUTS,
    HOLDING_REGISTERS,
    INPUT_REGISTERS,
    NS_PER_S,
    REGISTERS,
    CommandCode,
    CommandWords,
    DataType,
    DiscreteInput,
    StationState,
    StationStatus,
    decode_command,
    decode_status,
    encode_command,
    encode_status,
    render_markdown,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "elution-station-registers.md"
GENERATED = re.compile(r"<!-- registers:begin -->\n(.*)<!-- registers:end -->", re.DOTALL)

#: Map version 1 as it is on the wire: (name, first address, registers) of every input register.
#: Changing any of these breaks every station and client in the field, so it is pinned here.
WIRE_V1 = [
    ("map_version", 0, 1),
    ("model", 1, 8),
    ("serial", 9, 8),
    ("firmware", 17, 4),
    ("generator_id", 21, 8),
    ("parent_nuclide", 29, 1),
    ("daughter_nuclide", 30, 1),
    ("cal_activity_bq", 31, 2),
    ("cal_time_ns", 33, 2),
    ("state", 35, 1),
    ("fault_code", 36, 1),
    ("outputs", 37, 1),
    ("elution_counter", 38, 2),
    ("eluate_activity_bq", 40, 2),
    ("eluate_volume_ml", 42, 2),
    ("eluate_parent_bq", 44, 2),
    ("start_ns", 46, 3),
    ("end_ns", 49, 3),
    ("requested_volume_ml", 52, 2),
    ("line_dose_rate_usv_h", 54, 2),
    ("clock_ns", 56, 3),
    ("cmd_ack_seq", 59, 1),
    ("cmd_ack_code", 60, 1),
    ("cmd_result", 61, 1),
    ("eluate_peak_dose_rate_usv_h", 62, 2),
]
#: Version 2 only appended the counter epoch: every version 1 address is where it was.
WIRE_V2 = [*WIRE_V1, ("counter_epoch_ns", 64, 2)]

STATUS = StationStatus(
    model="HL-ES100",
    serial="SIM-0001",
    firmware="1.4.2",
    generator_id="GE68-T-17",
    parent_nuclide="Ge-68",
    daughter_nuclide="Ga-68",
    cal_activity_bq=1.85e9,
    cal_time_ns=1_790_000_000 * NS_PER_S,
    state=StationState.DONE,
    fault_code=0,
    outputs=0b01101,
    elution_counter=70_000,
    eluate_activity_bq=1.2e9,
    eluate_volume_ml=5.0,
    eluate_parent_bq=120.0,
    start_ns=1_790_086_400_123_000_000,
    end_ns=1_790_086_430_456_000_000,
    requested_volume_ml=5.0,
    line_dose_rate_usv_h=0.25,
    clock_ns=1_790_086_500_789_000_000,
    cmd_ack_seq=41,
    cmd_ack_code=1,
    cmd_result=1,
    eluate_peak_dose_rate_usv_h=35.5,
    counter_epoch_ns=1_789_990_000 * NS_PER_S,
)

#: STATUS as the driver before the table served it, word by word, in the plainest and the most
#: swapped order; map version 2 and the counter epoch (1 789 990 000 s = 0x6AB11470) added by hand.
STATUS_WORDS = {
    WordOrder.ABCD: (
        "0002 484c 2d45 5331 3030 0000 0000 0000 0000 5349 4d2d 3030 3031 0000 0000 0000 "
        "0000 312e 342e 3200 0000 4745 3638 2d54 2d31 3700 0000 0000 0000 0001 0002 4edc "
        "8985 6ab1 3b80 0003 0000 000d 0001 1170 4e8f 0d18 40a0 0000 42f0 0000 6ab2 8d00 "
        "007b 6ab2 8d1e 01c8 40a0 0000 3e80 0000 6ab2 8d64 0315 0029 0001 0001 420e 0000 "
        "6ab1 1470"
    ),
    WordOrder.DCBA: (
        "0002 4c48 452d 3153 3030 0000 0000 0000 0000 4953 2d4d 3030 3130 0000 0000 0000 "
        "0000 2e31 2e34 0032 0000 4547 3836 542d 312d 0037 0000 0000 0000 0001 0002 8589 "
        "dc4e 803b b16a 0003 0000 000d 7011 0100 180d 8f4e 0000 a040 0000 f042 008d b26a "
        "007b 1e8d b26a 01c8 0000 a040 0000 803e 648d b26a 0315 0029 0001 0001 0000 0e42 "
        "7014 b16a"
    ),
}
COMMAND_WORDS = {WordOrder.ABCD: [41, 1, 0x40A0, 0], WordOrder.DCBA: [41, 1, 0, 0xA040]}


def test_the_doc_shows_the_tables_rendered_from_the_code() -> None:
    generated = GENERATED.search(DOC.read_text(encoding="utf-8"))
    assert generated is not None, f"{DOC.name} lost its registers:begin/end markers"
    assert generated.group(1) == render_markdown(), (
        f"{DOC.name} is out of date: replace its tables with `python -m hotlab.drivers.station_registers`"
    )


def test_python_m_prints_the_tables() -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "hotlab.drivers.station_registers"], capture_output=True, text=True, check=True
    )
    assert printed.stdout == render_markdown()


def test_every_block_runs_from_address_0_without_gaps_or_overlaps() -> None:
    assert sum(len(block.registers) for block in BLOCKS) == len(REGISTERS)
    for block in BLOCKS:
        starts = [register.address for register in block]
        ends = [0, *(register.end for register in block)][:-1]
        assert starts == ends, block.kind
        assert block.count == block.registers[-1].end
        assert len({register.name for register in block}) == len(block.registers)


def test_the_wire_layout_of_map_version_1_is_unchanged() -> None:
    assert [(r.name, r.address, r.count) for r in INPUT_REGISTERS] == WIRE_V2
    assert [(r.name, r.address, r.count) for r in HOLDING_REGISTERS] == [
        ("cmd_seq", 0, 1),
        ("cmd_code", 1, 1),
        ("cmd_volume_ml", 2, 2),
    ]
    assert [(r.name, r.address) for r in DISCRETE_INPUTS] == [(bit.name.lower(), bit.value) for bit in DiscreteInput]
    assert COIL_COMMANDS == {0: CommandCode.START, 1: CommandCode.ABORT, 2: CommandCode.ACK_FAULT}
    assert COILS.count == 3 and DISCRETE_INPUTS.count == 5


def test_registers_are_named_after_the_fields_they_fill() -> None:
    status_fields = [field.name for field in dataclasses.fields(StationStatus)]
    assert [r.name for r in INPUT_REGISTERS][1:] == status_fields
    assert [r.name for r in HOLDING_REGISTERS] == [field.name for field in dataclasses.fields(CommandWords)]


def test_only_float32_registers_are_scaled() -> None:
    """The codec applies `scale` to float32 values only; anywhere else it would be a silent lie in the doc."""
    assert all(r.scale == 1.0 for r in REGISTERS if r.dtype is not DataType.FLOAT32)


@pytest.mark.parametrize("order", list(STATUS_WORDS))
def test_status_and_command_words_are_those_served_before_the_table(order: WordOrder) -> None:
    words = [int(word, 16) for word in STATUS_WORDS[order].split()]
    assert encode_status(STATUS, order) == words
    assert decode_status(words, order) == STATUS
    assert encode_command(41, CommandCode.START, 5.0, order) == COMMAND_WORDS[order]
    assert decode_command(COMMAND_WORDS[order], order) == CommandWords(41, int(CommandCode.START), 5.0)


@pytest.mark.parametrize("order", list(WordOrder))
def test_every_field_round_trips_in_every_word_order(order: WordOrder) -> None:
    status = dataclasses.replace(STATUS, state=StationState.FAULT, fault_code=4, cmd_result=3, parent_nuclide="Mo-99")
    assert decode_status(encode_status(status, order), order) == status


def test_an_unknown_nuclide_code_is_a_bad_frame_naming_its_register() -> None:
    words = encode_status(STATUS, WordOrder.ABCD)
    words[INPUT_REGISTERS["daughter_nuclide"].address] = 7
    with pytest.raises(FrameError, match="unknown nuclide code 7 at input register 30"):
        decode_status(words, WordOrder.ABCD)


def test_a_nan_volume_reaches_the_station_to_be_refused() -> None:
    command = decode_command(encode_command(5, CommandCode.START, math.nan, WordOrder.CDAB), WordOrder.CDAB)
    assert command.cmd_seq == 5 and math.isnan(command.cmd_volume_ml)

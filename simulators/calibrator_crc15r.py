"""Simulated Capintec CRC-15R style calibrator answering `@A` (see drivers/crc15r.py for the wire format).

The nuclide is set "on the front panel": `select_on_panel` is what a test or the CLI calls.
"""

from __future__ import annotations

from hotlab.drivers.crc15r import UNIT_CODE_BY_NAME, checksum, wire_name
from hotlab.physics.units import ACTIVITY_UNITS
from hotlab.simulators.faults import Fault, FaultInjector
from hotlab.simulators.serial_host import RequestReplyDevice
from hotlab.simulators.source import CURIE_LADDER, SI_LADDER, IonChamber, auto_range, fixed_digits

SI_UNITS = tuple(unit for unit in SI_LADDER if unit in UNIT_CODE_BY_NAME)


def format_report(nuclide: str, activity_bq: float, ladder: tuple[str, ...] = SI_UNITS) -> bytes:
    """`A,<nuclide>,<unit code>,<value>` as the display shows it (auto-ranged, 4 digits)."""
    value, unit = auto_range(activity_bq, ladder, ACTIVITY_UNITS)
    return b"A,%s,%d,%s" % (wire_name(nuclide).encode("ascii"), UNIT_CODE_BY_NAME[unit], fixed_digits(value).encode())


def format_frame(body: bytes, *, terminator: bytes = b"\r\n", corrupt_checksum: bool = False) -> bytes:
    """Append `*HH` and the terminator; `corrupt_checksum` flips the checksum's lowest bit."""
    check = int(checksum(body), 16) ^ (0x01 if corrupt_checksum else 0)
    return body + b"*%02X" % check + terminator


class Crc15rSimulator(RequestReplyDevice):
    def __init__(
        self,
        chamber: IonChamber,
        faults: FaultInjector | None = None,
        *,
        curie_units: bool = False,
        terminator: bytes = b"\r\n",
    ) -> None:
        super().__init__(faults or FaultInjector())
        self.chamber = chamber
        self._ladder = CURIE_LADDER if curie_units else SI_UNITS
        self._terminator = terminator

    def select_on_panel(self, nuclide: str) -> None:
        self.chamber.select(nuclide)

    def take_request(self, buffer: bytearray) -> bytes | None:
        start = buffer.find(b"@")
        if start < 0:
            buffer.clear()
            return None
        del buffer[:start]
        if len(buffer) < 2:
            return None
        request = bytes(buffer[:2])
        del buffer[:2]
        return request

    def reply_to(self, request: bytes) -> bytes:
        if request == b"@A":
            body = format_report(self.chamber.selected, self.faults.hold(self.chamber.measure_bq), self._ladder)
        else:
            body = b"E,UNKNOWN REQUEST"
        corrupt = self.faults.fires(Fault.BAD_CHECKSUM)
        return format_frame(body, terminator=self._terminator, corrupt_checksum=corrupt)

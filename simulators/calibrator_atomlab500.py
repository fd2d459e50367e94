"""Simulated Biodex Atomlab 500 answering `^C`, `1`, `DS` and `ISO` (see drivers/atomlab500.py)."""

from __future__ import annotations

from hotlab.drivers.atomlab500 import MAX_COMMAND_LETTERS, READ_LATEST, wire_name
from hotlab.physics.nuclides import UnknownNuclideError
from hotlab.physics.units import ACTIVITY_UNITS
from hotlab.simulators.faults import FaultInjector
from hotlab.simulators.serial_host import RequestReplyDevice
from hotlab.simulators.source import SI_LADDER, IonChamber, auto_range, fixed_digits

#: Bytes that ask for the latest reading without a CR (manual: ^C, and "1" for the same).
_IMMEDIATE = (READ_LATEST[0], ord("1"))


def format_report(nuclide: str, activity_bq: float) -> bytes:
    """`<isotope> <value> <unit>`, auto-ranged Bq..GBq, 4 digits (no terminator)."""
    value, unit = auto_range(activity_bq, SI_LADDER[:4], ACTIVITY_UNITS)
    return f"{wire_name(nuclide)} {fixed_digits(value)} {unit}".encode("ascii")


class Atomlab500Simulator(RequestReplyDevice):
    def __init__(self, chamber: IonChamber, faults: FaultInjector | None = None) -> None:
        super().__init__(faults or FaultInjector())
        self.chamber = chamber

    def take_request(self, buffer: bytearray) -> bytes | None:
        while buffer and buffer[0] in b"\n ":
            del buffer[:1]
        if buffer and buffer[0] in _IMMEDIATE:
            request = bytes(buffer[:1])
            del buffer[:1]
            return request
        end = buffer.find(b"\r")
        if end < 0:
            return None
        request = bytes(buffer[:end]).strip()
        del buffer[: end + 1]
        return request

    def reply_to(self, request: bytes) -> bytes:
        return self._line(request) + b"\r\n"

    def _line(self, request: bytes) -> bytes:
        if len(request) == 1 and request[0] in _IMMEDIATE:
            return self._report()
        command, _, parameter = request.replace(b",", b" ").partition(b" ")
        command, parameter = command.upper(), parameter.strip()
        if not command.isalpha() or len(command) > MAX_COMMAND_LETTERS:
            return b"ERROR: FORMAT"
        if command == b"DS":
            return self._report()
        if command == b"ISO":
            return self._iso(parameter)
        return b"ERROR: UNKNOWN COMMAND"

    def _iso(self, parameter: bytes) -> bytes:
        if parameter:
            try:
                self.chamber.select(parameter.decode("ascii", "replace"))
            except (UnknownNuclideError, ValueError):
                return b"ERROR: BAD ISOTOPE"
        return b"ISO " + wire_name(self.chamber.selected).encode("ascii")

    def _report(self) -> bytes:
        return format_report(self.chamber.selected, self.faults.hold(self.chamber.measure_bq))

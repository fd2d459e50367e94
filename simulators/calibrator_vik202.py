"""Simulated Veenstra/Comecer VIK-202 answering `!` commands (see drivers/vik202.py for the wire format).

The calibration factor selected with `!Fnnn` picks the chamber response the electrometer
divides by, so selecting the wrong factor misreads the activity exactly as the real device
would (simulators/source.py explains the physics).
"""

from __future__ import annotations

from collections.abc import Mapping

from hotlab.drivers.vik202 import DEFAULT_FACTORS, REPLY_PREFIX
from hotlab.physics.nuclides import normalize_name
from hotlab.simulators.faults import FaultInjector
from hotlab.simulators.serial_host import RequestReplyDevice
from hotlab.simulators.source import IonChamber

VERSION = "VIK-202 SIM 1.0"


def format_number(value: float) -> bytes:
    """Five significant digits in E-notation, the assumed `!R`/`!GQ` reply layout."""
    return f"{value:.4E}".encode("ascii")


class Vik202Simulator(RequestReplyDevice):
    def __init__(
        self,
        chamber: IonChamber,
        faults: FaultInjector | None = None,
        *,
        factors: Mapping[str, int] | None = None,
        command_terminator: bytes = b"\r",
        reply_terminator: bytes = b"\r\n",
    ) -> None:
        super().__init__(faults or FaultInjector())
        self.chamber = chamber
        table = DEFAULT_FACTORS if factors is None else factors
        self._nuclide_by_factor = {int(factor): normalize_name(name) for name, factor in table.items()}
        by_nuclide = {name: factor for factor, name in self._nuclide_by_factor.items()}
        if chamber.selected not in by_nuclide:
            raise ValueError(f"no VIK-202 factor for the selected nuclide {chamber.selected}")
        self.factor = by_nuclide[chamber.selected]
        self._command_terminator = command_terminator
        self._reply_terminator = reply_terminator

    def select_on_panel(self, factor: int) -> None:
        """Dial a factor on the front panel, behind the host's back."""
        if self._select_factor(factor) != b"OK":
            raise ValueError(f"factor {factor} is not in this simulator's table")

    def take_request(self, buffer: bytearray) -> bytes | None:
        end = buffer.find(self._command_terminator)
        if end < 0:
            return None
        request = bytes(buffer[:end]).strip(b"\n ")
        del buffer[: end + len(self._command_terminator)]
        return request

    def reply_to(self, request: bytes) -> bytes:
        return REPLY_PREFIX + self._payload(request) + self._reply_terminator

    def _payload(self, request: bytes) -> bytes:
        if request == b"!R":
            return format_number(self.faults.hold(self.chamber.measure_bq))
        if request == b"!F":
            return b"F%03d" % self.factor
        if request.startswith(b"!F") and request[2:].isdigit() and len(request) <= 5:
            return self._select_factor(int(request[2:]))
        if request in (b"!BON", b"!BOFF"):
            self.chamber.background_subtraction = request == b"!BON"
            return b"OK"
        if request == b"!Z":
            self.chamber.autozero()
            return b"OK"
        if request == b"!GQ":
            return format_number(self.chamber.current_a())
        if request == b"!GV":
            return VERSION.encode("ascii")
        return b"ERR UNKNOWN COMMAND"

    def _select_factor(self, factor: int) -> bytes:
        nuclide = self._nuclide_by_factor.get(factor)
        if nuclide is None:
            return b"ERR NO SUCH FACTOR"
        try:
            self.chamber.select(nuclide)
        except ValueError:
            return b"ERR FACTOR NOT CALIBRATED"
        self.factor = factor
        return b"OK"

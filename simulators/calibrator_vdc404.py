"""Simulated Veenstra VDC-404 in "PC" mode, streaming `<isotope>: <activity> <unit>` lines.

Anything the host sends is ignored, as the device does; the nuclide is set "on the front
panel" with `select_on_panel`.
"""

from __future__ import annotations

import asyncio

from hotlab.physics.units import ACTIVITY_UNITS
from hotlab.simulators.faults import FaultInjector, send_reply
from hotlab.simulators.serial_host import ByteChannel
from hotlab.simulators.source import CURIE_LADDER, SI_LADDER, IonChamber, auto_range, fixed_digits


def format_line(
    nuclide: str, activity_bq: float, ladder: tuple[str, ...] = SI_LADDER[:4], terminator: bytes = b"\r\n"
) -> bytes:
    """`<isotope>: <activity> <unit>`, the isotope left-justified to 6 characters, 4 digits."""
    value, unit = auto_range(activity_bq, ladder, ACTIVITY_UNITS)
    return f"{nuclide:<6}: {fixed_digits(value)} {unit}".encode("ascii") + terminator


class Vdc404Simulator:
    def __init__(
        self,
        chamber: IonChamber,
        faults: FaultInjector | None = None,
        *,
        interval_s: float = 1.0,
        curie_units: bool = False,
        terminator: bytes = b"\r\n",
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.chamber = chamber
        self.faults = faults or FaultInjector()
        self.interval_s = interval_s
        self._ladder = CURIE_LADDER if curie_units else SI_LADDER[:4]
        self._terminator = terminator

    def select_on_panel(self, nuclide: str) -> None:
        self.chamber.select(nuclide)

    def line(self) -> bytes:
        activity_bq = self.faults.hold(self.chamber.measure_bq)
        return format_line(self.chamber.selected, activity_bq, self._ladder, self._terminator)

    async def serve(self, channel: ByteChannel) -> None:
        """Send a line every `interval_s` until the connection goes away."""
        listener = asyncio.create_task(self._ignore_input(channel))
        try:
            while not channel.closed:
                await asyncio.wait({listener}, timeout=self.interval_s)
                if listener.done() or channel.closed:
                    return
                await send_reply(channel, self.line(), self.faults)
        finally:
            listener.cancel()  # not awaited: a hung-up pty must be replaced without yielding

    @staticmethod
    async def _ignore_input(channel: ByteChannel) -> None:
        while await channel.read():
            pass

"""A calibrator source whose readings leave with their quality: `good`, or `suspect` and why.

The service wraps every calibrator's `Source` (controller/supervisor.py) in a `CheckedSource`, so the
adapters in controller/sources.py stay protocol translators and every calibrator, whatever its
family, is judged by the same rules (controller/plausibility.py). A suspect reading is still handed
over, committed and published: nothing is lost or hidden, but QC and measurements skip it.

How a reading is judged, against the last good reading (the reference) and an unconfirmed step
(the candidate, a suspect reading that may yet prove real):

1. outside the instrument's range: suspect;
2. no reference yet, or the nuclide setting changed: good (nothing to compare with);
3. consistent with decay from the reference, within the noise band: good;
4. consistent with the candidate: good; the earlier step is confirmed by this second, agreeing frame;
5. a step from or to background on a protocol with a checksum: good (a source went in or out; the
   checksum rules out a corrupted frame);
6. anything else is unconfirmed: a jump between two levels, or (without a checksum) any step at all.

Where the protocol has no checksum (VIK-202, VDC-404, Atomlab 500, a CRC-15R with `checksum = false`)
an unconfirmed or out-of-range reading is read again at once, before the next poll. Two agreeing
frames are both good: a real change is repeated by the re-read, a bit flip is not. A frame the
re-read contradicts is suspect, and the re-read is judged by the rules above on its own. With a
checksum there is no re-read: the unconfirmed reading is suspect and becomes the candidate, which
the next poll confirms (rule 4) or not. So each reading's quality is decided with every frame that
exists when it is handed over, and never changes afterwards.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from hotlab.controller.plausibility import PlausibilityRules, Point
from hotlab.controller.supervisor import Item, Source
from hotlab.drivers.records import DriverError, Reading
from hotlab.physics.units import format_activity

log = logging.getLogger(__name__)


#: Calibrator families whose frames carry a checksum, and the driver option that can switch it off.
CHECKSUM_FAMILIES: dict[str, str] = {"crc15r": "checksum"}


def has_checksum(family: str, options: Mapping[str, Any]) -> bool:
    """Whether a calibrator's frames are checksummed as configured (a bit flip then cannot pass as a reading)."""
    option = CHECKSUM_FAMILIES.get(family)
    return option is not None and options.get(option, True) is not False


def _point(reading: Reading) -> Point:
    return Point(reading.timestamp_ns, reading.activity_bq, reading.nuclide)


def _suspect(reading: Reading, reason: str) -> Reading:
    return dataclasses.replace(reading, quality="suspect", quality_reason=reason)


class CheckedSource:
    """Wraps a calibrator's `Source`; `read()` returns its readings with `quality` set (module docstring)."""

    def __init__(self, source: Source, rules: PlausibilityRules, *, reread: bool) -> None:
        self.source = source
        self.rules = rules
        #: True where the protocol has no checksum: an unconfirmed reading is read again at once.
        self.reread = reread
        self.streaming = source.streaming
        self.reference: Point | None = None
        self.candidate: Point | None = None

    async def connect(self) -> None:
        await self.source.connect()

    async def close(self) -> None:
        await self.source.close()

    async def delivered(self, items: Sequence[Item]) -> None:
        await self.source.delivered(items)

    async def read(self) -> Sequence[Item]:
        checked: list[Item] = []
        for item in await self.source.read():
            checked.extend(await self._check(item) if isinstance(item, Reading) else [item])
        return checked

    async def _check(self, reading: Reading) -> list[Reading]:
        reason = self._unconfirmed(reading)
        if reason is None:
            self._accept(reading)
            return [reading]
        if not self.reread:
            self._hold(reading)
            return [_suspect(reading, reason)]
        again = await self._read_again(reading)
        if again is None:
            self._hold(reading)  # the next poll may still confirm it
            return [_suspect(reading, f"{reason}; the re-read failed")]
        if self.rules.out_of_range(reading.activity_bq) is None and self.rules.consistent(
            _point(reading), _point(again)
        ):
            self._accept(again)  # two agreeing frames: the change is real
            return [reading, again]
        first = _suspect(reading, f"{reason}; the immediate re-read did not repeat it")
        second_reason = self._unconfirmed(again)
        if second_reason is None:
            self._accept(again)
            return [first, again]
        self._hold(again)
        return [first, _suspect(again, second_reason)]

    def _unconfirmed(self, reading: Reading) -> str | None:
        """Why `reading` cannot be taken as good on its own (rules 1-6 of the module docstring), or None."""
        out_of_range = self.rules.out_of_range(reading.activity_bq)
        if out_of_range is not None:
            return out_of_range
        point, reference = _point(reading), self.reference
        if reference is None or reference.nuclide != point.nuclide or self.rules.consistent(reference, point):
            return None
        if self.candidate is not None and self.rules.consistent(self.candidate, point):
            return None
        if self.rules.source_change(reference, point):
            if not self.reread:
                return None
            return (
                f"step from {format_activity(reference.activity_bq)} to {format_activity(point.activity_bq)} "
                "(a source in or out) not yet confirmed"
            )
        return self.rules.why_not_decay(reference, point)

    async def _read_again(self, reading: Reading) -> Reading | None:
        """The device's next reading (a calibrator hands over one per read), or None if it gave none (logged)."""
        try:
            readings = [item for item in await self.source.read() if isinstance(item, Reading)]
        except DriverError as exc:
            log.warning(
                "device %s: re-read of a suspect reading failed: %s: %s", reading.device, type(exc).__name__, exc
            )
            return None
        return readings[0] if readings else None

    def _accept(self, reading: Reading) -> None:
        self.reference, self.candidate = _point(reading), None

    def _hold(self, reading: Reading) -> None:
        """An unconfirmed reading in range waits as the candidate for a frame that agrees with it."""
        if self.rules.out_of_range(reading.activity_bq) is None:
            self.candidate = _point(reading)

"""A calibrator source whose readings leave with their quality: `good`, or `suspect` and why.

The service wraps every calibrator's `Source` (controller/supervisor.py) in a `CheckedSource`, so the
adapters in controller/sources.py stay protocol translators and every calibrator, whatever its
family, is judged by the same rules (controller/plausibility.py). A suspect reading is still handed
over, committed and published: nothing is lost or hidden, but QC and measurements skip it.

How a reading is judged, against the last good reading (the reference) and an unconfirmed step
(the candidate, a suspect reading that may yet prove real):

1. outside the instrument's range, or on a nuclide setting that is not in the library
   (physics/nuclides.py; a flipped bit in a text isotope field turns Cs-137 into Cs-136 or Cs-37):
   suspect, never a candidate, and never confirmed by a re-read;
2. consistent with the candidate: good; the earlier step is confirmed by this second, agreeing frame;
3. no reference yet (the first reading after start), or the nuclide setting changed: good on a
   protocol with a checksum; without one, unconfirmed until the re-read repeats it (same setting,
   consistent value), since a flipped frame parses as well as a real one;
4. consistent with decay from the reference, within the noise band: good;
5. a step from or to background on a protocol with a checksum: good (a source went in or out; the
   checksum rules out a corrupted frame);
6. in the rising phase (the first `RISING_POLLS` readings after a step up from background, while the
   dipper goes down and the electrometer settles) a further rise is good with a checksum, and without
   one unconfirmed until the re-read repeats it (see below);
7. anything else is unconfirmed: a jump between two levels, or (without a checksum) any step at all.

Where the protocol has no checksum (VIK-202, VDC-404, Atomlab 500, a CRC-15R with `checksum = false`)
an unconfirmed or invalid (rule 1) reading is read again at once, before the next poll; if the re-read
raises anything at all, that is logged and the first frame is kept, as suspect. Two agreeing frames are both
good: a real change is repeated by the re-read, a bit flip is not. The re-read agrees when it is
consistent with the first frame by decay (same nuclide setting), or, while the chamber ramps, when it
continues the ramp: after a step up, at least the first frame less the noise band and at most
`RAMP_MAX_RISE` times it (a power-of-ten flip of the first frame is not repeated); on a removal, the
re-read is background and the first frame lies between the reference and it. A frame the re-read
contradicts is suspect, and the re-read is judged by the rules above on its own. With a checksum
there is no re-read: the unconfirmed reading is suspect and becomes the candidate, which the next
poll confirms (rule 2) or not. So each reading's quality is decided with every frame that exists
when it is handed over, and never changes afterwards.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from hotlab.controller.plausibility import PlausibilityRules, Point
from hotlab.controller.supervisor import Item, Source
from hotlab.drivers.records import Reading
from hotlab.physics.units import format_activity

log = logging.getLogger(__name__)


#: Calibrator families whose frames carry a checksum, and the driver option that can switch it off.
CHECKSUM_FAMILIES: dict[str, str] = {"crc15r": "checksum"}

#: The rising phase after a step up from background: how many readings a chamber may take to settle
#: (a hotlab assumption: the dipper goes down and the electrometer settles within a few polls).
RISING_POLLS = 5
#: The largest rise between a frame and its re-read that continues a ramp; a flipped exponent is x10.
RAMP_MAX_RISE = 4.0


def has_checksum(family: str, options: Mapping[str, Any]) -> bool:
    """Whether a calibrator's frames are checksummed as configured (a bit flip then cannot pass as a reading)."""
    option = CHECKSUM_FAMILIES.get(family)
    return option is not None and bool(options.get(option, True))  # as the driver: any false value is off


def _point(reading: Reading) -> Point:
    return Point(reading.timestamp_ns, reading.activity_bq, reading.nuclide)


def _suspect(reading: Reading, reason: str) -> Reading:
    return dataclasses.replace(reading, quality="suspect", quality_reason=reason)


class CheckedSource:
    """Wraps a calibrator's `Source`; `read()` returns its readings with `quality` set (module docstring)."""

    def __init__(self, source: Source, rules: PlausibilityRules, *, reread: bool) -> None:
        self.source = source
        self.rules = rules
        #: True where the protocol has no checksum: an unconfirmed or invalid reading is read again at once.
        self.reread = reread
        self.streaming = source.streaming
        self.reference: Point | None = None
        self.candidate: Point | None = None
        #: Readings left in the rising phase after a step up from background (rule 6).
        self.rising = 0

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
        rising = self.rising > 0
        self.rising = max(0, self.rising - 1)
        reason = self._judge(reading, rising=rising)
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
        if self._invalid(reading) is None and self._invalid(again) is None and self._repeats(reading, again, rising):
            self._accept(reading)
            self._accept(again)  # two agreeing frames: the change is real
            return [reading, again]
        first = _suspect(reading, f"{reason}; the immediate re-read did not repeat it")
        second_reason = self._judge(again, rising=rising)
        if second_reason is None:
            self._accept(again)
            return [first, again]
        self._hold(again)
        return [first, _suspect(again, second_reason)]

    def _judge(self, reading: Reading, *, rising: bool) -> str | None:
        """Why `reading` cannot be taken as good on its own (rules 1-7 of the module docstring), or None."""
        invalid = self._invalid(reading)
        return invalid if invalid is not None else self._unconfirmed(reading, rising=rising)

    def _invalid(self, reading: Reading) -> str | None:
        """Why `reading` cannot be a reading at all (out of range, unknown nuclide setting), or None."""
        out_of_range = self.rules.out_of_range(reading.activity_bq)
        if out_of_range is not None:
            return out_of_range
        if reading.nuclide is not None and not self.rules.known_nuclide(reading.nuclide):
            return f"nuclide setting {reading.nuclide!r} is not in the nuclide library"
        return None

    def _repeats(self, reading: Reading, again: Reading, rising: bool) -> bool:
        """Whether the immediate re-read `again` repeats `reading` (module docstring)."""
        first, second = _point(reading), _point(again)
        if self.rules.consistent(first, second):
            return True
        if first.nuclide != second.nuclide:
            return False
        reference = self.reference
        if reference is None or reference.nuclide != first.nuclide:
            return False
        if self.rules.is_background(second.activity_bq):
            # a removal: the first frame lies between the reference and the confirmed background
            band = self.rules.band(first.activity_bq)
            return second.activity_bq - band <= first.activity_bq <= reference.activity_bq + band
        if (rising or self.rules.is_background(reference.activity_bq)) and not self.rules.is_background(
            first.activity_bq
        ):
            # the chamber still ramps up: the re-read continues the rise, by no more than a ramp does
            low = first.activity_bq - self.rules.band(first.activity_bq)
            return low <= second.activity_bq <= RAMP_MAX_RISE * first.activity_bq
        return False

    def _unconfirmed(self, reading: Reading, *, rising: bool = False) -> str | None:
        """Why an in-range `reading` cannot be taken as good on its own (rules 2-7 of the module
        docstring), or None."""
        point, reference = _point(reading), self.reference
        if self.candidate is not None and self.rules.consistent(self.candidate, point):
            return None
        if reference is None:
            return None if not self.reread else "first reading since start, not yet confirmed"
        if reference.nuclide != point.nuclide:
            if not self.reread:
                return None
            return f"nuclide setting changed from {reference.nuclide} to {point.nuclide}, not yet confirmed"
        if self.rules.consistent(reference, point):
            return None
        if self.rules.source_change(reference, point):
            if not self.reread:
                return None
            return (
                f"step from {format_activity(reference.activity_bq)} to {format_activity(point.activity_bq)} "
                "(a source in or out) not yet confirmed"
            )
        if rising and point.activity_bq > reference.activity_bq:
            if not self.reread:
                return None
            return (
                f"rise from {format_activity(reference.activity_bq)} to {format_activity(point.activity_bq)} "
                "while the chamber settles, not yet confirmed"
            )
        return self.rules.why_not_decay(reference, point)

    async def _read_again(self, reading: Reading) -> Reading | None:
        """The device's next reading (a calibrator hands over one per read), or None if it gave none (logged)."""
        try:
            readings = [item for item in await self.source.read() if isinstance(item, Reading)]
        except Exception as exc:  # any error: the first frame is never repeated, so keep it, as suspect
            log.warning(
                "device %s: re-read of a suspect reading failed: %s: %s", reading.device, type(exc).__name__, exc
            )
            return None
        return readings[0] if readings else None

    def _accept(self, reading: Reading) -> None:
        point = _point(reading)
        if self.reference is not None and self.rules.is_background(self.reference.activity_bq):
            if not self.rules.is_background(point.activity_bq):
                self.rising = RISING_POLLS  # a source went in: the chamber may still be ramping up
        elif self.rules.is_background(point.activity_bq):
            self.rising = 0
        self.reference, self.candidate = point, None

    def _hold(self, reading: Reading) -> None:
        """An unconfirmed reading in range waits as the candidate for a frame that agrees with it."""
        if self._invalid(reading) is None:
            self.candidate = _point(reading)

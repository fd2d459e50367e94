"""Physical plausibility of a dose calibrator's readings: the instrument's range, and decay between polls.

Why: three of the four calibrator protocols (VIK-202, VDC-404, Atomlab 500) carry no checksum, so one
bit flipped on the line turns `>7.4000E+09` into `>7.4000E+08` or `>7.4000E+19` and still parses. The
frame cannot tell; physics can:

* **range**: a reading outside the instrument's measuring range (`Plausibility.min_bq`..`max_bq`) is
  not a measurement. `FAMILY_RANGES` holds each family's default, with where it comes from; where no
  public specification was found the default is a hotlab assumption and says so. A site overrides it
  per device in `[device.plausibility]`;
* **decay**: between two readings on the same nuclide setting the activity cannot rise, nor fall
  faster than the setting's half-life allows (`hotlab.physics.decay`, half-lives from
  `hotlab.physics.nuclides`). From A0 at t0 the reading A at t is consistent when
      A0 * 2^-((t - t0) / T½) - band  <=  A  <=  A0 + band,
  with the device's noise band max(`noise_rel` x value, `noise_floor_bq`) around each bound. A
  slower fall is allowed: a longer-lived source read on this setting (a check source on the
  F-18 setting, say) decays slower than the setting's nuclide. Without a known half-life (no
  nuclide setting) the lower bound is A0 - band;
* **source changes**: putting a source in or taking it out is a step from or to background (a reading
  at most `background_bq`, an empty chamber), never a jump between two sources by a power of ten.

`PlausibilityRules` only answers questions about values; controller/checked_source.py applies them to
a device's stream of readings (and re-reads where the protocol has no checksum), and the measurement
detector (controller/measurements.py) uses the same noise band and background, so the two never
disagree about what is noise and what is an empty chamber.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from hotlab.physics.decay import activity_at
from hotlab.physics.nuclides import Nuclide, UnknownNuclideError, get_nuclide
from hotlab.physics.units import format_activity


@dataclass(frozen=True, slots=True)
class FamilyRange:
    """A calibrator family's default measuring range in Bq and where that range comes from."""

    min_bq: float
    max_bq: float
    source: str


#: Shared reasoning of the defaults below: no manufacturer publishes the range of these models in a
#: document we could check, so every default is a hotlab assumption. 1 TBq (27 Ci) is above anything
#: a radiopharmacy's well chamber measures (the largest Tc-99m eluates are some hundreds of GBq) and
#: below every power-of-ten corruption of such a value; -1 MBq allows the zero offset of an empty
#: chamber after background subtraction (the QC background limit fails at 370 kBq) and no more.
_ASSUMED = "hotlab assumption (no public specification found): -1 MBq to 1 TBq"

FAMILY_RANGES: dict[str, FamilyRange] = {
    "vik202": FamilyRange(-1e6, 1e12, f"{_ASSUMED} for the VIK-202"),
    "crc15r": FamilyRange(-1e6, 1e12, f"{_ASSUMED} for the CRC-15R"),
    "vdc404": FamilyRange(-1e6, 1e12, f"{_ASSUMED} for the VDC-404"),
    "atomlab500": FamilyRange(-1e6, 1e12, f"{_ASSUMED} for the Atomlab 500"),
}

#: Defaults of the noise band and the empty chamber (hotlab assumptions, see docs/calibrator-protocols.md):
#: 2 % is ten times the simulator's electrometer noise and twice a good chamber's reproducibility; 10 kBq
#: is ten display steps of a 0.001 MBq resolution; 37 kBq (1 uCi) is the QC background warn level.
DEFAULT_NOISE_REL = 0.02
DEFAULT_NOISE_FLOOR_BQ = 10e3
DEFAULT_BACKGROUND_BQ = 37e3
#: The suspect-reading alarm (controller/suspect_alarm.py): raised when at least `alarm_fraction` of the
#: last `alarm_window` readings are suspect; one reading in ten is a failing line, not bad luck.
DEFAULT_ALARM_WINDOW = 50
DEFAULT_ALARM_FRACTION = 0.1


@dataclass(frozen=True, slots=True)
class Plausibility:
    """One calibrator's plausibility settings (`[device.plausibility]`; defaults per family)."""

    min_bq: float
    max_bq: float
    range_source: str
    noise_rel: float = DEFAULT_NOISE_REL
    noise_floor_bq: float = DEFAULT_NOISE_FLOOR_BQ
    background_bq: float = DEFAULT_BACKGROUND_BQ
    alarm_window: int = DEFAULT_ALARM_WINDOW
    alarm_fraction: float = DEFAULT_ALARM_FRACTION

    @classmethod
    def for_family(cls, family: str) -> Plausibility:
        """The family's defaults (a KeyError for a family that is not a calibrator)."""
        default = FAMILY_RANGES[family]
        return cls(default.min_bq, default.max_bq, default.source)


@dataclass(frozen=True, slots=True)
class Point:
    """What the rules need of a reading: when, how much, and on which nuclide setting."""

    time_ns: int
    activity_bq: float
    nuclide: str | None


@lru_cache(maxsize=64)
def _half_life_nuclide(name: str) -> Nuclide | None:
    try:
        return get_nuclide(name)
    except UnknownNuclideError:
        return None


class PlausibilityRules:
    """The questions the plausibility check and the measurement detector ask about values."""

    def __init__(self, family: str, settings: Plausibility) -> None:
        self.family = family
        self.settings = settings

    def known_nuclide(self, name: str) -> bool:
        """Whether a nuclide setting is in the library (physics/nuclides.py); a flipped isotope text is not."""
        return _half_life_nuclide(name) is not None

    def band(self, expected_bq: float) -> float:
        """The noise band around an expected value: relative, with an absolute floor."""
        return max(self.settings.noise_rel * abs(expected_bq), self.settings.noise_floor_bq)

    def is_background(self, activity_bq: float) -> bool:
        """An empty chamber: at most `background_bq` (a negative zero offset included)."""
        return activity_bq <= self.settings.background_bq

    def out_of_range(self, activity_bq: float) -> str | None:
        """Why the value cannot be a reading of this instrument, or None when it is in range."""
        low, high = self.settings.min_bq, self.settings.max_bq
        if low <= activity_bq <= high:
            return None
        return (
            f"{format_activity(activity_bq)} is outside the {self.family} range "
            f"{format_activity(low)} to {format_activity(high)} ({self.settings.range_source})"
        )

    def carried(self, point: Point, to_ns: int) -> float:
        """`point`'s activity carried to `to_ns` (back in time if earlier) by the half-life of its nuclide
        setting; unchanged without a known half-life."""
        nuclide = None if point.nuclide is None else _half_life_nuclide(point.nuclide)
        if nuclide is None:
            return point.activity_bq
        return float(activity_at(point.activity_bq, nuclide, (to_ns - point.time_ns) / 1e9))

    def consistent(self, earlier: Point, later: Point) -> bool:
        """True when `later` can follow from `earlier` by decay, within the noise band (same setting):
        no rise, and no faster fall than the setting's half-life (module docstring)."""
        if later.nuclide != earlier.nuclide:
            return False
        highest = earlier.activity_bq + self.band(earlier.activity_bq)
        slowest = self.carried(earlier, later.time_ns)
        return slowest - self.band(slowest) <= later.activity_bq <= highest

    def source_change(self, earlier: Point, later: Point) -> bool:
        """A step from or to an empty chamber: how a source goes in or comes out."""
        return self.is_background(earlier.activity_bq) or self.is_background(later.activity_bq)

    def why_not_decay(self, earlier: Point, later: Point) -> str:
        """Say how `later` breaks the decay rule against `earlier` (call only when not `consistent`)."""
        dt_s = max(0, later.time_ns - earlier.time_ns) / 1e9
        move = (
            f"{format_activity(earlier.activity_bq)} to {format_activity(later.activity_bq)} in {dt_s:.3g} s "
            f"on the {later.nuclide or 'unknown'} setting"
        )
        if later.activity_bq > earlier.activity_bq:
            band = self.band(earlier.activity_bq)
            return f"rose from {move}: activity does not grow (noise band {format_activity(band)})"
        slowest = self.carried(earlier, later.time_ns)
        lowest = format_activity(slowest - self.band(slowest))
        nuclide = None if later.nuclide is None else _half_life_nuclide(later.nuclide)
        decay = (
            f"{nuclide.name} (T½ {nuclide.half_life_s:.6g} s) decays to no less than {lowest}"
            if nuclide is not None
            else f"without a known half-life it stays above {lowest}"
        )
        return f"fell from {move}: {decay}"

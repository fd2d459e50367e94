"""Physics of a radioactive source in a dose calibrator's ionisation chamber.

A well-type ionisation chamber measures a current, not an activity:

    I = A_true * S(true nuclide) + I_background

where S is the chamber's response per becquerel, which depends on the nuclide's photon
emissions. The electrometer divides by the response of the nuclide the *operator selected*
(its calibration factor), so a wrongly selected nuclide scales the displayed activity by
S(true) / S(selected). That is the calibration-factor error the simulator reproduces.

Decay uses the evaluated half-lives in `hotlab.physics.nuclides` (DDEP/ENSDF, sources listed
there) through `hotlab.physics.decay.activity_at`: A(t) = A0 * 2^(-dt / T1/2).

Simulated time can run faster than wall time (`acceleration`), so an F-18 half-life
(109.77 min, ENSDF) passes in seconds in a test.

What is in the chamber may change over simulated time (`ChamberSchedule`): a radiopharmacist puts a
vial in, reads it and takes it out, or leaves the check source in. An empty chamber reads the
background only, which the electrometer subtracts.
"""

from __future__ import annotations

import bisect
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass

from hotlab.physics.decay import activity_at
from hotlab.physics.nuclides import Nuclide, get_nuclide

#: Chamber response per becquerel (A/Bq), a MODEL PARAMETER, not device data. Real responses
#: are chamber-specific and come with the device's calibration certificate. The relative
#: values follow the VIK-202 calibration factor numbers (236 Tc-99m, 762 F-18, 587 Cs-137),
#: taking the factor as proportional to the response; the scale, 1e-19 A/Bq per factor unit
#: (about 24 pA/MBq for Tc-99m), is the order of magnitude of an argon-filled well chamber.
#: Ga-68 has no VIK-202 number here: it is F-18's scaled by the annihilation photons per decay
#: (beta+ 88.9 % vs 96.7 %, DDEP), the 1077 keV line (3 %) neglected: a model value too.
DEFAULT_RESPONSE_A_PER_BQ: dict[str, float] = {
    "Tc-99m": 236e-19,
    "F-18": 762e-19,
    "Ga-68": 762e-19 * 88.9 / 96.7,
    "Cs-137": 587e-19,
}

#: Background ionisation current in an empty, shielded well chamber (model parameter).
DEFAULT_BACKGROUND_A = 5e-15


class SimClock:
    """Simulated UTC time: wall time since start, multiplied by `acceleration`, plus jumps."""

    def __init__(self, acceleration: float = 1.0, start_ns: int | None = None) -> None:
        if not acceleration > 0:
            raise ValueError(f"acceleration must be > 0, got {acceleration}")
        self.acceleration = acceleration
        self._start_ns = time.time_ns() if start_ns is None else start_ns
        self._start_monotonic = time.monotonic()
        self._jumped_s = 0.0

    def now_ns(self) -> int:
        elapsed_s = (time.monotonic() - self._start_monotonic) * self.acceleration + self._jumped_s
        return self._start_ns + int(elapsed_s * 1e9)

    def advance(self, seconds: float) -> None:
        """Jump simulated time forward (tests use it to pass half-lives instantly)."""
        if seconds < 0:
            raise ValueError(f"simulated time only runs forward, got {seconds} s")
        self._jumped_s += seconds


@dataclass(frozen=True, slots=True)
class Source:
    """A source of `nuclide` that had `reference_activity_bq` at `reference_time_ns`."""

    nuclide: Nuclide
    reference_activity_bq: float
    reference_time_ns: int

    def activity_bq(self, at_ns: int) -> float:
        dt_s = (at_ns - self.reference_time_ns) / 1e9
        return float(activity_at(self.reference_activity_bq, self.nuclide, dt_s))


@dataclass(frozen=True, slots=True)
class ChamberSchedule:
    """What the chamber holds over simulated time: from each change's `at_ns` on, its source (None: empty).

    `changes` are (at_ns, source or None) pairs; before the first one the chamber holds what it was
    built with. With `repeat_every_ns` the changes repeat with that period (a routine: a dose read
    every few minutes, the check source every morning); a source keeps decaying from its own
    reference time however often it goes in and out, as one vial does.

    With `ramp_ns` a source that goes in is not seen at once: the chamber reads a linearly rising
    fraction of its activity for `ramp_ns` after the change (the dipper goes down, the electrometer
    settles), as a real insertion ramps over a few polls. Taking a source out is immediate.
    """

    changes: tuple[tuple[int, Source | None], ...]
    repeat_every_ns: int | None = None
    ramp_ns: int = 0

    def __post_init__(self) -> None:
        times = [at_ns for at_ns, _ in self.changes]
        if not times or times != sorted(times):
            raise ValueError("a chamber schedule needs at least one change, in time order")
        if self.repeat_every_ns is not None and not times[-1] - times[0] < self.repeat_every_ns:
            raise ValueError("a repeating chamber schedule's changes must fit in one period")
        if self.ramp_ns < 0:
            raise ValueError(f"a chamber schedule's ramp must be >= 0 ns, got {self.ramp_ns}")

    def content(self, at_ns: int, before: Source | None) -> Source | None:
        """The source in the chamber at `at_ns`; `before` until the first change."""
        first_ns = self.changes[0][0]
        if at_ns < first_ns:
            return before
        if self.repeat_every_ns is not None:
            at_ns = first_ns + (at_ns - first_ns) % self.repeat_every_ns
        index = bisect.bisect_right([at for at, _ in self.changes], at_ns) - 1
        changed_ns, content = self.changes[index]
        if index > 0:
            previous = self.changes[index - 1][1]
        else:
            previous = before if self.repeat_every_ns is None else self.changes[-1][1]
        elapsed_ns = at_ns - changed_ns
        if content is None or content == previous or not elapsed_ns < self.ramp_ns:
            return content
        # going in: the chamber sees a growing fraction of the source until the ramp is over
        fraction = elapsed_ns / self.ramp_ns
        return Source(content.nuclide, content.reference_activity_bq * fraction, content.reference_time_ns)


class IonChamber:
    """A well chamber with a source in it (or a schedule of sources), read through a selected calibration."""

    def __init__(
        self,
        source: Source | None,
        *,
        clock: SimClock,
        selected_nuclide: str | None = None,
        background_a: float = DEFAULT_BACKGROUND_A,
        background_subtraction: bool = True,
        noise_rel: float = 0.002,
        seed: int = 0,
        responses: Mapping[str, float] | None = None,
        schedule: ChamberSchedule | None = None,
    ) -> None:
        if noise_rel < 0:
            raise ValueError(f"noise_rel must be >= 0, got {noise_rel}")
        self.initial_source = source
        self.schedule = schedule
        self.clock = clock
        self.background_a = background_a
        self.background_subtraction = background_subtraction
        self.noise_rel = noise_rel
        self.responses = dict(DEFAULT_RESPONSE_A_PER_BQ if responses is None else responses)
        self._stored_background_a = background_a
        self._rng = random.Random(seed)
        default = source.nuclide.name if source else "Cs-137"
        self.selected = get_nuclide(selected_nuclide or default).name
        self._response(self.selected)
        scheduled = [] if schedule is None else [change for _, change in schedule.changes]
        for content in (source, *scheduled):
            if content is not None:
                self._response(content.nuclide.name)

    def source_at(self, at_ns: int) -> Source | None:
        """What is in the chamber at `at_ns` (simulated time)."""
        if self.schedule is None:
            return self.initial_source
        return self.schedule.content(at_ns, self.initial_source)

    @property
    def source(self) -> Source | None:
        """What is in the chamber now."""
        return self.source_at(self.clock.now_ns())

    def select(self, nuclide: str) -> None:
        """Change the calibration (what the operator's nuclide key does)."""
        name = get_nuclide(nuclide).name
        self._response(name)
        self.selected = name

    def autozero(self) -> None:
        """Store the present background current as the one to subtract."""
        self._stored_background_a = self.background_a

    def current_a(self, at_ns: int | None = None) -> float:
        """Noise-free ionisation current: source plus background."""
        at = self.clock.now_ns() if at_ns is None else at_ns
        source = self.source_at(at)
        source_a = 0.0 if source is None else source.activity_bq(at) * self._response(source.nuclide.name)
        return source_a + self.background_a

    def expected_display_bq(self, at_ns: int | None = None) -> float:
        """What a noise-free electrometer shows, in Bq of the selected nuclide."""
        current = self.current_a(at_ns)
        if self.background_subtraction:
            current -= self._stored_background_a
        return current / self._response(self.selected)

    def measure_bq(self) -> float:
        """One displayed reading now, with Gaussian electrometer noise of `noise_rel` (1 sigma)."""
        expected = self.expected_display_bq()
        return expected * (1.0 + self._rng.gauss(0.0, self.noise_rel))

    def true_activity_bq(self, at_ns: int | None = None) -> float:
        at = self.clock.now_ns() if at_ns is None else at_ns
        source = self.source_at(at)
        return 0.0 if source is None else source.activity_bq(at)

    def _response(self, nuclide: str) -> float:
        try:
            return self.responses[nuclide]
        except KeyError:
            known = ", ".join(sorted(self.responses))
            raise ValueError(f"no chamber response configured for {nuclide}; configured: {known}") from None


def make_chamber(
    nuclide: str,
    activity_bq: float,
    *,
    acceleration: float = 1.0,
    selected_nuclide: str | None = None,
    noise_rel: float = 0.002,
    seed: int = 0,
    background_subtraction: bool = True,
) -> IonChamber:
    """A chamber holding a source of `activity_bq` now (simulated time zero)."""
    if not activity_bq >= 0:
        raise ValueError(f"activity must be >= 0 Bq, got {activity_bq}")
    clock = SimClock(acceleration)
    source = Source(get_nuclide(nuclide), activity_bq, clock.now_ns())
    return IonChamber(
        source,
        clock=clock,
        selected_nuclide=selected_nuclide,
        noise_rel=noise_rel,
        seed=seed,
        background_subtraction=background_subtraction,
    )


#: Display unit ladders: each unit is 1000x the previous, like a four-digit auto-ranging display.
SI_LADDER = ("Bq", "kBq", "MBq", "GBq", "TBq")
CURIE_LADDER = ("uCi", "mCi", "Ci")


def auto_range(activity_bq: float, ladder: tuple[str, ...], scale_bq: Mapping[str, float]) -> tuple[float, str]:
    """Pick the ladder unit in which |value| lies in [1, 1000), as an auto-ranging display does."""
    unit = ladder[0]
    for candidate in ladder:
        if abs(activity_bq) >= scale_bq[candidate]:
            unit = candidate
    return activity_bq / scale_bq[unit], unit


def fixed_digits(value: float, significant: int = 4) -> str:
    """Fixed-point text with `significant` digits and no exponent (a seven-segment display)."""
    magnitude = math.floor(math.log10(abs(value))) if value else 0
    decimals = min(max(significant - 1 - magnitude, 0), 6)
    return f"{value:.{decimals}f}"

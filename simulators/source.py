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
"""

from __future__ import annotations

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
DEFAULT_RESPONSE_A_PER_BQ: dict[str, float] = {
    "Tc-99m": 236e-19,
    "F-18": 762e-19,
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


class IonChamber:
    """A well chamber with a source in it, read through a selected calibration."""

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
    ) -> None:
        if noise_rel < 0:
            raise ValueError(f"noise_rel must be >= 0, got {noise_rel}")
        self.source = source
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
        if source is not None:
            self._response(source.nuclide.name)

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
        source_a = 0.0
        if self.source is not None:
            source_a = self.source.activity_bq(at) * self._response(self.source.nuclide.name)
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
        if self.source is None:
            return 0.0
        return self.source.activity_bq(self.clock.now_ns() if at_ns is None else at_ns)

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

"""What a radionuclide generator column yields when it is eluted: activity, yield, breakthrough.

The decay physics (parent decay since calibration, Bateman ingrowth of the daughter since the
last elution, the Mo-99 -> Tc-99m branching) is not repeated here: it comes from
hotlab.physics.decay, the same code the QC engine uses to judge the elution, so a simulated
elution is judged against exactly the physics that produced it. This module adds only what
is specific to a column: how much of the available daughter an elution recovers (yield), how
much parent leaks into the eluate (breakthrough), how long an elution takes, and the gamma
dose rate at the eluate line.

The yield and breakthrough models are deliberately simple empirical curves (linear yield
loss with age and with use; exponential breakthrough rise with age) with parameters chosen
to sit inside the ranges that product literature reports; they are test stand-ins, not a
model of any one product.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hotlab.errors import InputError
from hotlab.physics.decay import activity_at, generator_daughter_activity
from hotlab.physics.utc_time import NS_PER_S

SECONDS_PER_DAY = 86_400.0


@dataclass(frozen=True, slots=True)
class GeneratorProfile:
    """Everything that distinguishes one generator type from another in the simulator."""

    key: str
    parent: str
    daughter: str
    description: str
    #: Typical parent activity on the calibration certificate, the simulator's default.
    nominal_cal_bq: float
    #: Elution yield of a fresh column (fraction of the available daughter that reaches the vial).
    initial_yield: float
    #: Absolute yield lost per day of column age and per elution; never below `yield_floor`.
    yield_loss_per_day: float
    yield_loss_per_elution: float
    yield_floor: float
    #: Parent activity in the eluate as a fraction of the daughter activity, fresh column;
    #: it doubles every `breakthrough_doubling_days` of column age.
    initial_breakthrough: float
    breakthrough_doubling_days: float
    #: Regulatory breakthrough limit as a fraction (source in PROFILES below), for display and QC.
    breakthrough_limit: float
    breakthrough_limit_source: str
    #: Priming (valves set, line flushed) before eluent reaches the column, in seconds.
    priming_s: float
    #: Eluent flow through the column; elution time = volume / flow.
    flow_ml_per_s: float
    min_volume_ml: float
    max_volume_ml: float
    default_volume_ml: float
    #: Ambient dose equivalent rate constant of the daughter, uSv*m^2/(MBq*h), and the distance and
    #: shielding transmission of the line detector; together they turn eluate activity into uSv/h.
    dose_rate_constant: float
    detector_distance_m: float
    shield_transmission: float
    background_usv_h: float

    def elution_yield(self, age_s: float, elutions_so_far: int) -> float:
        """Fraction of the available daughter that an elution recovers at this column age and use."""
        age_days = max(age_s, 0.0) / SECONDS_PER_DAY
        loss = self.yield_loss_per_day * age_days + self.yield_loss_per_elution * elutions_so_far
        return max(self.yield_floor, self.initial_yield - loss)

    def breakthrough_fraction(self, age_s: float) -> float:
        """Parent activity / daughter activity in the eluate, rising with column age."""
        age_days = max(age_s, 0.0) / SECONDS_PER_DAY
        return self.initial_breakthrough * 2.0 ** (age_days / self.breakthrough_doubling_days)

    def elution_duration_s(self, volume_ml: float) -> float:
        """Seconds of eluent flow for this volume (priming not included)."""
        return volume_ml / self.flow_ml_per_s

    def line_dose_rate_usv_h(self, activity_in_line_bq: float) -> float:
        """Dose rate at the line detector: point source, inverse square, through the shielding."""
        activity_mbq = max(activity_in_line_bq, 0.0) / 1e6
        direct = self.dose_rate_constant * activity_mbq / self.detector_distance_m**2
        return self.background_usv_h + direct * self.shield_transmission


PROFILES: dict[str, GeneratorProfile] = {
    # Ge-68/Ga-68 column (TiO2/SnO2 type, eluted with 0.1 M HCl). Yield ~80 % fresh, falling
    # towards ~65 % after a year, as generator SmPCs/labels describe (e.g. GalliaPharm SmPC
    # section 2: Ga-68 yield not less than 60 % over the shelf life). Ga-68 dose rate constant
    # ~0.13 uSv*m^2/(MBq*h) (511 keV annihilation photons; Smith & Stabin, Health Phys
    # 102(3):271-291, 2012, rounded).
    "ge68": GeneratorProfile(
        key="ge68",
        parent="Ge-68",
        daughter="Ga-68",
        description="Ge-68/Ga-68 generator, 0.1 M HCl eluent",
        nominal_cal_bq=1.85e9,  # 50 mCi, a common clinical size
        initial_yield=0.80,
        yield_loss_per_day=0.0004,
        yield_loss_per_elution=0.0001,
        yield_floor=0.40,
        initial_breakthrough=2e-7,
        breakthrough_doubling_days=120.0,
        # Ph. Eur. monograph 2464 "Gallium (68Ga) chloride solution for radiolabelling":
        # Ge-68 not more than 0.001 % of total radioactivity.
        breakthrough_limit=1e-5,
        breakthrough_limit_source="Ph. Eur. 2464 (Ge-68 <= 0.001 %)",
        priming_s=8.0,
        flow_ml_per_s=0.25,
        min_volume_ml=1.0,
        max_volume_ml=10.0,
        default_volume_ml=5.0,
        dose_rate_constant=0.13,
        detector_distance_m=0.05,
        shield_transmission=1e-3,
        background_usv_h=0.15,
    ),
    # Mo-99/Tc-99m alumina column, eluted with 0.9 % saline; elution efficiency ~90 %. The
    # ~87.6 % Mo-99 -> Tc-99m branching is applied by hotlab.physics.decay (nuclide data). Tc-99m
    # dose rate constant ~0.017 uSv*m^2/(MBq*h) (140.5 keV gamma; Smith & Stabin 2012, rounded).
    "mo99": GeneratorProfile(
        key="mo99",
        parent="Mo-99",
        daughter="Tc-99m",
        description="Mo-99/Tc-99m generator, 0.9 % NaCl eluent",
        nominal_cal_bq=20e9,
        initial_yield=0.94,
        yield_loss_per_day=0.002,
        yield_loss_per_elution=0.001,
        yield_floor=0.70,
        initial_breakthrough=5e-6,
        breakthrough_doubling_days=7.0,
        # 10 CFR 35.204(a) (US NRC): not more than 0.15 kBq Mo-99 per MBq Tc-99m; Ph. Eur. 0124
        # sets 0.1 % of total radioactivity. The stricter, 1.5e-4, is used.
        breakthrough_limit=1.5e-4,
        breakthrough_limit_source="10 CFR 35.204(a) (Mo-99 <= 0.15 kBq per MBq Tc-99m)",
        priming_s=5.0,
        flow_ml_per_s=0.5,
        min_volume_ml=2.0,
        max_volume_ml=20.0,
        default_volume_ml=10.0,
        dose_rate_constant=0.017,
        detector_distance_m=0.05,
        shield_transmission=1e-2,
        background_usv_h=0.15,
    ),
}


class UnknownGeneratorError(InputError):
    """A generator profile name that is not in PROFILES."""


def get_profile(key: str) -> GeneratorProfile:
    try:
        return PROFILES[key.strip().lower()]
    except KeyError:
        raise UnknownGeneratorError(f"unknown generator profile {key!r}; known: {', '.join(PROFILES)}") from None


@dataclass(frozen=True, slots=True)
class ElutionOutcome:
    """What one elution put into the vial, at the end-of-elution instant."""

    daughter_bq: float
    parent_bq: float
    available_daughter_bq: float
    yield_fraction: float
    breakthrough_fraction: float
    volume_ml: float
    end_ns: int


class GeneratorColumn:
    """One column's state between elutions: what it was calibrated to and when it was last eluted.

    The eluate is modelled as leaving the column at the end-of-elution instant: the activity
    reported is (yield x daughter available at that instant); the rest stays on the column as
    residual daughter, which decays and counts towards the next elution.
    """

    def __init__(
        self,
        profile: GeneratorProfile,
        *,
        generator_id: str,
        parent_cal_bq: float,
        cal_time_ns: int,
        last_elution_ns: int | None = None,
        elution_count: int = 0,
    ) -> None:
        if not parent_cal_bq > 0 or not math.isfinite(parent_cal_bq):
            raise ValueError(f"calibration activity must be a positive number of Bq, got {parent_cal_bq!r}")
        self.profile = profile
        self.generator_id = generator_id
        self.parent_cal_bq = float(parent_cal_bq)
        self.cal_time_ns = int(cal_time_ns)
        #: A new column counts as eluted at calibration (the manufacturer's QC elution).
        self.last_elution_ns = int(cal_time_ns if last_elution_ns is None else last_elution_ns)
        self.residual_daughter_bq = 0.0
        self.elution_count = elution_count

    def age_s(self, at_ns: int) -> float:
        return (at_ns - self.cal_time_ns) / NS_PER_S

    def parent_bq(self, at_ns: int) -> float:
        return float(activity_at(self.parent_cal_bq, self.profile.parent, self.age_s(at_ns)))

    def available_daughter_bq(self, at_ns: int) -> float:
        """Daughter activity on the column now: Bateman ingrowth since the last elution plus residual."""
        return float(
            generator_daughter_activity(
                self.parent_cal_bq,
                self.cal_time_ns,
                self.profile.parent,
                self.profile.daughter,
                self.last_elution_ns,
                at_ns,
                residual_daughter_bq=self.residual_daughter_bq,
            )
        )

    def preview(self, at_ns: int, volume_ml: float, volume_fraction: float = 1.0) -> ElutionOutcome:
        """The outcome an elution of `volume_ml` ending at `at_ns` would have, without changing the column.

        `volume_fraction` < 1 is an aborted elution: only that fraction of the eluent passed,
        and recovery is taken as proportional to it.
        """
        fraction = min(max(volume_fraction, 0.0), 1.0)
        available = self.available_daughter_bq(at_ns)
        yield_fraction = self.profile.elution_yield(self.age_s(at_ns), self.elution_count) * fraction
        daughter = available * yield_fraction
        breakthrough = self.profile.breakthrough_fraction(self.age_s(at_ns))
        return ElutionOutcome(
            daughter_bq=daughter,
            parent_bq=daughter * breakthrough,
            available_daughter_bq=available,
            yield_fraction=yield_fraction,
            breakthrough_fraction=breakthrough,
            volume_ml=volume_ml * fraction,
            end_ns=at_ns,
        )

    def elute(self, at_ns: int, volume_ml: float, volume_fraction: float = 1.0) -> ElutionOutcome:
        """Elute the column, ending at `at_ns`; the column restarts its ingrowth from here."""
        if at_ns < self.last_elution_ns:
            raise ValueError("an elution cannot end before the previous one")
        outcome = self.preview(at_ns, volume_ml, volume_fraction)
        self.residual_daughter_bq = outcome.available_daughter_bq - outcome.daughter_bq
        self.last_elution_ns = at_ns
        self.elution_count += 1
        return outcome

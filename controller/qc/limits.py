"""QC acceptance limits: the jurisdiction profiles, where each limit comes from, and per-site overrides.

Every limit carries its source so a verdict can always be traced to the text that justifies
it. A profile (`[qc] profile = "us-nrc" | "ph-eur" | "chp"`) sets every default; where it has no
limit of its own for a test, or its text could not be checked, the source says which text is
applied instead and why. A site may tighten or relax any limit on top of the profile (a TOML
table such as ``[qc.limits.constancy] warn = 3.0``); the override keeps the default's source in
its text so an auditor sees both what was changed and what it replaced.

Boundary rule (used by every test, chosen once here): a value exactly AT a limit is
within it. The standards are phrased that way ("within ±10 %", "not more than 0.15",
"not less than 60 %", "differs by more than 20 %"), so |deviation| = 5 % passes a
±5 % test and 5.000001 % does not. A relative slack of 1e-9 absorbs float rounding so
that a reading typed as exactly 105 % of expected is judged as exactly 5 %.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Literal

from hotlab.controller.config_table import ConfigError, ConfigTable

Verdict = Literal["pass", "warn", "fail"]
VERDICTS: tuple[Verdict, ...] = ("pass", "warn", "fail")

#: Relative slack at a boundary so float rounding never flips an at-the-limit value.
_BOUNDARY_SLACK = 1e-9


#: A limit or QC configuration value that is missing, of the wrong type or inconsistent: the one
#: config error, so that [qc] problems read (and are caught) like every other config problem.
QcConfigError = ConfigError


class LimitKind(StrEnum):
    """How a value is compared with the limit.

    tolerance: |deviation_pct| <= warn passes, <= fail warns, beyond fails.
    ceiling:   value <= warn passes, <= fail warns, beyond fails (breakthrough, background).
    floor:     value >= warn passes, >= fail warns, below fails (elution yield).
    range:     low <= value <= high passes, anything else fails (half-life identity).
    A missing `warn` means the test only passes or fails.
    """

    TOLERANCE = "tolerance"
    CEILING = "ceiling"
    FLOOR = "floor"
    RANGE = "range"


def _within_upper(value: float, bound: float) -> bool:
    return value <= bound + abs(bound) * _BOUNDARY_SLACK


def _within_lower(value: float, bound: float) -> bool:
    return value >= bound - abs(bound) * _BOUNDARY_SLACK


@dataclass(frozen=True, slots=True)
class Limit:
    """One acceptance limit with its unit and the document it comes from."""

    kind: LimitKind
    unit: str
    source: str
    warn: float | None = None
    fail: float | None = None
    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        if self.kind is LimitKind.RANGE:
            if self.low is None or self.high is None or not self.low < self.high:
                raise QcConfigError(f"a range limit needs low < high, got low={self.low} high={self.high}")
            return
        if self.fail is None:
            raise QcConfigError(f"a {self.kind} limit needs a fail level")
        if self.kind in (LimitKind.TOLERANCE, LimitKind.CEILING) and self.fail <= 0:
            raise QcConfigError(f"a {self.kind} fail level must be positive, got fail={self.fail}")
        if self.warn is None:
            return
        ordered = self.warn >= self.fail if self.kind is LimitKind.FLOOR else self.warn <= self.fail
        if not ordered:
            side = "at or above" if self.kind is LimitKind.FLOOR else "at or below"
            raise QcConfigError(f"warn level {self.warn} must be {side} the fail level {self.fail} for a {self.kind}")

    def judge(self, value: float) -> Verdict:
        """The verdict for `value` (a deviation in % for a tolerance, the quantity itself otherwise)."""
        if self.kind is LimitKind.RANGE:
            assert self.low is not None and self.high is not None
            return "pass" if _within_lower(value, self.low) and _within_upper(value, self.high) else "fail"
        assert self.fail is not None
        if self.kind is LimitKind.FLOOR:
            within = _within_lower
            probe = value
        else:
            within = _within_upper
            probe = abs(value) if self.kind is LimitKind.TOLERANCE else value
        if self.warn is not None and within(probe, self.warn):
            return "pass"
        if within(probe, self.fail):
            return "warn" if self.warn is not None else "pass"
        return "fail"

    @property
    def text(self) -> str:
        """The limit as a person reads it, e.g. ``pass |dev| <= 5 %, warn <= 10 %, fail > 10 %``."""
        u = self.unit
        if self.kind is LimitKind.RANGE:
            return f"pass {self.low:g}-{self.high:g} {u}, fail outside"
        if self.kind is LimitKind.TOLERANCE:
            subject, le, gt = "|dev|", "<=", ">"
        elif self.kind is LimitKind.CEILING:
            subject, le, gt = "value", "<=", ">"
        else:
            subject, le, gt = "value", ">=", "<"
        if self.warn is None:
            return f"pass {subject} {le} {self.fail:g} {u}, fail {gt} {self.fail:g} {u}"
        return f"pass {subject} {le} {self.warn:g} {u}, warn {le} {self.fail:g} {u}, fail {gt} {self.fail:g} {u}"

    def as_dict(self) -> dict[str, Any]:
        """The numbers of the limit, for the result payload (so a verdict can be recomputed)."""
        values: dict[str, Any] = {"kind": str(self.kind), "unit": self.unit}
        for name in ("warn", "fail", "low", "high"):
            value = getattr(self, name)
            if value is not None:
                values[name] = float(value)
        return values


# Where the calibrator numbers come from (checked against the texts named):
# - ANSI N42.13-2004 ("Calibration and usage of dose calibrator ionization chambers for the
#   assay of radionuclides") section 2.2: measurements accurate to within +-10 % and
#   reproducible to within +-5 %. That is the only numeric tolerance here checked against a
#   standard's text; the 10 % fail levels are that accuracy envelope, the 5 % warn levels its
#   reproducibility, used as the usual tighter action level.
# - Linearity +-5 % per point is the figure cited for linearity from TG-181 and ANSI N42.13-2004;
#   neither linearity clause could be checked here, and the source string says so instead of
#   naming a section.
# - Former 10 CFR 35.50(b) (NRC, Part 35 as revised to 1 January 2002): daily constancy with a
#   dedicated check source, accuracy at installation and annually, linearity at installation and
#   quarterly down to 1.1 MBq (30 uCi), geometry dependence at installation. Today's 10 CFR
#   35.60(b) defers to "nationally recognized standards or the manufacturer's instructions".
# - AAPM Report 181 (TG-181, 2012) is the current AAPM guidance on these tests; it is named as
#   the programme the tests belong to, not as the source of a number.
_TG181 = "AAPM Report 181 (TG-181, 2012)"
_N42_13 = "ANSI N42.13-2004 s.2.2 (accuracy +-10 %, reproducibility +-5 %)"
_FORMER_35_50 = "former 10 CFR 35.50(b) (NRC, Part 35 before its 2002 revision)"
_LINEARITY = (
    f"+-5 % per point, the linearity tolerance cited from {_TG181} and ANSI N42.13-2004 "
    "(not checked against either text; what was checked is ANSI N42.13-2004 s.2.2, reproducibility +-5 %)"
)

# Limits that do not depend on the jurisdiction: the calibrator tests (the profiles below say, for
# Ph. Eur. and ChP, that they apply ANSI N42.13 because those texts set no calibrator number we could
# check), the manufacturers' yield specifications and the hotlab background default.
_CALIBRATOR_AND_GENERATOR: dict[str, Limit] = {
    # Daily constancy with a long-lived check source: warn beyond the 5 % reproducibility,
    # fail beyond the 10 % accuracy envelope.
    "constancy": Limit(
        LimitKind.TOLERANCE,
        "%",
        f"{_TG181} daily constancy; {_N42_13}; test required daily by {_FORMER_35_50}",
        warn=5.0,
        fail=10.0,
    ),
    # Accuracy against a certified reference source: +-10 %; 5 % warns as a site action level.
    "accuracy": Limit(
        LimitKind.TOLERANCE,
        "%",
        f"{_N42_13}: fail > 10 %, warn 5 % is a site action level; {_TG181}",
        warn=5.0,
        fail=10.0,
    ),
    # Linearity (decay or sleeve method): EACH point against the activity expected from the
    # known half-life (or the sleeve factors), normalised at the low-activity end. No warn level:
    # the +-5 % is already the action level; a site may add one (e.g. warn = 3.0).
    "linearity": Limit(
        LimitKind.TOLERANCE,
        "%",
        f"{_LINEARITY}; test required by {_FORMER_35_50}",
        fail=5.0,
    ),
    "linearity_sleeve": Limit(
        LimitKind.TOLERANCE,
        "%",
        f"{_LINEARITY} (shield/sleeve method, factors from a decay series)",
        fail=5.0,
    ),
    # Geometry / volume dependence relative to the reference container and volume.
    "geometry": Limit(
        LimitKind.TOLERANCE,
        "%",
        f"{_N42_13} applied per geometry; {_TG181} geometry dependence; test required by {_FORMER_35_50}",
        warn=5.0,
        fail=10.0,
    ),
    # Background with the chamber empty. TG-181 asks for a daily background check without a
    # number, and no standard we could check sets one: this is an engineering default. 370 kBq
    # (10 uCi) is 1 % of a 37 MBq (1 mCi) dosage, the low end of routine diagnostic dosages, so
    # a larger background biases such a dosage by more than 1 %; 37 kBq warns a decade earlier.
    "background": Limit(
        LimitKind.CEILING,
        "Bq",
        f"hotlab engineering default (no standard sets a number): warn 37 kBq (1 uCi), fail 370 kBq (10 uCi, 1 % of a 37 MBq dosage); {_TG181} daily background check",
        warn=37e3,
        fail=370e3,
    ),
    # Ga-68 elution yield: the GalliaPharm SmPC (Eckert & Ziegler), section 2 "Qualitative and
    # quantitative composition", states that with mother and daughter in equilibrium more than
    # 60 % of the present Ga-68 can be eluted; a yield below 60 % is outside that specification.
    # 65 % warns early.
    "elution_yield_ga68": Limit(
        LimitKind.FLOOR,
        "%",
        "GalliaPharm SmPC section 2 (yield specification): > 60 % of present Ga-68 elutable at equilibrium; warn 65 % is a hotlab early-warning margin",
        warn=65.0,
        fail=60.0,
    ),
    # Tc-99m elution efficiency: manufacturers' leaflets differ; set these from your generator's
    # leaflet. The defaults flag a generator clearly below the typical >90 % efficiency of
    # dry/wet column Mo-99/Tc-99m generators.
    "elution_yield_tc99m": Limit(
        LimitKind.FLOOR,
        "%",
        "hotlab default, set from the generator leaflet: warn < 90 %, fail < 80 % elution efficiency",
        warn=90.0,
        fail=80.0,
    ),
}

# Ph. Eur. monograph 2464 (Gallium (68Ga) chloride solution for radiolabelling): germanium-68 and
# gamma-emitting impurities maximum 0.001 % of total radioactivity, tested on the eluate after 48 h;
# identification by half-life, 62 min to 74 min.
_GE68_PH_EUR = Limit(
    LimitKind.CEILING,
    "%",
    "Ph. Eur. 2464 Gallium (68Ga) chloride solution for radiolabelling: Ge-68 max 0.001 % of the Ga-68 at end of elution",
    fail=0.001,
)
_GA68_HALF_LIFE_PH_EUR = Limit(
    LimitKind.RANGE,
    "min",
    "Ph. Eur. 2464 identification: half-life 62 min to 74 min",
    low=62.0,
    high=74.0,
)
# 10 CFR 35.204(a) (checked, text as amended 2007): a licensee may not administer a
# radiopharmaceutical containing more than 0.15 kBq Mo-99 per MBq Tc-99m, more than 0.02 kBq
# Sr-82 or 0.2 kBq Sr-85 per MBq Rb-82. "May not administer" makes it a limit at administration;
# 35.3204 requires a report when an eluate exceeded it at the time of elution. 35.204(c): Sr-82
# and Sr-85 are measured before the first patient use of the day.
_MO99_NRC = Limit(
    LimitKind.CEILING,
    "kBq/MBq",
    "10 CFR 35.204(a)(1): max 0.15 kBq Mo-99 per MBq Tc-99m at administration (35.3204: reportable if "
    "exceeded at elution); measured per 35.204(b)",
    fail=0.15,
)
_SR82_NRC = Limit(
    LimitKind.CEILING,
    "kBq/MBq",
    "10 CFR 35.204(a)(2): max 0.02 kBq Sr-82 per MBq Rb-82; measured before the first patient use of the day, 35.204(c)",
    fail=0.02,
)
_SR85_NRC = Limit(
    LimitKind.CEILING,
    "kBq/MBq",
    "10 CFR 35.204(a)(2): max 0.2 kBq Sr-85 per MBq Rb-82; measured before the first patient use of the day, 35.204(c)",
    fail=0.2,
)
# Lu-177m in carrier-added Lu-177 (made from Lu-176 by neutron capture, which also makes the
# 160 d isomer). The one figure checked against a public text is the LutaPol (POLATOM, carrier-added,
# EU-authorised) product specification, 177mLu <= 0.05 %; the page does not say at which time.
# The Ph. Eur. monograph on lutetium (177Lu) solution for radiolabelling could not be checked here.
_LU177M_SPEC = Limit(
    LimitKind.CEILING,
    "%",
    "LutaPol (POLATOM) product specification: Lu-177m <= 0.05 % of Lu-177 (checked on the manufacturer's page; "
    "the time it refers to is not stated there)",
    fail=0.05,
)
# 10 CFR 35.63(d): a dosage may not be used if it differs from the prescribed dosage by more
# than 20 % (unless the authorized user directs otherwise).
_DOSAGE_NRC = Limit(
    LimitKind.TOLERANCE,
    "%",
    "10 CFR 35.63(d): dosage within +-20 % of the prescribed dosage",
    fail=20.0,
)


def _instead(limit: Limit, why: str) -> Limit:
    """`limit` applied in a profile that has no limit of its own for the test; the source says why."""
    return replace(limit, source=f"{why}; applied instead: {limit.source}")


#: The dose-calibrator tests: the pharmacopoeia profiles apply ANSI N42.13 to them.
_CALIBRATOR_TESTS = ("constancy", "accuracy", "linearity", "linearity_sleeve", "geometry")
_NO_NRC_RULE = "us-nrc: no NRC regulation sets this limit"
_PH_EUR_NO_CALIBRATOR = "ph-eur: no Ph. Eur. text checked here sets a dose-calibrator tolerance"
_CHP_NOT_CHECKED = "chp: the Chinese Pharmacopoeia text for this test could not be checked here"

#: The jurisdiction profiles (`[qc] profile`); the first is the default.
PROFILES: tuple[str, ...] = ("us-nrc", "ph-eur", "chp")
DEFAULT_PROFILE = PROFILES[0]

#: Every default limit of every profile, with its source.
PROFILE_LIMITS: dict[str, dict[str, Limit]] = {
    "us-nrc": _CALIBRATOR_AND_GENERATOR
    | {
        "ge68_breakthrough": _instead(_GE68_PH_EUR, f"{_NO_NRC_RULE} for Ge-68 in Ga-68 eluate"),
        "ga68_half_life": _instead(_GA68_HALF_LIFE_PH_EUR, f"{_NO_NRC_RULE} for Ga-68 identity"),
        "mo99_breakthrough": _MO99_NRC,
        "sr82_breakthrough": _SR82_NRC,
        "sr85_breakthrough": _SR85_NRC,
        "lu177m_ratio": _instead(_LU177M_SPEC, f"{_NO_NRC_RULE} for Lu-177m"),
        "dosage": _DOSAGE_NRC,
    },
    "ph-eur": {
        test: _instead(limit, _PH_EUR_NO_CALIBRATOR) if test in _CALIBRATOR_TESTS else limit
        for test, limit in _CALIBRATOR_AND_GENERATOR.items()
    }
    | {
        "ge68_breakthrough": _GE68_PH_EUR,
        "ga68_half_life": _GA68_HALF_LIFE_PH_EUR,
        # 0.1 % of total radioactivity is Mo/(Mo + Tc) = 1e-3, i.e. Mo/Tc = 1.001 kBq/MBq: 1.0 is
        # the limit in the unit every profile judges Mo-99 in (0.1 % tighter, never looser).
        "mo99_breakthrough": Limit(
            LimitKind.CEILING,
            "kBq/MBq",
            "Ph. Eur. 0124 (fission) / 0283 (non-fission) Sodium pertechnetate (99mTc) injection: Mo-99 max 0.1 % of "
            "total radioactivity, taken as 1.0 kBq/MBq; value as cited, monograph text and the time it applies to NOT "
            "checked here (judged at administration like 10 CFR 35.204)",
            fail=1.0,
        ),
        "sr82_breakthrough": _instead(
            _SR82_NRC, "ph-eur: the Ph. Eur. rubidium (82Rb) injection text could not be checked here"
        ),
        "sr85_breakthrough": _instead(
            _SR85_NRC, "ph-eur: the Ph. Eur. rubidium (82Rb) injection text could not be checked here"
        ),
        "lu177m_ratio": _instead(
            _LU177M_SPEC,
            "ph-eur: the Ph. Eur. lutetium (177Lu) solution for radiolabelling limit could not be checked here",
        ),
        "dosage": _instead(_DOSAGE_NRC, "ph-eur: no Ph. Eur. patient-dosage tolerance was found"),
    },
    "chp": {
        test: _instead(limit, _CHP_NOT_CHECKED) if test in _CALIBRATOR_TESTS else limit
        for test, limit in _CALIBRATOR_AND_GENERATOR.items()
    }
    | {
        "ge68_breakthrough": _instead(_GE68_PH_EUR, _CHP_NOT_CHECKED),
        "ga68_half_life": _instead(_GA68_HALF_LIFE_PH_EUR, _CHP_NOT_CHECKED),
        # The strictest checked figure, so this profile never passes what a checked text fails.
        "mo99_breakthrough": _instead(
            _MO99_NRC,
            "chp: the ChP sodium pertechnetate [99mTc] injection limit could not be checked here, so the strictest "
            "checked figure",
        ),
        "sr82_breakthrough": _instead(_SR82_NRC, _CHP_NOT_CHECKED),
        "sr85_breakthrough": _instead(_SR85_NRC, _CHP_NOT_CHECKED),
        "lu177m_ratio": _instead(_LU177M_SPEC, _CHP_NOT_CHECKED),
        "dosage": _instead(_DOSAGE_NRC, _CHP_NOT_CHECKED),
    },
}

#: The default profile's limits.
DEFAULT_LIMITS: dict[str, Limit] = PROFILE_LIMITS[DEFAULT_PROFILE]

#: Which yield limit applies to a generator, by daughter nuclide (canonical names).
YIELD_LIMIT_BY_DAUGHTER: dict[str, str] = {"Ga-68": "elution_yield_ga68", "Tc-99m": "elution_yield_tc99m"}


def load_limits(
    overrides: ConfigTable | Mapping[str, Any] | None = None, profile: str = DEFAULT_PROFILE
) -> dict[str, Limit]:
    """The `profile`'s limits with a site's overrides applied; unknown profiles, tests or keys are errors naming the key.

    `overrides` is the [qc.limits] table: a ConfigTable from a caller that knows the file (its errors
    then name it), or the mapping itself, whose errors start at `qc.limits`. `profile` is the value
    of `[qc] profile`.
    """
    table = overrides if isinstance(overrides, ConfigTable) else ConfigTable(overrides or {}, "qc.limits")
    if profile not in PROFILE_LIMITS:
        qc = ConfigTable({}, "qc", file=table.file)
        raise qc.error("profile", f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
    limits: dict[str, Limit] = {}
    for test, default in PROFILE_LIMITS[profile].items():
        override = table.table(test)
        limits[test] = default if override is None else _override(default, override)
    table.finish("test")
    return limits


def _override(default: Limit, table: ConfigTable) -> Limit:
    """`default` with a site's numbers and source; only the levels its kind judges by are accepted.

    A range has no warn/fail levels and the other kinds no low/high bounds, so such a key would be
    silently ignored: it is refused like any other unknown key instead.
    """
    warn, fail, low, high = default.warn, default.fail, default.low, default.high
    if default.kind is LimitKind.RANGE:
        low, high = table.number("low", low), table.number("high", high)
    else:
        warn, fail = table.number("warn", warn), table.number("fail", fail)
    source = table.string("source", f"site configuration (default: {default.source})")
    table.finish()
    try:
        return replace(default, warn=warn, fail=fail, low=low, high=high, source=source)
    except QcConfigError as exc:  # the levels are each valid but do not fit together
        raise table.error(None, str(exc)) from None

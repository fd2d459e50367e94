"""Nuclide library: evaluated half-lives with uncertainty and source, and the decay links
that matter in a hot lab (generator parent -> daughter, isomer -> ground state).

Why a hand-kept table and not a nuclear-data package: every decay correction the QC engine
signs off is traceable to one named evaluation, and the table is small enough to review line by
line. Half-lives are the DDEP recommended values (Decay Data Evaluation Project, published by
LNHB, "Table de Radionucleides") where this table uses DDEP, otherwise the ENSDF value as shown
by NNDC NuDat 3; the `source` of every entry says which. Uncertainties are standard (k=1)
uncertainties in the last digits, as both evaluations quote them. `radioactivedecay` (ICRP-107)
is used only by the tests, to cross-check this table, never at run time.

Names are canonical "Symbol-A" (`Ga-68`) with a lowercase `m` for a metastable state
(`Tc-99m`, `Lu-177m`); `normalize_name` accepts the common lab spellings (`68Ga`, `ga68`,
`99mTc`, `GA 68`, `gallium-68`).
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass

from hotlab.errors import InputError

# Unit lengths in seconds. Years are converted with the tropical year, 365.24219 d; choosing
# the Julian year instead would move a 30-year half-life by 0.002 %, far inside its uncertainty.
MINUTE_S = 60.0
HOUR_S = 3600.0
DAY_S = 86400.0
YEAR_S = 365.24219 * DAY_S

DDEP = "DDEP (LNHB recommended data)"
ENSDF = "ENSDF (NNDC NuDat 3)"


class UnknownNuclideError(InputError):
    """A nuclide name that is not in the library or cannot be read; the message suggests spellings."""


@dataclass(frozen=True)
class Decay:
    """One decay branch to a radioactive daughter; `branching` is the fraction of parent decays that feed it."""

    daughter: str
    branching: float
    source: str


@dataclass(frozen=True)
class Nuclide:
    """A radionuclide with its evaluated half-life (seconds), standard uncertainty and source."""

    name: str
    half_life_s: float
    half_life_unc_s: float
    source: str
    decays: tuple[Decay, ...] = ()

    @property
    def decay_constant_per_s(self) -> float:
        """lambda = ln 2 / T1/2, in 1/s."""
        return math.log(2.0) / self.half_life_s

    def branching_to(self, daughter: str) -> float | None:
        """Fraction of this nuclide's decays that feed `daughter`, or None if it is not a listed daughter."""
        for decay in self.decays:
            if decay.daughter == daughter:
                return decay.branching
        return None


def _nuclide(name: str, value: float, unc: float, unit_s: float, source: str, *decays: Decay) -> Nuclide:
    return Nuclide(name, value * unit_s, unc * unit_s, source, tuple(decays))


# Only branches to radioactive daughters are listed: a stable daughter carries no activity.
# Each line quotes the evaluated value as published, value (uncertainty in last digits) unit.
_LIBRARY: tuple[Nuclide, ...] = (
    # PET, cyclotron-produced
    _nuclide("F-18", 109.77, 0.05, MINUTE_S, ENSDF),  # 109.77 (5) min
    _nuclide("C-11", 20.364, 0.014, MINUTE_S, ENSDF),  # 20.364 (14) min
    _nuclide("N-13", 9.965, 0.004, MINUTE_S, ENSDF),  # 9.965 (4) min
    _nuclide("O-15", 122.24, 0.16, 1.0, ENSDF),  # 122.24 (16) s
    _nuclide("Cu-64", 12.701, 0.002, HOUR_S, ENSDF),  # 12.701 (2) h
    _nuclide("Zr-89", 78.41, 0.12, HOUR_S, ENSDF),  # 78.41 (12) h
    # Generators and their daughters
    _nuclide(
        "Ge-68",
        270.95,
        0.26,
        DAY_S,
        DDEP,  # 270.95 (26) d
        Decay("Ga-68", 1.0, "DDEP: Ge-68 decays 100 % by electron capture to Ga-68 ground state"),
    ),
    # DDEP update by N. K. Kuzmenko, Appl. Radiat. Isot. 152 (2019) 188; ENSDF (2012) has 67.71 (9) min.
    _nuclide("Ga-68", 67.83, 0.20, MINUTE_S, DDEP),  # 67.83 (20) min
    _nuclide(
        # LNHB sheet (Morillon, Be, Chechev, Egorov, 2004; tables of 2012): 2.7479 (6) d = 65.950 (14) h.
        # ENSDF, as IAEA LiveChart shows it, has 65.924 h; this entry quoted that value under DDEP's name
        # until 2026-11-26.
        "Mo-99",
        2.7479,
        0.0006,
        DAY_S,
        DDEP,  # 2.7479 (6) d
        # Fraction of Mo-99 beta decays that end in the 142.7 keV isomer (directly or by gamma
        # cascade); the rest feeds the Tc-99 ground state. ICRP Publication 107 (2008, ENSDF-based)
        # gives 0.8773; radiopharmacy texts round it to 87.5-88 % (IAEA Human Health Campus:
        # "about 12.5 %" direct to the ground state).
        Decay("Tc-99m", 0.8773, "ICRP Publication 107 (2008), ENSDF-based"),
        Decay("Tc-99", 0.1227, "ICRP Publication 107 (2008), ENSDF-based"),
    ),
    _nuclide(
        "Tc-99m",
        6.0067,
        0.0010,
        HOUR_S,
        DDEP,  # 6.0067 (10) h; ENSDF (2017) 6.0072 (9) h
        # IT 99.9963 (6) %, the rest beta- to Ru-99: ENSDF, E. Browne & J. K. Tuli, NDS 145 (2017) 25.
        Decay("Tc-99", 0.999963, "ENSDF (Browne & Tuli, NDS 145, 2017): IT 99.9963 (6) %"),
    ),
    _nuclide(
        "Sr-82",
        25.35,
        0.03,
        DAY_S,
        ENSDF,  # 25.35 (3) d
        Decay("Rb-82", 1.0, "ENSDF: Sr-82 decays 100 % by electron capture to Rb-82"),
    ),
    _nuclide("Rb-82", 1.2575, 0.0002, MINUTE_S, ENSDF),  # 1.2575 (2) min
    # Sr-85 rides along with Sr-82 in the generator column (both made by spallation); it decays by
    # electron capture to stable Rb-85, so no daughter is listed.
    _nuclide("Sr-85", 64.850, 0.007, DAY_S, ENSDF),  # 64.850 (7) d
    # Therapy
    _nuclide("Lu-177", 6.6443, 0.0009, DAY_S, ENSDF),  # 6.6443 (9) d
    _nuclide(
        "Lu-177m",
        160.44,
        0.06,
        DAY_S,
        ENSDF,  # 160.44 (6) d
        # Isomeric transition 21.4 (20) %, beta- to Hf-177 78.6 % (ENSDF).
        Decay("Lu-177", 0.214, "ENSDF: IT branch 21.4 (20) %"),
    ),
    _nuclide("Y-90", 64.053, 0.020, HOUR_S, ENSDF),  # 64.053 (20) h
    _nuclide("I-131", 8.0233, 0.0019, DAY_S, DDEP),  # 8.0233 (19) d
    _nuclide("Sm-153", 46.284, 0.004, HOUR_S, ENSDF),  # 46.284 (4) h
    _nuclide("Ho-166", 26.824, 0.012, HOUR_S, ENSDF),  # 26.824 (12) h
    _nuclide(
        "Ra-223",
        11.43,
        0.03,
        DAY_S,
        ENSDF,  # 11.43 (3) d
        # Alpha 100 %; the C-14 cluster branch (~9e-10) is negligible for activity.
        Decay("Rn-219", 1.0, "ENSDF: alpha 100 %"),
    ),
    _nuclide(
        "Ac-225",
        9.920,
        0.003,
        DAY_S,
        ENSDF,  # 9.920 (3) d
        Decay("Fr-221", 1.0, "ENSDF: alpha 100 %"),
    ),
    # SPECT
    _nuclide("I-123", 13.2235, 0.0019, HOUR_S, DDEP),  # 13.2235 (19) h
    # DDEP (BIPM-5, Table of Radionuclides vol. 3, 2006) has 2.8049 d; this is the ENSDF value.
    _nuclide("In-111", 2.8047, 0.0004, DAY_S, ENSDF),  # 2.8047 (4) d
    _nuclide("Tl-201", 3.0421, 0.0017, DAY_S, DDEP),  # 3.0421 (17) d
    # Dose-calibrator check sources
    _nuclide(
        "Cs-137",
        30.08,
        0.09,
        YEAR_S,
        ENSDF,  # 30.08 (9) y
        # Ba-137m (2.552 min) carries the 661.7 keV line a calibrator sees.
        Decay("Ba-137m", 0.9470, "ENSDF: beta- to the 661.7 keV level, 94.70 (20) %"),
    ),
    # LNHB sheet by V. P. Chechev and N. K. Kuzmenko (2014, revised 2017); the earlier DDEP value was 271.80 (5) d.
    _nuclide("Co-57", 271.81, 0.04, DAY_S, DDEP),  # 271.81 (4) d
    _nuclide("Ba-133", 10.540, 0.006, YEAR_S, DDEP),  # 10.540 (6) a
)

NUCLIDES: dict[str, Nuclide] = {nuclide.name: nuclide for nuclide in _LIBRARY}

# Every element symbol, so that "99MO" is read as Mo-99 and not as an isomer of element "O".
_SYMBOLS = (
    "H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As Se Br "
    "Kr Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm Eu Gd Tb Dy Ho "
    "Er Tm Yb Lu Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U Np Pu Am Cm Bk Cf Es "
    "Fm Md No Lr Rf Db Sg Bh Hs Mt Ds Rg Cn Nh Fl Mc Lv Ts Og"
).split()
_ELEMENT_BY_KEY: dict[str, str] = {symbol.lower(): symbol for symbol in _SYMBOLS}
# Full names, for the elements in the library only (what a label or a prescription spells out).
_ELEMENT_BY_KEY.update(
    {
        "fluorine": "F",
        "carbon": "C",
        "nitrogen": "N",
        "oxygen": "O",
        "copper": "Cu",
        "zirconium": "Zr",
        "germanium": "Ge",
        "gallium": "Ga",
        "molybdenum": "Mo",
        "technetium": "Tc",
        "strontium": "Sr",
        "rubidium": "Rb",
        "lutetium": "Lu",
        "yttrium": "Y",
        "iodine": "I",
        "samarium": "Sm",
        "holmium": "Ho",
        "radium": "Ra",
        "actinium": "Ac",
        "indium": "In",
        "thallium": "Tl",
        "caesium": "Cs",
        "cesium": "Cs",
        "cobalt": "Co",
        "barium": "Ba",
        "radon": "Rn",
        "francium": "Fr",
        "hafnium": "Hf",
    }
)

_SEP = r"[\s_\-]*"
# Symbol first: "Ga-68", "ga68", "Tc 99m", "Tc-99m1", "gallium-68".
_SYMBOL_FIRST = re.compile(rf"^(?P<element>[a-z]+){_SEP}(?P<mass>\d{{1,3}}){_SEP}(?P<meta>m\d?)?$")
# Mass first: "68Ga", "99mTc", "99m-Tc", "177m Lu". The meta group may steal an "m" from the
# symbol ("99Mo"), so both readings are tried and only a real element is accepted.
_MASS_FIRST = re.compile(rf"^(?P<mass>\d{{1,3}}){_SEP}(?P<meta>m\d?)?{_SEP}(?P<element>[a-z]+)$")
_MASS_FIRST_NO_META = re.compile(rf"^(?P<mass>\d{{1,3}}){_SEP}(?P<element>[a-z]+)$")


def _how_to_spell() -> str:
    return "write the element symbol and mass number, e.g. Ga-68, Tc-99m, 68Ga or Lu177"


def normalize_name(text: str) -> str:
    """Return the canonical spelling (`Ga-68`, `Tc-99m`) of a nuclide name written any common way.

    The result need not be in the library (`co60` -> `Co-60`); `get_nuclide` checks that.
    Raises UnknownNuclideError if `text` is not a readable nuclide name at all.
    """
    key = text.strip().lower()
    for pattern in (_SYMBOL_FIRST, _MASS_FIRST_NO_META, _MASS_FIRST):
        match = pattern.match(key)
        if match is None:
            continue
        element = _ELEMENT_BY_KEY.get(match["element"])
        if element is None:
            continue
        meta = "m" if match.groupdict().get("meta") else ""
        return f"{element}-{int(match['mass'])}{meta}"
    raise UnknownNuclideError(f"cannot read nuclide name {text!r}; {_how_to_spell()}")


def _suggestions(text: str, canonical: str | None) -> list[str]:
    by_lower = {name.lower(): name for name in NUCLIDES}
    probes = [text.strip().lower()] + ([canonical.lower()] if canonical else [])
    found: list[str] = []
    for probe in probes:
        for close in difflib.get_close_matches(probe, list(by_lower), n=3, cutoff=0.6):
            if by_lower[close] not in found:
                found.append(by_lower[close])
    return found[:3]


def get_nuclide(text: str) -> Nuclide:
    """Look a nuclide up by any common spelling; UnknownNuclideError names close matches if absent."""
    try:
        canonical: str | None = normalize_name(text)
    except UnknownNuclideError:
        canonical = None
    if canonical is not None and canonical in NUCLIDES:
        return NUCLIDES[canonical]
    close = _suggestions(text, canonical)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    what = f"nuclide {text!r} is not in the library" if canonical else f"cannot read nuclide name {text!r}"
    raise UnknownNuclideError(f"{what}; {hint}{_how_to_spell()}; known: {', '.join(sorted(NUCLIDES))}")

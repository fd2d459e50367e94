"""Limits: verdict bands, the at-the-limit rule, sources, and site overrides."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hotlab.controller.config_table import ConfigError, ConfigTable
from hotlab.controller.qc.limits import DEFAULT_LIMITS, Limit, LimitKind, QcConfigError, load_limits
from hotlab.errors import InputError


def test_every_default_names_its_source() -> None:
    for test, limit in DEFAULT_LIMITS.items():
        assert len(limit.source) > 20, test
    assert "35.204" in DEFAULT_LIMITS["mo99_breakthrough"].source
    assert "2464" in DEFAULT_LIMITS["ge68_breakthrough"].source
    assert "35.63" in DEFAULT_LIMITS["dosage"].source


@pytest.mark.parametrize(
    ("deviation", "verdict"),
    [
        (0.0, "pass"),
        (5.0, "pass"),
        (-5.0, "pass"),
        (5.0001, "warn"),
        (10.0, "warn"),
        (-10.0, "warn"),
        (10.0001, "fail"),
        (-12.0, "fail"),
    ],
)
def test_tolerance_at_the_limit_is_within(deviation: float, verdict: str) -> None:
    assert DEFAULT_LIMITS["constancy"].judge(deviation) == verdict


def test_float_rounding_at_the_boundary_does_not_flip_the_verdict() -> None:
    # 1.05 * 100 is 105.00000000000001 in binary floating point: still exactly "5 %".
    deviation = (1.05 * 100.0 / 100.0 - 1.0) * 100.0
    assert deviation != 5.0
    assert DEFAULT_LIMITS["constancy"].judge(deviation) == "pass"


def test_ceiling_floor_and_range() -> None:
    mo99 = DEFAULT_LIMITS["mo99_breakthrough"]
    assert (mo99.judge(0.15), mo99.judge(0.1501)) == ("pass", "fail")
    ga = DEFAULT_LIMITS["elution_yield_ga68"]
    assert (ga.judge(65.0), ga.judge(64.9), ga.judge(60.0), ga.judge(59.9)) == ("pass", "warn", "warn", "fail")
    half_life = DEFAULT_LIMITS["ga68_half_life"]
    assert [half_life.judge(v) for v in (61.99, 62.0, 67.83, 74.0, 74.01)] == ["fail", "pass", "pass", "pass", "fail"]


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=-1e3, max_value=1e3, allow_nan=False))
def test_tolerance_verdict_is_monotonic_in_magnitude(deviation: float) -> None:
    order = {"pass": 0, "warn": 1, "fail": 2}
    limit = DEFAULT_LIMITS["accuracy"]
    assert order[limit.judge(deviation)] <= order[limit.judge(abs(deviation) * 1.5 + 0.01)]


def test_site_override_keeps_the_default_source_in_view() -> None:
    limits = load_limits({"constancy": {"warn": 3.0, "fail": 6.0}})
    assert (limits["constancy"].warn, limits["constancy"].fail) == (3.0, 6.0)
    assert limits["constancy"].source.startswith("site configuration (default: AAPM")
    assert limits["constancy"].judge(4.0) == "warn"
    assert limits["accuracy"] is DEFAULT_LIMITS["accuracy"]


def test_override_with_own_source() -> None:
    limits = load_limits({"dosage": {"fail": 10.0, "source": "local SOP RP-12"}})
    assert limits["dosage"].source == "local SOP RP-12"
    assert limits["dosage"].judge(15.0) == "fail"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"constancyy": {"warn": 1.0}},
            "qc.limits.constancyy: unknown test (did you mean 'constancy'?); allowed here: ",
        ),
        ({"constancy": {"wran": 1.0}}, "qc.limits.constancy.wran: unknown key (did you mean 'warn'?)"),
        ({"constancy": {"warn": "five"}}, "qc.limits.constancy.warn: must be a finite number, got 'five' (string)"),
        (
            {"constancy": {"warn": 12.0}},
            "qc.limits.constancy: warn level 12.0 must be at or below the fail level 10.0 for a tolerance",
        ),
        (
            {"elution_yield_ga68": {"warn": 50.0}},
            "qc.limits.elution_yield_ga68: warn level 50.0 must be at or above the fail level 60.0",
        ),
        ({"ga68_half_life": {"low": 80.0}}, "qc.limits.ga68_half_life: a range limit needs low < high"),
        ({"constancy": 5}, "qc.limits.constancy: must be a table, got 5 (integer)"),
    ],
)
def test_bad_overrides_are_rejected_clearly(overrides: dict, message: str) -> None:
    with pytest.raises(QcConfigError) as info:
        load_limits(overrides)
    assert str(info.value).startswith(message)


def test_an_unknown_test_error_lists_every_known_test() -> None:
    with pytest.raises(QcConfigError) as info:
        load_limits({"constancyy": {"warn": 1.0}})
    assert str(info.value).endswith("allowed here: " + ", ".join(sorted(DEFAULT_LIMITS)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"ga68_half_life": {"warn": 63.0}},
            "qc.limits.ga68_half_life.warn: unknown key; allowed here: high, low, source",
        ),
        ({"constancy": {"low": 1.0}}, "qc.limits.constancy.low: unknown key; allowed here: fail, source, warn"),
    ],
)
def test_only_the_levels_a_limit_judges_by_are_accepted(overrides: dict, message: str) -> None:
    # A warn level on a range (or bounds on a tolerance) used to be ignored without a word.
    with pytest.raises(QcConfigError) as info:
        load_limits(overrides)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (math.nan, "qc.limits.dosage.fail: must be a finite number, got nan (number)"),
        (math.inf, "qc.limits.dosage.fail: must be a finite number, got inf (number)"),
        (True, "qc.limits.dosage.fail: must be a finite number, got True (boolean)"),
    ],
)
def test_a_level_must_be_a_finite_number(value: object, message: str) -> None:
    with pytest.raises(QcConfigError) as info:
        load_limits({"dosage": {"fail": value}})
    assert str(info.value) == message


def test_a_source_must_be_text_that_says_something() -> None:
    with pytest.raises(QcConfigError, match=r"^qc\.limits\.dosage\.source: must be a string, got 12 \(integer\)$"):
        load_limits({"dosage": {"source": 12}})
    with pytest.raises(QcConfigError, match=r"^qc\.limits\.dosage\.source: must not be empty$"):
        load_limits({"dosage": {"source": " "}})


def test_a_table_read_from_a_file_names_the_file() -> None:
    table = ConfigTable({"constancy": {"warn": "five"}}, "qc.limits", file="site.toml")
    with pytest.raises(QcConfigError) as info:
        load_limits(table)
    assert str(info.value) == "site.toml: qc.limits.constancy.warn: must be a finite number, got 'five' (string)"


def test_limit_errors_are_config_errors_with_exit_code_2() -> None:
    assert QcConfigError is ConfigError and issubclass(QcConfigError, InputError)
    assert QcConfigError.exit_code == 2


def test_limit_text_and_numbers() -> None:
    limit = Limit(LimitKind.CEILING, "%", "test", fail=0.001)
    assert limit.text == "pass value <= 0.001 %, fail > 0.001 %"
    assert limit.as_dict() == {"kind": "ceiling", "unit": "%", "fail": 0.001}


def test_default_sources_cite_only_what_was_checked() -> None:
    # The calibrator tolerances rest on ANSI N42.13-2004 s.2.2; no default cites the unverified former 35.50(d).
    assert all("35.50(d)" not in limit.source for limit in DEFAULT_LIMITS.values())
    assert "ANSI N42.13-2004 s.2.2 (accuracy +-10 %, reproducibility +-5 %)" in DEFAULT_LIMITS["accuracy"].source
    assert DEFAULT_LIMITS["elution_yield_ga68"].source.startswith("GalliaPharm SmPC section 2")
    assert DEFAULT_LIMITS["background"].source.startswith("hotlab engineering default")


def test_linearity_is_judged_per_point_at_5_percent_and_says_what_was_not_checked() -> None:
    for test in ("linearity", "linearity_sleeve"):
        limit = DEFAULT_LIMITS[test]
        assert (limit.kind, limit.warn, limit.fail) == (LimitKind.TOLERANCE, None, 5.0)
        assert [limit.judge(d) for d in (5.0, -5.0, 5.0001, -8.0)] == ["pass", "pass", "fail", "fail"]
        assert "AAPM Report 181 (TG-181, 2012)" in limit.source and "ANSI N42.13-2004" in limit.source
        assert "not checked against either text" in limit.source
    # The fitted half-life is a diagnostic inside the linearity result now, with no limit of its own.
    with pytest.raises(QcConfigError, match="qc.limits.linearity_half_life: unknown test"):
        load_limits({"linearity_half_life": {"warn": 2.0}})
    assert load_limits({"linearity": {"warn": 3.0}})["linearity"].judge(4.0) == "warn"

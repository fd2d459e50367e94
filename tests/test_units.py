"""Activity unit parsing and conversion: the curie is exactly 3.7e10 Bq."""

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hotlab.physics.units import (
    ACTIVITY_UNITS,
    UnitError,
    canonical_unit,
    format_activity,
    from_bq,
    parse_activity,
    to_bq,
)


@pytest.mark.parametrize(
    ("text", "expected_bq"),
    [
        ("7.4GBq", 7.4e9),
        ("200 mCi", 7.4e9),
        ("1 Ci", 3.7e10),
        ("27.027 uCi", 27.027 * 3.7e4),
        ("5µCi", 5 * 3.7e4),
        ("3.5e6 Bq", 3.5e6),
        ("12 kbq", 12e3),
        ("3 mbq", 3e6),
        (".5 MBq", 5e5),
    ],
)
def test_parse_activity(text: str, expected_bq: float) -> None:
    assert parse_activity(text) == pytest.approx(expected_bq, rel=1e-12)


@pytest.mark.parametrize("text", ["", "GBq", "7.4", "7.4 Gy", "-1 MBq", "1..2 MBq", "nan MBq"])
def test_bad_activity_is_a_unit_error_naming_the_input(text: str) -> None:
    with pytest.raises(UnitError) as excinfo:
        parse_activity(text)
    assert repr(text) in str(excinfo.value) or "unknown activity unit" in str(excinfo.value)


#: Beyond the largest float (about 1.8e308): the number itself (1e400), or the number times its unit.
@pytest.mark.parametrize("text", ["1e400GBq", "1e308 TBq", "2e307 Ci"])
def test_an_activity_beyond_the_float_range_is_refused_not_infinite(text: str) -> None:
    with pytest.raises(UnitError, match=f"{re.escape(repr(text))} is too large"):
        parse_activity(text)


def test_the_largest_activity_that_fits_is_still_read() -> None:
    assert parse_activity("1e300 Bq") == 1e300


def test_unknown_unit_lists_the_allowed_ones() -> None:
    with pytest.raises(UnitError, match="allowed: Bq, kBq, MBq, GBq, TBq, uCi, mCi, Ci"):
        canonical_unit("Gy")


@settings(max_examples=200)
@given(value=st.floats(min_value=0, max_value=1e15, allow_nan=False), unit=st.sampled_from(sorted(ACTIVITY_UNITS)))
def test_to_and_from_bq_round_trip(value: float, unit: str) -> None:
    assert math.isclose(from_bq(to_bq(value, unit), unit), value, rel_tol=1e-12, abs_tol=1e-300)


def test_format_picks_a_fitting_prefix_or_the_requested_unit() -> None:
    assert format_activity(7.4e9) == "7.4 GBq"
    assert format_activity(7.4e9, "mCi") == "200 mCi"
    assert format_activity(12.0) == "12 Bq"


@pytest.mark.parametrize(("text", "suggestion"), [("5 mBq", "MBq"), ("2 MCi", "mCi"), ("1 KBq", "kBq")])
def test_prefix_case_that_changes_the_magnitude_is_refused(text: str, suggestion: str) -> None:
    with pytest.raises(UnitError, match=f"did you mean {suggestion}"):
        parse_activity(text)

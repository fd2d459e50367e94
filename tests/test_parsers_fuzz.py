"""Property tests of the calibrator frame parsers.

No byte string may make a parser fail with anything but FrameError (ChecksumError is one),
and what a simulator formats, the driver's parser must read back to the same nuclide and
activity within the display's resolution.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hotlab.drivers import atomlab500, crc15r, vdc404, vik202
from hotlab.drivers.records import ChecksumError, FrameError
from hotlab.physics.nuclides import NUCLIDES
from hotlab.physics.units import ACTIVITY_UNITS
from hotlab.simulators import calibrator_atomlab500, calibrator_crc15r, calibrator_vdc404, calibrator_vik202
from hotlab.simulators.source import CURIE_LADDER

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUND_TRIP = settings(max_examples=150, deadline=None)

#: Characters the real frames are made of, so fuzzing also reaches the deep branches.
_FRAME_ALPHABET = "0123456789.-+eE ,:*>@AEFRTcmMBkqGuiCIOSR\r\n\x03"
frames = st.one_of(
    st.binary(max_size=80),
    st.text(alphabet=_FRAME_ALPHABET, max_size=40).map(lambda t: t.encode("latin-1")),
    st.text(alphabet=_FRAME_ALPHABET, max_size=30).map(lambda t: t.encode("latin-1") + b"\r\n"),
)

PARSERS: dict[str, Callable[[bytes], object]] = {
    "vik202.parse_reply": vik202.parse_reply,
    "vik202.parse_number": vik202.parse_number,
    "vik202.parse_factor": vik202.parse_factor,
    "crc15r.parse_frame": crc15r.parse_frame,
    "crc15r.parse_frame(unverified)": lambda f: crc15r.parse_frame(f, verify=False),
    "crc15r.parse_report": crc15r.parse_report,
    "vdc404.parse_line": vdc404.parse_line,
    "atomlab500.parse_line": atomlab500.parse_line,
    "atomlab500.parse_report": atomlab500.parse_report,
    "atomlab500.parse_iso_reply": atomlab500.parse_iso_reply,
}

nuclides = st.sampled_from(sorted(NUCLIDES))
#: Activities a four-digit display shows without losing digits: 1 kBq to 100 TBq.
activities = st.floats(min_value=1e3, max_value=1e14, allow_nan=False, allow_infinity=False)
DISPLAY_REL = 5e-4


@pytest.mark.parametrize("name", sorted(PARSERS))
@FUZZ
@given(frame=frames)
def test_no_bytes_crash_a_parser(name: str, frame: bytes) -> None:
    with contextlib.suppress(FrameError):
        PARSERS[name](frame)


@ROUND_TRIP
@given(value=st.floats(min_value=-1e15, max_value=1e15, allow_nan=False))
def test_vik202_number_round_trip(value: float) -> None:
    frame = vik202.REPLY_PREFIX + calibrator_vik202.format_number(value) + b"\r\n"
    assert vik202.parse_number(vik202.parse_reply(frame)) == pytest.approx(value, rel=5e-5, abs=1e-300)


@ROUND_TRIP
@given(nuclide=nuclides, activity_bq=activities, curie=st.booleans())
def test_crc15r_round_trip(nuclide: str, activity_bq: float, curie: bool) -> None:
    ladder = CURIE_LADDER if curie else calibrator_crc15r.SI_UNITS
    activity_bq = max(activity_bq, ACTIVITY_UNITS[ladder[0]])
    frame = calibrator_crc15r.format_frame(calibrator_crc15r.format_report(nuclide, activity_bq, ladder))
    report = crc15r.parse_report(crc15r.parse_frame(frame))
    assert report.nuclide == nuclide
    assert report.activity_bq == pytest.approx(activity_bq, rel=DISPLAY_REL)


@ROUND_TRIP
@given(nuclide=nuclides, activity_bq=activities)
def test_crc15r_corrupted_checksum_is_always_caught(nuclide: str, activity_bq: float) -> None:
    body = calibrator_crc15r.format_report(nuclide, activity_bq)
    with pytest.raises(ChecksumError):
        crc15r.parse_frame(calibrator_crc15r.format_frame(body, corrupt_checksum=True))


@ROUND_TRIP
@given(nuclide=nuclides, activity_bq=activities)
def test_vdc404_round_trip(nuclide: str, activity_bq: float) -> None:
    line = vdc404.parse_line(calibrator_vdc404.format_line(nuclide, activity_bq))
    assert line.nuclide == nuclide
    assert line.activity_bq == pytest.approx(activity_bq, rel=DISPLAY_REL)


@ROUND_TRIP
@given(nuclide=nuclides, activity_bq=activities)
def test_atomlab500_round_trip(nuclide: str, activity_bq: float) -> None:
    frame = calibrator_atomlab500.format_report(nuclide, activity_bq) + b"\r\n"
    report = atomlab500.parse_report(atomlab500.parse_line(frame))
    assert report.nuclide == nuclide
    assert report.activity_bq == pytest.approx(activity_bq, rel=DISPLAY_REL)
    assert atomlab500.parse_iso_reply(b"ISO " + atomlab500.wire_name(nuclide).encode()) == nuclide


def test_parsers_reject_well_formed_but_wrong_frames() -> None:
    with pytest.raises(FrameError, match="not a number"):
        vik202.parse_number(b"nan")
    with pytest.raises(FrameError, match="out of range"):
        vik202.parse_number(b"9E999")
    with pytest.raises(FrameError, match="unit code 7"):
        crc15r.parse_report(b"A,Tc99m,7,1.0")
    with pytest.raises(FrameError, match="unknown activity unit"):
        vdc404.parse_line(b"Tc-99m: 1.0 Gy\r\n")
    with pytest.raises(FrameError, match="isotope unreadable"):
        atomlab500.parse_report(b"Xq99 1.0 MBq")
    assert crc15r.parse_frame(b"A,Tc99m,5,1.0*2F\r\n", verify=False) == b"A,Tc99m,5,1.0"

"""message_to_line formats the line itself; it must stay byte-for-byte what influxdb_client's Point writes."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from influxdb_client import WritePrecision

from hotlab.controller.messages import Message
from hotlab.controller.sinks.influx_points import (
    LIMIT_NUMBERS,
    SCHEMAS,
    VERDICT_CODES,
    PointError,
    message_to_line,
    message_to_point,
)

T0 = 1_764_000_000_000_000_001
MISSING = object()

#: Text biased towards everything line protocol escapes (or must not escape), plus any unicode.
_TEXT = st.text(st.one_of(st.sampled_from(list(",= \"\\\n\t\r#'")), st.characters()), max_size=12)
_NUMBER = st.one_of(st.floats(), st.integers(), st.integers(min_value=-(2**1100), max_value=2**1100), st.booleans())
_ANYTHING = st.one_of(st.just(MISSING), st.none(), _TEXT, _NUMBER, st.lists(st.integers(), max_size=2))


def _either(draw: st.DrawFn, mappable: bool, good: st.SearchStrategy[Any]) -> Any:
    """A value from `good` when building a mappable message, else mostly-anything (missing included)."""
    return draw(good if mappable else st.one_of(good, _ANYTHING))


@st.composite
def messages(draw: st.DrawFn) -> Message:
    """A message of any kind (an unknown one too); about half are built to map, the rest may not."""
    kind = draw(st.sampled_from([*SCHEMAS, "alarm"]))
    schema = SCHEMAS.get(kind, SCHEMAS["reading"])
    mappable = draw(st.booleans())
    tag = _TEXT.filter(str.strip)
    optional = st.one_of(st.just(MISSING), st.none(), _TEXT)
    present = st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False), st.integers(), st.booleans())
    number = st.one_of(st.just(MISSING), present)
    draft: dict[str, Any] = {
        "msg_id": _either(draw, mappable, _TEXT.filter(bool)),
        "time_ns": _either(draw, mappable, st.integers()),
        "schema": f"hotlab.{kind}/1",
        "raw_frame": draw(_TEXT),
    }
    draft |= {key: _either(draw, mappable, tag) for key in schema.required_tags}
    draft |= {key: _either(draw, mappable, optional) for key in schema.optional_tags}
    draft |= {key: _either(draw, mappable, number) for key in schema.float_fields}
    draft |= {key: draw(_ANYTHING) for key in schema.string_fields}
    if kind == "qc_result":
        draft["verdict"] = _either(draw, mappable, st.one_of(st.sampled_from(list(VERDICT_CODES)), tag))
        limits = st.dictionaries(st.sampled_from([*LIMIT_NUMBERS, "kind", "unit"]), present)
        draft["limit_values"] = _either(draw, mappable, st.one_of(st.just(MISSING), limits))
    payload = {key: value for key, value in draft.items() if value is not MISSING}
    return Message(kind, "t", payload)  # type: ignore[arg-type]


def _render(render: Any, message: Message) -> tuple[str, str]:
    """("line", text) or (exception type name, exception text)."""
    try:
        return "line", render(message)
    except Exception as exc:
        return type(exc).__name__, str(exc)


@settings(max_examples=1500, deadline=None)
@given(messages())
@example(Message("reading", "t", {"msg_id": "m", "time_ns": T0, "site": "a\\", "station": "b", "device": "c"}))
@example(Message("reading", "t", {"msg_id": "m", "time_ns": T0, "site": "a", "station": "b", "device": " "}))
def test_line_is_byte_for_byte_influxdb_clients_line(message: Message) -> None:
    got = _render(message_to_line, message)
    want = _render(lambda m: message_to_point(m).to_line_protocol(WritePrecision.NS), message)
    event(f"{message.kind}: {got[0]}")
    assert got == want
    assert got[0] in ("line", "PointError")


def test_the_generator_reaches_both_outcomes_for_every_kind() -> None:
    """Guard for the property test above: it must not be comparing only errors (or only lines)."""
    outcomes: set[tuple[str, str]] = set()

    @settings(max_examples=1000, deadline=None, database=None, derandomize=True)  # a fixed sample: no flakes
    @given(messages())
    def collect(message: Message) -> None:
        outcomes.add((message.kind, _render(message_to_line, message)[0]))

    collect()
    for kind in SCHEMAS:
        assert {(kind, "line"), (kind, "PointError")} <= outcomes
    assert ("alarm", "PointError") in outcomes


def _payload(**fields: Any) -> dict[str, Any]:
    return {"msg_id": "0f3c", "time_ns": T0, "schema": "x", "time": "2025-11-24T16:00:00Z"} | fields


@pytest.mark.parametrize(
    ("message", "line"),
    [
        (
            Message(
                "reading",
                "t",
                _payload(
                    site="lab 1",
                    station="hot,cell",
                    device='crc=55"\\',
                    nuclide="F-18",
                    activity_bq=3.7e8,
                    raw_value=10,
                    unit='m"Ci\\',
                    raw_frame="...",
                    extra={"range": 2},
                ),
            ),
            'reading,device=crc\\=55"\\ ,nuclide=F-18,site=lab\\ 1,station=hot\\,cell '
            f'activity_bq=370000000,msg_id="0f3c",raw_value=10,unit="m\\"Ci\\\\" {T0}',
        ),
        (
            Message(
                "elution",
                "t",
                _payload(
                    site="s",
                    station="st",
                    generator="gen\n7",
                    parent="Mo-99",
                    nuclide="",
                    counter=42,
                    activity_bq=1.25e10,
                    volume_ml=5.0,
                    duration_s=-0.0,
                    yield_pct=None,
                    breakthrough_pct=1.5e-05,
                ),
            ),
            "elution,generator=gen\\n7,parent=Mo-99,site=s,station=st "
            f'activity_bq=12500000000,breakthrough_pct=1.5e-05,counter=42,duration_s=-0,msg_id="0f3c",volume_ml=5 {T0}',
        ),
        (
            Message(
                "qc_result",
                "t",
                _payload(
                    site="s",
                    station="st",
                    device="crc",
                    test="constancy",
                    verdict="warn",
                    measured=7.0e6,
                    expected=7.4e6,
                    deviation_pct=-5.405405405405405,
                    value_judged=-5.405405405405405,
                    unit="Bq",
                    limit="pass |dev| <= 5 %",
                    limit_source="AAPM-181",
                    detail="",
                    limit_values={"kind": "abs_pct", "unit": "%", "warn": 5.0, "fail": 10.0},
                ),
            ),
            "qc_result,device=crc,site=s,station=st,test=constancy,verdict=warn "
            'deviation_pct=-5.405405405405405,expected=7400000,limit="pass |dev| <= 5 %",limit_fail=10,'
            'limit_source="AAPM-181",limit_warn=5,measured=7000000,msg_id="0f3c",unit="Bq",'
            f"value_judged=-5.405405405405405,verdict_code=1 {T0}",
        ),
        (
            Message(
                "device_status",
                "t",
                _payload(site="s", station="st", device="d", up=True, latency_ms=1e22, errors=0, detail="timeout"),
            ),
            f'device_status,device=d,site=s,station=st detail="timeout",errors=0,latency_ms=1e+22,msg_id="0f3c",up=1 {T0}',
        ),
    ],
    ids=["reading", "elution", "qc_result", "device_status"],
)
def test_literal_lines(message: Message, line: str) -> None:
    assert message_to_line(message) == line
    assert message_to_point(message).to_line_protocol(WritePrecision.NS) == line


def test_unmappable_message_raises_the_same_point_error() -> None:
    message = Message("reading", "t", _payload(site="s", station="st", device="d", raw_value=float("inf")))
    with pytest.raises(PointError, match="field 'raw_value' must be finite"):
        message_to_line(message)

"""Map an outbox message to one InfluxDB line-protocol point (measurement = message kind).

The mapping is a pure function so it can be tested without a server and so the sink never
has to think about schema. Rules (reasons in docs/influxdb.md):

* Tags are the low-cardinality identity of a series (site, station, device, ...); a tag whose
  value is missing or empty is left out rather than written as an empty string.
* Every numeric field is written as a float, ints and bools included, so a field's type can
  never conflict between two writers or two versions of this code.
* `None` fields are omitted: InfluxDB has no null, and a missing field is what a null means there.
* `msg_id` is a string field on every point. A resend of the same message lands on the same
  series and timestamp and therefore overwrites itself: at-least-once delivery from the
  outbox becomes exactly-once storage.
* The timestamp is the payload's `time_ns` (UTC epoch nanoseconds), written at ns precision.
* Raw readings (RAW_KINDS) are kept for a limited time and summarised per minute; every other kind
  (measurements, QC, elutions, statuses, ...) is a record and is kept (docs/influxdb.md, "Retention").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from influxdb_client import Point, WritePrecision

from hotlab.controller.messages import Message
from hotlab.errors import InputError

#: QC verdicts as numbers, so they can be graphed, aggregated (max over an interval is the
#: worst verdict) and thresholded in Grafana; the verdict is also kept as a tag for filtering.
VERDICT_CODES: dict[str, float] = {"pass": 0.0, "warn": 1.0, "fail": 2.0}


#: QC schedule states as numbers (done < due < overdue < failed), so the worst state of an interval is its max.
STATE_CODES: dict[str, float] = {"done": 0.0, "due": 1.0, "overdue": 2.0, "failed": 3.0}


#: The kinds written to the raw readings' retention policy (or raw bucket); every other kind is kept.
RAW_KINDS = frozenset({"reading"})
#: The per-minute summary of the good raw readings (and the count of suspect ones), kept like the records.
SUMMARY_MEASUREMENT = "reading_1m"


#: Numbers of a QC limit (QcResult payload `limit_values`), written as float fields `limit_<name>`.
LIMIT_NUMBERS = ("warn", "fail", "low", "high")


class PointError(InputError):
    """A message that cannot become a point (unknown kind, missing tag or time, non-numeric field)."""

    def __init__(self, message: Message, reason: str) -> None:
        msg_id = message.payload.get("msg_id", "?")
        super().__init__(f"{message.kind} message {msg_id}: {reason}")
        self.msg_id = msg_id


@dataclass(frozen=True, slots=True)
class PointSchema:
    """Which payload keys become tags, float fields and string fields for one message kind."""

    required_tags: tuple[str, ...]
    optional_tags: tuple[str, ...]
    float_fields: tuple[str, ...]
    string_fields: tuple[str, ...]


SCHEMAS: dict[str, PointSchema] = {
    # `quality` is a string field (good | suspect), not a tag: a reading found suspect must stay in its
    # device's series (last(), mean() per device), and dashboards filter on it with WHERE.
    "reading": PointSchema(
        required_tags=("site", "station", "device"),
        optional_tags=("nuclide",),
        float_fields=("activity_bq", "raw_value"),
        string_fields=("unit", "quality", "quality_reason", "qc_state"),
    ),
    # One point per measurement at its settle time; `end` says what published it (docs/influxdb.md).
    "measurement": PointSchema(
        required_tags=("site", "station", "device"),
        optional_tags=("nuclide",),
        float_fields=("activity_bq", "sd_bq", "n", "background_bq"),
        string_fields=("end", "qc_state", "procedure_id"),
    ),
    "measurement_label": PointSchema(
        required_tags=("site", "station", "device"),
        optional_tags=(),
        float_fields=(),
        string_fields=("label", "measurement_id", "user"),
    ),
    "elution": PointSchema(
        required_tags=("site", "station", "generator"),
        optional_tags=("parent", "nuclide"),
        float_fields=("activity_bq", "yield_pct", "volume_ml", "breakthrough_pct", "counter", "duration_s"),
        string_fields=(),
    ),
    "qc_result": PointSchema(
        required_tags=("site", "station", "device", "test", "verdict"),
        optional_tags=(),
        float_fields=("measured", "expected", "deviation_pct", "value_judged"),
        string_fields=("unit", "limit", "limit_source", "detail", "procedure_id"),
    ),
    "device_status": PointSchema(
        required_tags=("site", "station", "device"),
        optional_tags=(),
        float_fields=("up", "latency_ms", "errors", "suspect_readings", "suspect_fraction"),
        string_fields=("detail",),
    ),
    # A device's alarms (a calibrator's suspect readings, a station's counter reset); the outbox alarm is
    # published directly and never stored.
    "controller_alarm": PointSchema(
        required_tags=("site", "station", "device", "alarm"),
        optional_tags=("generator",),
        float_fields=("active", "suspect_recent", "window", "fraction", "threshold", "suspect_readings", "counter"),
        string_fields=("reason", "elution_id"),
    ),
    # One series per QC schedule item (docs/qc.md, "Schedule"). `state` is a string field, not a tag, and
    # `state_code` its number (STATE_CODES), so an item stays one series whatever its state; `alarm` is 0/1.
    "qc_status": PointSchema(
        required_tags=("site", "station", "device", "item", "test"),
        optional_tags=(),
        float_fields=("alarm", "due_ns", "overdue_ns", "last_done_ns"),
        string_fields=("state", "last_verdict", "last_record_id", "elution_id", "detail"),
    ),
    # A QC procedure's start and end records (docs/qc.md, "Procedures"); who started it, its steps and results
    # are in the archive and the audit trail, which a dashboard links to by `procedure_id`.
    "qc_procedure": PointSchema(
        required_tags=("site", "station", "device", "procedure", "status"),
        optional_tags=("generator",),
        float_fields=("started_ns", "ended_ns"),
        string_fields=("procedure_id", "verdict", "source_id", "elution_id", "detail"),
    ),
    # One series per calibrator setting: the check source's reading that daily constancy is judged against.
    "qc_baseline": PointSchema(
        required_tags=("site", "station", "device", "setting"),
        optional_tags=(),
        float_fields=("activity_bq",),
        string_fields=("source_id", "measurement_id", "procedure_id", "reason"),
    ),
    # One point per pass of the history archive's retention (controller/archive_retention.py): what it summarised.
    "archive_retention": PointSchema(
        required_tags=("site",),
        optional_tags=(),
        float_fields=(
            "raw_days",
            "cutoff_ns",
            "started_ns",
            "readings",
            "minutes",
            "statuses",
            "chunks",
            "complete",
            "freed_bytes",
            "archive_bytes",
        ),
        string_fields=(),
    ),  # fmt: skip
    # One series per trail (its first record's hash): the trail's growth over time, off the controller host.
    "audit_anchor": PointSchema(
        required_tags=("site", "trail_id"),
        optional_tags=(),
        float_fields=("seq",),
        string_fields=("hash", "trail"),
    ),
}


def message_to_point(message: Message) -> Point:
    """Build the point for `message`, or raise PointError saying what is wrong with it.

    The reference for `message_to_line`: tests pin that line to this point's line protocol.
    """
    time_ns, tags, fields = _point_parts(message)
    point = Point(message.kind).time(time_ns, WritePrecision.NS)
    for key, tag in tags.items():
        point.tag(key, tag)
    for key, value in fields.items():
        point.field(key, value)
    return point


def message_to_line(message: Message) -> str:
    """The line-protocol text of `message`'s point (ns precision), built as a plain string.

    Building a `Point` and rendering it is a measurable share of the controller's CPU per
    reading, so this formats the line directly with the rules of influxdb_client 1.50's point.py: tags
    and fields sorted by key, tag values and string fields escaped as below, floats as `str()`
    without a trailing ".0". tests/test_influx_line_format.py pins the result byte for byte to
    `message_to_point(...).to_line_protocol(WritePrecision.NS)`. Measurement, tag keys and field
    keys are fixed identifiers that need no escaping (that test would see it if one did).
    """
    time_ns, tags, fields = _point_parts(message)
    tag_text = "".join([f",{key}={_tag_value(tag)}" for key, tag in sorted(tags.items())])
    field_text = ",".join([f"{key}={_field_value(value)}" for key, value in sorted(fields.items())])
    return f"{message.kind}{tag_text} {field_text} {time_ns}"


def _tag_value(tag: str) -> str:
    """Escaped as influxdb_client does (and a backslash left alone); a space after a trailing backslash.

    Chained `replace` rather than the library's `str.translate` table: same result (no
    replacement creates a character a later one replaces), a quarter of the time.
    """
    text = (
        tag.replace(",", r"\,")
        .replace("=", r"\=")
        .replace(" ", r"\ ")
        .replace("\n", r"\n")
        .replace("\t", r"\t")
        .replace("\r", r"\r")
    )
    return text + " " if text.endswith("\\") else text


def _field_value(value: float | str) -> str:
    """A float as `str()` minus a trailing ".0"; a string quoted, with backslash (first) and quote escaped."""
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    text = str(value)
    return text[:-2] if text.endswith(".0") else text


def _point_parts(message: Message) -> tuple[int, dict[str, str], dict[str, float | str]]:
    """(time_ns, tags, fields) of `message`'s point, or PointError; shared so both renderings agree."""
    schema = SCHEMAS.get(message.kind)
    if schema is None:
        raise PointError(message, f"unknown kind {message.kind!r}; known: {', '.join(SCHEMAS)}")
    payload = message.payload
    time_ns = _time_ns(message, payload)
    tags: dict[str, str] = {}
    for key in schema.required_tags:
        value = payload.get(key)
        if not isinstance(value, str) or not value.strip():
            raise PointError(message, f"tag {key!r} must be a non-empty string, got {value!r}")
        tags[key] = value
    for key in schema.optional_tags:
        value = payload.get(key)
        if isinstance(value, str) and value.strip():
            tags[key] = value
    fields: dict[str, float | str] = {}
    for key in schema.float_fields:
        number = _float_or_none(message, key, payload.get(key))
        if number is not None:
            fields[key] = number
    for key in schema.string_fields:
        value = payload.get(key)
        if value is not None and str(value) != "":
            fields[key] = str(value)
    if message.kind == "qc_result":
        _add_qc_numbers(message, fields)
    if message.kind == "qc_status":
        code = STATE_CODES.get(str(payload.get("state")))
        if code is not None:
            fields["state_code"] = code
    msg_id = payload.get("msg_id")
    if not isinstance(msg_id, str) or not msg_id:
        raise PointError(message, f"msg_id must be a non-empty string, got {msg_id!r}")
    fields["msg_id"] = msg_id
    return time_ns, tags, fields


def _add_qc_numbers(message: Message, fields: dict[str, float | str]) -> None:
    """verdict_code, and the limit's numbers (`limit_values`) as limit_warn/fail/low/high for limit lines."""
    code = VERDICT_CODES.get(str(message.payload["verdict"]))
    if code is not None:
        fields["verdict_code"] = code
    limits = message.payload.get("limit_values")
    if isinstance(limits, Mapping):
        for name in LIMIT_NUMBERS:
            value = _float_or_none(message, f"limit_values.{name}", limits.get(name))
            if value is not None:
                fields[f"limit_{name}"] = value


def _time_ns(message: Message, payload: Mapping[str, Any]) -> int:
    value = payload.get("time_ns")
    if isinstance(value, bool) or not isinstance(value, int):
        raise PointError(message, f"time_ns must be an integer of UTC epoch nanoseconds, got {value!r}")
    return value


def _float_or_none(message: Message, key: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, (bool, int, float)):
        try:
            number = float(value)
        except OverflowError:  # an int beyond float range: bad data, not a reason to stall the sink
            raise PointError(message, f"field {key!r} is out of float range, got {value!r}") from None
    else:
        raise PointError(message, f"field {key!r} must be a number, got {value!r}")
    if not math.isfinite(number):
        raise PointError(message, f"field {key!r} must be finite, got {value!r}")
    return number

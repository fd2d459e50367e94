"""What the record pages (QC, review, audit) read from a query string: a period, a filter value, a cursor.

One place, so every page reads a period as `hotlab report --from/--to` and `hotlab audit show`
do (controller/archive.py `TimeRange.from_text`: a bare end date includes that whole UTC day),
and refuses bad input with the same one-line error.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlencode

from starlette.datastructures import QueryParams

from hotlab.controller.archive import TimeRange
from hotlab.errors import InputError

#: Rows of a record table per page.
PAGE_SIZE = 50


@dataclass(frozen=True, slots=True)
class Period:
    """The period a page shows, and the text of its form fields as the reader left them."""

    range: TimeRange
    start_text: str
    end_text: str


def text(params: QueryParams, name: str) -> str | None:
    """A filter's value, or None when the field was left empty."""
    value = (params.get(name) or "").strip()
    return value or None


def period(params: QueryParams, *, default_days: int | None) -> Period:
    """`from` and `to` (UTC days or ISO instants with offset); an empty `from` is `default_days` ago
    (None: open), an empty `to` is open. InputError (one line) for a date that cannot be read."""
    start, end = text(params, "from"), text(params, "to")
    if start is None and default_days is not None:
        start = (datetime.now(UTC) - timedelta(days=default_days)).date().isoformat()
    return Period(TimeRange.from_text(start, end), start or "", end or "")


def cursor_number(params: QueryParams, name: str) -> int | None:
    """A page cursor that is a record number (an audit seq), or None."""
    value = text(params, name)
    if value is None:
        return None
    if not value.isdigit():
        raise InputError(f"{name} must be a record number, got {value!r}")
    return int(value)


def utc_minute(time_ns: int | None) -> str:
    """A time as the record tables show it: UTC to the minute."""
    if time_ns is None:
        return "-"
    return datetime.fromtimestamp(time_ns / 1e9, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")


def page_link(path: str, query: QueryParams, **changes: str | int | None) -> str:
    """`path` with the page's `query` changed by `changes` (None drops a parameter): the filters stay as set."""
    params: dict[str, str] = {k: v for k, v in query.items() if k not in changes}
    params |= {k: str(v) for k, v in changes.items() if v is not None}
    return f"{path}?{urlencode(params)}" if params else path

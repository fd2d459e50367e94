"""InfluxDB 1.x retention and downsampling: what the sink provisions, and the one downsampling query.

Raw readings are many (one per poll) and are kept for `raw_days` in the retention policy
INFLUX_RAW_POLICY; everything else is a record (measurements, QC, elutions, statuses) and goes to the
kept policy (the database's default unless [influx] retention_policy names one), as does the
per-minute summary of the readings, SUMMARY_MEASUREMENT (docs/influxdb.md, "Retention and downsampling").

The summary is made by two continuous queries, one per reading quality, each `SELECT … INTO` over
one-minute windows, `GROUP BY *` so every tag survives. A continuous query only looks back
RESAMPLE_FOR_NS: readings that arrive later (after an InfluxDB outage, or a history fill) are
summarised by the sink running the same SELECTs over their minutes (`Downsampling.backfill`), so the
two triggers can never disagree on what a summary is.

Everything here is text: the sink sends it over HTTP /query (controller/sinks/influx.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from hotlab.controller.config import INFLUX_RAW_POLICY
from hotlab.controller.sinks.influx_points import SUMMARY_MEASUREMENT

#: How far back each run of the continuous queries recomputes its minutes (RESAMPLE … FOR).
RESAMPLE_FOR_NS = 3600 * 10**9
#: Readings at least this old when written are summarised by the sink: the queries may have passed them.
BACKFILL_AFTER_NS = RESAMPLE_FOR_NS - 300 * 10**9
MINUTE_NS = 60 * 10**9
#: The continuous queries' names: good readings' min/mean/max/count, and the count of suspect ones.
GOOD_CQ = "hotlab_reading_1m"
SUSPECT_CQ = "hotlab_suspect_1m"

#: Runs one InfluxQL statement and returns its result (the `results[0]` object of /query).
Query = Callable[[str], dict[str, Any]]


class ProvisioningRefused(Exception):
    """A statement InfluxDB refused for good (no admin rights, a conflicting definition): provision by hand."""


def ident(name: str) -> str:
    """An InfluxQL identifier, double-quoted and escaped."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True, slots=True)
class Downsampling:
    """The per-minute summary of `database`'s raw readings, written to its `kept_policy`."""

    database: str
    kept_policy: str

    def selects(self) -> dict[str, str]:
        """Each continuous query's name and its SELECT … INTO, without a time range."""
        source = f"{ident(self.database)}.{ident(INFLUX_RAW_POLICY)}.{ident('reading')}"
        into = f"{ident(self.database)}.{ident(self.kept_policy)}.{ident(SUMMARY_MEASUREMENT)}"
        good = (
            'min("activity_bq") AS "activity_bq_min", mean("activity_bq") AS "activity_bq_mean", '
            'max("activity_bq") AS "activity_bq_max", count("activity_bq") AS "good_readings"'
        )
        suspect = 'count("activity_bq") AS "suspect_readings"'
        return {
            name: f"SELECT {fields} INTO {into} FROM {source} WHERE \"quality\" = '{quality}' GROUP BY time(1m), *"
            for name, fields, quality in ((GOOD_CQ, good, "good"), (SUSPECT_CQ, suspect, "suspect"))
        }

    def continuous_queries(self) -> list[str]:
        """CREATE CONTINUOUS QUERY statements: every minute, the last RESAMPLE_FOR_NS again."""
        resample = f"RESAMPLE EVERY 1m FOR {RESAMPLE_FOR_NS // MINUTE_NS}m"
        return [
            f"CREATE CONTINUOUS QUERY {ident(name)} ON {ident(self.database)} {resample} BEGIN {select} END"
            for name, select in self.selects().items()
        ]

    def backfill(self, start_ns: int, end_ns: int) -> list[str]:
        """The continuous queries' SELECTs over the whole minutes from `start_ns` to `end_ns` (both included)."""
        first = start_ns - start_ns % MINUTE_NS
        after = end_ns - end_ns % MINUTE_NS + MINUTE_NS
        window = f"time >= {first} AND time < {after} AND "
        return [select.replace(" WHERE ", f" WHERE {window}", 1) for select in self.selects().values()]


def needs_backfill(times_ns: Sequence[int], now_ns: int) -> bool:
    """True if a reading at one of `times_ns`, written at `now_ns`, may have been passed by the continuous queries."""
    return bool(times_ns) and min(times_ns) <= now_ns - BACKFILL_AFTER_NS


def provisioning_statements(database: str, raw_days: int, kept_policy: str | None) -> list[str]:
    """What an admin runs by hand where the sink may not (docs/influxdb.md): the same as `provision`."""
    kept = kept_policy or "autogen"
    statements = [
        f"CREATE DATABASE {ident(database)}",
        f"CREATE RETENTION POLICY {ident(INFLUX_RAW_POLICY)} ON {ident(database)} DURATION {raw_days}d REPLICATION 1",
    ]
    if kept_policy is not None:
        statements.append(f"CREATE RETENTION POLICY {ident(kept)} ON {ident(database)} DURATION INF REPLICATION 1")
    return statements + Downsampling(database, kept).continuous_queries()


def provision(query: Query, database: str, raw_days: int, kept_policy: str | None) -> Downsampling:
    """Create what is missing, idempotently: the database, the raw policy (its duration set to `raw_days`),
    a named kept policy, and the continuous queries (replaced, so a changed definition takes effect).

    Returns the downsampling in force. Raises ProvisioningRefused for a statement InfluxDB refused; `query`'s
    own errors (server unreachable, HTTP errors) pass through.
    """
    on = f"ON {ident(database)}"
    _run(query, f"CREATE DATABASE {ident(database)}")
    policies = {row["name"]: row for row in _rows(_run(query, f"SHOW RETENTION POLICIES {on}"))}
    raw = ident(INFLUX_RAW_POLICY)
    duration = f"{raw_days * 24}h0m0s"  # how SHOW RETENTION POLICIES writes a duration of whole days
    if INFLUX_RAW_POLICY not in policies:
        _run(query, f"CREATE RETENTION POLICY {raw} {on} DURATION {raw_days}d REPLICATION 1")
    elif policies[INFLUX_RAW_POLICY]["duration"] != duration:
        _run(query, f"ALTER RETENTION POLICY {raw} {on} DURATION {raw_days}d")
    if kept_policy is None:
        kept = next((str(name) for name, row in policies.items() if row.get("default")), "autogen")
    else:
        kept = kept_policy
        if kept not in policies:
            _run(query, f"CREATE RETENTION POLICY {ident(kept)} {on} DURATION INF REPLICATION 1")
    downsampling = Downsampling(database, kept)
    series = _run(query, "SHOW CONTINUOUS QUERIES").get("series", [])
    existing = {row["name"] for serie in series if serie.get("name") == database for row in _serie_rows(serie)}
    for name in downsampling.selects():
        if name in existing:
            _run(query, f"DROP CONTINUOUS QUERY {ident(name)} {on}")
    for statement in downsampling.continuous_queries():
        _run(query, statement)
    return downsampling


def _run(query: Query, statement: str) -> dict[str, Any]:
    result = query(statement)
    if "error" in result:
        raise ProvisioningRefused(f"{statement}: {result['error']}")
    return result


def _rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [row for serie in result.get("series", []) for row in _serie_rows(serie)]


def _serie_rows(serie: dict[str, Any]) -> list[dict[str, Any]]:
    return [dict(zip(serie["columns"], values, strict=True)) for values in serie.get("values", [])]

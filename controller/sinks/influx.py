"""Drain the outbox into InfluxDB: batched, retried, acknowledged only after the server said yes.

The sink reads `pending("influx")` in sequence order, turns each message into one point
(hotlab.controller.sinks.influx_points), posts up to `batch_size` points per request and `ack`s them only
after InfluxDB answered 2xx (204 No Content). Each read continues after the last message it
acknowledged, so while the sink keeps up the outbox answers from memory. A crash between the
write and the ack resends the batch on restart; that is harmless because a point with the
same series and timestamp overwrites itself (see docs/influxdb.md).

Two write APIs, one failure policy:
* InfluxDB 1.x (`database`): POST /write?db=&rp=&precision=ns with basic authentication (or a
  1.8+ token). Raw readings go to the INFLUX_RAW_POLICY retention policy, everything else to the kept
  one; at start the sink provisions the database, the policies and the continuous queries that
  summarise the readings per minute (controller/sinks/influx_v1.py), if the user may;
* InfluxDB 2.x/3.x (`bucket`): POST /api/v2/write?org=&bucket=&precision=ns with a token; raw readings
  go to `raw_bucket` if set.
Both are plain HTTP requests (urllib3, the HTTP client influxdb-client itself uses) on one private
worker thread, so the event loop never waits on the network, and each attempt is bounded by `timeout_s`.
Retrying is done here, not by a client library: it is what makes "no loss" hold across outages of any
length, and a library's batching would hold data in memory where a crash loses it.

Failure handling, by cause:
* server unreachable, timeout, 5xx, 429, 401/403/404 (down, overloaded, or misconfigured and
  fixable by an operator): keep the batch, back off exponentially with jitter, try again;
* 400/413/422 (the server rejects the data itself): split the batch in halves until the
  offending points are isolated; a single point the server refuses is logged with its msg_id,
  counted in `stats.rejected` and acknowledged, so one poisoned message cannot stall the lab;
* "partial write: points beyond retention policy" (1.x answers 400: points older than their policy
  keeps; it wrote the others): acknowledged, and the dropped points counted in `stats.expired`
  (InfluxDB would already have deleted them; the history archive keeps them);
* a message that cannot be mapped to a point at all (PointError): same as a rejected point;
* the outbox itself failing (sqlite3.Error: disk full, database locked) or any unexpected error:
  logged (the latter with its traceback), shown in `stats.last_error`, retried after a backoff.
  The task never ends on its own, because an undrained outbox would eventually stop the lab.
Provisioning retries like a write; a statement InfluxDB refuses for good (no admin rights) is logged
once with what an admin should run, and writing goes on. A per-minute summary the sink could not
make (`influx_v1.Downsampling.backfill`) is logged with its query; it is derived data and never holds
up the raw points.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import re
import sqlite3
import time
import urllib.parse
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import urllib3

from hotlab.backoff import Backoff
from hotlab.controller.config import (
    INFLUX_RAW_POLICY,
    InfluxSection,
    InfluxTarget,
    read_influx_batching,
    read_influx_target,
    read_influx_url,
)
from hotlab.controller.config_table import ConfigError, ConfigTable
from hotlab.controller.outbox import AsyncOutbox, StoredMessage
from hotlab.controller.sinks.influx_points import RAW_KINDS, PointError, message_to_line
from hotlab.controller.sinks.influx_v1 import (
    Downsampling,
    ProvisioningRefused,
    needs_backfill,
    provision,
    provisioning_statements,
)

log = logging.getLogger(__name__)

SINK_NAME = "influx"

#: Statuses that mean "this data is wrong", not "try later": retrying the same bytes cannot help.
_DATA_REJECTED = frozenset({400, 413, 422})
#: InfluxDB's answer (1.x: HTTP 400) when the only problem was points older than their retention policy.
_BEYOND_RETENTION = re.compile(r"partial write: points beyond retention policy dropped=(\d+)")


#: The [influx] settings are missing, misspelt or out of range: the one config error, so that these
#: problems read (and are caught) like every other config problem.
InfluxConfigError = ConfigError

#: The project's retry policy when the settings name none: 0.5 s doubling to 30 s.
_DEFAULT_RETRY = Backoff()


@dataclass(frozen=True, slots=True)
class InfluxConfig:
    """Where and how to write: a 1.x `database` (username/password) or a 2.x/3.x `bucket` (token).

    The values are checked where they are read, once: [influx] by controller/config.py, a table in
    the sink's own terms by `from_mapping`, with the same rules for the keys the two share.
    """

    url: str
    target: InfluxTarget
    token: str | None = field(default=None, repr=False)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    batch_size: int = 1000
    flush_interval_s: float = 1.0
    timeout_s: float = 10.0
    retry_initial_s: float = _DEFAULT_RETRY.initial_s
    retry_max_s: float = _DEFAULT_RETRY.max_s

    @property
    def bucket(self) -> str:
        return self.target.bucket

    @property
    def org(self) -> str:
        return self.target.org

    def authorization(self) -> str | None:
        """The Authorization header: basic for a 1.x user, `Token` for a token; None without credentials."""
        if self.token is not None:
            return f"Token {self.token}"
        if self.username is None:
            return None
        pair = f"{self.username}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(pair).decode()

    @classmethod
    def from_section(cls, section: InfluxSection) -> InfluxConfig:
        """The sink's settings from a lab config's validated [influx] table (its secrets read there)."""
        return cls(
            url=section.url,
            target=section.target,
            token=None if section.token is None else section.token.reveal(),
            username=section.username,
            password=None if section.password is None else section.password.reveal(),
            batch_size=section.batch_size,
            flush_interval_s=section.flush_interval_s,
            timeout_s=section.timeout_s,
        )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> InfluxConfig:
        """Build from a table holding the secrets themselves (tests, tools); errors name the key as `influx.<key>`."""
        table = ConfigTable(data, "influx")
        url = read_influx_url(table)
        token = table.string("token")
        username = table.string("username")
        password = table.string("password")
        if username is None and password is not None:
            raise table.error("username", "is required when a password is configured")
        target = read_influx_target(table, token=token is not None, username=username)
        batch_size, flush_interval_s, timeout_s = read_influx_batching(table)
        retry_initial_s = table.number("retry_initial_s", _DEFAULT_RETRY.initial_s, minimum=0.0, exclusive_minimum=True)
        retry_max_s = table.number("retry_max_s", _DEFAULT_RETRY.max_s, minimum=retry_initial_s)
        table.finish()
        return cls(
            url=url,
            target=target,
            token=token,
            username=username,
            password=password,
            batch_size=batch_size,
            flush_interval_s=flush_interval_s,
            timeout_s=timeout_s,
            retry_initial_s=retry_initial_s,
            retry_max_s=retry_max_s,
        )


@dataclass(slots=True)
class SinkStats:
    """Counters for health reporting; `last_error` is empty while writes succeed.

    `written`/`rejected`/`expired` count acknowledged messages (stored, refused, older than their
    retention policy); `failed_attempts` counts failed writes and failed outbox calls alike, each
    followed by a backoff.
    """

    written: int = 0
    rejected: int = 0
    expired: int = 0
    failed_attempts: int = 0
    requests: int = 0
    last_error: str = ""

    def detail(self) -> str:
        """What the counters say beyond the deliveries: messages refused or expired, the last error."""
        parts = [f"{self.rejected} refused"] if self.rejected else []
        if self.expired:
            parts.append(f"{self.expired} older than their retention policy")
        if self.last_error:
            parts.append(f"last error: {self.last_error}")
        return ", ".join(parts)


class _Transient(Exception):
    """A request that may succeed later; carries the HTTP status (None: no answer) and any Retry-After."""

    def __init__(self, reason: str, retry_after_s: float | None = None, status: int | None = None) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s
        self.status = status


class _Rejected(Exception):
    """The server refused the data itself (HTTP 400/413/422)."""


class _Expired(Exception):
    """1.x wrote the points but `dropped` ones, older than their retention policy."""

    def __init__(self, dropped: int) -> None:
        super().__init__(f"{dropped} point(s) beyond their retention policy")
        self.dropped = dropped


class _Line(NamedTuple):
    seq: int
    text: str
    time_ns: int
    raw: bool


class InfluxSink:
    """Run with `await sink.run()` (usually as a task); `stop()` ends it after the current attempt.

    A sink runs once: `run()` closes its connections on the way out, so build a new sink to run again.
    """

    def __init__(
        self,
        config: InfluxConfig,
        outbox: AsyncOutbox,
        *,
        sink_name: str = SINK_NAME,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.stats = SinkStats()
        self._retry = Backoff(config.retry_initial_s, config.retry_max_s)
        self._rng = rng
        self._outbox = outbox
        self._sink_name = sink_name
        self._stopping = asyncio.Event()
        #: The last seq acknowledged by this sink: everything up to it is done.
        self._acked_through = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hotlab-influx")
        self._http = urllib3.PoolManager(maxsize=1, retries=False, timeout=urllib3.Timeout(total=config.timeout_s))
        self._base_url = config.url.rstrip("/")
        self._headers = {"Content-Type": "text/plain; charset=utf-8", "Accept": "application/json"}
        authorization = config.authorization()
        if authorization is not None:
            self._headers["Authorization"] = authorization
        #: The write request's path and query per destination: raw readings (True) or the rest (False).
        self._write_targets = {raw: write_target(config.target, raw) for raw in (False, True)}
        target = config.target
        self._provision_pending = target.database is not None and target.provision
        #: The per-minute summary this sink provisioned (1.x), which it also makes for late readings.
        self.downsampling: Downsampling | None = None

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Provision (1.x), then write batches until `stop()`; a partial batch waits `flush_interval_s` for company.

        Nothing but stop() or cancellation ends this loop: a backlog that nobody drains would fill
        the outbox until OutboxFull stops every producer in the lab. So an unreachable server, an
        outbox error (disk full, database locked) and, as a last resort, any unexpected error are
        logged, shown in `stats.last_error` and retried after a backoff. CancelledError is a
        BaseException and passes through untouched.
        """
        failures = 0
        try:
            while not self._stopping.is_set():
                try:
                    if self._provision_pending:
                        await self._provision()
                    batch = await self._outbox.pending(
                        self._sink_name, self.config.batch_size, after_seq=self._acked_through
                    )
                    completed = await self._deliver(batch) if batch else True
                except _Transient as exc:
                    delay = self._note_failure(str(exc), failures, exc.retry_after_s)
                    log.warning("InfluxDB could not be provisioned (%s); retrying in %.2f s", exc, delay)
                except sqlite3.Error as exc:
                    delay = self._note_failure(f"outbox {type(exc).__name__}: {exc}", failures)
                    log.error("outbox unusable for the InfluxDB sink (%s); retrying in %.2f s", exc, delay)
                except Exception as exc:  # last resort: a bug must not silently stop the sink
                    delay = self._note_failure(f"unexpected {type(exc).__name__}: {exc}", failures)
                    log.exception("InfluxDB sink hit an unexpected error; retrying in %.2f s", delay)
                else:
                    failures = 0
                    if completed:  # no error is current any more
                        self.stats.last_error = ""
                    if len(batch) < self.config.batch_size:
                        await self._sleep(self.config.flush_interval_s)
                    continue
                failures += 1
                await self._sleep(delay)
        finally:
            await self._close()

    async def _provision(self) -> None:
        """Create the 1.x database, policies and continuous queries; _Transient if InfluxDB cannot be asked now."""
        target = self.config.target
        assert target.database is not None
        loop = asyncio.get_running_loop()
        try:
            self.downsampling = await loop.run_in_executor(
                self._executor, provision, self._query_blocking, target.database, target.raw_days,
                target.retention_policy,
            )  # fmt: skip
        except (_Transient, _Rejected, ProvisioningRefused) as exc:
            if isinstance(exc, _Transient) and exc.status != 403:
                raise
            statements = provisioning_statements(target.database, target.raw_days, target.retention_policy)
            log.warning(
                "InfluxDB: %s may not provision database %s (%s); writing on. An admin runs once: %s",
                self.config.username or "this token",
                target.database,
                exc,
                "; ".join(statements),
            )
        else:
            log.info(
                "InfluxDB database %s: raw readings kept %d days in policy %s, everything else and the per-minute "
                "summary in policy %s",
                target.database,
                target.raw_days,
                INFLUX_RAW_POLICY,
                self.downsampling.kept_policy,
            )
        self._provision_pending = False

    def _note_failure(self, reason: str, attempt: int, retry_after_s: float | None = None) -> float:
        """Count a failed attempt, publish its reason in stats, and return how long to back off."""
        self.stats.failed_attempts += 1
        self.stats.last_error = reason
        return self._backoff(attempt, retry_after_s)

    async def _deliver(self, batch: Sequence[StoredMessage]) -> bool:
        """Write `batch` until the server has accepted or finally refused every point, then ack it all.

        Returns False if stop() interrupted it before the ack (the batch stays pending).

        Chunks (one per destination: raw readings, the rest) wait in a work list: a transient failure
        retries the same chunk after a backoff, a data rejection replaces the chunk by its two halves,
        so nothing is written twice. The counters move only once the ack succeeded: if the ack fails
        (outbox error), run() retries the whole batch, which rewrites identical points (idempotent)
        and counts them once.
        """
        loop = asyncio.get_running_loop()
        lines, unmappable = await loop.run_in_executor(self._executor, _to_lines, batch)
        rejected, expired, written = unmappable, 0, 0
        chunks = deque(chunk for raw in (False, True) if (chunk := [line for line in lines if line.raw == raw]))
        attempt = 0
        while chunks:
            chunk = chunks[0]
            try:
                await self._write(chunk[0].raw, [line.text for line in chunk])
            except _Expired as exc:
                log.info("InfluxDB kept %d of %d point(s); the others are older than their retention policy",
                         len(chunk) - exc.dropped, len(chunk))  # fmt: skip
                expired += exc.dropped
                written -= exc.dropped  # the rest of the chunk is stored: counted with it below
            except _Rejected as exc:
                chunks.popleft()
                if len(chunk) > 1:
                    middle = len(chunk) // 2
                    chunks.extendleft((chunk[middle:], chunk[:middle]))
                else:
                    rejected += 1
                    log.error("InfluxDB refused message seq %d for good (%s): %s", chunk[0].seq, exc, chunk[0].text)
                continue
            except _Transient as exc:
                delay = self._note_failure(str(exc), attempt, exc.retry_after_s)
                log.warning("InfluxDB write of %d point(s) failed (%s); retrying in %.2f s", len(chunk), exc, delay)
                attempt += 1
                if await self._sleep(delay):
                    return False
                continue
            chunks.popleft()
            written += len(chunk)
            attempt = 0
        if not await self._summarise_late([line.time_ns for line in lines if line.raw]):
            return False
        await self._outbox.ack(self._sink_name, [stored.seq for stored in batch])
        self._acked_through = batch[-1].seq
        self.stats.written += written
        self.stats.rejected += rejected
        self.stats.expired += expired
        return True

    async def _summarise_late(self, times_ns: list[int]) -> bool:
        """Make the per-minute summary of raw readings the continuous queries may have passed by.

        Retried like a write while InfluxDB cannot answer (False if stop() came first); a query it
        refuses is logged with what to run by hand: a summary is derived data and never holds up the
        raw points.
        """
        downsampling = self.downsampling
        if downsampling is None or not needs_backfill(times_ns, time.time_ns()):
            return True
        loop = asyncio.get_running_loop()
        statements = downsampling.backfill(min(times_ns), max(times_ns))
        attempt = 0
        while True:
            try:
                for statement in statements:
                    result = await loop.run_in_executor(self._executor, self._query_blocking, statement)
                    if "error" in result:
                        raise _Rejected(str(result["error"]))
                return True
            except (_Transient, _Rejected) as exc:
                if isinstance(exc, _Rejected) or exc.status == 403:
                    log.warning("InfluxDB: no per-minute summary made of late readings (%s); run by hand: %s",
                                exc, "; ".join(statements))  # fmt: skip
                    return True
                delay = self._note_failure(str(exc), attempt, exc.retry_after_s)
                log.warning("InfluxDB per-minute summary failed (%s); retrying in %.2f s", exc, delay)
                attempt += 1
                if await self._sleep(delay):
                    return False

    async def _write(self, raw: bool, lines: list[str]) -> None:
        loop = asyncio.get_running_loop()
        self.stats.requests += 1
        await loop.run_in_executor(self._executor, self._write_blocking, raw, lines)

    def _write_blocking(self, raw: bool, lines: list[str]) -> None:
        """One write request on the worker thread; _Expired, _Rejected or _Transient on failure."""
        status, reason, retry_after_s = self._post(self._write_targets[raw], "\n".join(lines).encode(), self._headers)
        if 200 <= status < 300:
            return
        expired = _BEYOND_RETENTION.search(reason) if status in _DATA_REJECTED else None
        if expired is not None:
            raise _Expired(int(expired[1]))
        if status in _DATA_REJECTED:
            raise _Rejected(reason)
        raise _Transient(reason, retry_after_s, status)

    def _query_blocking(self, statement: str) -> dict[str, Any]:
        """One InfluxQL statement over 1.x /query on the worker thread: its result, or _Rejected/_Transient."""
        headers = self._headers | {"Content-Type": "application/x-www-form-urlencoded"}
        body = urllib.parse.urlencode({"q": statement}).encode()
        status, text, retry_after_s = self._post("/query", body, headers)
        if status == 200:
            try:
                return dict(json.loads(text)["results"][0])
            except (ValueError, KeyError, IndexError, TypeError):
                raise _Transient(f"/query answered with something else than InfluxDB results: {_short(text)}") from None
        if status in _DATA_REJECTED:
            raise _Rejected(text)
        raise _Transient(text, retry_after_s, status)

    def _post(self, target: str, body: bytes, headers: Mapping[str, str]) -> tuple[int, str, float | None]:
        """(status, body on 200 or "HTTP <status>: <the server's words>" otherwise, Retry-After); _Transient if no answer."""
        try:
            response = self._http.request("POST", self._base_url + target, body=body, headers=dict(headers))
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise _Transient(f"{type(exc).__name__}: {exc}") from None
        text = response.data.decode("utf-8", "replace")
        if 200 <= response.status < 300:
            return response.status, text, None
        retry_after_s = _retry_after_s(response.headers.get("Retry-After"))
        return (
            response.status,
            f"HTTP {response.status}: {_short(server_words(text, response.headers))}",
            retry_after_s,
        )

    def _backoff(self, attempt: int, retry_after_s: float | None) -> float:
        """The project's backoff (hotlab.backoff), but never sooner than the server's Retry-After.

        The floor is capped at retry_max_s: a server asking for an hour must not stall the lab's
        backlog for an hour when the configured cap says how long a wait may be.
        """
        delay = self._retry.delay(attempt, self._rng)
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, self._retry.max_s))
        return delay

    async def _sleep(self, seconds: float) -> bool:
        """Wait `seconds` or until stop(); True if stopping."""
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def _close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._http.clear)
        self._executor.shutdown(wait=False)


def write_target(target: InfluxTarget, raw: bool) -> str:
    """The write request's path and query for raw readings (`raw`) or everything else."""
    if target.database is not None:
        params = {"db": target.database}
        policy = INFLUX_RAW_POLICY if raw else target.retention_policy
        if policy is not None:
            params["rp"] = policy
        return "/write?" + urllib.parse.urlencode(params | {"precision": "ns"})
    bucket = target.raw_bucket if raw and target.raw_bucket is not None else target.bucket
    return "/api/v2/write?" + urllib.parse.urlencode({"org": target.org, "bucket": bucket, "precision": "ns"})


def _to_lines(batch: Sequence[StoredMessage]) -> tuple[list[_Line], int]:
    """A line for every mappable message, and how many were not; runs on the worker thread."""
    lines: list[_Line] = []
    unmappable = 0
    for stored in batch:
        message = stored.message
        try:
            text = message_to_line(message)
        except PointError as exc:
            log.error("not writing to InfluxDB: %s", exc)
            unmappable += 1
            continue
        lines.append(_Line(stored.seq, text, int(message.payload["time_ns"]), message.kind in RAW_KINDS))
    return lines, unmappable


def server_words(text: str, headers: Mapping[str, str]) -> str:
    """What the server said went wrong: 2.x puts it in `message`, 1.x in `error` (and X-Influxdb-Error)."""
    try:
        document = json.loads(text)
    except ValueError:
        document = None
    if isinstance(document, dict):
        for key in ("message", "error"):
            if isinstance(document.get(key), str):
                return str(document[key])
    return headers.get("X-Influxdb-Error") or text.strip() or "no reason given"


def _retry_after_s(header: str | None) -> float | None:
    try:
        return float(header) if header else None
    except ValueError:
        return None


def _short(text: Any, limit: int = 300) -> str:
    text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    return text if len(text) <= limit else text[:limit] + "…"

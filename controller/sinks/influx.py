"""Drain the outbox into InfluxDB: batched, retried, acknowledged only after the server said yes.

The sink reads `pending("influx")` in sequence order, turns each message into one point
(hotlab.controller.sinks.influx_points), posts up to `batch_size` points per request and `ack`s them only
after InfluxDB answered 2xx (204 No Content). Each read continues after the last message it
acknowledged, so while the sink keeps up the outbox answers from memory. A crash between the
write and the ack resends the batch on restart; that is harmless because a point with the
same series and timestamp overwrites itself (see docs/influxdb.md).

influxdb-client's HTTP calls are synchronous; they run on one private worker thread so the
event loop never waits on the network, and each attempt is bounded by `timeout_s`. The
client's own retry and batching machinery is not used (its `flush()` is a no-op and its
`close()` blocks): retrying here is what makes "no loss" hold across outages of any length.

Failure handling, by cause:
* server unreachable, timeout, 5xx, 429, 401/403/404 (down, overloaded, or misconfigured and
  fixable by an operator): keep the batch, back off exponentially with jitter, try again;
* 400/413/422 (the server rejects the data itself): split the batch in halves until the
  offending points are isolated; a single point the server refuses is logged with its msg_id,
  counted in `stats.rejected` and acknowledged, so one poisoned message cannot stall the lab;
* a message that cannot be mapped to a point at all (PointError): same as a rejected point;
* the outbox itself failing (sqlite3.Error: disk full, database locked) or any unexpected error:
  logged (the latter with its traceback), shown in `stats.last_error`, retried after a backoff.
  The task never ends on its own, because an undrained outbox would eventually stop the lab.

Works with InfluxDB 2.x/3.x (url, token, org, bucket) and 1.8+ through its v2 compatibility
API (token "username:password", org "-", bucket "database/retention-policy").
"""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import urllib3
from influxdb_client import InfluxDBClient, WritePrecision
from influxdb_client.client.write_api import SYNCHRONOUS
from influxdb_client.rest import ApiException

from hotlab.backoff import Backoff
from hotlab.controller.config import InfluxSection, read_influx_batching, read_influx_url
from hotlab.controller.config_table import ConfigError, ConfigTable
from hotlab.controller.outbox import AsyncOutbox, StoredMessage
from hotlab.controller.sinks.influx_points import PointError, message_to_line

log = logging.getLogger(__name__)

SINK_NAME = "influx"

#: Statuses that mean "this data is wrong", not "try later": retrying the same bytes cannot help.
_DATA_REJECTED = frozenset({400, 413, 422})


#: The [influx] settings are missing, misspelt or out of range: the one config error, so that these
#: problems read (and are caught) like every other config problem.
InfluxConfigError = ConfigError

#: The project's retry policy when the settings name none: 0.5 s doubling to 30 s.
_DEFAULT_RETRY = Backoff()


@dataclass(frozen=True, slots=True)
class InfluxConfig:
    """Where and how to write. For InfluxDB 1.8+ use token "user:password", org "-", bucket "db/rp".

    The values are checked where they are read, once: [influx] by controller/config.py, a table in
    the sink's own terms by `from_mapping`, with the same rules for the keys the two share.
    """

    url: str
    token: str = field(repr=False)
    org: str
    bucket: str
    batch_size: int = 1000
    flush_interval_s: float = 1.0
    timeout_s: float = 10.0
    retry_initial_s: float = _DEFAULT_RETRY.initial_s
    retry_max_s: float = _DEFAULT_RETRY.max_s

    @classmethod
    def from_section(cls, section: InfluxSection) -> InfluxConfig:
        """The sink's settings from a lab config's validated [influx] table (its secret read there)."""
        return cls(
            url=section.url,
            token=section.auth_token(),
            org=section.org,
            bucket=section.bucket,
            batch_size=section.batch_size,
            flush_interval_s=section.flush_interval_s,
            timeout_s=section.timeout_s,
        )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> InfluxConfig:
        """Build from a table holding the token itself (tests, tools); errors name the key as `influx.<key>`."""
        table = ConfigTable(data, "influx")
        url = read_influx_url(table)
        token = table.string("token", required=True)
        org = table.string("org", required=True)
        bucket = table.string("bucket", required=True)
        batch_size, flush_interval_s, timeout_s = read_influx_batching(table)
        retry_initial_s = table.number("retry_initial_s", _DEFAULT_RETRY.initial_s, minimum=0.0, exclusive_minimum=True)
        retry_max_s = table.number("retry_max_s", _DEFAULT_RETRY.max_s, minimum=retry_initial_s)
        table.finish()
        return cls(
            url=url,
            token=token,
            org=org,
            bucket=bucket,
            batch_size=batch_size,
            flush_interval_s=flush_interval_s,
            timeout_s=timeout_s,
            retry_initial_s=retry_initial_s,
            retry_max_s=retry_max_s,
        )


@dataclass(slots=True)
class SinkStats:
    """Counters for health reporting; `last_error` is empty while writes succeed.

    `written`/`rejected` count acknowledged messages; `failed_attempts` counts failed writes and
    failed outbox calls alike, each followed by a backoff.
    """

    written: int = 0
    rejected: int = 0
    failed_attempts: int = 0
    requests: int = 0
    last_error: str = ""


class _Transient(Exception):
    """A write that may succeed later; carries the server's Retry-After hint if it gave one."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class _Rejected(Exception):
    """The server refused the data itself (HTTP 400/413/422)."""


class InfluxSink:
    """Run with `await sink.run()` (usually as a task); `stop()` ends it after the current attempt.

    A sink runs once: `run()` closes its client on the way out, so build a new sink to run again.
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
        self._client = InfluxDBClient(
            url=config.url,
            token=config.token,
            org=config.org,
            timeout=int(config.timeout_s * 1000),
            retries=False,
        )
        self._write_api = self._client.write_api(write_options=SYNCHRONOUS)

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Write batches until `stop()`; a partial batch waits `flush_interval_s` for company.

        Nothing but stop() or cancellation ends this loop: a backlog that nobody drains would fill
        the outbox until OutboxFull stops every producer in the lab. So an outbox error (disk
        full, database locked) and, as a last resort, any unexpected error are logged, shown in
        `stats.last_error` and retried after a backoff. CancelledError is a BaseException and
        passes through untouched.
        """
        failures = 0
        try:
            while not self._stopping.is_set():
                try:
                    batch = await self._outbox.pending(
                        self._sink_name, self.config.batch_size, after_seq=self._acked_through
                    )
                    completed = await self._deliver(batch) if batch else True
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

    def _note_failure(self, reason: str, attempt: int, retry_after_s: float | None = None) -> float:
        """Count a failed attempt, publish its reason in stats, and return how long to back off."""
        self.stats.failed_attempts += 1
        self.stats.last_error = reason
        return self._backoff(attempt, retry_after_s)

    async def _deliver(self, batch: Sequence[StoredMessage]) -> bool:
        """Write `batch` until the server has accepted or finally refused every point, then ack it all.

        Returns False if stop() interrupted it before the ack (the batch stays pending).

        Chunks wait in a work list: a transient failure retries the same chunk after a backoff, a
        data rejection replaces the chunk by its two halves, so nothing is written twice. The
        counters move only once the ack succeeded: if the ack fails (outbox error), run() retries
        the whole batch, which rewrites identical points (idempotent) and counts them once.
        """
        loop = asyncio.get_running_loop()
        lines, unmappable = await loop.run_in_executor(self._executor, _to_lines, batch)
        rejected, written = unmappable, 0
        chunks: deque[list[tuple[int, str]]] = deque([lines] if lines else [])
        attempt = 0
        while chunks:
            chunk = chunks[0]
            try:
                await self._write([line for _, line in chunk])
            except _Rejected as exc:
                chunks.popleft()
                if len(chunk) > 1:
                    middle = len(chunk) // 2
                    chunks.extendleft((chunk[middle:], chunk[:middle]))
                else:
                    rejected += 1
                    log.error("InfluxDB refused message seq %d for good (%s): %s", chunk[0][0], exc, chunk[0][1])
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
        await self._outbox.ack(self._sink_name, [stored.seq for stored in batch])
        self._acked_through = batch[-1].seq
        self.stats.written += written
        self.stats.rejected += rejected
        return True

    async def _write(self, lines: list[str]) -> None:
        loop = asyncio.get_running_loop()
        self.stats.requests += 1
        await loop.run_in_executor(self._executor, self._write_blocking, lines)

    def _write_blocking(self, lines: list[str]) -> None:
        """One HTTP request on the worker thread, translated into _Transient or _Rejected on failure."""
        try:
            self._write_api.write(
                bucket=self.config.bucket,
                org=self.config.org,
                record="\n".join(lines),
                write_precision=WritePrecision.NS,  # type: ignore[arg-type]  # the library's enum values are str
            )
        except ApiException as exc:
            reason = f"HTTP {exc.status}: {_short(exc.message)}" if exc.status else _short(str(exc.reason))
            if exc.status in _DATA_REJECTED:
                raise _Rejected(reason) from None
            raise _Transient(reason, _retry_after_s(exc.retry_after)) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise _Transient(f"{type(exc).__name__}: {exc}") from None

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
        def close_client() -> None:
            self._write_api.close()
            self._client.close()

        await asyncio.get_running_loop().run_in_executor(self._executor, close_client)
        self._executor.shutdown(wait=False)


def _to_lines(batch: Sequence[StoredMessage]) -> tuple[list[tuple[int, str]], int]:
    """(seq, line) for every mappable message, and how many were not; runs on the worker thread."""
    lines: list[tuple[int, str]] = []
    unmappable = 0
    for stored in batch:
        try:
            lines.append((stored.seq, message_to_line(stored.message)))
        except PointError as exc:
            log.error("not writing to InfluxDB: %s", exc)
            unmappable += 1
    return lines, unmappable


def _retry_after_s(header: str | None) -> float | None:
    try:
        return float(header) if header else None
    except ValueError:
        return None


def _short(text: Any, limit: int = 300) -> str:
    text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    return text if len(text) <= limit else text[:limit] + "…"

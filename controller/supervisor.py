"""One supervised task per device: read, hand over, reconnect with backoff, report status.

The supervisor only knows the small `Source` protocol below, so a calibrator driver, the
Modbus elution station and a test double are handled the same way. Its rules:

* A `DriverError` (bad frame, checksum, timeout, refused) is counted and logged; after
  `max_consecutive_errors` in a row, or at once on `DeviceDisconnected`, the source is
  closed and reopened with exponential backoff and full jitter (AWS Architecture Blog,
  "Exponential Backoff And Jitter", 2015: full jitter spreads reconnect storms best).
* Any other exception from a source is a bug in that driver: it is logged with its
  traceback and handled like a disconnect. Nothing a device does can stop another
  device's task or the controller.
* Data is handed to `deliver` (which commits it to the outbox). If that fails — the outbox
  is full, or unavailable (sqlite3 disk I/O error, disk full: `sqlite3.Error`, `OSError`),
  or anything else in the commit path — the same items are retried with backoff, and the
  device is neither reconnected (it is fine) nor read meanwhile: a calibrator keeps
  displaying its value, a station keeps its elution counter, so the data waits on the device
  instead of being dropped here. The status detail says why ("outbox full", "outbox
  unavailable: ...", "commit failed: ...").
* Status (up, last read latency, error count) is reported on every change and every
  `status_interval_s`; the service turns it into a retained device_status message. A device
  that has a state of its own (an elution station: idle, eluting, fault…) gives it as
  `condition`; a change of it after a read is reported at once, so a station that faults on
  its own is shown faulted within a poll, not a status interval later.
* A watchdog bounds every connect/read (drivers have their own timeouts; this catches a
  driver that hangs anyway) and turns a hang into a DeviceTimeout.
* `stop()` is graceful: an item already read is committed before `run()` returns; only
  waiting (for the device, the poll interval or the backoff) is interrupted. A commit that
  keeps failing is retried for up to `stop_commit_s` after `stop()`; only then, or if the
  task is cancelled first, are the items given up, and the log names each one (ERROR).

The read loop runs once per poll of every device (thousands of times a second in a large
lab), so it creates no task and no `wait_for` per poll: the read, the watchdog and the
pause run in the supervisor's own task, under a shared timeout (drivers/deadlines.py), and
`stop()` interrupts a wait by cancelling that task while (and only while) it is in an
interruptible wait.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol, TypeVar

from hotlab.backoff import Backoff
from hotlab.controller.outbox import OutboxFull
from hotlab.drivers.deadlines import SharedDeadlines
from hotlab.drivers.records import (
    DeviceDisconnected,
    DeviceTimeout,
    DriverError,
    ElutionRecord,
    Reading,
)

log = logging.getLogger(__name__)

Item = Reading | ElutionRecord
T = TypeVar("T")


class _Stopped(Enum):
    STOPPED = "stopped"


_STOPPED = _Stopped.STOPPED


class Source(Protocol):
    """What the supervisor needs from a device driver.

    `read()` performs one poll (or, for a streaming device, waits for the next frame) and
    returns what it produced — possibly nothing, e.g. a station with no finished elution.
    `delivered(items)` is called once those items are committed to the outbox, so a device
    that repeats data until it is confirmed (the elution station) can stop repeating it.
    """

    streaming: bool

    async def connect(self) -> None: ...

    async def read(self) -> Sequence[Item]: ...

    async def delivered(self, items: Sequence[Item]) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class DeviceState:
    device: str
    up: bool
    latency_ms: float | None
    errors: int
    detail: str


Deliver = Callable[[Sequence[Item]], Awaitable[None]]
ReportStatus = Callable[[DeviceState], Awaitable[None]]
#: The device's own state as of its last read (compared for equality only), e.g. a station's state.
Condition = Callable[[], object]


class _ErrorRun(Exception):
    """`max_consecutive_errors` failed reads in a row: the link is reopened. Already counted."""

    def __init__(self, last: DriverError, count: int) -> None:
        self.detail = f"{type(last).__name__}: {last}"
        super().__init__(f"{self.detail} ({count} in a row)")


#: The shortest time between two statuses that only carry a grown error count.
ERROR_STATUS_MIN_S = 0.2


class DeviceSupervisor:
    def __init__(
        self,
        device: str,
        source: Source,
        *,
        poll_interval_s: float,
        deliver: Deliver,
        report_status: ReportStatus,
        backoff: Backoff | None = None,
        status_interval_s: float = 60.0,
        max_consecutive_errors: int = 3,
        outbox_retry_s: float = 1.0,
        stop_commit_s: float = 8.0,
        watchdog_s: float = 30.0,
        rng: random.Random | None = None,
        condition: Condition | None = None,
    ) -> None:
        self.device = device
        self.source = source
        self.poll_interval_s = poll_interval_s
        self._deliver = deliver
        self._report_status = report_status
        self.backoff = backoff or Backoff()
        self.status_interval_s = status_interval_s
        self.max_consecutive_errors = max_consecutive_errors
        self.outbox_retry_s = outbox_retry_s
        #: How long after `stop()` a failing commit is still retried. The service should pass its
        #: drain timeout; the default stays under the 10 s ControllerService._stop_devices waits.
        self.stop_commit_s = stop_commit_s
        self._stop_deadline = float("inf")
        self.watchdog_s = watchdog_s
        self._watchdog = SharedDeadlines()  # one timer for the watchdog of every poll (drivers/deadlines.py)
        self._rng = rng or random.Random()
        self._condition = condition
        self._reported_condition: object = None
        self.errors = 0
        self._reported_errors = 0
        self.reads = 0
        self.up = False
        self.latency_ms: float | None = None
        self._last_status_at = float("-inf")
        self._stopping = False
        #: The supervisor's task while it waits in `_interruptible`, else None.
        self._waiting_task: asyncio.Task[object] | None = None
        #: True once `stop()` cancelled `_waiting_task`; that one cancellation is ours to absorb.
        self._stop_cancelled = False

    def stop(self) -> None:
        """Finish the item in hand (commit it), then return from `run()` without reading again."""
        if self._stopping:
            return
        self._stopping = True
        self._stop_deadline = time.monotonic() + self.stop_commit_s
        if self._waiting_task is not None:
            self._stop_cancelled = True
            self._waiting_task.cancel()

    async def run(self) -> None:
        """Supervise until `stop()` (graceful) or cancellation."""
        attempt = 0
        try:
            while not self._stopping:
                try:
                    if await self._interruptible(self._watched(self.source.connect, "connect")) is _STOPPED:
                        return
                    await self._read_loop()
                    return
                except asyncio.CancelledError:
                    raise
                except _ErrorRun as run:  # counted and described by the read loop
                    log.warning("device %s: %s; reconnecting", self.device, run)
                    await self._set_down(run.detail)
                except DriverError as exc:
                    self.errors += 1
                    log.warning("device %s: %s: %s; reconnecting", self.device, type(exc).__name__, exc)
                    await self._set_down(f"{type(exc).__name__}: {exc}")
                except Exception as exc:  # a driver bug must not take the controller down
                    self.errors += 1
                    log.exception("device %s: unexpected %s from driver; reconnecting", self.device, type(exc).__name__)
                    await self._set_down(f"driver failure: {type(exc).__name__}: {exc}")
                await self._close_quietly()
                if self.reads:  # the last connection worked for a while: start the backoff over
                    attempt = 0
                    self.reads = 0
                delay = self.backoff.delay(attempt, self._rng)
                attempt += 1
                log.info("device %s: next connection attempt in %.2f s", self.device, delay)
                await self._sleep(delay)
        finally:
            await asyncio.shield(self._close_quietly())

    async def _read_loop(self) -> None:
        """Read until stopped; returns normally only on stop, raises to trigger a reconnect."""
        consecutive = 0
        while not self._stopping:
            started = time.monotonic()
            try:
                items = await self._interruptible(self._watched(self.source.read, "read"))
            except DeviceDisconnected:
                raise
            except DriverError as exc:
                consecutive += 1
                self.errors += 1
                if consecutive >= self.max_consecutive_errors:
                    raise _ErrorRun(exc, consecutive) from exc  # run() logs it once and reconnects
                log.warning("device %s: %s: %s (%d in a row)", self.device, type(exc).__name__, exc, consecutive)
                await self._report(detail=f"{type(exc).__name__}: {exc}")
                await self._pause(started)
                continue
            if items is _STOPPED:
                return
            consecutive = 0
            self.reads += 1
            self.latency_ms = (time.monotonic() - started) * 1000.0
            if not self.up:
                self.up = True
                log.info("device %s: online", self.device)
                await self._report(detail="online", force=True)
            if items:
                await self._hand_over(items)
            await self._report(detail="ok")
            await self._pause(started)

    async def _hand_over(self, items: Sequence[Item]) -> None:
        """Commit, retrying any failure with backoff; the device is not read (nor reconnected) meanwhile.

        Deliberately not interrupted by `stop()`: an item that was read is committed first, for
        up to `stop_commit_s`. Only the commit is guarded here, so a commit failure is never
        mistaken for a driver failure (which would reconnect the device and lose the items).
        """
        failing_since = 0.0
        failures = 0
        try:
            while True:
                try:
                    await self._deliver(items)
                except Exception as exc:
                    failures += 1
                    detail, delay = self._commit_failure(exc, items, failures)
                    if failures == 1:
                        failing_since = time.monotonic()
                        await self._report(detail=detail, force=True)
                    if self._stopping and time.monotonic() >= self._stop_deadline:
                        self._log_not_committed(
                            items,
                            f"still failing {self.stop_commit_s:g} s after stop "
                            f"({failures} attempt(s), last: {detail})",
                        )
                        return
                    await self._retry_pause(delay)
                    continue
                await self._confirm(items)
                if failures:
                    log.warning(
                        "device %s: commit works again after %.1f s and %d failed attempt(s); %d item(s) committed",
                        self.device,
                        time.monotonic() - failing_since,
                        failures,
                        len(items),
                    )
                    await self._report(detail="ok", force=True)
                return
        except asyncio.CancelledError:
            self._log_not_committed(items, "cancelled before the commit succeeded")
            raise

    def _commit_failure(self, exc: Exception, items: Sequence[Item], failures: int) -> tuple[str, float]:
        """Log one failed commit (loudly the first time); return the status detail and the retry delay."""
        first = failures == 1
        if isinstance(exc, OutboxFull):
            # A sink has to catch up; that is not sped up by waiting longer between attempts.
            detail, delay = f"outbox full: {exc}", self.outbox_retry_s
            if first:
                log.error(
                    "device %s: OUTBOX FULL, holding %d item(s) and pausing reads until a sink catches up: %s",
                    self.device,
                    len(items),
                    exc,
                )
            return detail, delay
        delay = Backoff(self.outbox_retry_s, self.backoff.max_s).ceiling(failures - 1)
        if isinstance(exc, (sqlite3.Error, OSError)):
            detail = f"outbox unavailable: {type(exc).__name__}: {exc}"
            if first:
                log.error(
                    "device %s: OUTBOX UNAVAILABLE (%s), holding %d item(s) and pausing reads; retrying with backoff",
                    self.device,
                    detail,
                    len(items),
                )
        else:
            detail = f"commit failed: {type(exc).__name__}: {exc}"
            if first:
                log.error(
                    "device %s: COMMIT FAILED (a bug in the commit path), holding %d item(s) and pausing "
                    "reads; retrying with backoff",
                    self.device,
                    len(items),
                    exc_info=exc,
                )
        if not first:
            log.warning(
                "device %s: commit attempt %d failed (%s); next in %.2f s", self.device, failures, detail, delay
            )
        return detail, delay

    async def _retry_pause(self, seconds: float) -> None:
        """Wait before the next commit attempt; once stopping, only as long as the stop deadline allows."""
        if self._stopping:
            await asyncio.sleep(max(0.0, min(seconds, self._stop_deadline - time.monotonic())))
        else:
            await self._sleep(seconds)  # a stop() ends this early: the next attempt comes at once

    def _log_not_committed(self, items: Sequence[Item], why: str) -> None:
        log.error(
            "device %s: %d item(s) read but NOT COMMITTED (%s); they are lost unless the device repeats them:",
            self.device,
            len(items),
            why,
        )
        for item in items:
            log.error("device %s: not committed: %r", self.device, item)

    async def _confirm(self, items: Sequence[Item]) -> None:
        """Tell the source its items are stored; if that fails they come again (same msg_id: harmless)."""
        try:
            await self.source.delivered(items)
        except Exception as exc:
            log.warning(
                "device %s: could not confirm delivery (%s: %s); the device will repeat it",
                self.device,
                type(exc).__name__,
                exc,
            )

    async def _interruptible(self, operation: Awaitable[T]) -> T | _Stopped:
        """Await `operation` in this task unless `stop()` comes first (then cancel it: it produced nothing yet).

        `stop()` cancels this task only while it waits here; the one cancellation it caused is
        absorbed here (`uncancel`), any other cancellation of the task passes through.
        """
        if self._stopping:
            if asyncio.iscoroutine(operation):
                operation.close()
            return _STOPPED
        task = asyncio.current_task()
        assert task is not None
        self._waiting_task = task
        try:
            result = await operation
        except asyncio.CancelledError:
            if self._stop_cancelled and task.uncancel() == 0:
                return _STOPPED
            raise
        else:
            if self._stop_cancelled:  # the driver swallowed stop's cancellation: keep the task's count right
                task.uncancel()
            return result
        finally:
            self._waiting_task = None
            self._stop_cancelled = False

    async def _watched(self, operation: Callable[[], Awaitable[T]], what: str) -> T:
        """Drivers enforce their own timeouts; this catches one that hangs anyway (a driver bug)."""
        try:
            async with self._watchdog.timeout(self.watchdog_s):
                return await operation()
        except TimeoutError:
            raise DeviceTimeout(f"driver {what} gave no result within {self.watchdog_s:g} s (watchdog)") from None

    async def _sleep(self, seconds: float) -> None:
        """Wait, unless `stop()` comes first."""
        await self._interruptible(asyncio.sleep(max(0.0, seconds)))

    async def _pause(self, started: float) -> None:
        if self.source.streaming:
            return
        await self._sleep(self.poll_interval_s - (time.monotonic() - started))

    async def _report(self, *, detail: str, force: bool = False) -> None:
        """Publish the device's status: when forced, when the interval has passed, when the device's
        condition changed, or when the error count has grown since the last status (at most every
        ERROR_STATUS_MIN_S), so a dashboard sees each failure while a device stays down instead of
        once per interval."""
        now = time.monotonic()
        since = now - self._last_status_at
        new_errors = self.errors != self._reported_errors and since >= ERROR_STATUS_MIN_S
        condition = self._condition() if self._condition is not None else None
        changed = condition != self._reported_condition
        if not (force or changed or new_errors or since >= self.status_interval_s):
            return
        self._last_status_at = now
        self._reported_errors = self.errors
        self._reported_condition = condition
        state = DeviceState(self.device, self.up, self.latency_ms, self.errors, detail)
        try:
            await self._report_status(state)
        except Exception as exc:
            log.warning("device %s: status %r not stored (%s: %s)", self.device, detail, type(exc).__name__, exc)

    async def _set_down(self, detail: str) -> None:
        if self.up or self._last_status_at == float("-inf"):
            log.warning("device %s: offline (%s)", self.device, detail)
        was_up, self.up = self.up, False
        await self._report(detail=detail, force=was_up or self._last_status_at == float("-inf"))

    async def _close_quietly(self) -> None:
        try:
            await self.source.close()
        except Exception as exc:
            log.debug("device %s: error while closing: %s", self.device, exc)

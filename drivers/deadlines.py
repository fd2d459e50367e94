"""Timeouts that share one event-loop timer per owner instead of arming a timer each.

Why: a VIK-202 reading is two serial exchanges, each bounded by a timeout, inside the
supervisor's watchdog: three `asyncio.timeout`s per reading, each arming a loop timer and
cancelling it a millisecond later when the reply arrives. With 100 devices polling, that
cost about 14 µs per timeout: without the two in `SerialLink.read_until` the read path did
8,000-9,500 reads per CPU-second instead of 6,200-7,800, and with them sharing a timer as
here 7,200-8,300 (docs/benchmarks.md, second sitting of 2026-11-26).

Here each owner (one serial link, one supervisor) keeps its open timeouts' deadlines in a dict
and arms one timer, for the earliest; a timeout that ends before its deadline only leaves the
dict. A new deadline later than the armed one (the usual case: the same timeout, started
later) arms nothing. When the timer fires, the timeouts that are due expire and the timer is
armed again for the earliest of the rest. Each timeout is an `asyncio.timeout(None)` whose
deadline is set with its public `reschedule` when due, so cancellation, `TimeoutError` and
nesting behave exactly as with `asyncio.timeout`.
"""

from __future__ import annotations

import asyncio
import math
from types import TracebackType

#: A deadline this close counts as due when the timer fires: uvloop's clock and timers have a
#: resolution of one millisecond, so its timer may fire up to that much before the deadline.
_CLOCK_SLACK_S = 0.001


class SharedDeadlines:
    """The timeouts of one owner, all on one loop; `timeout(s)` is used like `asyncio.timeout(s)`."""

    def __init__(self) -> None:
        self._deadlines: dict[asyncio.Timeout, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        #: The loop of the timeouts. An owner used again on a new loop (tests) starts afresh there:
        #: a timer armed on a loop that has since closed never fires.
        self._loop: asyncio.AbstractEventLoop | None = None

    def timeout(self, delay_s: float) -> SharedTimeout:
        return SharedTimeout(self, delay_s)

    def _add(self, scope: asyncio.Timeout, when: float, loop: asyncio.AbstractEventLoop) -> None:
        if loop is not self._loop:
            self._deadlines.clear()
            self._timer, self._timer_at, self._loop = None, math.inf, loop
        self._deadlines[scope] = when
        if when < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._arm(when, loop)

    def _remove(self, scope: asyncio.Timeout) -> None:
        self._deadlines.pop(scope, None)

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer, self._timer_at = None, math.inf
        now = loop.time()
        due = [scope for scope, when in self._deadlines.items() if when <= now + _CLOCK_SLACK_S]
        for scope in due:
            del self._deadlines[scope]
            scope.reschedule(now)  # in the past: asyncio's Timeout expires at the next loop turn
        if self._deadlines:
            self._arm(min(self._deadlines.values()), loop)

    def _arm(self, when: float, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = loop.call_at(when, self._expire, loop)
        self._timer_at = when


class SharedTimeout:
    """One timeout of a `SharedDeadlines`: an `asyncio.timeout(None)` given its deadline when due.

    The deadline is kept by the owner, not by the `asyncio.Timeout` that `async with` yields
    (its `when()` is None until it expires): do not `reschedule` that one.
    """

    __slots__ = ("_owner", "_delay_s", "_scope")

    def __init__(self, owner: SharedDeadlines, delay_s: float) -> None:
        self._owner = owner
        self._delay_s = delay_s
        self._scope: asyncio.Timeout | None = None

    async def __aenter__(self) -> asyncio.Timeout:
        scope = self._scope = asyncio.timeout(None)
        await scope.__aenter__()
        loop = asyncio.get_running_loop()
        self._owner._add(scope, loop.time() + self._delay_s, loop)
        return scope

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        assert self._scope is not None
        self._owner._remove(self._scope)
        await self._scope.__aexit__(exc_type, exc, traceback)

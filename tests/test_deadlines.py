"""Shared timeouts (drivers/deadlines.py): asyncio.timeout's behaviour, without a loop timer per use."""

from __future__ import annotations

import asyncio
import time

import pytest
from pytest_mock import MockerFixture

from hotlab.drivers.deadlines import SharedDeadlines


async def test_a_timeout_that_is_reached_raises_timeout_error_at_its_deadline() -> None:
    deadlines = SharedDeadlines()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with deadlines.timeout(0.05):
            await asyncio.sleep(10)
    assert 0.045 <= time.monotonic() - started < 1.0


async def test_timeouts_that_end_in_time_arm_one_timer_not_one_each(mocker: MockerFixture) -> None:
    armed = mocker.spy(asyncio.get_running_loop(), "call_at")  # the real call_at runs; the spy counts
    deadlines = SharedDeadlines()
    for _ in range(1000):
        async with deadlines.timeout(5.0):
            await asyncio.sleep(0)
    assert armed.call_count == 1


async def test_only_the_due_timeouts_expire_and_the_later_ones_still_do() -> None:
    deadlines = SharedDeadlines()
    outcomes: dict[str, float] = {}
    started = time.monotonic()

    async def wait(name: str, timeout_s: float) -> None:
        try:
            async with deadlines.timeout(timeout_s):
                await asyncio.sleep(10)
        except TimeoutError:
            outcomes[name] = time.monotonic() - started

    async def finish_early() -> None:
        async with deadlines.timeout(0.02):
            await asyncio.sleep(0.001)
        outcomes["early"] = -1.0

    await asyncio.gather(wait("late", 0.2), wait("soon", 0.05), finish_early())
    assert outcomes["early"] == -1.0
    assert 0.045 <= outcomes["soon"] < 0.15
    assert 0.195 <= outcomes["late"] < 0.5


async def test_nested_timeouts_each_raise_at_their_own_level() -> None:
    deadlines = SharedDeadlines()
    with pytest.raises(TimeoutError):
        async with deadlines.timeout(0.1):
            with pytest.raises(TimeoutError):
                async with deadlines.timeout(0.02):
                    await asyncio.sleep(10)
            await asyncio.sleep(10)  # the outer one is still running, and expires here


async def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    deadlines = SharedDeadlines()

    async def waiting() -> None:
        async with deadlines.timeout(5.0):
            await asyncio.sleep(10)

    task = asyncio.create_task(waiting())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


def test_an_owner_used_again_on_a_new_loop_still_times_out() -> None:
    deadlines = SharedDeadlines()

    async def expire(timeout_s: float) -> bool:
        try:
            async with deadlines.timeout(timeout_s):
                await asyncio.sleep(10)
        except TimeoutError:
            return True
        return False

    async def leave_a_timer_armed() -> None:
        async with deadlines.timeout(0.01):
            pass

    asyncio.run(leave_a_timer_armed())  # its timer, armed on that loop, never fires
    assert asyncio.run(expire(0.05))

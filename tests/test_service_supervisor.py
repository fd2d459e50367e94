"""Device supervision and the commit path, without a broker (local-only mode keeps everything in the outbox)."""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from hotlab.backoff import Backoff
from hotlab.controller.config import DeviceConfig, parse_config
from hotlab.controller.messages import Message
from hotlab.controller.outbox import Outbox
from hotlab.controller.qc.generator_rules import ge68_breakthrough
from hotlab.controller.qc.limits import load_limits
from hotlab.controller.service import ControllerService, ServiceError
from hotlab.controller.supervisor import DeviceState, DeviceSupervisor, Item
from hotlab.drivers.records import DeviceDisconnected, FrameError, Reading


def qc_verdict(site: str, station: str, device: str) -> Message:
    """A QC verdict as the QC engine commits it (so it matches its schema), where any verdict will do."""
    now = time.time_ns()
    result = ge68_breakthrough(
        1.1e9, now - 72 * 3600 * 10**9, 10.0, now, load_limits()["ge68_breakthrough"], background_bq=(1.0, 1.2, 0.8)
    )
    return result.to_message(site, station, device)


def reading(device: str, n: int) -> Reading:
    return Reading(device, "F-18", float(n), float(n), "Bq", time.time_ns(), b"%d" % n)


class ScriptedSource:
    """Each read takes the next step: an int n yields reading n, an exception is raised."""

    streaming = False

    def __init__(self, device: str, script: Sequence[int | Exception], then: int | Exception = 0) -> None:
        self.device = device
        self.script = list(script)
        self.then = then
        self.connects = 0
        self.closes = 0
        self.reads = 0
        self.confirmed: list[Item] = []

    async def connect(self) -> None:
        self.connects += 1

    async def read(self) -> Sequence[Item]:
        self.reads += 1
        step = self.script.pop(0) if self.script else self.then
        if isinstance(step, Exception):
            raise step
        return [reading(self.device, step or self.reads)]

    async def delivered(self, items: Sequence[Item]) -> None:
        self.confirmed.extend(items)

    async def close(self) -> None:
        self.closes += 1


class Recorder:
    def __init__(self) -> None:
        self.items: list[Item] = []
        self.states: list[DeviceState] = []
        self.changed = asyncio.Event()

    async def deliver(self, items: Sequence[Item]) -> None:
        self.items.extend(items)
        self.changed.set()

    async def status(self, state: DeviceState) -> None:
        self.states.append(state)
        self.changed.set()

    async def until(self, predicate: object, timeout: float = 10.0) -> None:
        async def wait() -> None:
            while not predicate():  # type: ignore[operator]
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), timeout)


def supervise(source: ScriptedSource, recorder: Recorder, **options: object) -> DeviceSupervisor:
    settings: dict[str, object] = {
        "poll_interval_s": 0.001,
        "backoff": Backoff(0.01, 0.05),
        "status_interval_s": 0.0,
        "rng": random.Random(1),
    } | options
    return DeviceSupervisor(source.device, source, deliver=recorder.deliver, report_status=recorder.status, **settings)  # type: ignore[arg-type]


def test_backoff_is_full_jitter_within_the_exponential_cap() -> None:
    backoff = Backoff(initial_s=0.5, max_s=30.0)
    rng = random.Random(42)
    for attempt, cap in [(0, 0.5), (1, 1.0), (3, 4.0), (6, 30.0), (100, 30.0)]:
        delays = [backoff.delay(attempt, rng) for _ in range(2000)]
        assert 0.0 <= min(delays) and max(delays) <= cap
        assert min(delays) < cap * 0.05 and max(delays) > cap * 0.95  # spread over the whole range


async def test_a_few_bad_frames_do_not_reconnect_but_a_run_of_them_does() -> None:
    bad = FrameError("garbage", b"\x00\xff")
    source = ScriptedSource("cal", [1, bad, 2, bad, bad, 3, bad, bad, bad], then=0)
    recorder = Recorder()
    task = asyncio.create_task(supervise(source, recorder).run())
    await recorder.until(lambda: len(recorder.items) >= 6)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert [r.activity_bq for r in recorder.items[:3]] == [1.0, 2.0, 3.0]
    assert source.connects == 2  # only the third bad frame in a row forced a reconnect
    downs = [s for s in recorder.states if not s.up]
    assert downs and downs[0].detail.startswith("FrameError: garbage") and downs[0].errors == 6
    assert recorder.states[-1].up


async def test_disconnect_reconnects_at_once_and_reports_offline_then_online() -> None:
    source = ScriptedSource("cal", [1, DeviceDisconnected("cable pulled"), 2])
    recorder = Recorder()
    supervisor = supervise(source, recorder)
    task = asyncio.create_task(supervisor.run())
    await recorder.until(lambda: len(recorder.items) >= 3)
    supervisor.stop()
    await asyncio.wait_for(task, 5)
    ups = [(s.up, s.detail) for s in recorder.states if s.detail in ("online",) or not s.up]
    assert ups[:3] == [(True, "online"), (False, "DeviceDisconnected: cable pulled"), (True, "online")]
    assert source.connects == 2 and source.closes >= 2  # closed before reconnecting and at the end


async def test_a_driver_bug_is_contained_to_its_device(caplog: pytest.LogCaptureFixture) -> None:
    broken = ScriptedSource("broken", [], then=ZeroDivisionError("driver bug"))
    healthy = ScriptedSource("healthy", [])
    broken_rec, healthy_rec = Recorder(), Recorder()
    tasks = [
        asyncio.create_task(supervise(broken, broken_rec).run()),
        asyncio.create_task(supervise(healthy, healthy_rec).run()),
    ]
    await healthy_rec.until(lambda: len(healthy_rec.items) >= 50)
    await broken_rec.until(lambda: broken.connects >= 3)
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    assert broken_rec.states[0].detail == "driver failure: ZeroDivisionError: driver bug"
    assert "unexpected ZeroDivisionError from driver" in caplog.text


async def test_stop_lets_the_item_in_hand_be_committed() -> None:
    source = ScriptedSource("cal", [])
    committed: list[Item] = []
    started = asyncio.Event()

    async def slow_deliver(items: Sequence[Item]) -> None:
        started.set()
        await asyncio.sleep(0.3)
        committed.extend(items)

    async def status(_state: DeviceState) -> None:
        pass

    supervisor = DeviceSupervisor("cal", source, poll_interval_s=0.0, deliver=slow_deliver, report_status=status)
    task = asyncio.create_task(supervisor.run())
    await started.wait()
    supervisor.stop()
    await asyncio.wait_for(task, 5)
    assert len(committed) == source.reads == 1
    assert source.confirmed == committed  # confirmed to the device only after the commit


class BlockingSource(ScriptedSource):
    """Reads 1 at once, then the second read waits for the device forever."""

    def __init__(self, device: str) -> None:
        super().__init__(device, [])
        self.read_cancelled = False

    async def read(self) -> Sequence[Item]:
        self.reads += 1
        if self.reads == 1:
            return [reading(self.device, 1)]
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.read_cancelled = True
            raise
        raise AssertionError("unreachable")


@pytest.mark.parametrize("waiting_in", ["read", "poll pause", "reconnect backoff"])
async def test_stop_interrupts_a_wait_and_run_returns_normally(waiting_in: str) -> None:
    recorder = Recorder()
    if waiting_in == "read":
        source: ScriptedSource = BlockingSource("cal")
        supervisor = supervise(source, recorder)
    elif waiting_in == "poll pause":
        source = ScriptedSource("cal", [])
        supervisor = supervise(source, recorder, poll_interval_s=3600.0)
    else:
        source = ScriptedSource("cal", [DeviceDisconnected("unplugged")])
        supervisor = supervise(source, recorder, backoff=Backoff(3600.0, 3600.0), rng=random.Random(4))
    task = asyncio.create_task(supervisor.run())
    if waiting_in == "reconnect backoff":
        await recorder.until(lambda: any(not s.up for s in recorder.states))
    else:
        await recorder.until(lambda: len(recorder.items) == 1)
    await asyncio.sleep(0.05)  # now waiting: for the device, the next poll or the next connection
    supervisor.stop()
    await asyncio.wait_for(task, 2)  # returns, not cancelled
    assert not task.cancelled() and task.result() is None
    assert source.closes >= 1
    if isinstance(source, BlockingSource):
        assert source.read_cancelled and len(recorder.items) == 1


async def test_a_cancellation_from_outside_still_cancels_the_supervisor() -> None:
    source = BlockingSource("cal")
    recorder = Recorder()
    supervisor = supervise(source, recorder)
    task = asyncio.create_task(supervisor.run())
    await recorder.until(lambda: len(recorder.items) == 1)
    await asyncio.sleep(0.05)
    supervisor.stop()
    task.cancel()  # in the same turn as stop(): stop's cancellation is absorbed, this one is not
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2)


def local_config(tmp_path: Path):  # type: ignore[no-untyped-def]
    return parse_config(
        {
            "site": {"name": "local"},
            "device": [
                {
                    "name": "cal-1",
                    "station": "s1",
                    "family": "vik202",
                    "transport": "/dev/null",
                    "poll_interval_s": 0.01,
                }
            ],
            "outbox": {"path": "outbox.sqlite3"},
            "history": {"enabled": False},
        },
        base_dir=tmp_path,
    )


async def run_until_committed(service: ControllerService, count: int) -> None:
    """Run the service until it has committed `count` messages, then stop it cleanly."""
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    while service.committed < count:
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, 20)


async def test_local_only_mode_commits_readings_with_processor_results_together(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    source = ScriptedSource("cal-1", [])

    async def async_qc(message: Message) -> list[Message]:
        p = message.payload
        return [qc_verdict(p["site"], p["station"], p["device"])]

    def failing_qc(message: Message) -> list[Message]:
        raise KeyError("calibration certificate")

    def by_source(device: DeviceConfig) -> ScriptedSource:
        return source

    service = ControllerService(local_config(tmp_path), processors=[async_qc, failing_qc], source_factory=by_source)
    await run_until_committed(service, 30)

    assert "local-only mode" in caplog.text
    assert "processor" in caplog.text and "KeyError" in caplog.text  # logged, and the reading still stored
    outbox = Outbox(tmp_path / "outbox.sqlite3", ["mqtt"])
    stored = outbox.pending("mqtt", limit=10_000)
    outbox.close()
    kinds = [s.message.kind for s in stored]
    data = [k for k in kinds if k != "device_status"]
    assert data[0::2] == ["reading"] * (len(data) // 2) and data[1::2] == ["qc_result"] * (len(data) // 2)
    readings = [s.message.payload["activity_bq"] for s in stored if s.message.kind == "reading"]
    assert readings == [float(n) for n in range(1, len(readings) + 1)] and len(readings) == source.reads
    assert kinds[-1] == "device_status" and stored[-1].message.payload["detail"] == "controller stopped"


async def test_deliveries_for_a_removed_sink_are_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    earlier = Outbox(tmp_path / "outbox.sqlite3", ["mqtt", "influx"])
    earlier.put(qc_verdict("local", "s1", "cal-1"))
    earlier.close()
    service = ControllerService(local_config(tmp_path), source_factory=lambda d: ScriptedSource(d.name, []))
    stop = asyncio.Event()
    stop.set()
    await asyncio.wait_for(service.run(stop), 20)
    assert "holds 1 message(s) for sink 'influx', which is not configured any more" in caplog.text


async def test_a_hanging_driver_is_caught_by_the_watchdog() -> None:
    class HangingSource(ScriptedSource):
        async def read(self) -> Sequence[Item]:
            self.reads += 1
            if self.reads == 2:
                await asyncio.Event().wait()  # a driver bug: never returns
            return [reading(self.device, self.reads)]

    source = HangingSource("cal", [])
    recorder = Recorder()
    task = asyncio.create_task(supervise(source, recorder, watchdog_s=0.2, max_consecutive_errors=1).run())
    await recorder.until(lambda: len(recorder.items) >= 3)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert any(s.detail == "DeviceTimeout: driver read gave no result within 0.2 s (watchdog)" for s in recorder.states)
    assert source.connects == 2


async def test_one_controller_per_outbox(tmp_path: Path) -> None:
    first = ControllerService(local_config(tmp_path), source_factory=lambda d: ScriptedSource(d.name, []))
    second = ControllerService(local_config(tmp_path), source_factory=lambda d: ScriptedSource(d.name, []))
    stop_first = asyncio.Event()
    task = asyncio.create_task(first.run(stop_first))
    while first.committed == 0:
        await asyncio.sleep(0.01)
    with pytest.raises(ServiceError, match=r"is in use by another hotlab controller \(pid \d+\)"):
        await second.run(asyncio.Event())
    stop_first.set()
    await asyncio.wait_for(task, 20)
    stop_second = asyncio.Event()
    stop_second.set()
    await asyncio.wait_for(second.run(stop_second), 20)  # free again once the first one stopped


async def test_an_unusable_outbox_path_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "outbox.sqlite3").mkdir()  # a directory where the database file should be
    service = ControllerService(local_config(tmp_path), source_factory=lambda d: ScriptedSource(d.name, []))
    with pytest.raises(ServiceError, match="cannot open the outbox"):
        await service.run(asyncio.Event())


async def test_a_device_whose_driver_cannot_be_built_does_not_stop_the_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = parse_config(
        {
            "site": {"name": "local"},
            "device": [
                {"name": name, "station": "s1", "family": "vik202", "transport": "/dev/null", "poll_interval_s": 0.01}
                for name in ("broken", "healthy")
            ],
            "outbox": {"path": "outbox.sqlite3"},
            "history": {"enabled": False},
        },
        base_dir=tmp_path,
    )

    def factory(device: DeviceConfig) -> ScriptedSource:
        if device.name == "broken":
            raise ValueError("calibration factor table is empty")
        return ScriptedSource(device.name, [])

    service = ControllerService(config, source_factory=factory)
    await run_until_committed(service, 20)
    assert "device broken: cannot create its vik202 driver" in caplog.text
    outbox = Outbox(tmp_path / "outbox.sqlite3", ["mqtt"])
    payloads = [s.message.payload for s in outbox.pending("mqtt", limit=10_000)]
    outbox.close()
    broken = [p for p in payloads if p["device"] == "broken"]
    assert broken[0]["up"] is False and "calibration factor table is empty" in broken[0]["detail"]
    assert sum(1 for p in payloads if p["device"] == "healthy" and "activity_bq" in p) >= 10


async def test_a_failing_commit_stage_never_costs_a_reading(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class BrokenStage:
        applied = 0

        def process(self, *messages: Message) -> object:
            raise RuntimeError("limits table corrupt")

        def apply(self, outcome: object) -> None:
            self.applied += 1

    stage = BrokenStage()
    source = ScriptedSource("cal-1", [])
    service = ControllerService(local_config(tmp_path), stage=stage, source_factory=lambda d: source)
    await run_until_committed(service, 10)
    assert "QC stage failed on 1 message(s); they are stored without QC" in caplog.text
    assert stage.applied == 0  # nothing to apply: no outcome was committed
    outbox = Outbox(tmp_path / "outbox.sqlite3", ["mqtt"])
    readings = [s for s in outbox.pending("mqtt", limit=10_000) if s.message.kind == "reading"]
    outbox.close()
    assert len(readings) == source.reads


class FailingCommit:
    """A commit callable that raises `errors` in turn, then `forever` (or stores, telling `recorder`)."""

    def __init__(
        self, errors: Sequence[Exception], *, forever: Exception | None = None, recorder: Recorder | None = None
    ) -> None:
        self.errors = list(errors)
        self.recorder = recorder
        self.forever = forever
        self.attempts = 0
        self.items: list[Item] = []
        self.first_failure = asyncio.Event()

    async def __call__(self, items: Sequence[Item]) -> None:
        self.attempts += 1
        error = self.errors.pop(0) if self.errors else self.forever
        if error is not None:
            self.first_failure.set()
            raise error
        self.items.extend(items)
        if self.recorder is not None:
            self.recorder.changed.set()


async def test_an_unavailable_outbox_is_retried_without_reconnecting_or_losing_the_reading(
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = ScriptedSource("cal", [])
    recorder = Recorder()
    commit = FailingCommit(
        [sqlite3.OperationalError("disk I/O error"), sqlite3.OperationalError("disk I/O error")], recorder=recorder
    )
    supervisor = DeviceSupervisor(
        "cal",
        source,
        poll_interval_s=0.001,
        deliver=commit,
        report_status=recorder.status,
        status_interval_s=3600.0,
        outbox_retry_s=0.01,
        rng=random.Random(1),
    )
    task = asyncio.create_task(supervisor.run())
    await recorder.until(lambda: len(commit.items) >= 2)
    supervisor.stop()
    await asyncio.wait_for(task, 10)
    assert commit.attempts == len(commit.items) + 2
    assert [r.activity_bq for r in commit.items] == [float(n) for n in range(1, len(commit.items) + 1)]
    assert commit.items[0].raw_frame == b"1"  # the reading in hand when the outbox failed, committed once
    assert source.confirmed == commit.items
    assert source.connects == 1 and source.reads == len(commit.items)  # not reconnected, not read while failing
    details = [s.detail for s in recorder.states]
    assert "outbox unavailable: OperationalError: disk I/O error" in details
    assert details[details.index("outbox unavailable: OperationalError: disk I/O error") + 1] == "ok"
    assert all(s.up for s in recorder.states)  # the device itself is fine
    assert "OUTBOX UNAVAILABLE" in caplog.text and "from driver" not in caplog.text


async def test_a_commit_bug_is_retried_and_not_blamed_on_the_driver(caplog: pytest.LogCaptureFixture) -> None:
    source = ScriptedSource("cal", [])
    recorder = Recorder()
    commit = FailingCommit([ValueError("QC stage bug")], recorder=recorder)
    supervisor = supervise(source, recorder, outbox_retry_s=0.01)
    supervisor._deliver = commit  # the same supervisor options, with this commit callable
    task = asyncio.create_task(supervisor.run())
    await recorder.until(lambda: len(commit.items) >= 1)
    supervisor.stop()
    await asyncio.wait_for(task, 10)
    assert commit.items[0].raw_frame == b"1" and source.connects == 1
    assert any(s.detail == "commit failed: ValueError: QC stage bug" for s in recorder.states)
    assert "COMMIT FAILED" in caplog.text and "from driver" not in caplog.text


async def test_stop_keeps_retrying_a_failing_commit_until_the_deadline(caplog: pytest.LogCaptureFixture) -> None:
    source = ScriptedSource("cal", [])
    recorder = Recorder()
    commit = FailingCommit([], forever=OSError(28, "No space left on device"))
    supervisor = DeviceSupervisor(
        "cal",
        source,
        poll_interval_s=0.001,
        deliver=commit,
        report_status=recorder.status,
        outbox_retry_s=0.02,
        stop_commit_s=0.6,
        backoff=Backoff(0.01, 0.05),
    )
    task = asyncio.create_task(supervisor.run())
    await asyncio.wait_for(commit.first_failure.wait(), 10)
    attempts_before_stop = commit.attempts
    stopped_at = time.monotonic()
    supervisor.stop()
    await asyncio.wait_for(task, 10)
    waited = time.monotonic() - stopped_at
    assert 0.55 <= waited < 5.0
    assert commit.attempts - attempts_before_stop >= 5  # retried every <= 0.05 s (backoff cap) meanwhile
    assert commit.items == [] and source.confirmed == [] and source.reads == 1
    assert "1 item(s) read but NOT COMMITTED (still failing 0.6 s after stop" in caplog.text
    assert "not committed: Reading(" in caplog.text and "raw_frame=b'1'" in caplog.text


async def test_a_commit_that_recovers_during_the_stop_deadline_is_kept() -> None:
    source = ScriptedSource("cal", [])
    recorder = Recorder()
    commit = FailingCommit([sqlite3.OperationalError("database is locked")] * 8)
    supervisor = DeviceSupervisor(
        "cal",
        source,
        poll_interval_s=0.001,
        deliver=commit,
        report_status=recorder.status,
        outbox_retry_s=0.02,
        stop_commit_s=30.0,
        backoff=Backoff(0.01, 0.04),
    )
    task = asyncio.create_task(supervisor.run())
    await asyncio.wait_for(commit.first_failure.wait(), 10)
    supervisor.stop()  # while the first reading is still failing to commit
    await asyncio.wait_for(task, 10)
    assert commit.attempts == 9 and [r.raw_frame for r in commit.items] == [b"1"]
    assert source.confirmed == commit.items and source.reads == 1


async def test_cancelling_a_failing_commit_names_what_was_lost(caplog: pytest.LogCaptureFixture) -> None:
    source = ScriptedSource("cal", [])
    commit = FailingCommit([], forever=sqlite3.OperationalError("disk I/O error"))
    supervisor = DeviceSupervisor(
        "cal", source, poll_interval_s=0.001, deliver=commit, report_status=Recorder().status, outbox_retry_s=0.02
    )
    task = asyncio.create_task(supervisor.run())
    await asyncio.wait_for(commit.first_failure.wait(), 10)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert "NOT COMMITTED (cancelled before the commit succeeded)" in caplog.text


async def test_each_failed_read_is_logged_once_and_counted_once(caplog: pytest.LogCaptureFixture) -> None:
    """The frame error that forces a reconnect used to be logged by the read loop and again by run()."""
    bad = FrameError("garbage", b"\x00\xff")
    source = ScriptedSource("cal", [bad, bad, bad, 1])
    recorder = Recorder()
    supervisor = supervise(source, recorder)
    with caplog.at_level(logging.WARNING, logger="hotlab.controller.supervisor"):
        task = asyncio.create_task(supervisor.run())
        await recorder.until(lambda: len(recorder.items) >= 1)
        supervisor.stop()
        await asyncio.wait_for(task, 5)
    frame_lines = [
        r.getMessage() for r in caplog.records if "FrameError" in r.getMessage() and "offline" not in r.getMessage()
    ]
    assert len(frame_lines) == 3, frame_lines
    assert supervisor.errors == 3
    assert "3 in a row" in frame_lines[-1] and "reconnecting" in frame_lines[-1]


async def test_the_status_counts_every_error_while_the_device_stays_down() -> None:
    """While a device cannot be reached, each failed attempt shows in its status, not once a minute."""
    source = ScriptedSource("cal", [])
    attempts = 0

    async def refuse() -> None:
        nonlocal attempts
        attempts += 1
        raise DeviceDisconnected("no route to the device server")

    source.connect = refuse  # type: ignore[method-assign]
    recorder = Recorder()
    supervisor = supervise(source, recorder, status_interval_s=60.0, backoff=Backoff(0.3, 0.3))
    task = asyncio.create_task(supervisor.run())
    await recorder.until(lambda: attempts >= 4)
    await asyncio.sleep(0.05)
    supervisor.stop()
    await asyncio.wait_for(task, 5)
    assert supervisor.errors == attempts
    assert recorder.states[-1].errors >= attempts - 1  # at most the attempt in flight is not yet reported
    assert len(recorder.states) <= attempts + 1  # bounded: one status per failed attempt, not a flood

"""The controller's commit path as the history fill runs it: builders, processors, detector, QC stage, outbox, sinks.

What a device hands over becomes messages exactly as in `ControllerService.commit` (the same builders and
name-based msg_ids, the same processors); each batch goes through the measurement detector and the QC stage
(engine, then schedule) and is committed to the lab's own outbox, and the stages take it over only after the
commit (`_commit_batch` in controller/service.py). The QC clock ticks as the service ticks it, on the fill's
time. The history sink moves the outbox into the archive and, with `[influx]`, the InfluxDB sink writes it.

Only the MQTT sink is left out: the broker is the live bus, and months of records replayed there would reach
every live subscriber as news (the live controller restores its state from the archive, not from MQTT). The
history's messages are committed with deliveries for the archive and InfluxDB only, so the live controller,
which opens the same outbox, never publishes them, and sends to InfluxDB whatever the fill could not.

An archive that already holds records is refused: a second fill would add a second history beside the first
(its readings' msg_ids are random, like live ones), so the fill is for a new lab's archive only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING

from hotlab.controller.archive import HistoryArchive
from hotlab.controller.config import DeviceConfig, LabConfig
from hotlab.controller.measurements import MeasurementDetector
from hotlab.controller.messages import Message, elution_message, elution_msg_id, reading_message
from hotlab.controller.outbox import AsyncOutbox, Outbox
from hotlab.controller.qc.stage import QcStage
from hotlab.controller.sinks.history import SINK_NAME as HISTORY_SINK
from hotlab.controller.sinks.history import run_history_sink
from hotlab.drivers.records import ElutionRecord, Reading
from hotlab.errors import InputError

if TYPE_CHECKING:
    from hotlab.controller.sinks.influx import InfluxSink

log = logging.getLogger(__name__)

INFLUX_SINK = "influx"
#: How often the drain looks at the sinks' backlog.
DRAIN_POLL_S = 0.05
#: The longest the fill waits for the archive to take the history (InfluxDB gets `[service] drain_timeout_s`).
#: What is left then stays in the outbox for the archive: the live controller's restore reads it from there.
ARCHIVE_DRAIN_TIMEOUT_S = 120.0

Processor = Callable[[Message], list[Message]]


class HistoryRefused(InputError):
    """The archive is not a new lab's: nothing was filled."""


class HistoryPipeline:
    """Commits what the history's devices produce, through the controller's stages, to the outbox."""

    def __init__(self, config: LabConfig, outbox: AsyncOutbox, stage: QcStage, processors: Sequence[Processor]) -> None:
        self.site = config.site
        self.outbox = outbox
        self.stage = stage
        self.processors = list(processors)
        self.detector = MeasurementDetector.for_lab(config)
        #: What was committed, by kind, and the QC results by (test, verdict).
        self.kinds: Counter[str] = Counter()
        self.results: Counter[tuple[str, str]] = Counter()

    async def commit_items(self, device: DeviceConfig, items: Sequence[Reading | ElutionRecord]) -> list[Message]:
        """Readings or elutions of `device` as the service builds them (ControllerService.commit), committed."""
        messages: list[Message] = []
        for item in items:
            if isinstance(item, ElutionRecord):
                message = elution_message(self.site, item, msg_id=elution_msg_id(item))
            else:
                message = reading_message(self.site, device.station, item)
            messages.append(message)
            for processor in self.processors:
                messages += processor(message)
        return await self.commit(messages)

    async def commit(self, messages: list[Message]) -> list[Message]:
        """One commit batch: detected, judged, stored, then taken over; returns the batch as committed."""
        detected = self.detector.process(messages)
        outcome = self.stage.process(*detected.messages)
        await self.outbox.put_many(outcome.messages)
        self.detector.apply(detected)
        self.stage.apply(outcome)
        for message in outcome.messages:
            self.kinds[message.kind] += 1
            if message.kind == "qc_result":
                self.results[(str(message.payload["test"]), str(message.payload["verdict"]))] += 1
        return list(outcome.messages)

    async def tick(self, now_ns: int) -> None:
        """The QC clock at `now_ns` (ControllerService._tick_qc): what timed out or turned overdue, committed."""
        outcome = self.stage.tick(now_ns)
        if outcome.messages:
            await self.commit(list(outcome.messages))
            self.stage.apply(outcome)


@contextlib.asynccontextmanager
async def history_pipeline(
    config: LabConfig, stage: QcStage, processors: Sequence[Processor]
) -> AsyncIterator[HistoryPipeline]:
    """The pipeline on the lab's outbox with its sinks running; on leaving, the archive has every message.

    HistoryRefused if the archive already holds records or the outbox still holds some for it.
    """
    if config.history_path is None:
        raise HistoryRefused("a history needs the lab's [history] archive")
    sinks = (HISTORY_SINK, INFLUX_SINK) if config.influx is not None else (HISTORY_SINK,)
    archive = await asyncio.to_thread(HistoryArchive, config.history_path)
    try:
        sync_outbox = await asyncio.to_thread(Outbox, config.outbox.path, sinks, config.outbox.max_bytes)
    except BaseException:
        await asyncio.to_thread(archive.close)
        raise
    outbox = AsyncOutbox(sync_outbox)
    stop = asyncio.Event()
    tasks: list[asyncio.Task[object]] = []
    influx = None
    try:
        held = await asyncio.to_thread(archive.count)
        waiting = await outbox.pending_count(HISTORY_SINK)
        if held or waiting:
            raise HistoryRefused(
                f"the archive {config.history_path} already holds {held + waiting} record(s): a history is filled "
                "into a new lab's archive only (use a new --state-dir)"
            )
        tasks.append(asyncio.create_task(run_history_sink(outbox, archive, stop, idle_poll_s=DRAIN_POLL_S)))
        if config.influx is not None:
            influx = _influx_sink(config, outbox)
            tasks.append(asyncio.create_task(influx.run()))
        yield HistoryPipeline(config, outbox, stage, processors)
        await _drain(outbox, HISTORY_SINK, ARCHIVE_DRAIN_TIMEOUT_S)
        if influx is not None:
            await _drain(outbox, INFLUX_SINK, config.service.drain_timeout_s)
    finally:
        stop.set()
        if influx is not None:
            influx.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.to_thread(archive.close)
        await outbox.close()


async def _drain(outbox: AsyncOutbox, sink: str, timeout_s: float) -> None:
    """Wait until `sink` has taken everything, or `timeout_s` passed (what is left waits for the live controller)."""
    deadline = time.monotonic() + timeout_s
    while left := await outbox.pending_count(sink):
        if time.monotonic() >= deadline:
            log.warning("history: the %s sink has %d message(s) left; the controller's sink sends them", sink, left)
            return
        await asyncio.sleep(DRAIN_POLL_S)


def _influx_sink(config: LabConfig, outbox: AsyncOutbox) -> InfluxSink:
    from hotlab.controller.sinks.influx import InfluxConfig, InfluxSink

    section = config.influx
    assert section is not None
    return InfluxSink(InfluxConfig.from_section(section), outbox)

"""The controller's QC commit stage: the QC engine, then the schedule, on every commit batch.

Both are two-phase (controller/qc/engine.py, controller/qc/schedule_stage.py); chained, the
schedule sees each batch as the engine left it (measurements with their ``procedure_id``, the
verdicts and procedure records the engine added), so a daily check that ends in a batch makes
its item ``done`` in the same commit:

    outcome = stage.process(*messages)       # engine, then schedule; neither changes
    await outbox.put_many(outcome.messages)
    stage.apply(outcome)                     # both take over, only after the commit

`tick(now)` is both clocks at once: procedures that timed out end, items whose deadline passed
turn overdue. Its messages are committed through the ordinary commit path, then the outcome is
applied.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hotlab.controller.messages import Message
from hotlab.controller.qc.engine import QcConfig, QcEngine, QcOutcome
from hotlab.controller.qc.schedule_stage import ScheduleOutcome, ScheduleStage, schedule_stage_for

if TYPE_CHECKING:
    from hotlab.controller.archive import HistoryArchive
    from hotlab.controller.config import LabConfig


@dataclass(frozen=True, slots=True)
class QcStageOutcome:
    """What `QcStage.process` or `tick` decided: commit `messages`, then `apply` the outcome."""

    messages: tuple[Message, ...]
    engine: QcOutcome
    schedule: ScheduleOutcome


class QcStage:
    """The QC engine and the QC schedule of one site, chained as one commit stage."""

    def __init__(self, engine: QcEngine, schedule: ScheduleStage) -> None:
        self.engine = engine
        self.schedule = schedule

    def process(self, *messages: Message) -> QcStageOutcome:
        """Judge one commit batch, then fold the result into the schedule; nothing changes yet."""
        judged = self.engine.process(*messages)
        scheduled = self.schedule.process(*judged.messages)
        return QcStageOutcome(scheduled.messages, judged, scheduled)

    def tick(self, now_ns: int) -> QcStageOutcome:
        """What the clock alone decides by `now_ns`: procedures ended as incomplete, items turned overdue."""
        ended = self.engine.tick(now_ns)
        turned = self.schedule.tick(now_ns)
        return QcStageOutcome((*ended.messages, *turned.messages), ended, turned)

    def apply(self, outcome: QcStageOutcome) -> None:
        """Take over a committed outcome (after the commit succeeded)."""
        self.engine.apply(outcome.engine)
        self.schedule.apply(outcome.schedule)

    def restore(self, archive: HistoryArchive, unarchived: Iterable[Message] = ()) -> int:
        """Rebuild both from the archive and the outbox's unarchived messages; returns the elutions restored."""
        pending = list(unarchived)
        restored = self.engine.restore(archive, pending)
        self.schedule.restore(archive, pending)
        return restored


def qc_stage_for(config: LabConfig) -> QcStage:
    """The QC stage for a lab config: its `[qc]` (limits, sources, devices, generators, schedule)."""
    qc = QcConfig.from_mapping(config.qc)
    stations = {device.name: device.station for device in config.devices}
    return QcStage(QcEngine(config.site, qc), schedule_stage_for(config.site, qc, qc.schedule, stations))

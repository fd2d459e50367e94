"""`hotlab demo --history-days N`: months of the demo lab's life, recorded before the live lab starts.

Charts of one dot teach nothing, so the demo can first fill the lab's archive (and InfluxDB, when the
lab has `[influx]`) with N days up to now, made the way live records are made:

* the plan (controller/lab/history_plan.py) says what happened when: daily constancy checks with a slow
  drift and one failure, a repair and its re-baseline, weekly linearity, elutions of an ageing Ga-68
  generator and of weekly Mo-99 generators, the Ge-68 follow-ups, acceptance tests on the first day;
* the lab's simulators carry it out on a clock the fill moves (controller/lab/history_devices.py):
  the QC calibrator's chamber read through its protocol's frames and the plausibility check, the
  stations over real Modbus by the real driver;
* the controller's commit path records it (controller/lab/history_pipeline.py): message builders,
  processors, measurement detector, QC engine and schedule, the lab's outbox, the history and InfluxDB
  sinks. The QC clock ticks every TICK_NS of the history's time, from the QC calibrator's installation.

QC procedures are started below the command path: the start record `ProcedureCommands.start` would
commit, built the same way but timed on the fill's clock (the command path stamps the wall clock), so
the history's procedures carry no audit record of their start_qc; elutions are started through the
station driver as the command path starts them, equally without an audit record. Nothing here writes
the audit trail, so the live lab's trail stays in time order.

Call it once the lab's config exists and before its controller starts (the controller restores its
state from the archive): `await fill_history(config, lab, days)`.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, replace
from datetime import date
from typing import Any

from hotlab.controller.config import LabConfig
from hotlab.controller.lab.demo_review import QC_OFFICER_USER
from hotlab.controller.lab.history_clock import SteppedClock
from hotlab.controller.lab.history_devices import HistoryCalibrator, HistoryStation, source_of
from hotlab.controller.lab.history_pipeline import HistoryPipeline, history_pipeline
from hotlab.controller.lab.history_plan import (
    Elute,
    Event,
    HistoryPlan,
    Install,
    LabelAccuracy,
    MeasureCheckSource,
    MeasureEluate,
    StartProcedure,
    plan_history,
)
from hotlab.controller.lab.simulated_lab import SimLab, station_mo99_breakthrough
from hotlab.controller.messages import elution_msg_id, iso_utc, measurement_label_message
from hotlab.controller.qc.engine import QcConfig
from hotlab.controller.qc.procedures import Procedure, new_procedure_id
from hotlab.controller.qc.stage import qc_stage_for
from hotlab.drivers.records import ElutionRecord
from hotlab.physics.utc_time import NS_PER_S
from hotlab.simulators.source import Source

log = logging.getLogger(__name__)

#: The QC clock's tick in the history's time (the service ticks every 30 s of wall time, QC_TICK_S): a new day's
#: items turn due at midnight exactly, a follow-up's at most this much after its due time.
TICK_NS = 600 * NS_PER_S
#: Who elutes in the history: the demo's operator (the name only reaches the station driver, as live).
OPERATOR_USER = "demo-operator"


@dataclass(frozen=True, slots=True)
class HistorySummary:
    """What a fill made: its window, its story's days, and the records committed."""

    days: int
    start_ns: int
    end_ns: int
    acceptance_day: date
    failure_day: date
    generators: tuple[str, ...]
    #: Messages committed, by kind; QC results by (test, verdict).
    kinds: dict[str, int]
    results: dict[tuple[str, str], int]
    wall_s: float

    def describe(self) -> str:
        """Two lines for the demo's banner."""
        verdicts = {
            verdict: sum(n for (_, v), n in self.results.items() if v == verdict)
            for verdict in ("pass", "warn", "fail")
        }
        return (
            f"history: {self.days} days from {iso_utc(self.start_ns)[:10]} to now filled in {self.wall_s:.1f} s: "
            f"{self.kinds.get('reading', 0)} readings, {self.kinds.get('measurement', 0)} measurements, "
            f"{self.kinds.get('elution', 0)} elutions, {sum(self.results.values())} QC results "
            f"({verdicts['pass']} pass, {verdicts['warn']} warn, {verdicts['fail']} fail)\n"
            f"history: calibrator accepted {self.acceptance_day}, failed and repaired {self.failure_day}; "
            f"earlier generators {', '.join(self.generators)}"
        )


async def fill_history(
    config: LabConfig,
    lab: SimLab,
    days: int,
    *,
    now_ns: int | None = None,
    qc_officer: str = QC_OFFICER_USER,
    operator: str = OPERATOR_USER,
) -> HistorySummary:
    """Fill `config`'s archive (and InfluxDB) with `days` days of `lab`'s life up to `now_ns` (default: now).

    `config` is the live lab's (simulated_lab yields it); `lab` says which generator is on which station.
    InputError (HistoryRefused among them) with a one-line reason when it cannot: `days` out of range, or an
    archive that already holds records, since a second history would lie beside the first.
    """
    started = time.monotonic()
    now = time.time_ns() if now_ns is None else now_ns
    plan = plan_history(lab, QcConfig.from_mapping(config.qc), days, now)
    history_config = replace(config, qc=plan.qc_table(config.qc))
    stage = qc_stage_for(history_config)
    async with history_pipeline(history_config, stage, [station_mo99_breakthrough(config.site)]) as pipeline:
        run = _Run(history_config, lab, plan, pipeline, qc_officer, operator)
        try:
            await run.carry_out()
        finally:
            await run.close()
    summary = HistorySummary(
        days=days,
        start_ns=plan.start_ns,
        end_ns=plan.end_ns,
        acceptance_day=plan.acceptance_day,
        failure_day=plan.failure_day,
        generators=tuple(life.generator_id for life in plan.generators),
        kinds=dict(pipeline.kinds),
        results=dict(pipeline.results),
        wall_s=time.monotonic() - started,
    )
    log.info("%s", summary.describe())
    return summary


class _Run:
    """Carries a plan out, event by event in time order, on the simulators and through the pipeline."""

    def __init__(
        self, config: LabConfig, lab: SimLab, plan: HistoryPlan, pipeline: HistoryPipeline, qc_officer: str,
        operator: str,
    ) -> None:  # fmt: skip
        assert lab.check_source is not None  # plan_history refuses a lab without one
        self.config = config
        self.plan = plan
        self.pipeline = pipeline
        self.engine = pipeline.stage.engine
        self.officer = {"user": qc_officer, "role": "qc_officer"}
        self.operator = operator
        self.clock = SteppedClock(plan.start_ns)
        devices = {device.name: device for device in config.devices}
        self.calibrator_device = devices[lab.check_source.device]
        self.calibrator = HistoryCalibrator(self.calibrator_device, self.clock, plan.chamber.at)
        check = self.engine.config.sources[lab.check_source.source_id]
        self.check_source_id = check.source_id
        self.check_source = Source(check.nuclide, check.reference_bq, check.reference_ns)
        self.stations = {g.device: HistoryStation(devices[g.device], self.clock) for g in lab.generators}
        self.elutions: dict[Elute, ElutionRecord] = {}
        self.last_check: dict[str, Any] | None = None
        # The QC clock from the calibrator's installation: before it, nothing was due.
        self.next_tick_ns = -(-plan.installed_ns // TICK_NS) * TICK_NS

    async def carry_out(self) -> None:
        for event in self.plan.events:
            await self._tick_until(event.at_ns)
            self.clock.set(event.at_ns)
            await self._carry_out(event)
        await self._tick_until(self.plan.end_ns)

    async def close(self) -> None:
        for station in self.stations.values():
            await station.close()

    async def _tick_until(self, at_ns: int) -> None:
        while self.next_tick_ns <= at_ns:
            await self.pipeline.tick(self.next_tick_ns)
            self.next_tick_ns += TICK_NS

    async def _carry_out(self, event: Event) -> None:
        if isinstance(event, Install):
            await self.stations[event.life.device].install(event.life)
        elif isinstance(event, Elute):
            await self._elute(event)
        elif isinstance(event, MeasureCheckSource):
            committed = await self._measure(self.check_source, self.check_source.nuclide.name)
            self.last_check = next(m.payload for m in committed if m.kind == "measurement")
        elif isinstance(event, LabelAccuracy):
            await self._label_accuracy()
        elif isinstance(event, StartProcedure):
            await self.pipeline.commit([self._procedure(event).started_message()])
        else:
            await self._measure_eluate(event)

    async def _elute(self, event: Elute) -> None:
        station = self.stations[event.life.device]
        reason = f"scheduled elution of {event.life.generator_id}"
        record = await station.elute(event.life.volume_ml, user=self.operator, reason=reason)
        await self.pipeline.commit_items(station.device, [record])
        await station.delivered(record)
        self.elutions[event] = record

    async def _measure(self, source: Source, setting: str, container: float = 1.0) -> list[Any]:
        readings = await self.calibrator.measure(source, setting, container)
        return await self.pipeline.commit_items(self.calibrator_device, readings)

    async def _measure_eluate(self, event: MeasureEluate) -> None:
        record = self.elutions.get(event.elution)
        if record is None:
            log.warning("history: no elution at %s to measure", iso_utc(event.elution.at_ns))
            return
        if event.part == "series" and not any(p.kind == "linearity" for p in self._open_procedures()):
            return  # the series reached the calibrator's low end: it is over
        source = source_of(record, event.part, aliquot_bq=event.aliquot_bq, drawn_ns=event.drawn_ns)
        await self._measure(source, event.setting, event.container_response)

    async def _label_accuracy(self) -> None:
        """label_measurement with the check source as reference, as MeasurementLabeller.label records it."""
        assert self.last_check is not None, "the plan labels a check-source measurement"
        device = self.calibrator_device
        record = measurement_label_message(
            self.config.site,
            device.station,
            device.name,
            measurement=self.last_check,
            label=f"accuracy: {self.check_source_id} against its certificate",
            user=self.officer["user"],
            request_id=uuid.uuid4().hex,
            time_ns=self.clock.now_ns(),
            reference_source=self.check_source_id,
        )
        await self.pipeline.commit([record])

    def _procedure(self, event: StartProcedure) -> Procedure:
        """The procedure a QC officer's start_qc opens, as ProcedureCommands.start builds it, at the fill's time."""
        device = self.calibrator_device
        procedure = Procedure(
            procedure_id=new_procedure_id(),
            kind=event.kind,
            site=self.config.site,
            station=device.station,
            device=device.name,
            started_by=dict(self.officer),
            started_ns=self.clock.now_ns(),
            settings=(),
            reason=event.reason,
        )
        if event.kind == "baseline":
            device_qc = self.engine.config.devices[device.name]
            procedure.source_id, procedure.settings = device_qc.check_source, device_qc.settings
        elif event.kind == "ge68_breakthrough":
            assert event.elution is not None
            procedure.settings = ("Ga-68",)
            procedure.elution_id = elution_msg_id(self.elutions[event.elution])
            procedure.generator = self.engine.eluate_generator(procedure.elution_id)
        else:
            assert event.nuclide is not None
            procedure.settings = (event.nuclide,)
            procedure.step_labels = event.geometries
        return procedure

    def _open_procedures(self) -> list[Procedure]:
        return self.engine.open_procedures(self.calibrator_device.name)

"""Labels on measurements: the `label_measurement` command's action, and a calibrator's command surface.

A calibrator's commands: `select_nuclide` (through its source), `label_measurement` (here),
`start_qc` and `end_qc` (controller/qc/procedure_commands.py).

A radiopharmacist names a measurement after taking it: a sample, a batch, a patient dose id. The
command path (controller/commands.py) validates, authorises and audits the `label_measurement`
command exactly like `select_nuclide`; executing it means committing a `measurement_label` record
(controller/messages.py) that links the label to the measurement, through the outbox like every
record. The calibrator itself is not touched, so a label can be added while it is offline.

The measurement must be one this controller published for that device: looked up among the recent
ones the detector remembers (controller/measurements.py), then in the history archive. A label may
also say what the measurement was for QC (docs/qc.md): an accuracy test of a certified reference
source (`reference_source`, one of [qc.sources], on that source's nuclide setting), or a patient
dosage with its prescription (`prescribed_bq`, `administration_ns`, not before the measurement).
Those are checked here, so a label QC could not judge is refused, not stored.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from hotlab.controller.config import DeviceConfig
from hotlab.controller.messages import Message, iso_utc, measurement_label_message
from hotlab.controller.outbox import OutboxFull
from hotlab.controller.qc.procedure_commands import ProcedureCommands
from hotlab.errors import HotlabError

Commit = Callable[[list[Message]], Awaitable[None]]
Lookup = Callable[[str], dict[str, Any] | None]


class LabelRefused(HotlabError):
    """The label was not stored and nothing changed: an unknown measurement, or the outbox refused the record."""


class NuclideControl(Protocol):
    """A calibrator source's command (controller/sources.py `CalibratorSource`)."""

    async def select_nuclide(self, nuclide: str) -> tuple[str | None, str]: ...


class MeasurementLabeller:
    """Stores label records for measurements this controller published."""

    def __init__(
        self,
        site: str,
        recent: Lookup,
        commit: Commit,
        history_path: Path | None,
        reference_nuclides: Mapping[str, str],
    ) -> None:
        """`reference_nuclides`: each [qc.sources] id and its nuclide (canonical name)."""
        self.site = site
        self._recent = recent
        self._commit = commit
        self._history_path = history_path
        self._reference_nuclides = dict(reference_nuclides)

    async def label(
        self,
        device: DeviceConfig,
        measurement_id: str,
        label: str,
        *,
        user: str,
        request_id: str,
        reference_source: str | None = None,
        prescribed_bq: float | None = None,
        administration_ns: int | None = None,
    ) -> dict[str, Any]:
        """Commit the label record; return what the reply and audit trail show as the new value."""
        measurement = self._recent(measurement_id) or await asyncio.to_thread(self._archived, measurement_id)
        if measurement is None or measurement.get("device") != device.name:
            raise LabelRefused(f"no measurement {measurement_id} of {device.name} is known to this controller")
        if reference_source is not None:
            self._check_reference(reference_source, measurement)
        if administration_ns is not None:
            self._check_prescription(administration_ns, measurement)
        record = measurement_label_message(
            self.site,
            device.station,
            device.name,
            measurement=measurement,
            label=label,
            user=user,
            request_id=request_id,
            time_ns=time.time_ns(),
            reference_source=reference_source,
            prescribed_bq=prescribed_bq,
            administration_ns=administration_ns,
        )
        try:
            await self._commit([record])
        except (OutboxFull, sqlite3.Error, OSError) as exc:
            raise LabelRefused(f"the label was not stored ({type(exc).__name__}: {exc}); send it again") from exc
        return {"measurement_id": measurement_id, "label": label, "record": record.msg_id}

    def _check_reference(self, source_id: str, measurement: Mapping[str, Any]) -> None:
        nuclide = self._reference_nuclides.get(source_id)
        if nuclide is None:
            known = ", ".join(sorted(self._reference_nuclides)) or "none"
            raise LabelRefused(f"no reference source {source_id!r} under [qc.sources]; configured: {known}")
        if measurement.get("nuclide") != nuclide:
            raise LabelRefused(
                f"source {source_id} is {nuclide}, but the measurement was taken on the "
                f"{measurement.get('nuclide') or 'unknown'} setting"
            )

    @staticmethod
    def _check_prescription(administration_ns: int, measurement: Mapping[str, Any]) -> None:
        if measurement.get("nuclide") is None:
            raise LabelRefused("a dosage needs the measurement's nuclide setting, and this one has none")
        if administration_ns < int(measurement["time_ns"]):
            raise LabelRefused(
                f"administration {iso_utc(administration_ns)} is before the measurement "
                f"({iso_utc(int(measurement['time_ns']))})"
            )

    def _archived(self, measurement_id: str) -> dict[str, Any] | None:
        if self._history_path is None or not self._history_path.is_file():
            return None
        from hotlab.controller.archive import HistoryArchive

        with HistoryArchive(self._history_path, read_only=True) as archive:
            found = archive.get(measurement_id)
        return found if found is not None and found.get("schema", "").startswith("hotlab.measurement/") else None


class CalibratorCommands:
    """What the command path may do with one calibrator: switch its nuclide, label its measurements, run QC."""

    def __init__(
        self,
        device: DeviceConfig,
        source: NuclideControl,
        labeller: MeasurementLabeller,
        procedures: ProcedureCommands,
    ) -> None:
        self.device = device
        self.source = source
        self.labeller = labeller
        self.procedures = procedures

    async def select_nuclide(self, nuclide: str) -> tuple[str | None, str]:
        return await self.source.select_nuclide(nuclide)

    async def label_measurement(
        self,
        measurement_id: str,
        label: str,
        *,
        user: str,
        request_id: str,
        reference_source: str | None = None,
        prescribed_bq: float | None = None,
        administration_ns: int | None = None,
    ) -> dict[str, Any]:
        return await self.labeller.label(
            self.device,
            measurement_id,
            label,
            user=user,
            request_id=request_id,
            reference_source=reference_source,
            prescribed_bq=prescribed_bq,
            administration_ns=administration_ns,
        )

    async def start_qc(self, args: Mapping[str, Any], *, user: str, role: str, reason: str) -> dict[str, Any]:
        return await self.procedures.start(self.device, args, user=user, role=role, reason=reason)

    async def end_qc(self, args: Mapping[str, Any], *, user: str, role: str, reason: str) -> dict[str, Any]:
        return await self.procedures.end(self.device, args, user=user, role=role, reason=reason)

"""The `start_qc` and `end_qc` commands' actions: commit a procedure's start or end record.

The command path (controller/commands.py) parses, authorises and audits both like every command;
executing one means checking it against what the QC engine has committed (the check source is the
calibrator's, the elution is known, the calibrator has sleeves for a sleeve test, no procedure of the
kind is open) and committing one
`qc_procedure` record through the outbox. The QC engine opens or closes the procedure when that
record passes its commit stage (controller/qc/engine.py), so the procedure's state is only ever
what was committed, and the calibrator itself is not touched: both run while it is offline.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from hotlab.controller.config import DeviceConfig
from hotlab.controller.messages import Message, iso_utc
from hotlab.controller.outbox import OutboxFull
from hotlab.controller.qc.engine import QcEngine, slot_of
from hotlab.controller.qc.procedures import HALF_LIFE_STEPS, UNSHIELDED, Procedure, new_procedure_id
from hotlab.errors import HotlabError

Commit = Callable[[list[Message]], Awaitable[None]]


class ProcedureRefused(HotlabError):
    """The procedure was not started or ended and nothing changed; the message says why."""


class ProcedureCommands:
    """Starts and ends QC procedures for the calibrators of one controller."""

    def __init__(self, site: str, engine: QcEngine | None, commit: Commit) -> None:
        self.site = site
        self._engine = engine
        self._commit = commit

    async def start(
        self, device: DeviceConfig, args: Mapping[str, Any], *, user: str, role: str, reason: str
    ) -> dict[str, Any]:
        """Commit the start record of the procedure `args` asks for; return what the reply shows."""
        engine = self._running()
        kind = str(args["procedure"])
        started_by = {"user": user, "role": role}
        procedure = Procedure(
            procedure_id=new_procedure_id(),
            kind=kind,
            site=self.site,
            station=device.station,
            device=device.name,
            started_by=started_by,
            started_ns=time.time_ns(),
            settings=(),
            reason=reason,
        )
        if kind in ("daily_constancy", "baseline"):
            device_qc = engine.config.devices.get(device.name)
            if device_qc is None or device_qc.check_source is None:
                raise ProcedureRefused(f"{device.name} has no check source: configure [qc.devices.{device.name}]")
            if args["source"] != device_qc.check_source:
                raise ProcedureRefused(
                    f"source {args['source']!r} is not the check source of {device.name} ({device_qc.check_source})"
                )
            procedure.source_id, procedure.settings = device_qc.check_source, device_qc.settings
        elif kind in ("ge68_breakthrough", "ga68_half_life"):
            procedure.settings = ("Ga-68",)
            if "elution_id" in args:
                procedure.elution_id = str(args["elution_id"])
                procedure.generator = engine.eluate_generator(procedure.elution_id)
                if procedure.generator is None:
                    raise ProcedureRefused(
                        f"no elution {procedure.elution_id} of a configured generator is known to this controller"
                    )
            if kind == "ga68_half_life":
                procedure.step_labels = HALF_LIFE_STEPS
            else:
                procedure.aliquot_fraction = float(args.get("aliquot_fraction", 1.0))
        else:
            procedure.settings = (str(args["nuclide"]),)
            if kind == "geometry":
                procedure.step_labels = tuple(args["geometries"])
            elif kind == "sleeve_linearity":
                sleeves = engine.config.sleeves(device.name)
                if not sleeves:
                    raise ProcedureRefused(
                        f"{device.name} has no linearity sleeves: configure [qc.devices.{device.name}.sleeves] "
                        "label = factor (activity / reading in that sleeve)"
                    )
                procedure.step_labels = (UNSHIELDED, *sleeves)
        for open_procedure in engine.open_procedures(device.name):
            if slot_of(device.name, open_procedure.kind) == slot_of(device.name, kind):
                raise ProcedureRefused(
                    f"{open_procedure.kind} procedure {open_procedure.procedure_id} is open on {device.name} since "
                    f"{iso_utc(open_procedure.started_ns)}; end it with end_qc first"
                )
        record = procedure.started_message()
        await self._store(record)
        return {"procedure_id": procedure.procedure_id, "procedure": kind, "record": record.msg_id}

    async def end(
        self, device: DeviceConfig, args: Mapping[str, Any], *, user: str, role: str, reason: str
    ) -> dict[str, Any]:
        """Commit the end record of the open procedure (of the kind `args` names, if any): aborted, or a
        linearity series judged with what it collected."""
        engine = self._running()
        candidates = [
            p for p in engine.open_procedures(device.name) if "procedure" not in args or p.kind == args["procedure"]
        ]
        if not candidates:
            raise ProcedureRefused(f"no {args.get('procedure', 'QC')} procedure is open on {device.name}")
        if len(candidates) > 1:
            kinds = ", ".join(p.kind for p in candidates)
            raise ProcedureRefused(f"{kinds} procedures are open on {device.name}: name one in args.procedure")
        [procedure] = candidates
        record = procedure.end_message("aborted", time.time_ns(), f"ended by {user} ({role}): {reason}")
        await self._store(record)
        return {"procedure_id": procedure.procedure_id, "procedure": procedure.kind, "record": record.msg_id}

    def _running(self) -> QcEngine:
        if self._engine is None:
            raise ProcedureRefused("the QC engine is not running on this controller")
        return self._engine

    async def _store(self, record: Message) -> None:
        try:
            await self._commit([record])
        except (OutboxFull, sqlite3.Error, OSError) as exc:
            raise ProcedureRefused(f"the record was not stored ({type(exc).__name__}: {exc}); send it again") from exc

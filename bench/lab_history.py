"""Years of a busy hot lab's retained history, written fast: what the archive holds after retention.

Why not `hotlab demo --history-days` (controller/lab/history_fill.py): it runs the real simulators,
drivers and QC engine on a simulated clock, about 4 s per 30 days of one calibrator, and stops at
365 days. The report and panel benchmarks need three years of a larger lab in seconds, so this
writes the records directly, built with the real constructors (controller/messages.py, the QC
engine's `judged` results with the default profile's limits, `qc_status_message`), through
`HistoryArchive.add_many`, and the signatures and elution starts into a keyed audit trail
(`AuditLog.append`, in the format `signatures.sign` writes).

The lab: `calibrators` dose calibrators, each with a daily constancy procedure (background and the
Cs-137 check source on three settings) and a weekly decay-method linearity procedure; a Ge-68/Ga-68
generator (a new one each year) eluted twice a day, judged for yield and the station's Ge-68
breakthrough, with a weekly Ge-68 follow-up; a Mo-99/Tc-99m generator (a new one each week) eluted
each morning, judged for yield and Mo-99 breakthrough; device statuses, QC schedule states and a
monthly clock-offset alarm raised and cleared. About 2 % of the constancy checks warn and 0.5 % fail.
Every ended procedure is approved the same day; the results outside procedures are approved once a
week, the last two weeks' still await review. No raw readings: retention keeps them only for 30
days, and the report does not read them.

    .venv/bin/python bench/lab_history.py --days 1095 --out /tmp/lab   # history.sqlite3, audit.jsonl, audit.key
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from hotlab.controller.archive import HistoryArchive
from hotlab.controller.audit import ELUTION_START, KEY_FILE_ENV, RECORD_SIGNED, USER_ADD, AuditLog, load_hmac_key
from hotlab.controller.messages import (
    ClockStatus,
    MeasurementValues,
    Message,
    clock_offset_alarm_message,
    device_status_message,
    elution_message,
    elution_msg_id,
    iso_utc,
    measurement_message,
    qc_procedure_message,
)
from hotlab.controller.qc.limits import DEFAULT_LIMITS
from hotlab.controller.qc.result import QcResult, judged
from hotlab.controller.qc.schedule import ItemStatus
from hotlab.controller.qc.schedule_stage import qc_status_message
from hotlab.controller.signatures import signed_record
from hotlab.controller.users import account_target
from hotlab.drivers.records import ElutionRecord

SITE = "busy-lab"
NS_PER_S = 1_000_000_000
MINUTE_NS = 60 * NS_PER_S
HOUR_NS = 60 * MINUTE_NS
DAY_NS = 24 * HOUR_NS
#: 2026-12-01T00:00:00Z: the end of the generated history unless told otherwise.
DEFAULT_END_NS = 1_796_083_200_000_000_000
# Half-lives (ENSDF, via NNDC NuDat 3): Cs-137 30.08 y, Ge-68 270.95 d, Mo-99 65.94 h, Tc-99m 6.0067 h.
CS137_HALF_LIFE_S = 30.08 * 365.25 * 86400
GE68_HALF_LIFE_S = 270.95 * 86400
TC99M_HALF_LIFE_S = 6.0067 * 3600
SETTINGS = ("Cs-137", "Tc-99m", "F-18")
QC_OFFICER = {"username": "qc-officer", "printed_name": "Quinn Officer", "role": "qc_officer"}
OPERATOR = "operator"
CALIBRATOR_STATION = "qc-lab"
GA_STATION, MO_STATION = "radiochemistry", "hotcell-1"


@dataclass(frozen=True, slots=True)
class Generated:
    days: int
    start_ns: int
    end_ns: int
    kinds: dict[str, int]
    verdicts: dict[tuple[str, str], int]
    audit_records: int
    seconds: float


class _Lab:
    def __init__(self, archive: HistoryArchive, audit: AuditLog, calibrators: int, seed: int) -> None:
        self.archive, self.audit = archive, audit
        self.rng = np.random.default_rng(seed)
        self.calibrators = [f"crc-{i + 1}" for i in range(calibrators)]
        self.kinds: Counter[str] = Counter()
        self.verdicts: Counter[tuple[str, str]] = Counter()
        self.batch: list[Message] = []
        self.signings: list[tuple[int, list[dict[str, object]]]] = []  # (time, records) to sign, in time order
        self.loose: list[dict[str, object]] = []  # results outside procedures since the last weekly approval
        self.last_ga_end: int | None = None

    def add(self, message: Message) -> dict[str, object]:
        self.batch.append(message)
        self.kinds[message.kind] += 1
        if message.kind == "qc_result":
            self.verdicts[(str(message.payload["test"]), str(message.payload["verdict"]))] += 1
        return message.payload

    def result(self, result: QcResult, station: str, device: str, procedure_id: str | None = None) -> dict[str, object]:
        return self.add(replace(result, procedure_id=procedure_id).to_message(SITE, station, device))

    def flush(self) -> None:
        self.archive.add_many(self.batch)
        self.batch.clear()

    # -- one day -----------------------------------------------------------------------

    def day(self, day_ns: int, index: int) -> None:
        audit: list[tuple[int, str, str, str, object]] = []  # (time, actor, action, target, new_value)
        for number, device in enumerate(self.calibrators):
            self.add(device_status_message(SITE, CALIBRATOR_STATION, device, up=True, latency_ms=35.0, errors=0,
                                           time_ns=day_ns + 6 * HOUR_NS + number * MINUTE_NS))  # fmt: skip
            self._daily_constancy(device, day_ns + 7 * HOUR_NS + number * 10 * MINUTE_NS)
            if index % 7 == number % 7:
                self._linearity(device, day_ns + 9 * HOUR_NS + number * 10 * MINUTE_NS)
        for hour in (8, 13):
            self._ga68_elution(day_ns + hour * HOUR_NS + int(self.rng.integers(0, 600)) * NS_PER_S, audit)
        self._mo99_elution(day_ns + 6 * HOUR_NS + 30 * MINUTE_NS, index, audit)
        if index % 7 == 2 and self.last_ga_end is not None:
            self._ge68_follow_up(day_ns + 10 * HOUR_NS)
        if index % 30 == 5:
            self._clock_alarm(day_ns + 11 * HOUR_NS)
        self.flush()
        for end_ns, records in self.signings:
            audit.append((end_ns + 6 * HOUR_NS, QC_OFFICER["username"], RECORD_SIGNED, "", records))
        self.signings.clear()
        if index % 7 == 6 and len(self.loose) > 0:
            audit.append((day_ns + 17 * HOUR_NS, QC_OFFICER["username"], RECORD_SIGNED, "", list(self.loose)))
            self.loose.clear()
        for when, actor, action, target, value in sorted(audit, key=lambda entry: entry[0]):
            self._audit(when, actor, action, target, value)

    def _audit(self, when: int, actor: str, action: str, target: str, value: object) -> None:
        if action == RECORD_SIGNED:
            assert isinstance(value, list)
            records = [signed_record(payload).as_json() for payload in value]  # type: ignore[arg-type]
            devices = sorted({str(payload.get("device")) for payload in value})  # type: ignore[union-attr]
            self.audit.append(
                actor=actor,
                action=RECORD_SIGNED,
                target=", ".join(devices),
                reason="approved: accepted as the QC record of the device",
                new_value=QC_OFFICER | {"signer": actor, "meaning": "approved", "comment": None, "records": records},
                time_ns=when,
            )
        else:
            self.audit.append(actor=actor, action=action, target=target, reason="routine elution",
                              new_value=value, old_value="idle", time_ns=when)  # fmt: skip

    def _measurement(self, device: str, at_ns: int, nuclide: str, activity_bq: float, pid: str) -> dict[str, object]:
        values = MeasurementValues(
            device=device,
            nuclide=nuclide,
            activity_bq=activity_bq,
            sd_bq=abs(activity_bq) * 0.002,
            n=10,
            background_bq=0.0,
            start_ns=at_ns - 2 * NS_PER_S,
            settle_ns=at_ns,
            removal_ns=at_ns + 3 * NS_PER_S,
            end="removed",
            reading_ids=tuple(uuid.uuid4().hex for _ in range(10)),
            background_readings=(0.0,) * 5,
        )
        message = measurement_message(SITE, CALIBRATOR_STATION, values)
        return self.add(Message(message.kind, message.topic, message.payload | {"procedure_id": pid}))

    def _procedure(self, device: str, name: str, start_ns: int, body: list[dict[str, object]], **extra: object) -> None:
        pid = str(extra.pop("procedure_id"))
        common: dict[str, object] = {
            "procedure_id": pid, "procedure": name, "started_by": None, "started_ns": start_ns,
            "source_id": extra.get("source_id"), "elution_id": extra.get("elution_id"),
            "generator": extra.get("generator"), "reason": None, "settings": list(extra.get("settings") or []),
        }  # fmt: skip
        self.add(qc_procedure_message(SITE, CALIBRATOR_STATION, device, status="started", ended_ns=None, verdict=None,
                                      results=[], measurements=[], detail=f"{name} on {device}", **common))  # type: ignore[arg-type]  # fmt: skip
        results = [p for p in body if p.get("schema", "").startswith("hotlab.qc_result")]  # type: ignore[union-attr]
        measured = [p for p in body if p.get("schema", "").startswith("hotlab.measurement")]  # type: ignore[union-attr]
        order = {"pass": 0, "warn": 1, "fail": 2}
        verdict = max((str(r["verdict"]) for r in results), key=order.__getitem__)
        end_ns = max(int(p["time_ns"]) for p in body) + NS_PER_S  # type: ignore[call-overload]
        end = self.add(
            qc_procedure_message(
                SITE,
                CALIBRATOR_STATION,
                device,
                status="complete",
                ended_ns=end_ns,
                verdict=verdict,
                results=[str(r["msg_id"]) for r in results],
                measurements=[str(m["msg_id"]) for m in measured],
                detail=f"{name} on {device} judged",
                **common,
            )  # type: ignore[arg-type]  # fmt: skip
        )
        self.signings.append((end_ns, [end, *results]))

    def _daily_constancy(self, device: str, start_ns: int) -> None:
        pid = uuid.uuid4().hex
        body = [self._measurement(device, start_ns + NS_PER_S, "Cs-137", 0.0, pid)]
        body.append(self.result(judged("background", DEFAULT_LIMITS["background"], measured=0.0, expected=None, unit="Bq",
                                       time_ns=start_ns + NS_PER_S, inputs={"reading_bq": 0.0, "nuclide_setting": "Cs-137"},
                                       value=0.0, detail="empty-chamber reading"), CALIBRATOR_STATION, device, pid))  # fmt: skip
        elapsed_s = (start_ns - DEFAULT_END_NS) / NS_PER_S + 5 * 365.25 * 86400
        expected = 7.4e6 * 2 ** (-elapsed_s / CS137_HALF_LIFE_S)
        for step, setting in enumerate(SETTINGS, start=1):
            at = start_ns + (step + 1) * 30 * NS_PER_S
            draw = float(self.rng.random())
            deviation = 7.0 if draw < 0.02 else 12.0 if draw < 0.025 else float(self.rng.normal(0.0, 1.5))
            measured = expected * (1 + deviation / 100)
            body.append(self._measurement(device, at, setting, measured, pid))
            inputs = {"source_id": "cs137-check", "source_nuclide": "Cs-137", "setting": setting, "measured_ns": at,
                      "measured_time": iso_utc(at), "baseline_bq": expected, "n": 10,
                      "reading_ids": [uuid.uuid4().hex for _ in range(10)]}  # fmt: skip
            result = judged("constancy", DEFAULT_LIMITS["constancy"], measured=measured, expected=expected, unit="Bq",
                            time_ns=at, inputs=inputs, detail=f"Cs-137 source cs137-check on the {setting} setting")  # fmt: skip
            body.append(self.result(result, CALIBRATOR_STATION, device, pid))
        self._procedure(device, "daily_constancy", start_ns, body, procedure_id=pid, source_id="cs137-check",
                        settings=list(SETTINGS))  # fmt: skip
        status = ItemStatus(device, CALIBRATOR_STATION, "daily_constancy", "constancy", "done", start_ns + DAY_NS,
                            start_ns + DAY_NS + HOUR_NS, start_ns, "pass", pid, None, "done today")  # fmt: skip
        self.add(qc_status_message(SITE, status, start_ns + 3 * MINUTE_NS))

    def _linearity(self, device: str, start_ns: int) -> None:
        pid = uuid.uuid4().hex
        times = [start_ns + i * 4 * HOUR_NS for i in range(13)]
        activity = [3.7e10 * 2 ** (-(t - start_ns) / NS_PER_S / TC99M_HALF_LIFE_S) for t in times]
        bias = float(self.rng.normal(0.0, 0.8))
        measured = [a * (1 + bias / 100 if i == 0 else 1.0) for i, a in enumerate(activity)]
        points = [{"time_ns": t, "activity_bq": m, "expected_bq": a, "deviation_pct": (m / a - 1) * 100,
                   "normalisation": i >= 10} for i, (t, m, a) in enumerate(zip(times, measured, activity))]  # fmt: skip
        result = judged("linearity", DEFAULT_LIMITS["linearity"], measured=measured[0], expected=activity[0], unit="Bq",
                        time_ns=times[-1], inputs={"nuclide": "Tc-99m", "half_life_s": TC99M_HALF_LIFE_S, "points": points},
                        detail="decay-method linearity")  # fmt: skip
        body = [self.result(result, CALIBRATOR_STATION, device, pid)]
        self._procedure(device, "linearity", start_ns, body, procedure_id=pid, settings=["Tc-99m"])

    def _elution(self, station: str, generator: str, parent: str, daughter: str, counter: int, end_ns: int,
                 available: float, yield_pct: float, audit: list[tuple[int, str, str, str, object]]) -> dict[str, object]:  # fmt: skip
        record = ElutionRecord(station, generator, parent, daughter, counter, available * yield_pct / 100, 5.0,
                               end_ns - 150 * NS_PER_S, end_ns, station_serial=generator)  # fmt: skip
        audit.append((end_ns - 160 * NS_PER_S, OPERATOR, ELUTION_START, f"{station}/{generator}", {"state": "eluting"}))
        return self.add(elution_message(SITE, record, yield_pct=yield_pct, breakthrough_pct=1.5e-4,
                                        msg_id=elution_msg_id(record)))  # fmt: skip

    def _ga68_elution(self, end_ns: int, audit: list[tuple[int, str, str, str, object]]) -> None:
        year = iso_utc(end_ns)[:4]
        generator = f"GE68-{year}"
        age_days = (end_ns - _year_start(end_ns)) / DAY_NS
        available = 1.85e9 * 2 ** (-age_days * 86400 / GE68_HALF_LIFE_S)
        yield_pct = 78.0 - 0.04 * age_days + float(self.rng.normal(0.0, 1.0))
        counter = int(age_days * 2) + 1
        elution = self._elution(GA_STATION, generator, "Ge-68", "Ga-68", counter, end_ns, available, yield_pct, audit)
        inputs = {
            "generator": generator,
            "end_of_elution": iso_utc(end_ns),
            "available_bq": available,
            "yield_pct": yield_pct,
        }
        judged_yield = judged("elution_yield", DEFAULT_LIMITS["elution_yield_ga68"], measured=available * yield_pct / 100,
                              expected=available, unit="Bq", time_ns=end_ns, inputs=inputs, value=yield_pct,
                              detail=f"{generator}: yield {yield_pct:.1f} %")  # fmt: skip
        station = judged("ge68_breakthrough_station", DEFAULT_LIMITS["ge68_breakthrough"], measured=1.5e-4, expected=None,
                         unit="%", time_ns=end_ns, value=1.5e-4, detail=f"{generator}: station-reported Ge-68",
                         inputs={"generator": generator, "elution_id": elution["msg_id"], "end_of_elution": iso_utc(end_ns)})  # fmt: skip
        self.loose += [self.result(judged_yield, GA_STATION, generator), self.result(station, GA_STATION, generator)]
        self.last_ga_end = end_ns
        self.last_ga = (generator, str(elution["msg_id"]))

    def _mo99_elution(self, end_ns: int, index: int, audit: list[tuple[int, str, str, str, object]]) -> None:
        generator = f"MO99-{iso_utc(end_ns - (index % 7) * DAY_NS)[:10].replace('-', '')}"
        available = 2.0e10 * 2 ** (-(index % 7) * 86400 / (65.94 * 3600))
        yield_pct = 92.0 + float(self.rng.normal(0.0, 1.5))
        self._elution(MO_STATION, generator, "Mo-99", "Tc-99m", index % 7 + 1, end_ns, available, yield_pct, audit)
        inputs = {
            "generator": generator,
            "end_of_elution": iso_utc(end_ns),
            "available_bq": available,
            "yield_pct": yield_pct,
        }
        judged_yield = judged("elution_yield", DEFAULT_LIMITS["elution_yield_tc99m"], measured=available * yield_pct / 100,
                              expected=available, unit="Bq", time_ns=end_ns, inputs=inputs, value=yield_pct,
                              detail=f"{generator}: yield {yield_pct:.1f} %")  # fmt: skip
        ratio = 0.01 + 0.002 * float(self.rng.random())
        assay = end_ns + 20 * MINUTE_NS
        mo99 = judged("mo99_breakthrough", DEFAULT_LIMITS["mo99_breakthrough"], measured=ratio, expected=None,
                      unit="kBq/MBq", time_ns=assay, value=ratio, inputs={"generator": generator, "measured_time": iso_utc(assay)},
                      detail=f"{ratio:.4g} kBq Mo-99 per MBq Tc-99m")  # fmt: skip
        self.loose += [
            self.result(judged_yield, MO_STATION, generator),
            self.result(mo99, CALIBRATOR_STATION, self.calibrators[0]),
        ]

    def _ge68_follow_up(self, at_ns: int) -> None:
        generator, elution_id = self.last_ga
        pid = uuid.uuid4().hex
        device = self.calibrators[0]
        body = [self._measurement(device, at_ns, "Ga-68", 690.0, pid)]
        ratio = 1.2e-4 + 2e-5 * float(self.rng.random())
        result = judged("ge68_breakthrough", DEFAULT_LIMITS["ge68_breakthrough"], measured=ratio, expected=None, unit="%",
                        time_ns=at_ns, value=ratio, inputs={"generator": generator, "elution_id": elution_id, "delay_s": 172800.0},
                        detail=f"Ge-68 breakthrough of elution {elution_id}")  # fmt: skip
        body.append(self.result(result, CALIBRATOR_STATION, device, pid))
        self._procedure(device, "ge68_breakthrough", at_ns, body, procedure_id=pid, elution_id=elution_id,
                        generator=generator, settings=["Ga-68"])  # fmt: skip

    def _clock_alarm(self, at_ns: int) -> None:
        for active, when in ((True, at_ns), (False, at_ns + HOUR_NS)):
            clock = ClockStatus(offset_s=4.2 if active else 0.3, uncertainty_s=0.05, limit_s=2.0, alarm=active)
            self.add(
                clock_offset_alarm_message(SITE, GA_STATION, "ga68-station", clock, measured_ns=when, time_ns=when)
            )


def _year_start(time_ns: int) -> int:
    year = int(iso_utc(time_ns)[:4])
    days = (year - 1970) * 365 + (year - 1969) // 4  # leap days before `year` (1970–2099)
    return days * DAY_NS


def generate(out: Path, days: int, *, end_ns: int = DEFAULT_END_NS, calibrators: int = 4, seed: int = 1) -> Generated:
    """Write `days` of history ending at `end_ns` into out/history.sqlite3 and out/audit.jsonl (key out/audit.key)."""
    began = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.key").write_text(secrets.token_hex(32) + "\n")
    key = load_hmac_key({KEY_FILE_ENV: str(out / "audit.key")})
    audit = AuditLog(out / "audit.jsonl", key=key)
    start_ns = end_ns - days * DAY_NS
    audit.append(actor=QC_OFFICER["username"], action=USER_ADD, target=account_target(QC_OFFICER["username"]),
                 reason="first account", new_value=QC_OFFICER, time_ns=start_ns - DAY_NS)  # fmt: skip
    with HistoryArchive(out / "history.sqlite3") as archive:
        lab = _Lab(archive, audit, calibrators, seed)
        for index in range(days):
            lab.day(start_ns + index * DAY_NS, index)
    records = sum(1 for _ in open(out / "audit.jsonl", encoding="utf-8"))
    return Generated(days, start_ns, end_ns, dict(lab.kinds), dict(lab.verdicts), records, time.perf_counter() - began)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=1095)
    parser.add_argument("--calibrators", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    made = generate(args.out, args.days, calibrators=args.calibrators)
    print(f"{made.days} days ({iso_utc(made.start_ns)[:10]} to {iso_utc(made.end_ns)[:10]}) in {made.seconds:.1f} s: "
          f"{sum(made.kinds.values())} messages {dict(sorted(made.kinds.items()))}, {made.audit_records} audit records")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

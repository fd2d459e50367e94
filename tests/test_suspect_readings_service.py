"""The review's case: a VIK-202 whose frames lose a bit on the line, through the real controller service.

A VIK-202 frame has no checksum, so `>7.4000E+09` with one bit flipped (`E+08`, `E+19`) parses as
well as the real one. Before the plausibility check, every such frame went to MQTT, the archive and
QC as a valid reading of 7.4x10^19 Bq. Here a real TCP peer plays the calibrator: it answers `!F`
with the Tc-99m factor and `!R` with 7.4 GBq, flipping one bit on 2 of every 8 `!R` while the line
is bad, then answering cleanly. Every reading must be archived; the flipped ones suspect, with a
reason, and none judged by QC; the alarm must be raised while the line is bad and cleared after.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import jsonschema
import pytest

from hotlab.controller.archive import HistoryArchive
from hotlab.controller.config import LabConfig, parse_config
from hotlab.controller.qc.stage import qc_stage_for
from hotlab.controller.service import ControllerService
from tests.fault_tally import tally
from tests.mosquitto_service import MosquittoBroker, MqttCollector, mosquitto  # noqa: F401 - fixture

SCHEMAS = Path(__file__).resolve().parent.parent / "controller" / "schemas"
CLEAN = b">7.4000E+09\r\n"
#: One bit flipped: '9' (0x39) -> '8' (0x38) in the exponent, and '0' (0x30) -> '1' (0x31).
FLIPPED = {3: b">7.4000E+08\r\n", 6: b">7.4000E+19\r\n"}
#: `!R` requests answered with flips (2 of every 8), then clean ones; after that the line is silent.
FLIPPING, TOTAL = 48, 96


def validator(kind: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads((SCHEMAS / f"{kind}.json").read_text()))


def test_the_flipped_frames_differ_from_the_real_one_by_one_bit() -> None:
    for frame in FLIPPED.values():
        differing = [a ^ b for a, b in zip(frame, CLEAN) if a != b]
        assert len(differing) == 1 and bin(differing[0]).count("1") == 1


class BadLineVik202:
    """A VIK-202 on TCP (socket://) behind a line that flips bits: factor 236 (Tc-99m), 7.4 GBq."""

    def __init__(self) -> None:
        self.answered: list[bytes] = []
        self.all_answered = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buffer = b""
        try:
            while data := await reader.read(256):
                buffer += data
                while b"\r" in buffer:
                    request, _, buffer = buffer.partition(b"\r")
                    reply = self.reply(request.strip())
                    if reply:
                        writer.write(reply)
        except ConnectionError:
            pass
        finally:
            writer.close()

    def reply(self, request: bytes) -> bytes:
        if request == b"!F":
            return b">F236\r\n"
        if request != b"!R" or len(self.answered) == TOTAL:
            return b""  # silence once the run is over: the driver times out
        n = len(self.answered) + 1
        frame = FLIPPED.get(n % 8, CLEAN) if n <= FLIPPING else CLEAN
        self.answered.append(frame)
        if len(self.answered) == TOTAL:
            self.all_answered.set()
        return frame


@pytest.fixture
async def bad_line() -> AsyncIterator[tuple[BadLineVik202, int]]:
    device = BadLineVik202()
    server = await asyncio.start_server(device.serve, "127.0.0.1", 0)
    try:
        yield device, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def lab_config(tmp_path: Path, port: int, broker: MosquittoBroker | None = None) -> LabConfig:
    """Local-only without a broker: everything waits in the outbox, and the history archive holds it."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    mqtt = {} if broker is None else {"mqtt": {"host": broker.host, "port": broker.port, "client_id": "review"}}
    return parse_config(
        mqtt
        | {
            "site": {"name": "review"},
            "device": [
                {
                    "name": "cal-1",
                    "station": "hotcell-1",
                    "family": "vik202",
                    "transport": f"socket://127.0.0.1:{port}",
                    "poll_interval_s": 0.02,
                    "timeout_s": 0.5,
                    "plausibility": {"alarm_window": 16, "alarm_fraction": 0.2},
                }
            ],
            "outbox": {"path": "outbox.sqlite3"},
            "history": {"path": "history.sqlite3"},
            "service": {"state_dir": "state", "drain_timeout_s": 5.0},
            # A check source on the device's own setting: every reading would be a constancy check if QC
            # judged readings, the flipped ones included.
            "qc": {
                "sources": {"TC-REF": {"nuclide": "Tc-99m", "activity": "7.4 GBq", "reference_time": now}},
                "devices": {"cal-1": {"check_source": "TC-REF"}},
            },
        },
        base_dir=tmp_path,
    )


async def run_until_archived(service: ControllerService, archive_path: Path, device: BadLineVik202) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        await asyncio.wait_for(device.all_answered.wait(), 60)
        deadline = time.monotonic() + 30
        while not (archive_path.is_file() and _archived_readings(archive_path) == TOTAL):
            assert time.monotonic() < deadline, "not every reading reached the archive"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def _archived_readings(path: Path) -> int:
    with HistoryArchive(path, read_only=True) as archive:
        return archive.count("reading")


async def test_bit_flipped_frames_are_archived_as_suspect_and_never_judged(
    tmp_path: Path, bad_line: tuple[BadLineVik202, int]
) -> None:
    device, port = bad_line
    config = lab_config(tmp_path, port)
    service = ControllerService(config, stage=qc_stage_for(config))
    await run_until_archived(service, tmp_path / "history.sqlite3", device)

    with HistoryArchive(tmp_path / "history.sqlite3", read_only=True) as archive:
        readings = archive.query("reading")
        suspect = archive.query("reading", quality="suspect")
        verdicts = archive.query("qc_result")
        measurements = archive.query("measurement")
        alarms = archive.query("controller_alarm")
        statuses = archive.query("device_status")

    # Every frame the calibrator sent is archived, in order, as it came.
    assert [r["raw_frame"].encode("latin-1") for r in readings] == device.answered
    flipped = [r for r in readings if r["raw_frame"].encode("latin-1") != CLEAN]
    assert len(flipped) == FLIPPING // 8 * 2 == 12 and len(readings) - len(flipped) == 84
    # ...the flipped ones suspect, with the reason; the clean ones good (the re-read after each flip included).
    assert suspect == flipped
    assert all(r["quality"] == "good" and "quality_reason" not in r for r in readings if r not in flipped)
    for reading in flipped:
        reason = reading["quality_reason"]
        if reading["raw_frame"].startswith(">7.4000E+19"):
            assert reason.startswith("7.4e+07 TBq is outside the vik202 range -1 MBq to 1 TBq"), reason
        else:
            assert reason.startswith("fell from 7.4 GBq to 740 MBq in"), reason
            assert "Tc-99m (T½ 21624.1 s) decays to no less than 7.252 GBq" in reason, reason
        assert reason.endswith("; the immediate re-read did not repeat it"), reason
    # Each flip was read again at once: the next frame is the clean re-read, and it is good.
    for index, reading in enumerate(readings):
        if reading in flipped:
            assert readings[index + 1]["raw_frame"].encode("latin-1") == CLEAN
    # None judged by QC: no verdict at all (QC reads measurements; the chamber never showed background).
    assert verdicts == [] and measurements == []
    tally(
        "bit-flipped calibrator frames",
        read=len(readings),
        flipped=len(flipped),
        flagged_suspect=len(suspect),
        good=len(readings) - len(suspect),
        judged_by_QC=len(verdicts),
    )
    # The alarm was raised while the line was bad and cleared once it was clean again, once each.
    assert [(a["alarm"], a["device"], a["active"]) for a in alarms] == [
        ("suspect_readings", "cal-1", True),
        ("suspect_readings", "cal-1", False),
    ]
    assert alarms[0]["suspect_recent"] >= 4 and alarms[0]["window"] == 16 and alarms[0]["threshold"] == 0.2
    assert alarms[1]["suspect_recent"] <= 1
    final = statuses[-1]
    assert final["detail"] == "controller stopped" and final["suspect_readings"] == 12
    for kind, payloads in (("reading", readings), ("controller_alarm", alarms), ("device_status", statuses)):
        for payload in payloads:
            validator(kind).validate(payload)


async def test_the_alarm_is_published_retained_and_a_late_subscriber_sees_its_last_state(
    tmp_path: Path, bad_line: tuple[BadLineVik202, int], mosquitto: MosquittoBroker
) -> None:
    device, port = bad_line
    config = lab_config(tmp_path, port, mosquitto)
    topic = "hotlab/review/hotcell-1/cal-1/alarm"
    async with MqttCollector(mosquitto.host, mosquitto.port, topic, client_id="alarm-watcher") as live:
        await run_until_archived(ControllerService(config), tmp_path / "history.sqlite3", device)
        await live.wait_for(lambda: len(live.payloads()) == 2, 30, "the alarm raised and cleared")
    assert [(p["active"], retained) for _, p, retained in live.messages] == [(True, False), (False, False)]
    async with MqttCollector(mosquitto.host, mosquitto.port, topic, client_id="late-watcher") as late:
        await late.wait_for(lambda: bool(late.messages), 30, "the retained alarm")
    [(_, last, retained)] = late.messages
    assert retained and last["active"] is False and last["suspect_readings"] == 12
    validator("controller_alarm").validate(last)

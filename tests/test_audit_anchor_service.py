"""Audit anchors end to end: real Mosquitto, the real controller service, a simulated Modbus elution station.

The defect these tests pin: deleting the last records of audit.jsonl leaves an intact hash chain,
so `hotlab audit verify` passed it. The controller now publishes the trail's head after each
append (archived, retained on MQTT); verify checks the file against the newest anchor and names it.

The lab runs once per module; each test verifies its own copy of the trail (a copy is the same
trail: anchors are matched on the hash of its first record, not on its path).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import jsonschema
import pytest

from hotlab.controller.archive import HistoryArchive
from hotlab.controller.audit import AuditRecord, canonical_json, iter_records, record_hash, verify_chain
from hotlab.controller.cli.main import main as hotlab
from hotlab.controller.config import parse_config
from hotlab.controller.lab.embedded_broker import free_tcp_port
from hotlab.controller.service import ControllerService
from hotlab.simulators.elution_station import ElutionStationSimulator
from tests.fault_tally import tally
from tests.mosquitto_service import MosquittoBroker, require_mosquitto
from tests.test_commands_service import PANEL_KEY, SITE, TOPIC, Requester, add_accounts, command, station_model

ANCHOR_SCHEMA = json.loads(
    (Path(__file__).resolve().parent.parent / "controller" / "schemas" / "audit_anchor.json").read_text()
)


@dataclass(frozen=True)
class AnchoredLab:
    """What one controller run left behind: its trail, its archive, and the broker that holds the retained anchor."""

    audit: Path
    archive: Path
    broker: MosquittoBroker

    def records(self) -> list[AuditRecord]:
        return list(iter_records(self.audit))

    def copy_trail(self, directory: Path, keep_lines: int | None = None) -> Path:
        """A copy of the trail, cut to its first `keep_lines` lines if given."""
        copy = directory / "audit.jsonl"
        if keep_lines is None:
            shutil.copyfile(self.audit, copy)
        else:
            copy.write_bytes(b"".join(self.audit.read_bytes().splitlines(keepends=True)[:keep_lines]))
        return copy

    def mqtt_options(self) -> list[str]:
        return ["--mqtt-host", self.broker.host, "--mqtt-port", str(self.broker.port)]


async def _run_controller(root: Path, broker: MosquittoBroker) -> None:
    """Start the controller on a simulated station, send commands whose every attempt is audited, stop it."""
    simulator = ElutionStationSimulator(station_model())
    _host, port = await simulator.start_tcp("127.0.0.1", 0)
    config = parse_config(
        {
            "site": {"name": SITE},
            "device": [
                {
                    "name": "gen-1",
                    "station": "elution-1",
                    "family": "elution_station",
                    "poll_interval_s": 0.05,
                    "transport": {"modbus": "tcp", "host": "127.0.0.1", "port": port},
                }
            ],
            "outbox": {"path": "outbox.sqlite3"},
            "service": {"state_dir": "state", "backoff_initial_s": 0.1, "backoff_max_s": 1.0, "drain_timeout_s": 5.0},
            "history": {"path": "history.sqlite3"},
            "mqtt": {"host": broker.host, "port": broker.port, "client_id": f"ctl-{uuid.uuid4().hex[:8]}"},
            "command_sender": [{"name": "panel", "key_env": "HOTLAB_TEST_KEY_PANEL"}],
            "commands": {"min_role": {"start_elution": "qc_officer"}},
        },
        base_dir=root,
    )
    service = ControllerService(config)
    stop = asyncio.Event()
    try:
        async with aiomqtt.Client(broker.host, broker.port) as client:
            requester = Requester(client)
            await client.subscribe(f"hotlab/{SITE}/+/+/cmd/+/reply", qos=1)
            await client.subscribe(f"hotlab/{SITE}/controller/status", qos=1)
            listener = asyncio.create_task(requester.listen())
            task = asyncio.create_task(service.run(stop))
            try:
                await asyncio.wait_for(requester.online.wait(), 30)
                deadline = time.monotonic() + 30
                while not (service.supervisors.get("gen-1") and service.supervisors["gen-1"].up):
                    assert time.monotonic() < deadline, "station never came online"
                    await asyncio.sleep(0.05)
                started = await requester.send(f"{TOPIC}/start_elution", command("alice", {"volume_ml": 5.0}))
                assert started["outcome"] == "executed", started
                denied = await requester.send(f"{TOPIC}/start_elution", command("bob", {"volume_ml": 5.0}))
                assert denied["outcome"] == "unauthorised", denied
                refused = await requester.send(f"{TOPIC}/acknowledge_fault", command("alice", {}))
                assert refused["outcome"] == "refused", refused
                aborted = await requester.send(f"{TOPIC}/abort", command("alice", {}))
                assert aborted["outcome"] == "executed", aborted
            finally:
                stop.set()
                await asyncio.wait_for(task, 60)
                listener.cancel()
                await asyncio.gather(listener, return_exceptions=True)
    finally:
        await simulator.stop()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AnchoredLab]:
    require_mosquitto()
    root = tmp_path_factory.mktemp("anchored-lab")
    (root / "mosquitto").mkdir()
    with MosquittoBroker(workdir=root / "mosquitto") as broker, pytest.MonkeyPatch.context() as env:
        env.setenv("HOTLAB_TEST_KEY_PANEL", PANEL_KEY.hex())
        add_accounts(root / "state")
        env.delenv("HOTLAB_AUDIT_KEY", raising=False)
        env.delenv("HOTLAB_AUDIT_KEY_FILE", raising=False)
        asyncio.run(_run_controller(root, broker))
        yield AnchoredLab(root / "state" / "audit.jsonl", root / "history.sqlite3", broker)


def _verify(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = hotlab(["audit", "verify", *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _anchor_named(output: str, record: AuditRecord, source: str) -> bool:
    """verify says which anchor it used: its seq, hash prefix, time and source."""
    return f"anchor used: #{record.seq} {record.hash[:16]}… of {record.time} from {source}" in output


def test_the_archive_holds_the_trails_head_as_a_valid_anchor(lab: AnchoredLab) -> None:
    records = lab.records()
    assert len(records) == 7  # started: requested + executed; denied: 1; refused: requested + refused; abort: 2
    with HistoryArchive(lab.archive, read_only=True) as archive:
        anchors = archive.query("audit_anchor")
    assert anchors, "no audit anchor was archived"
    validator = jsonschema.Draft202012Validator(ANCHOR_SCHEMA, format_checker=jsonschema.FormatChecker())
    for anchor in anchors:
        validator.validate(anchor)
    seqs = [anchor["seq"] for anchor in anchors]
    assert seqs == sorted(seqs), "anchors must be committed in the order of the trail"
    head = max(anchors, key=lambda anchor: anchor["seq"])
    assert (head["seq"], head["hash"], head["time_ns"]) == (records[-1].seq, records[-1].hash, records[-1].time_ns)
    assert head["trail_id"] == records[0].hash and head["trail"] == str(lab.audit.resolve())
    assert head["site"] == SITE


def test_an_intact_trail_passes_and_names_the_anchor_it_used(
    lab: AnchoredLab, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trail = lab.copy_trail(tmp_path)
    head = lab.records()[-1]
    code, output = _verify("--path", str(trail), "--archive", str(lab.archive), capsys=capsys)
    assert code == 0, output
    assert _anchor_named(output, head, f"history archive {lab.archive}"), output
    assert f"record #{head.seq} matches the anchor" in output


def test_deleting_the_last_records_fails_verify_and_says_how_many_are_missing(
    lab: AnchoredLab, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = lab.records()
    deleted = 2
    trail = lab.copy_trail(tmp_path, keep_lines=len(records) - deleted)
    assert verify_chain(trail).ok, "the cut trail is an intact chain: only the anchor can tell"
    code, output = _verify("--path", str(trail), "--archive", str(lab.archive), capsys=capsys)
    assert code == 1, output
    assert f"is TRUNCATED: {deleted} record(s) missing at its end" in output
    assert _anchor_named(output, records[-1], f"history archive {lab.archive}"), output
    tally("audit trail tampering (real controller)", truncations_made=1, truncations_detected=1)


def test_a_rewritten_record_at_the_anchors_seq_fails_verify(
    lab: AnchoredLab, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trail = lab.copy_trail(tmp_path)
    lines = trail.read_bytes().splitlines(keepends=True)
    head = json.loads(lines[-1])
    head["reason"] = "nothing to see here"
    head["hash"] = record_hash(head)  # a consistent rewrite: the chain itself stays intact
    lines[-1] = canonical_json(head) + b"\n"
    trail.write_bytes(b"".join(lines))
    assert verify_chain(trail).ok
    code, output = _verify("--path", str(trail), "--archive", str(lab.archive), capsys=capsys)
    assert code == 1, output
    assert f"is BROKEN: record #{head['seq']} has hash {head['hash'][:16]}…" in output
    assert "the trail was rewritten" in output
    tally("audit trail tampering (real controller)", rewrites_made=1, rewrites_detected=1)


def test_the_retained_mqtt_anchor_is_used_when_the_archive_is_missing(
    lab: AnchoredLab, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = lab.records()
    source = f"MQTT {lab.broker.host}:{lab.broker.port} hotlab/{SITE}/controller/audit"
    missing = tmp_path / "no-archive.sqlite3"
    intact = lab.copy_trail(tmp_path)
    code, output = _verify("--path", str(intact), "--archive", str(missing), *lab.mqtt_options(), capsys=capsys)
    assert code == 0, output
    assert _anchor_named(output, records[-1], source), output

    cut = lab.copy_trail(tmp_path, keep_lines=len(records) - 1)
    code, output = _verify("--path", str(cut), "--archive", str(missing), *lab.mqtt_options(), capsys=capsys)
    assert code == 1, output
    assert "is TRUNCATED: 1 record(s) missing at its end" in output
    assert _anchor_named(output, records[-1], source), output
    tally("audit trail tampering (real controller)", truncations_made=1, truncations_detected=1)


def test_without_a_reachable_anchor_verify_says_so_and_fails_only_when_required(
    lab: AnchoredLab, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trail = lab.copy_trail(tmp_path, keep_lines=len(lab.records()) - 2)
    unreachable = ["--archive", str(tmp_path / "none.sqlite3"), "--mqtt-host", "127.0.0.1"]
    unreachable += ["--mqtt-port", str(free_tcp_port()), "--mqtt-timeout", "1"]
    no_anchor = "no anchor reachable: a truncation of the last records could not be detected"

    code, output = _verify("--path", str(trail), *unreachable, capsys=capsys)
    assert code == 0, output
    assert no_anchor in output and "not found" in output and "unreachable" in output

    code, output = _verify("--path", str(trail), *unreachable, "--require-anchor", capsys=capsys)
    assert code == 1, output
    assert no_anchor in output

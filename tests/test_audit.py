"""Audit trail: the chain verifies, and every kind of tampering is found at the right line."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hotlab.controller.audit import (
    ELUTION_ABORT,
    ELUTION_START,
    FAULT_ACKNOWLEDGE,
    GENESIS_HASH,
    QC_MANUAL_ENTRY,
    TORN_TAIL_DISCARDED,
    AuditEntryError,
    AuditKeyError,
    AuditLog,
    AuditLogCorrupt,
    canonical_json,
    iter_records,
    load_hmac_key,
    record_hash,
    verify_chain,
)
from hotlab.controller.cli.main import main as hotlab

KEY = b"k" * 32
T0 = 1_793_577_600_000_000_000  # 2026-11-02T00:00:00Z


def write_five(path: Path, key: bytes | None = None) -> list[dict]:
    log = AuditLog(path, key=key)
    entries = [
        dict(
            actor="alice",
            action=ELUTION_START,
            target="hotlab-a/gen-1",
            reason="morning elution",
            old_value="idle",
            new_value={"state": "eluting", "volume_ml": 5.0},
        ),
        dict(
            actor="bob",
            action=ELUTION_ABORT,
            target="hotlab-a/gen-1",
            reason="line pressure high",
            old_value="eluting",
            new_value="idle",
        ),
        dict(
            actor="bob",
            action=FAULT_ACKNOWLEDGE,
            target="hotlab-a/gen-1",
            reason="pressure sensor checked",
            old_value={"fault": 3},
            new_value=None,
        ),
        dict(
            actor="carol",
            action=QC_MANUAL_ENTRY,
            target="hotlab-a/crc-1",
            reason="constancy, Cs-137 source A",
            old_value=None,
            new_value={"test": "constancy", "measured_bq": 7.12e6},
        ),
        dict(
            actor="alice",
            action=ELUTION_START,
            target="hotlab-a/gen-1",
            reason="afternoon elution",
            old_value="idle",
            new_value="eluting",
        ),
    ]
    for i, entry in enumerate(entries):
        log.append(**entry, time_ns=T0 + i * 3_600_000_000_000)
    return [json.loads(line) for line in path.read_text().splitlines()]


def rewrite(path: Path, records: list[dict]) -> None:
    path.write_bytes(b"".join(canonical_json(r) + b"\n" for r in records))


def test_intact_chain_verifies_and_links_every_record(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    records = write_five(path)
    result = verify_chain(path)
    assert result.ok, result.summary()
    assert result.records == 5
    assert records[0]["prev_hash"] == GENESIS_HASH
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    for before, after in zip(records, records[1:]):
        assert after["prev_hash"] == before["hash"]
    # The hash is SHA-256 over the canonical JSON of everything but hash/mac, computed independently here.
    body = {k: v for k, v in records[2].items() if k != "hash"}
    expected = hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    ).hexdigest()
    assert records[2]["hash"] == expected
    assert result.head_hash == records[-1]["hash"]
    assert records[0]["time"] == "2026-11-02T00:00:00.000000Z"
    assert records[0]["actor"] == "alice" and records[0]["reason"] == "morning elution"


def test_edited_field_is_found_at_its_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    records = write_five(path)
    records[2]["reason"] = "nothing to see here"
    rewrite(path, records)
    result = verify_chain(path)
    assert not result.ok
    assert result.broken.line == 3
    assert result.records == 2
    assert "altered" in result.broken.problem
    assert [d.field for d in result.broken.differences] == ["hash"]


def test_edit_with_recomputed_hash_breaks_the_next_link(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    records = write_five(path)
    records[2]["new_value"] = {"fault": 0}
    records[2]["hash"] = record_hash(records[2])
    rewrite(path, records)
    broken = verify_chain(path).broken
    assert broken is not None and broken.line == 4
    assert [d.field for d in broken.differences] == ["prev_hash"]
    assert "line 3" in broken.differences[0].expected


def test_deleted_line_is_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    records = write_five(path)
    rewrite(path, records[:2] + records[3:])
    broken = verify_chain(path).broken
    assert broken is not None and broken.line == 3
    fields = {d.field: d for d in broken.differences}
    assert set(fields) == {"seq", "prev_hash"}
    assert (fields["seq"].expected, fields["seq"].found) == ("3", "4")
    assert "deleted, inserted or moved" in broken.problem


def test_reordered_lines_are_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    records = write_five(path)
    records[1], records[2] = records[2], records[1]
    rewrite(path, records)
    broken = verify_chain(path).broken
    assert broken is not None and broken.line == 2


def test_garbage_line_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_five(path)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[3] = b'{"seq": 4, oops\n'
    path.write_bytes(b"".join(lines))
    broken = verify_chain(path).broken
    assert broken is not None and broken.line == 4 and "JSON" in broken.problem


def test_torn_last_line_is_reported_then_set_aside_and_recorded(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_five(path)
    data = path.read_bytes()
    torn = data[: len(data) - 40]  # a crash in the middle of writing record 5
    path.write_bytes(torn)
    result = verify_chain(path)
    assert not result.ok and result.broken.line == 5 and "torn" in result.broken.problem
    assert result.records == 4

    fragment = torn[torn.rfind(b"\n") + 1 :]
    record = AuditLog(path).append(actor="alice", action=ELUTION_START, target="hotlab-a/gen-1", reason="retry")
    after = verify_chain(path)
    assert after.ok, after.summary()
    assert after.records == 6
    assert record.seq == 6
    note = list(iter_records(path))[4]
    assert note.action == TORN_TAIL_DISCARDED
    assert note.new_value["bytes"] == len(fragment)
    assert note.new_value["sha256"] == hashlib.sha256(fragment).hexdigest()
    assert (tmp_path / "audit.jsonl.torn").read_bytes() == fragment + b"\n"


def test_torn_only_line_in_a_new_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"schema":"hotlab.au')
    assert verify_chain(path).broken.line == 1
    record = AuditLog(path).append(actor="a", action=FAULT_ACKNOWLEDGE, target="s", reason="r")
    assert record.seq == 2 and verify_chain(path).ok


def test_corrupt_last_record_refuses_to_append(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    records = write_five(path)
    records[4]["actor"] = "mallory"
    rewrite(path, records)
    size = path.stat().st_size
    with pytest.raises(AuditLogCorrupt, match="hotlab audit verify"):
        AuditLog(path).append(actor="a", action=FAULT_ACKNOWLEDGE, target="s", reason="r")
    assert path.stat().st_size == size


def test_hmac_detects_a_rewritten_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    records = write_five(path, key=KEY)
    assert verify_chain(path, KEY).ok
    # An attacker without the key rewrites record 2 and recomputes every hash after it.
    records[1]["reason"] = "routine"
    prev = records[0]["hash"]
    for record in records[1:]:
        record["prev_hash"] = prev
        record["hash"] = record_hash(record)
        prev = record["hash"]
    rewrite(path, records)
    without_key = verify_chain(path)
    assert without_key.ok and without_key.mac_present and not without_key.mac_checked
    assert "NOT checked" in without_key.summary()
    broken = verify_chain(path, KEY).broken
    assert broken is not None and broken.line == 2 and [d.field for d in broken.differences] == ["mac"]
    assert verify_chain(path, b"x" * 32).broken.line == 1


def test_key_required_but_missing_mac(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_five(path)
    broken = verify_chain(path, KEY).broken
    assert broken.line == 1 and broken.differences[0].found == "none"


def test_key_loading(tmp_path: Path) -> None:
    assert load_hmac_key({}) is None
    assert load_hmac_key({"HOTLAB_AUDIT_KEY": "s" * 32}) == b"s" * 32
    key_file = tmp_path / "key"
    key_file.write_bytes(b"f" * 40 + b"\n")
    assert load_hmac_key({"HOTLAB_AUDIT_KEY_FILE": str(key_file), "HOTLAB_AUDIT_KEY": "s" * 32}) == b"f" * 40
    with pytest.raises(AuditKeyError, match="at least 32"):
        load_hmac_key({"HOTLAB_AUDIT_KEY": "short"})
    with pytest.raises(AuditKeyError, match="cannot read"):
        load_hmac_key({"HOTLAB_AUDIT_KEY_FILE": str(tmp_path / "missing")})


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (dict(actor="", action=ELUTION_START, target="s", reason="r"), "actor"),
        (dict(actor="a", action=ELUTION_START, target="s", reason="  "), "reason"),
        (dict(actor="a", action=ELUTION_START, target="", reason="r"), "target"),
        (dict(actor="a", action="Start Elution", target="s", reason="r"), "dotted"),
        (dict(actor="a", action=ELUTION_START, target="s", reason="r", new_value=float("nan")), "JSON"),
        (dict(actor="a", action=ELUTION_START, target="s", reason="r", new_value={1, 2}), "JSON"),
    ],
)
def test_bad_entries_are_refused_before_writing(tmp_path: Path, entry: dict, message: str) -> None:
    path = tmp_path / "audit.jsonl"
    with pytest.raises(AuditEntryError, match=message):
        AuditLog(path).append(**entry)
    assert not path.exists()


async def test_concurrent_async_appends_form_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, key=KEY)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    tick_task = asyncio.create_task(ticker())
    records = await asyncio.gather(
        *(
            log.append_async(actor=f"user{i}", action=ELUTION_START, target=f"station-{i % 3}", reason=f"run {i}")
            for i in range(40)
        )
    )
    tick_task.cancel()
    assert sorted(r.seq for r in records) == list(range(1, 41))
    result = verify_chain(path, KEY)
    assert result.ok and result.records == 40, result.summary()
    assert ticks > 40  # the loop kept running while appends fsynced on worker threads


def test_concurrent_processes_do_not_interleave(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    script = (
        "import sys; from hotlab.controller.audit import AuditLog\n"
        "log = AuditLog(sys.argv[1])\n"
        "for i in range(25): log.append(actor=sys.argv[2], action='qc.manual_entry', target='crc-1', reason=str(i))\n"
    )
    root = Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path), who], cwd=root) for who in ("p1", "p2")]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    result = verify_chain(path)
    assert result.ok and result.records == 50, result.summary()


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(old=json_values, new=json_values, reason=st.text(min_size=1, max_size=30).filter(str.strip))
def test_any_json_values_verify_after_round_trip(tmp_path: Path, old: object, new: object, reason: str) -> None:
    path = tmp_path / "prop.jsonl"
    path.unlink(missing_ok=True)
    log = AuditLog(path)
    log.append(actor="a", action=QC_MANUAL_ENTRY, target="crc", reason=reason, old_value=old, new_value=new)
    log.append(actor="b", action=QC_MANUAL_ENTRY, target="crc", reason="second", old_value=new, new_value=old)
    assert verify_chain(path).ok
    first = next(iter_records(path))
    assert first.old_value == old and first.new_value == new


def test_missing_log_is_an_empty_intact_trail(tmp_path: Path) -> None:
    result = verify_chain(tmp_path / "none.jsonl")
    assert result.ok and result.records == 0 and result.head_hash == GENESIS_HASH


def test_cli_append_show_verify(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HOTLAB_AUDIT_KEY", raising=False)
    monkeypatch.delenv("HOTLAB_AUDIT_KEY_FILE", raising=False)
    path = tmp_path / "audit.jsonl"
    assert (
        hotlab(
            [
                "audit",
                "append",
                "--path",
                str(path),
                "--actor",
                "dana",
                "--action",
                "fault.acknowledge",
                "--target",
                "hotlab-a/gen-2",
                "--reason",
                "valve reseated",
                "--old",
                '{"fault": 7}',
                "--new",
                "ok",
            ]
        )
        == 0
    )
    assert (
        hotlab(
            [
                "audit",
                "append",
                "--path",
                str(path),
                "--actor",
                "dana",
                "--action",
                "BAD",
                "--target",
                "x",
                "--reason",
                "y",
            ]
        )
        == 2
    )
    capsys.readouterr()
    assert hotlab(["audit", "show", "--path", str(path), "--json", "--from", "2020-01-01"]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(shown) == 1 and shown[0]["old_value"] == {"fault": 7} and shown[0]["new_value"] == "ok"
    assert hotlab(["audit", "verify", "--path", str(path)]) == 0
    assert "1 record(s)" in capsys.readouterr().out

    records = [json.loads(line) for line in path.read_text().splitlines()]
    records[0]["target"] = "hotlab-a/gen-3"
    rewrite(path, records)
    assert hotlab(["audit", "verify", "--path", str(path)]) == 1
    assert "line 1:" in capsys.readouterr().err


def test_cli_verify_with_short_key_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("short")
    assert hotlab(["audit", "verify", "--path", str(tmp_path / "a.jsonl"), "--key-file", str(key_file)]) == 2
    assert "at least 32" in capsys.readouterr().err


def test_cli_verify_refuses_a_missing_trail_unless_allowed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "audti.jsonl"  # a typo'd path must not read as an intact trail
    assert hotlab(["audit", "verify", "--path", str(missing)]) == 1
    assert f"no audit trail at {missing}" in capsys.readouterr().err
    assert hotlab(["audit", "show", "--path", str(missing)]) == 1
    assert hotlab(["audit", "verify", "--path", str(missing), "--allow-empty"]) == 0
    assert "0 record(s)" in capsys.readouterr().out


def test_cli_default_path_is_where_the_simulated_lab_audits(monkeypatch: pytest.MonkeyPatch) -> None:
    from hotlab.controller.cli.audit import default_audit_path

    monkeypatch.delenv("HOTLAB_AUDIT_LOG", raising=False)
    # controller/cli/run.py runs the simulated lab in var/simulated-lab with state_dir "state".
    assert default_audit_path() == Path("var/simulated-lab/state/audit.jsonl")


def _lab_toml(directory: Path, extra: str = "") -> Path:
    config = directory / "lab.toml"
    # An MQTT password in an unset variable: verifying the trail must not need the service's secrets.
    config.write_text(
        '[site]\nname = "hotlab-a"\n[service]\nstate_dir = "state"\n'
        '[mqtt]\nhost = "127.0.0.1"\nusername = "ctl"\npassword_env = "HOTLAB_TEST_UNSET_PASSWORD"\n' + extra
    )
    return config


def test_cli_config_resolves_the_services_trail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HOTLAB_TEST_UNSET_PASSWORD", raising=False)
    monkeypatch.delenv("HOTLAB_AUDIT_KEY", raising=False)
    monkeypatch.delenv("HOTLAB_AUDIT_KEY_FILE", raising=False)
    config = _lab_toml(tmp_path)
    assert hotlab(["audit", "verify", "--config", str(config)]) == 1
    assert f"no audit trail at {tmp_path / 'state' / 'audit.jsonl'}" in capsys.readouterr().err
    write_five(tmp_path / "state" / "audit.jsonl")
    assert hotlab(["audit", "verify", "--config", str(config)]) == 0
    assert "5 record(s)" in capsys.readouterr().out

    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    write_five(elsewhere / "trail.jsonl")
    explicit = _lab_toml(elsewhere, '[commands]\naudit_path = "trail.jsonl"\n')
    assert hotlab(["audit", "show", "--config", str(explicit), "--json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 5


def test_cli_config_errors_are_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _lab_toml(tmp_path, '[commands]\naudit_pth = "x.jsonl"\n')
    assert hotlab(["audit", "verify", "--config", str(config)]) == 2
    assert "did you mean 'audit_path'" in capsys.readouterr().err
    assert hotlab(["audit", "verify", "--config", str(tmp_path / "missing.toml")]) == 2
    with pytest.raises(SystemExit):  # --path and --config name the same thing twice
        hotlab(["audit", "verify", "--config", str(config), "--path", str(tmp_path / "a.jsonl")])


@pytest.mark.parametrize("action", ["record.signed", "user.add", "user.passwd", "user.disable"])
def test_cli_append_cannot_forge_a_signature_or_an_account_change(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], action: str
) -> None:
    path = tmp_path / "audit.jsonl"
    argv = ["audit", "append", "--path", str(path), "--actor", "mallory", "--action", action]
    assert hotlab([*argv, "--target", "qc_result/abc", "--reason", "typed in"]) == 2
    assert "only by its own command" in capsys.readouterr().err
    assert not path.exists()

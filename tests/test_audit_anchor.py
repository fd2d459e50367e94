"""Audit anchors without a broker: checking a trail against its anchors, finding anchors, publishing them.

tests/test_audit_anchor_service.py runs the whole path (controller, archive, retained MQTT).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from hotlab.controller.anchor_check import AuditAnchor, verify_anchored
from hotlab.controller.archive import HistoryArchive
from hotlab.controller.audit import AuditLog, AuditRecord, first_record_hash, verify_chain
from hotlab.controller.audit_anchor import AnchorPublisher
from hotlab.controller.cli.audit_anchors import TrailIdentity, find_anchors
from hotlab.controller.cli.main import main as hotlab
from hotlab.controller.commands import Authoriser, CommandHandler
from hotlab.controller.config import DEFAULT_MIN_ROLE
from hotlab.controller.messages import Message, audit_anchor_message
from hotlab.controller.outbox import OutboxFull

KEY = b"k" * 32


def write_trail(path: Path, count: int, key: bytes | None = None) -> list[AuditRecord]:
    log = AuditLog(path, key=key)
    return [
        log.append(actor="alice", action="qc.manual_entry", target="hotcell-1/cal-1", reason=f"entry {n}", new_value=n)
        for n in range(1, count + 1)
    ]


def anchor_message(trail: Path, first: AuditRecord, head: AuditRecord, site: str = "lab") -> Message:
    return audit_anchor_message(
        site, trail=str(trail.resolve()), trail_id=first.hash, seq=head.seq, hash_hex=head.hash, time_ns=head.time_ns
    )


def anchor_of(trail: Path, first: AuditRecord, head: AuditRecord) -> AuditAnchor:
    anchor = AuditAnchor.from_payload(anchor_message(trail, first, head).payload, "test")
    assert anchor is not None
    return anchor


def cut(path: Path, keep_lines: int) -> None:
    path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:keep_lines]))


def archive_with(path: Path, messages: list[Message]) -> Path:
    with HistoryArchive(path) as archive:
        archive.add_many(messages)
    return path


# --------------------------------------------------------------------------- the verdict


def test_a_trail_that_reaches_its_anchor_with_the_same_hash_is_ok(tmp_path: Path) -> None:
    trail = tmp_path / "audit.jsonl"
    records = write_trail(trail, 5)
    result = verify_anchored(trail, None, [anchor_of(trail, records[0], records[-1])])
    assert result.ok and result.missing == 0 and not result.rewritten
    assert "record #5 matches the anchor" in result.summary()
    older = verify_anchored(trail, None, [anchor_of(trail, records[0], records[2])])
    assert older.ok and "(2 later record(s) not covered by an anchor yet)" in older.summary()


def test_a_trail_shorter_than_its_anchor_is_truncated(tmp_path: Path) -> None:
    trail = tmp_path / "audit.jsonl"
    records = write_trail(trail, 5)
    cut(trail, 2)
    assert verify_chain(trail).ok  # the defect: without an anchor the cut trail is intact
    result = verify_anchored(trail, None, [anchor_of(trail, records[0], records[-1])])
    assert not result.ok and result.missing == 3
    assert "is TRUNCATED: 3 record(s) missing at its end; it holds 2 record(s)" in result.summary()


def test_another_record_at_the_anchors_seq_is_a_rewrite(tmp_path: Path) -> None:
    trail = tmp_path / "audit.jsonl"
    records = write_trail(trail, 4)
    cut(trail, 2)
    [_, forged] = write_trail(trail, 2)  # records 3 and 4 written again: a valid chain of the same length
    result = verify_anchored(trail, None, [anchor_of(trail, records[0], records[3])])
    assert verify_chain(trail).ok and not result.ok and result.rewritten and result.missing == 0
    assert result.mismatch is not None and result.mismatch.found == forged.hash != records[3].hash
    assert f"is BROKEN: record #4 has hash {forged.hash[:16]}…" in result.summary()


def test_a_broken_chain_is_reported_as_broken_not_as_truncated(tmp_path: Path) -> None:
    trail = tmp_path / "audit.jsonl"
    records = write_trail(trail, 4)
    lines = trail.read_bytes().splitlines(keepends=True)
    trail.write_bytes(lines[0] + lines[2])  # line 2 deleted
    result = verify_anchored(trail, None, [anchor_of(trail, records[0], records[-1])])
    assert result.chain.broken is not None and result.chain.broken.line == 2 and result.missing == 0
    assert "BROKEN after 1 intact record(s)" in result.summary()


def every_anchor(trail: Path, records: list[AuditRecord]) -> list[Message]:
    """What the controller archives for these appends: one anchor per record (each append is its own head)."""
    return [anchor_message(trail, records[0], record) for record in records]


def test_a_trail_cut_back_and_grown_again_fails_on_its_older_anchors(tmp_path: Path) -> None:
    """The newest anchor describes the regrown trail exactly; only the older ones show the rewrite."""
    trail = tmp_path / "audit.jsonl"
    before = write_trail(trail, 5)
    cut(trail, 3)
    after = before[:3] + write_trail(trail, 2)  # the controller appends on: #4 and #5 again, other records
    old_heads = [anchor_of(trail, before[0], record) for record in before]
    new_heads = [anchor_of(trail, before[0], record) for record in after[3:]]

    assert verify_anchored(trail, None, new_heads).ok  # the defect: the newest anchor alone passes it
    result = verify_anchored(trail, None, old_heads[:4] + new_heads[1:])  # #4 archived before the cut, #5 after
    assert not result.ok and result.rewritten and result.clash is None
    assert result.mismatch is not None and (result.mismatch.anchor.seq, result.mismatch.found) == (4, after[3].hash)
    assert f"is BROKEN: record #4 has hash {after[3].hash[:16]}…" in result.summary()

    clashing = verify_anchored(trail, None, old_heads + new_heads)
    assert not clashing.ok and clashing.clash is not None
    assert (clashing.clash.first.hash, clashing.clash.second.hash) == (before[3].hash, after[3].hash)
    assert "two anchors of record #4 name different records" in clashing.summary()


def test_two_anchors_naming_different_records_for_one_seq_fail_even_past_the_trails_end(tmp_path: Path) -> None:
    trail = tmp_path / "audit.jsonl"
    records = write_trail(trail, 4)
    cut(trail, 3)
    other = AuditRecord(4, records[3].time_ns + 1, "x", "qc.manual_entry", "t", "r", None, None, "0" * 64, "f" * 64)
    anchors = [anchor_of(trail, records[0], records[3]), anchor_of(trail, records[0], other)]
    result = verify_anchored(trail, None, anchors)
    assert not result.ok and result.clash is not None and result.mismatch is None
    assert "is BROKEN: two anchors of record #4 name different records" in result.summary()


def test_a_trail_deleted_and_started_again_at_its_path_is_replaced(tmp_path: Path) -> None:
    trail = tmp_path / "audit.jsonl"
    old = write_trail(trail, 3)
    trail.unlink()
    new = write_trail(trail, 2)  # the controller's next append starts a new trail: a new first record
    anchors = [anchor_of(trail, old[0], record) for record in old] + [anchor_of(trail, new[0], new[1])]
    assert verify_anchored(trail, None, anchors[3:]).ok  # its own anchors alone cannot tell
    result = verify_anchored(trail, None, anchors)
    assert not result.ok and result.replaced is not None and result.replaced.newest.seq == 3
    assert (
        f"audit trail at {trail.resolve()} was REPLACED: anchors name trail_id {old[0].hash[:16]}… up to #3"
        in result.summary()
    )
    emptied = verify_anchored(tmp_path / "none.jsonl", None, anchors[:3])  # no first record: all found by path
    assert emptied.replaced is None and emptied.missing == 3


def test_cli_checks_every_archived_anchor_and_the_trails_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As reported: 5 records, cut to 3, 2 more appended by the controller: verify said OK."""
    monkeypatch.delenv("HOTLAB_AUDIT_KEY", raising=False)
    monkeypatch.delenv("HOTLAB_AUDIT_KEY_FILE", raising=False)
    trail = tmp_path / "audit.jsonl"
    before = write_trail(trail, 5)
    cut(trail, 3)
    after = before[:3] + write_trail(trail, 2)
    archive = archive_with(tmp_path / "h.sqlite3", every_anchor(trail, before) + every_anchor(trail, after)[3:])
    verify = ["audit", "verify", "--path", str(trail), "--archive", str(archive)]
    assert hotlab(verify) == 1
    captured = capsys.readouterr()
    assert f"anchor used: #5 {after[4].hash[:16]}…" in captured.out
    assert "is BROKEN: two anchors of record #4 name different records" in captured.err

    trail.unlink()
    again = write_trail(trail, 1)
    archive_with(archive, every_anchor(trail, again))
    assert hotlab(verify) == 1
    assert f"was REPLACED: anchors name trail_id {before[0].hash[:16]}… up to #5" in capsys.readouterr().err


@pytest.mark.parametrize(
    "change",
    [
        {"schema": "hotlab.audit_anchor/2"},
        {"seq": 0},
        {"seq": True},
        {"hash": "not a hash"},
        {"trail_id": None},
        {"time_ns": "yesterday"},
    ],
)
def test_a_malformed_anchor_is_not_used(tmp_path: Path, change: dict[str, object]) -> None:
    records = write_trail(tmp_path / "audit.jsonl", 1)
    payload = anchor_message(tmp_path / "audit.jsonl", records[0], records[0]).payload | change
    assert AuditAnchor.from_payload(payload, "test") is None


def test_a_trail_is_known_by_its_first_record_and_by_its_path(tmp_path: Path) -> None:
    trail = tmp_path / "audit.jsonl"
    assert TrailIdentity.of(trail) == TrailIdentity(str(trail.resolve()), None)
    records = write_trail(trail, 2)
    assert first_record_hash(trail) == records[0].hash
    identity = TrailIdentity.of(trail)
    assert identity == TrailIdentity(str(trail.resolve()), records[0].hash)
    elsewhere = anchor_message(tmp_path / "copy.jsonl", records[0], records[1]).payload  # a copy: same first record
    replaced = anchor_message(trail, records[1], records[1]).payload  # another trail that lay at this path
    stranger = anchor_message(tmp_path / "other.jsonl", records[1], records[1]).payload
    assert identity.matches(elsewhere) and identity.matches(replaced) and not identity.matches(stranger)
    trail.write_bytes(b"")
    assert TrailIdentity.of(trail) == TrailIdentity(str(trail.resolve()), None)


# --------------------------------------------------------------------------- finding anchors


def test_the_archive_gives_every_anchor_of_this_trail_only(tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours.jsonl", tmp_path / "theirs.jsonl"
    records, other = write_trail(ours, 4), write_trail(theirs, 6)
    archive = archive_with(
        tmp_path / "history.sqlite3",
        [
            anchor_message(ours, records[0], records[3]),
            anchor_message(ours, records[0], records[1]),  # archived later, but an older head
            anchor_message(theirs, other[0], other[5]),
        ],
    )
    search = find_anchors(TrailIdentity.of(ours), archive=archive, broker=None)
    assert sorted((a.seq, a.hash) for a in search.anchors) == [(2, records[1].hash), (4, records[3].hash)]
    assert search.tried[0] == f"history archive {archive}: 2 anchor(s) of this trail, the newest #4"
    unknown = find_anchors(TrailIdentity(str(tmp_path / "x.jsonl"), "0" * 64), archive=archive, broker=None)
    assert unknown.anchors == () and unknown.tried[0].endswith("no anchor of this trail")


def test_cli_uses_the_config_labs_archive_and_an_emptied_trail_is_found_by_its_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HOTLAB_AUDIT_KEY", raising=False)
    monkeypatch.delenv("HOTLAB_AUDIT_KEY_FILE", raising=False)
    config = tmp_path / "lab.toml"
    config.write_text('[site]\nname = "lab"\n[service]\nstate_dir = "state"\n[history]\npath = "records/h.sqlite3"\n')
    trail = tmp_path / "state" / "audit.jsonl"
    records = write_trail(trail, 3)
    archive_with(tmp_path / "records" / "h.sqlite3", [anchor_message(trail, records[0], records[-1])])

    assert hotlab(["audit", "verify", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"anchor used: #3 {records[-1].hash[:16]}… of {records[-1].time} from history archive " in out
    assert str(tmp_path / "records" / "h.sqlite3") in out

    trail.write_bytes(b"")  # every record deleted: no first record to know the trail by, only its path
    assert hotlab(["audit", "verify", "--config", str(config)]) == 1
    assert "is TRUNCATED: 3 record(s) missing at its end; it holds 0 record(s)" in capsys.readouterr().err


def test_cli_finds_the_archive_of_the_known_lab_whose_trail_it_verifies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HOTLAB_AUDIT_LOG", raising=False)
    trail = Path("var/demo/audit.jsonl")  # what `hotlab demo` writes (controller/cli/lab_records.py)
    records = write_trail(trail, 4)
    archive_with(Path("var/demo/history.sqlite3"), [anchor_message(trail, records[0], records[-1])])
    cut(trail, 3)
    assert hotlab(["audit", "verify"]) == 1
    captured = capsys.readouterr()
    assert "anchor used: #4" in captured.out and "history archive var/demo/history.sqlite3" in captured.out
    assert "TRUNCATED: 1 record(s) missing" in captured.err


def test_cli_checks_the_hmac_and_the_anchor_together(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HOTLAB_AUDIT_KEY", raising=False)
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY)
    trail = tmp_path / "audit.jsonl"
    records = write_trail(trail, 2, key=KEY)
    archive = archive_with(tmp_path / "h.sqlite3", [anchor_message(trail, records[0], records[-1])])
    verify = ["audit", "verify", "--path", str(trail), "--archive", str(archive), "--key-file", str(key_file)]
    assert hotlab(verify) == 0
    out = capsys.readouterr().out
    assert "HMAC verified; record #2 matches the anchor" in out
    assert hotlab([*verify[:-1], str(tmp_path / "missing-key")]) == 2  # a bad key is still bad input


def test_cli_without_any_source_says_a_truncation_could_not_be_detected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trail = tmp_path / "audit.jsonl"
    write_trail(trail, 2)
    assert hotlab(["audit", "verify", "--path", str(trail)]) == 0
    out = capsys.readouterr().out
    assert "no anchor reachable: a truncation of the last records could not be detected" in out
    assert "history archive: none known for this trail; MQTT: no broker given" in out
    assert hotlab(["audit", "verify", "--path", str(trail), "--require-anchor"]) == 1
    assert "no anchor reachable" in capsys.readouterr().err


# --------------------------------------------------------------------------- publishing anchors


class Committed:
    """The service's commit, recording what it was given; `fail` makes the next commit raise it."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.calls = 0
        self.fail: Exception | None = None

    async def __call__(self, messages: list[Message]) -> None:
        self.calls += 1
        if self.fail is not None:
            failure, self.fail = self.fail, None
            raise failure
        self.messages.extend(messages)

    async def until(self, calls: int) -> None:
        """Wait for the publisher's background task to have tried `calls` commits."""
        async with asyncio.timeout(5.0):
            while self.calls < calls:
                await asyncio.sleep(0.01)


async def test_a_burst_of_appends_is_anchored_by_its_newest_record_and_never_steps_back(tmp_path: Path) -> None:
    trail = tmp_path / "audit.jsonl"
    records = write_trail(trail, 4)
    committed = Committed()
    publisher = AnchorPublisher("lab", trail, committed)
    for record in records[:3]:
        publisher.offer(record)
    await committed.until(1)
    publisher.offer(records[3])
    publisher.offer(records[1])  # a slower append's hook, late: must not replace the newer head
    await publisher.close(5.0)
    assert [m.payload["seq"] for m in committed.messages] == [3, 4]
    head = committed.messages[-1]
    assert head.kind == "audit_anchor" and head.topic == "hotlab/lab/controller/audit"
    assert (head.payload["hash"], head.payload["time_ns"]) == (records[3].hash, records[3].time_ns)
    assert head.payload["trail_id"] == records[0].hash and head.payload["trail"] == str(trail.resolve())
    again = anchor_message(trail, records[0], records[3])
    assert head.msg_id == again.msg_id, "an anchor built again (a replay) must be the same message"


async def test_an_anchor_that_cannot_be_queued_is_logged_and_the_next_append_anchors_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trail = tmp_path / "audit.jsonl"
    records = write_trail(trail, 2)
    committed = Committed()
    committed.fail = OutboxFull("outbox full")
    publisher = AnchorPublisher("lab", trail, committed)
    with caplog.at_level(logging.ERROR, logger="hotlab.controller.audit_anchor"):
        publisher.offer(records[0])
        await committed.until(1)
        await asyncio.sleep(0)  # the task logs the failure after the commit raised
    assert "audit anchor #1" in caplog.text and "not queued (OutboxFull: outbox full)" in caplog.text
    publisher.offer(records[1])
    await publisher.close(5.0)
    assert [m.payload["seq"] for m in committed.messages] == [2]


async def test_nothing_is_anchored_once_closing_began(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The service closes the outbox right after the publisher: a later commit would hit a closed outbox."""
    trail = tmp_path / "audit.jsonl"
    records = write_trail(trail, 2)
    committed = Committed()
    publisher = AnchorPublisher("lab", trail, committed)
    publisher.offer(records[0])
    await publisher.close(5.0)
    with caplog.at_level(logging.INFO, logger="hotlab.controller.audit_anchor"):
        publisher.offer(records[1])  # a command whose append finished during shutdown
        await asyncio.sleep(0.05)
    assert [m.payload["seq"] for m in committed.messages] == [1]
    assert "audit record #2" in caplog.text and "written during shutdown: not anchored" in caplog.text


async def test_a_trail_started_again_while_running_is_anchored_from_its_first_record(tmp_path: Path) -> None:
    trail = tmp_path / "audit.jsonl"
    old = write_trail(trail, 3)
    committed = Committed()
    publisher = AnchorPublisher("lab", trail, committed)
    for record in old:
        publisher.offer(record)
        await committed.until(record.seq)
    trail.unlink()  # rotated away by hand while the controller runs
    new = write_trail(trail, 2)
    for record in new:
        publisher.offer(record)
    await publisher.close(5.0)
    anchored = [(m.payload["trail_id"], m.payload["seq"]) for m in committed.messages]
    assert anchored[:3] == [(old[0].hash, 1), (old[0].hash, 2), (old[0].hash, 3)]
    assert anchored[3:] and anchored[-1] == (new[0].hash, 2), anchored  # before: nothing until it passed #3


async def test_the_command_handler_offers_every_record_and_a_failing_hook_fails_no_command(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    offered: list[AuditRecord] = []

    def hook(record: AuditRecord) -> None:
        offered.append(record)
        raise RuntimeError("anchor bug")

    async def publish(topic: str, reply: dict[str, object]) -> bool:
        return True

    audit = AuditLog(tmp_path / "audit.jsonl")
    handler = CommandHandler("lab", Authoriser(DEFAULT_MIN_ROLE), audit, publish, lambda _: None, on_audited=hook)
    with caplog.at_level(logging.ERROR, logger="hotlab.controller.commands"):
        reply = await handler.handle("hotlab/lab/elution-1/gen-1/cmd/abort", b"{}")
    assert reply["outcome"] == "malformed" and reply["audit_seq"] == 1
    assert [record.seq for record in offered] == [1]
    assert "audit record #1 written, but its hook failed" in caplog.text


def test_another_sites_trail_at_the_same_path_is_not_taken_for_a_replacement(tmp_path: Path) -> None:
    """Two labs on one broker or one central archive may keep their trails at the same install path."""
    trail = tmp_path / "audit.jsonl"
    ours = write_trail(trail, 3)
    elsewhere = tmp_path / "other" / "audit.jsonl"
    elsewhere.parent.mkdir()
    theirs = write_trail(elsewhere, 5)
    at_our_path = [
        audit_anchor_message(
            "lab-b", trail=str(trail.resolve()), trail_id=theirs[0].hash, seq=5, hash_hex=theirs[4].hash, time_ns=1
        )
    ]
    archive = archive_with(
        tmp_path / "history.sqlite3", [anchor_message(trail, ours[0], ours[2], site="lab-a"), *at_our_path]
    )
    search = find_anchors(TrailIdentity.of(trail), archive=archive, broker=None)
    assert [(a.site, a.seq) for a in search.anchors] == [("lab-a", 3)]
    assert verify_anchored(trail, None, list(search.anchors)).ok
    # The same foreign anchors still tell a replacement when the trail's own site is one of theirs.
    replaced = archive_with(tmp_path / "replaced.sqlite3", [anchor_message(trail, theirs[0], theirs[4], site="lab-a")])
    assert not verify_anchored(
        trail, None, list(find_anchors(TrailIdentity.of(trail), archive=replaced, broker=None).anchors)
    ).ok

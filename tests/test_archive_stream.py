"""Streaming and aggregate reads of the archive: the same rows as `query`, in bounded chunks."""

from __future__ import annotations

from pathlib import Path

import pytest

from hotlab.controller.archive import HistoryArchive, HistoryQueryError, TimeRange
from hotlab.controller.config import RetentionConfig, parse_config
from hotlab.controller.config_table import ConfigError
from tests.test_history import NOV_1, sample_messages


@pytest.fixture
def archive(tmp_path: Path) -> HistoryArchive:
    archive = HistoryArchive(tmp_path / "history.sqlite3")
    archive.add_many(sample_messages(41))
    return archive


@pytest.mark.parametrize("chunk_size", [1, 3, 10, 11, 1000])
def test_stream_yields_what_query_returns_whatever_the_chunk(archive: HistoryArchive, chunk_size: int) -> None:
    for kind in ("reading", "elution", "qc_result", "device_status"):
        assert list(archive.stream(kind, chunk_size=chunk_size)) == archive.query(kind)


def test_stream_keeps_equal_times_apart_by_msg_id(tmp_path: Path) -> None:
    """Chunks continue after (time_ns, msg_id): many messages at one instant are neither lost nor repeated."""
    same_time = [m for m in sample_messages(40) if m.kind == "reading"]
    for message in same_time:
        message.payload["time_ns"] = NOV_1
    with HistoryArchive(tmp_path / "h.sqlite3") as archive:
        archive.add_many(same_time)
        streamed = [p["msg_id"] for p in archive.stream("reading", chunk_size=3)]
    assert streamed == sorted(m.payload["msg_id"] for m in same_time)


def test_stream_filters_like_query(archive: HistoryArchive) -> None:
    period = TimeRange(NOV_1, NOV_1 + 3 * 3_600_000_000_000)
    assert list(archive.stream("reading", period, device="crc-1", chunk_size=2)) == archive.query(
        "reading", period, device="crc-1"
    )
    with pytest.raises(HistoryQueryError, match="cannot filter on colour"):
        list(archive.stream("reading", colour="red"))


def test_select_answers_aggregates_and_only_reads(archive: HistoryArchive) -> None:
    counted = dict(archive.select("SELECT kind, COUNT(*) FROM message GROUP BY kind"))
    assert counted == {kind: archive.count(kind) for kind in counted}
    with pytest.raises(HistoryQueryError, match="only SELECT"):
        archive.select("DELETE FROM message")


def test_raw_days_is_read_from_history_and_checked(tmp_path: Path) -> None:
    base = {"site": {"name": "lab"}}
    assert parse_config(base, base_dir=tmp_path).history_retention == RetentionConfig()
    chosen = parse_config({**base, "history": {"raw_days": 7}}, base_dir=tmp_path)
    assert chosen.history_retention.raw_days == 7
    with pytest.raises(ConfigError, match="raw_days"):
        parse_config({**base, "history": {"raw_days": 0}}, base_dir=tmp_path)

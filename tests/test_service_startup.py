"""How `hotlab run`/`demo` end (exit codes), and a start that keeps blocking I/O off the event loop."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

import hotlab.controller.archive as archive_module
from hotlab.controller.config import LabConfig, parse_config
from hotlab.controller.service import ControllerService, ServiceError, run_to_exit_code
from hotlab.controller.supervisor import Item
from hotlab.errors import HotlabError, InputError


class _Failing(HotlabError):
    """A runtime HotlabError of some other layer (exit code 1)."""


async def _raise(exc: BaseException) -> None:
    raise exc


async def _return() -> None:
    return None


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (InputError("[qc.generators.GA-1] activity: must be positive"), 2),
        (ServiceError("outbox /x is in use by another hotlab controller (pid 7)"), 1),
        (_Failing("the station refused"), 1),
    ],
)
def test_a_hotlab_error_ends_the_run_with_one_line_and_its_exit_code(
    exc: HotlabError, code: int, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    assert run_to_exit_code(_raise(exc), "hotlab run") == code
    assert capsys.readouterr().err == f"hotlab run: {exc}\n"
    assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)


def test_a_bug_is_logged_with_its_traceback_and_a_clean_stop_is_0(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        assert run_to_exit_code(_raise(RuntimeError("a bug")), "hotlab demo") == 1
    assert any(r.exc_info and "hotlab demo failed" in r.getMessage() for r in caplog.records)
    assert run_to_exit_code(_return(), "hotlab run") == 0


class _IdleSource:
    """A device that never has anything to read."""

    streaming = False

    async def connect(self) -> None:
        pass

    async def read(self) -> Sequence[Item]:
        return []

    async def delivered(self, items: Sequence[Item]) -> None:
        pass

    async def close(self) -> None:
        pass


def _config(tmp_path: Path) -> LabConfig:
    return parse_config(
        {
            "site": {"name": "local"},
            "device": [{"name": "cal-1", "station": "s1", "family": "vik202", "transport": "/dev/null"}],
            "outbox": {"path": "outbox.sqlite3"},
            "history": {"enabled": True, "path": "history.sqlite3"},
        },
        base_dir=tmp_path,
    )


def _opened_on(monkeypatch: pytest.MonkeyPatch, fail_at: int | None = None) -> list[int]:
    """Record the thread of each HistoryArchive opened from now on; the `fail_at`-th open (from 1) fails."""
    threads: list[int] = []
    real = archive_module.HistoryArchive

    class Recorded(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            threads.append(threading.get_ident())
            if len(threads) == fail_at:
                raise sqlite3.OperationalError("unable to open database file")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(archive_module, "HistoryArchive", Recorded)
    return threads


async def test_the_history_archive_is_opened_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening it creates the file and runs DDL with fsync: on the loop that would stall every device."""
    threads = _opened_on(monkeypatch)
    service = ControllerService(_config(tmp_path), source_factory=lambda _device: _IdleSource())
    stop = asyncio.Event()
    service.on_started = stop.set
    await asyncio.wait_for(service.run(stop), 20)
    assert len(threads) == 2, "the QC/measurement restore and the history sink each open it"
    assert threading.get_ident() not in threads


async def test_a_history_archive_that_cannot_be_opened_stops_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _opened_on(monkeypatch, fail_at=2)  # the history sink's open, after the restore read it
    started: list[bool] = []
    service = ControllerService(_config(tmp_path), source_factory=lambda _device: _IdleSource())
    service.on_started = lambda: started.append(True)
    with pytest.raises(sqlite3.OperationalError, match="unable to open database file"):
        await asyncio.wait_for(service.run(asyncio.Event()), 20)
    assert not started and not service.supervisors

"""The simulated lab's private influxd: authenticated, same port and data across restarts, restarted when it dies,
and one an earlier run left behind is stopped (real influxd)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from hotlab.controller.lab.private_influxd import ADMIN_USER, PrivateInfluxd, influxd_binary

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _influxd_installed() -> None:
    if influxd_binary() is None:
        pytest.skip("influxd is not installed")


def _request(server: PrivateInfluxd, target: str, body: bytes, password: str | None = None) -> urllib.request.Request:
    """A POST as the admin user (`password`: that one instead of the kept one)."""
    secret = password if password is not None else server.password_path.read_text().strip()
    credentials = base64.b64encode(f"{ADMIN_USER}:{secret}".encode()).decode()
    return urllib.request.Request(f"{server.url}{target}", data=body, headers={"Authorization": f"Basic {credentials}"})


def query(server: PrivateInfluxd, statement: str, password: str | None = None) -> dict[str, Any]:
    """One statement over /query as the admin user."""
    form = urllib.parse.urlencode({"q": statement, "db": "lab", "epoch": "ns"}).encode()
    with urllib.request.urlopen(_request(server, "/query", form, password), timeout=10) as response:
        return dict(json.loads(response.read())["results"][0])


def test_it_keeps_its_port_its_data_and_its_admin_across_restarts(tmp_path: Path) -> None:
    first = PrivateInfluxd(tmp_path / "influxd")
    first.start()
    try:
        query(first, 'CREATE DATABASE "lab"')
        with urllib.request.urlopen(_request(first, "/write?db=lab&precision=ns", b"m v=1 1700000000000000000")) as r:
            assert r.status == 204
        with pytest.raises(urllib.error.HTTPError) as refused:
            query(first, "SHOW DATABASES", password="not-the-password")
        assert refused.value.code == 401  # authentication is on
    finally:
        first.close()
    assert stat.S_IMODE(first.password_path.stat().st_mode) == 0o600
    again = PrivateInfluxd(tmp_path / "influxd")
    again.start()
    try:
        assert again.port == first.port
        assert query(again, 'SELECT "v" FROM "m"')["series"][0]["values"] == [[1700000000000000000, 1]]
    finally:
        again.close()


async def test_one_that_dies_is_started_again_on_its_port(tmp_path: Path) -> None:
    server = PrivateInfluxd(tmp_path / "influxd")
    await asyncio.to_thread(server.start)
    supervisor = asyncio.create_task(server.supervise())
    try:
        port = server.port
        assert server._process is not None
        os.kill(server._process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while server.restarts < 1:
            assert time.monotonic() < deadline, "not restarted within 30 s"
            await asyncio.sleep(0.1)
        assert server.running and server.port == port
        assert "series" in await asyncio.to_thread(query, server, "SHOW DATABASES")
    finally:
        supervisor.cancel()
        await asyncio.gather(supervisor, return_exceptions=True)
        await asyncio.to_thread(server.close)


def test_one_an_earlier_run_left_behind_is_stopped_and_its_port_taken(tmp_path: Path) -> None:
    left_behind = PrivateInfluxd(tmp_path / "influxd")
    left_behind.start()  # and never closed, as after a crash on a system without a parent-death signal
    process = left_behind._process
    assert process is not None
    try:
        successor = PrivateInfluxd(tmp_path / "influxd")
        successor.start()
        try:
            assert process.wait(10) is not None  # stopped by the successor
            assert successor.port == left_behind.port and successor.running
        finally:
            successor.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

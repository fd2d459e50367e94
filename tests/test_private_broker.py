"""The simulated lab's private mosquitto: no orphan after any death of the controller, the same port
across restarts (another one when that port was taken meanwhile), and a broker that dies is reaped
and started again, however often a restart fails first."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hotlab.controller.lab import embedded_broker
from hotlab.controller.lab.embedded_broker import MosquittoBroker
from hotlab.controller.lab.private_broker import PrivateBroker
from tests.cli_process import run_hotlab
from tests.mosquitto_service import require_mosquitto

pytestmark = pytest.mark.integration

BANNER_PORT = re.compile(r"MQTT broker: private mosquitto on 127\.0\.0\.1:(\d+)")


def _alive(pid: int) -> bool:
    """Running, not a zombie: a container's init may never reap an orphan that has exited."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _wait_for(condition: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_a_killed_controller_leaves_no_broker_and_the_next_start_takes_its_port(tmp_path: Path) -> None:
    require_mosquitto()
    log_path = tmp_path / "run.log"
    record = tmp_path / "var" / "simulated-lab" / "broker" / "broker.json"
    with log_path.open("w") as log:
        controller = subprocess.Popen(
            [sys.executable, "-m", "hotlab.controller.cli", "run", "--no-web"],
            cwd=tmp_path,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    try:
        _wait_for(lambda: BANNER_PORT.search(log_path.read_text()), 60, "no banner")
        port = int(BANNER_PORT.search(log_path.read_text())[1])  # type: ignore[index]
        broker_pid = json.loads(record.read_text())["pid"]
        assert _alive(broker_pid)
        controller.kill()  # kill -9 of the controller alone, not of its process group
        controller.wait(10)
        _wait_for(lambda: not _alive(broker_pid), 10, f"the private broker (pid {broker_pid}) outlived its controller")
        assert not _accepts(port)
    finally:
        os.killpg(controller.pid, signal.SIGKILL)
        controller.wait()

    again = run_hotlab("run", "--no-web", "--duration", "2", cwd=tmp_path, timeout_s=90)
    assert again.returncode == 0, again.stderr[-3000:]
    assert int(BANNER_PORT.search(again.stderr)[1]) == port  # type: ignore[index]


def test_a_broker_left_running_by_an_earlier_run_is_stopped_and_its_port_taken(tmp_path: Path) -> None:
    """Where the parent-death signal did not fire (another OS, a race), the record file finds the orphan."""
    require_mosquitto()
    directory = tmp_path / "broker"
    directory.mkdir()
    orphan = MosquittoBroker(persistence=False, workdir=directory).start()
    try:
        (directory / "broker.json").write_text(json.dumps({"pid": orphan.pid, "port": orphan.port}))
        private = PrivateBroker(directory)
        private.start()
        try:
            assert orphan.exit_code() is not None  # stopped (and reaped here, its parent)
            assert private.port == orphan.port and private.broker.pid != orphan.pid
            assert _accepts(private.port)
        finally:
            private.close()
    finally:
        orphan.close()


def test_a_record_naming_another_program_stops_nothing(tmp_path: Path) -> None:
    """A pid from an old record may belong to someone else by now: only our own mosquitto is stopped."""
    require_mosquitto()
    directory = tmp_path / "broker"
    directory.mkdir()
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        (directory / "broker.json").write_text(json.dumps({"pid": bystander.pid, "port": 1}))
        private = PrivateBroker(directory)
        private.start()
        private.close()
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


async def test_a_broker_that_dies_is_reaped_and_started_again_on_its_port(tmp_path: Path) -> None:
    require_mosquitto()
    private = PrivateBroker(tmp_path / "broker")
    await asyncio.to_thread(private.start)
    supervisor = asyncio.create_task(private.supervise())
    try:
        first_pid, port = private.broker.pid, private.port
        assert first_pid is not None
        os.kill(first_pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while not (private.restarts == 1 and await asyncio.to_thread(_accepts, port)):
            assert time.monotonic() < deadline, "the private broker was not started again"
            await asyncio.sleep(0.1)
        assert private.port == port and private.broker.pid != first_pid
        assert not Path(f"/proc/{first_pid}").exists()  # reaped: no zombie left behind
    finally:
        supervisor.cancel()
        await asyncio.gather(supervisor, return_exceptions=True)
        await asyncio.to_thread(private.close)


def _listening_on(port: int) -> socket.socket:
    """Someone else's server on `port`, as when another program takes the port while the broker is down."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", port))
    holder.listen()
    return holder


async def _until_restarted(private: PrivateBroker, restarts: int) -> None:
    deadline = time.monotonic() + 30
    while not (private.restarts == restarts and await asyncio.to_thread(_accepts, private.port)):
        assert time.monotonic() < deadline, f"the private broker was not started again ({private.restarts} restarts)"
        await asyncio.sleep(0.1)


async def test_a_broker_whose_port_was_taken_meanwhile_restarts_on_another_port(tmp_path: Path) -> None:
    require_mosquitto()
    private = PrivateBroker(tmp_path / "broker")
    await asyncio.to_thread(private.start)
    first_pid, port = private.broker.pid, private.port
    assert first_pid is not None
    os.kill(first_pid, signal.SIGKILL)
    _wait_for(lambda: not _accepts(port), 10, "the killed broker still accepts")
    holder = _listening_on(port)
    supervisor = asyncio.create_task(private.supervise())
    try:
        await _until_restarted(private, 1)
        assert private.port != port
        assert json.loads((tmp_path / "broker" / "broker.json").read_text())["port"] == private.port
    finally:
        holder.close()
        supervisor.cancel()
        await asyncio.gather(supervisor, return_exceptions=True)
        await asyncio.to_thread(private.close)


async def test_a_failed_restart_is_retried_until_the_broker_runs_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restart that fails leaves no process (and no exit code) behind: supervision must go on anyway."""
    require_mosquitto()
    real = embedded_broker.mosquitto_binary()
    attempts: list[str] = []

    def failing_once() -> str | None:
        attempts.append("start")
        return "/bin/false" if len(attempts) == 1 else real  # exits at once: it never listens

    private = PrivateBroker(tmp_path / "broker")
    await asyncio.to_thread(private.start)
    first_pid, port = private.broker.pid, private.port
    assert first_pid is not None
    monkeypatch.setattr(embedded_broker, "mosquitto_binary", failing_once)
    os.kill(first_pid, signal.SIGKILL)
    supervisor = asyncio.create_task(private.supervise())
    try:
        await _until_restarted(private, 1)
        assert len(attempts) == 2 and private.port == port
    finally:
        supervisor.cancel()
        await asyncio.gather(supervisor, return_exceptions=True)
        await asyncio.to_thread(private.close)

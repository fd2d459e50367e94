"""The simulated lab's own mosquitto: one per lab folder, on the same port, kept alive, never orphaned.

A newcomer points a dashboard or `mosquitto_sub` at the port the banner printed. So:
* the broker ends with its controller however the controller ends: it gets SIGTERM when the
  controller dies (Linux parent-death signal), and a record file (`broker.json` in the lab's
  broker folder) lets the next start stop one that survived anyway (another OS, a race);
* the port of the last run is taken again when it is free, so that dashboard keeps working;
  when something else holds it now, a free port is chosen (and logged) rather than failing;
* a broker that dies is reaped (no zombie) and started again on the same port, with backoff,
  for as long as it takes: a restart that fails is retried like the exit itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
from pathlib import Path

from hotlab.backoff import Backoff
from hotlab.controller.lab.embedded_broker import BrokerUnavailable, MosquittoBroker, write_file

log = logging.getLogger(__name__)

RECORD_NAME = "broker.json"
#: How often the supervisor looks at the process; a restart follows within this time.
WATCH_INTERVAL_S = 0.5


class PrivateBroker:
    """A supervised `MosquittoBroker` whose files live in `directory` (one per simulated lab)."""

    def __init__(self, directory: Path, *, restart: Backoff = Backoff(0.5, 10.0)) -> None:
        self.directory = directory
        self.restart = restart
        self.broker = MosquittoBroker(persistence=False, workdir=directory, die_with_parent=True)
        self.restarts = 0

    @property
    def record_path(self) -> Path:
        return self.directory / RECORD_NAME

    @property
    def host(self) -> str:
        return self.broker.host

    @property
    def port(self) -> int:
        return self.broker.port

    def start(self) -> None:
        """Stop a broker an earlier run left behind, take its port if free, start. Blocking: run in a thread."""
        self.directory.mkdir(parents=True, exist_ok=True)
        earlier = self._read_record()
        if earlier is not None:
            stop_orphan(earlier.get("pid"), "mosquitto", self.directory / "mosquitto.conf", grace_s=5.0)
            port = earlier.get("port")
            if isinstance(port, int) and port_is_free(self.broker.host, port):
                self.broker.port = port
            elif isinstance(port, int):
                log.warning("the private broker's port %d is taken now: choosing another one", port)
                self.broker.port = 0  # MosquittoBroker.start picks a free one
        self.broker.start()
        self._write_record()

    async def supervise(self) -> None:
        """Run until cancelled: restart the broker on its port whenever it is not running.

        "Not running" covers a broker that exited and one whose restart failed (then no process
        is left to have an exit code), so a failed restart is retried, with backoff.
        """
        failures = 0
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            if self.broker.running:  # polls the process: a dead broker is reaped, so no zombie is left
                failures = 0
                continue
            if failures == 0:
                log.error(
                    "the private broker exited (code %s); restarting it on port %d: %s",
                    self.broker.exit_code(),
                    self.broker.port,
                    self.broker.log_tail(),
                )
            await asyncio.sleep(self.restart.delay(failures))
            try:
                await asyncio.to_thread(self.start)
            except BrokerUnavailable as exc:
                failures += 1
                log.error("the private broker did not start again: %s", exc)
                continue
            self.restarts += 1
            log.warning("the private broker runs again on port %d", self.broker.port)

    def close(self) -> None:
        """Stop the broker; the record keeps its port for the next start, and no pid to clean up. Blocking."""
        self.broker.close()
        if self.broker.port:
            self._write_record()

    def _read_record(self) -> dict[str, object] | None:
        try:
            record = json.loads(self.record_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring the unreadable private broker record %s: %s", self.record_path, exc)
            return None
        return record if isinstance(record, dict) else None

    def _write_record(self) -> None:
        record = {"pid": self.broker.pid, "port": self.broker.port, "written": time.time()}
        temporary = self.record_path.with_suffix(".tmp")
        write_file(temporary, json.dumps(record) + "\n")
        temporary.replace(self.record_path)


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def stop_orphan(pid: object, program: str, config: Path, *, grace_s: float) -> None:
    """SIGTERM the recorded `program` (then SIGKILL after `grace_s`) if it still runs with this `config`:
    a pid may have been reused by something else, which is left alone."""
    if not isinstance(pid, int) or pid <= 0:
        return
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return  # gone, or no /proc: nothing of ours to stop
    if not any(part.endswith(program.encode()) for part in command) or str(config.resolve()).encode() not in command:
        return
    log.warning("stopping the private %s (pid %d) that an earlier run left behind", program, pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    """Running and not a zombie (in a container, nobody may reap an orphan that has exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"

"""Run the system `mosquitto` binary on a free loopback port, for newcomers and for tests.

`hotlab run` without a config (the simulated lab) needs a broker so the first thing a new
user sees is live MQTT traffic; the system Mosquitto is a real, production-grade broker, so
we start it privately (loopback only, generated config in a temp dir) instead of carrying
an embedded Python broker. The same class is what the test suite uses to start, kill and
restart a broker on the same port (tests/mosquitto_service.py).

Everything here is synchronous (process start, port probing); async callers run it with
`asyncio.to_thread` so the event loop never waits on it.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from hotlab.errors import HotlabError


class BrokerUnavailable(HotlabError, RuntimeError):
    """mosquitto is not installed, or it did not start listening in time (its log is in the message)."""


#: prctl(2) option: the signal the kernel sends a process when its parent thread dies.
_PR_SET_PDEATHSIG = 1
#: Loaded before any fork: the child must not load a library between fork and exec.
_LIBC = ctypes.CDLL(None, use_errno=True) if os.uname().sysname == "Linux" else None


def die_with_parent() -> None:
    """In the child before exec: SIGTERM when the thread that started us ends (the owner died)."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def write_file(path: Path, text: str, *, private: bool = False) -> None:
    """Write `text` to `path` (owner-only if `private`); an OSError always names the file.

    A failed write() raises an OSError without a file name, and on a full disk the user must be
    told which file could not be written.
    """
    try:
        if private:
            path.touch(mode=0o600, exist_ok=True)
            path.chmod(0o600)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (bind to port 0 and let the kernel choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).is_file()), None
    )


@dataclass(slots=True)
class TlsListener:
    """Server-side TLS files; `require_certificate` turns on client-certificate authentication."""

    cafile: Path
    certfile: Path
    keyfile: Path
    require_certificate: bool = False


@dataclass
class MosquittoBroker:
    """A private mosquitto on 127.0.0.1.

    `persistence=True` keeps retained messages and persistent sessions (with their queued
    QoS 1 messages) across `stop()`/`start()`, as a production broker would; `users`
    enables password authentication (a mosquitto_passwd file is generated).
    """

    port: int = 0
    host: str = "127.0.0.1"
    persistence: bool = True
    users: dict[str, str] = field(default_factory=dict)
    tls: TlsListener | None = None
    workdir: Path | None = None
    start_timeout_s: float = 15.0
    #: End with the owner even when it is killed (Linux): for a broker that serves only its owner.
    #: The kernel signals when the *thread* that started it ends, so start it from a long-lived thread.
    die_with_parent: bool = False
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, init=False, repr=False)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def exit_code(self) -> int | None:
        """None while it runs (or was never started); once it has exited, its code (and it is reaped)."""
        return None if self._process is None else self._process.poll()

    @property
    def log_path(self) -> Path:
        return self._dir / "mosquitto.log"

    @property
    def _dir(self) -> Path:
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="hotlab-mosquitto-")
            self.workdir = Path(self._tmp.name)
        return self.workdir

    def start(self) -> Self:
        """Start (or restart, on the same port) and return once the port accepts connections."""
        if self.running:
            return self
        binary = mosquitto_binary()
        if binary is None:
            raise BrokerUnavailable("the mosquitto binary is not installed (apt install mosquitto)")
        first_start = self.port == 0
        for _attempt in range(3 if first_start else 1):
            if first_start:
                self.port = free_tcp_port(self.host)
            config = self._write_config()
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._spawn_deaf_to_ctrl_c([binary, "-c", str(config)])
            if self._wait_listening():
                return self
            self.kill()
            if not first_start:
                break
        raise BrokerUnavailable(f"mosquitto did not listen on {self.host}:{self.port}: {self.log_tail(log_offset)}")

    def _spawn_deaf_to_ctrl_c(self, command: list[str]) -> None:
        """Start mosquitto with SIGINT blocked (a blocked signal stays blocked across exec).

        A terminal's Ctrl-C goes to the whole foreground process group: it would stop the broker
        while its owner is still draining the backlog to it. The owner stops it with SIGTERM
        (stop/close) once done. It stays in its owner's process group, so a signal sent to the
        group by a supervisor or a CI runner (SIGTERM, SIGKILL) still ends it.

        `_process` is set before the mask is restored: a Ctrl-C that waited meanwhile is raised
        (KeyboardInterrupt) right then, and close() must still know the broker to stop it.
        """
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                cwd=self._dir,
                preexec_fn=die_with_parent if self.die_with_parent else None,
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Graceful stop (SIGTERM): mosquitto writes its persistence file, like a service restart."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout_s)
        self._process = None

    def kill(self) -> None:
        """Crash stop (SIGKILL): nothing is saved after the last autosave."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait(10)
        self._process = None

    def close(self) -> None:
        """Stop and remove the work directory (if we created it)."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write_config(self) -> Path:
        """Write mosquitto.conf and return its absolute path (mosquitto runs with the work dir as its cwd)."""
        directory = self._dir.resolve()
        lines = [
            f"listener {self.port} {self.host}",
            f"log_dest file {directory / 'mosquitto.log'}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            # Enough queued QoS 1 messages per offline persistent client for a long outage in tests.
            "max_queued_messages 100000",
            "max_inflight_messages 100",
        ]
        if os.geteuid() == 0:
            # As root, mosquitto would switch to the "mosquitto" user, which cannot write our private work dir.
            lines.append("user root")
        if self.persistence:
            lines += ["persistence true", f"persistence_location {directory}/", "autosave_interval 1"]
        if self.users:
            password_file = directory / "passwords"
            password_file.write_text("")
            password_file.chmod(0o600)
            for user, password in self.users.items():
                subprocess.run(
                    ["mosquitto_passwd", "-b", str(password_file), user, password], check=True, capture_output=True
                )
            lines += ["allow_anonymous false", f"password_file {password_file}"]
        else:
            lines.append("allow_anonymous true")
        if self.tls is not None:
            lines += [f"cafile {self.tls.cafile}", f"certfile {self.tls.certfile}", f"keyfile {self.tls.keyfile}"]
            if self.tls.require_certificate:
                lines.append("require_certificate true")
        write_file(self._dir / "mosquitto.conf", "\n".join(lines) + "\n")
        return directory / "mosquitto.conf"

    def _wait_listening(self) -> bool:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                return False
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def log_tail(self, offset: int = 0) -> str:
        """The end of the broker's log from `offset` on (at most 2000 characters)."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                return log.read()[-2000:].decode("utf-8", "replace").strip() or "(empty log)"
        except OSError:
            return "(no log)"

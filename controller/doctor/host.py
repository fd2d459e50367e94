"""The doctor's checks of this machine: device paths and device servers, storage, the user store, the clock.

Free space (a hotlab rule, not a standard): the outbox may hold `max_bytes` of payload, and SQLite's
rows, index and write-ahead log around them take more. Measured for a full outbox with three sinks:
2.2 x max_bytes on disk for 200-byte messages, 1.5 x for 600-byte ones; OUTBOX_DISK_FACTOR keeps
2.5 x, less what the outbox files already take. The archive keeps growing (readings are thinned after
[history] raw_days, everything else is kept), so its file system needs ARCHIVE_FREE_BYTES free
besides. Directories on one file system add their needs up, in one finding.
"""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import shutil
import stat
import urllib.parse
from pathlib import Path

from hotlab.controller.audit import KEY_ENV, KEY_FILE_ENV, AuditKeyError, load_hmac_key
from hotlab.controller.config import (
    ModbusRtuLink,
    ModbusTcpLink,
    ModbusTlsLink,
    OutboxConfig,
    SerialTransport,
    Transport,
)
from hotlab.controller.doctor.finding import Finding

OUTBOX_DISK_FACTOR = 2.5
ARCHIVE_FREE_BYTES = 1024**3
#: How long a device server or station gets to accept a TCP connection.
TCP_TIMEOUT_S = 3.0
#: How long timedatectl or chronyc gets to answer.
CLOCK_TOOL_TIMEOUT_S = 5.0
#: chronyc tracking's "Leap status" when chronyd has no usable source (chronyc(1)).
CHRONY_UNSYNCHRONISED = "Not synchronised"


async def device_finding(name: str, transport: Transport) -> Finding:
    """A serial path: present and permitted; a device server or Modbus TCP station: accepts a connection."""
    if isinstance(transport, ModbusTcpLink | ModbusTlsLink):
        subject = f"device {name} (modbus {transport.host}:{transport.port})"
        return await _tcp_finding(subject, transport.host, transport.port)
    url = transport.url if isinstance(transport, SerialTransport | ModbusRtuLink) else ""
    subject = f"device {name} ({url})"
    if url.startswith("/"):
        return await asyncio.to_thread(_serial_port_finding, subject, Path(url))
    parts = urllib.parse.urlsplit(url)
    if parts.scheme in ("socket", "rfc2217") and parts.hostname and parts.port:
        return await _tcp_finding(subject, parts.hostname, parts.port)
    return Finding("warn", subject, "not checked: the doctor checks /dev paths, socket:// and rfc2217:// URLs")


async def _tcp_finding(subject: str, host: str, port: int) -> Finding:
    try:
        async with asyncio.timeout(TCP_TIMEOUT_S):
            _reader, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        return Finding("FAIL", subject, f"no answer to a TCP connection within {TCP_TIMEOUT_S:g} s")
    except OSError as exc:
        # asyncio words a refused connection "Connect call failed (address)": the errno says what happened.
        why = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else (exc.strerror or str(exc))
        return Finding("FAIL", subject, f"cannot connect: {why} (a device server that takes one client refuses others)")
    writer.close()
    await asyncio.gather(writer.wait_closed(), return_exceptions=True)
    return Finding("ok", subject, "accepts TCP connections")


def _serial_port_finding(subject: str, path: Path) -> Finding:
    try:
        info = path.stat()
    except FileNotFoundError:
        return Finding("FAIL", subject, "not present (unplugged, or named otherwise: ls /dev/serial/by-id)")
    except OSError as exc:
        return Finding("FAIL", subject, f"cannot be examined: {exc.strerror}")
    if not stat.S_ISCHR(info.st_mode):
        return Finding("FAIL", subject, "not a character device, which a serial port is")
    if os.access(path, os.R_OK | os.W_OK):
        return Finding("ok", subject, f"present, readable and writable by {_user()}")
    group = _group_name(info.st_gid)
    detail = f"present but not readable and writable by {_user()} (mode {stat.filemode(info.st_mode)}, group {group})"
    if info.st_mode & 0o060 == 0o060 and info.st_gid not in {os.getgid(), *os.getgroups()}:
        detail += f": add the user to group {group}"
    return Finding("FAIL", subject, detail)


def storage_findings(outbox: OutboxConfig, archive: Path | None, state_dirs: list[Path]) -> list[Finding]:
    """Per file system: each directory the lab writes to is writable, and the free space covers the needs."""
    roles: dict[Path, list[str]] = {}
    outbox_dir = outbox.path.parent.absolute()
    archive_dir = archive.parent.absolute() if archive is not None else None
    for role, directory in [("outbox", outbox_dir), ("archive", archive_dir), *(("state", d) for d in state_dirs)]:
        if directory is not None:
            names = roles.setdefault(directory.absolute(), [])
            if role not in names:
                names.append(role)
    by_device: dict[int, list[Path]] = {}
    for directory in roles:
        by_device.setdefault(_existing_ancestor(directory).stat().st_dev, []).append(directory)
    findings = []
    for paths in by_device.values():
        subject = "storage " + ", ".join(f"{path} ({', '.join(roles[path])})" for path in paths)
        unwritable = [_unwritable(path) for path in paths if _unwritable(path)]
        if unwritable:
            findings.append(Finding("FAIL", subject, "; ".join(unwritable)))
            continue
        needs = []
        if outbox_dir in paths:
            taken = sum(_size(Path(f"{outbox.path}{suffix}")) for suffix in ("", "-wal", "-shm"))
            needs.append(("outbox", max(0, int(OUTBOX_DISK_FACTOR * outbox.max_bytes) - taken)))
        if archive_dir in paths:
            needs.append(("archive", ARCHIVE_FREE_BYTES))
        free = shutil.disk_usage(_existing_ancestor(paths[0])).free
        detail = f"writable by {_user()}, {_size_text(free)} free"
        if needs:
            detail += ", needs " + " + ".join(f"{role} {_size_text(size)}" for role, size in needs)
        findings.append(Finding("ok" if free >= sum(size for _, size in needs) else "FAIL", subject, detail))
    return findings


def audit_key_finding() -> Finding:
    """The audit trail's HMAC key as the services find it: from the environment (the units set it)."""
    try:
        key = load_hmac_key()
    except AuditKeyError as exc:
        return Finding("FAIL", "audit key", str(exc))
    if key is None:
        return Finding("warn", "audit key", f"${KEY_FILE_ENV} is not set: no HMAC on the trail, and no web panel")
    return Finding("ok", "audit key", f"{len(key)} bytes from {os.environ.get(KEY_FILE_ENV) or '$' + KEY_ENV}")


def users_finding(path: Path) -> Finding:
    if path.exists():
        return Finding("ok", "users", f"store {path} present")
    return Finding("warn", "users", f"no store at {path}: the web panel needs one (hotlab user add)")


async def clock_findings() -> list[Finding]:
    """Synchronised by NTP? timedatectl where systemd runs, else chrony's own view, else unknown (a warn)."""
    tried = []
    if shutil.which("timedatectl"):
        code, out = await _run("timedatectl", "show", "-p", "NTPSynchronized", "--value")
        answer = out.strip()
        if code == 0 and answer == "yes":
            return [Finding("ok", "clock", "synchronised (timedatectl: NTPSynchronized=yes)")]
        if code == 0 and answer == "no":
            return [Finding("FAIL", "clock", "not synchronised (timedatectl: NTPSynchronized=no): enable NTP")]
        tried.append(f"timedatectl: {_first_line(out)}")
    else:
        tried.append("no timedatectl")
    if shutil.which("chronyc"):
        code, out = await _run("chronyc", "tracking")
        leap = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Leap status")), "")
        if code == 0 and leap == CHRONY_UNSYNCHRONISED:
            return [Finding("FAIL", "clock", f"not synchronised (chronyc: leap status {leap})")]
        if code == 0 and leap:
            return [Finding("ok", "clock", f"synchronised (chronyc: leap status {leap})")]
        tried.append(f"chronyc: {_first_line(out)}")
    else:
        tried.append("no chronyc")
    return [Finding("warn", "clock", f"synchronisation cannot be determined ({'; '.join(tried)})")]


async def _run(*command: str) -> tuple[int, str]:
    """Exit code and output (stdout and stderr together) of a short command; -1 if it hangs past the timeout."""
    process = await asyncio.create_subprocess_exec(
        *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        async with asyncio.timeout(CLOCK_TOOL_TIMEOUT_S):
            out, _ = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        return -1, f"no answer within {CLOCK_TOOL_TIMEOUT_S:g} s"
    return int(process.returncode or 0), out.decode(errors="replace")


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "no output")


def _existing_ancestor(path: Path) -> Path:
    """`path` if it exists, else its nearest existing parent: where it would be created."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _unwritable(directory: Path) -> str:
    """Why this user cannot write `directory` (or create it), or "" if it can."""
    existing = _existing_ancestor(directory)
    if os.access(existing, os.W_OK | os.X_OK):
        return ""
    where = str(directory) if existing == directory else f"{existing} (to create {directory} in)"
    return f"{where} is not writable by {_user()}"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _size_text(size: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _user() -> str:
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = "?"
    return f"{name} (uid {uid})"


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)

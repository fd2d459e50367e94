"""`hotlab doctor` against real things: ptys, listening and closed ports, mosquitto with passwords and TLS,
influxd with its users, a real file system, and an unprivileged user.

Tests run as root here, and os.access() says yes to root for any file, so the permission checks run
the doctor as `nobody` through setpriv (util-linux) with the ports' modes set by the test; as any
other user they run the doctor directly, with a port its owner has no access to. The clock's state
cannot be set by a test, so the clock tests put stand-ins for timedatectl and chronyc, printing what
the real tools print, first on PATH.
"""

from __future__ import annotations

import asyncio
import grp
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from hotlab.controller.cli.main import main
from hotlab.controller.doctor import Finding, examine
from tests.influx_service import InfluxService, influx_server  # noqa: F401
from tests.mosquitto_service import MosquittoBroker, TlsListener, free_tcp_port, require_mosquitto
from tests.test_mqtt_tls import make_certificates

HOTLAB = Path(sys.executable).parent / "hotlab"
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
MiB = 1024 * 1024


def lab_config(directory: Path, devices: Sequence[str] = (), tables: str = "") -> Path:
    """A lab config in `directory`: one [[device]] per TOML body given, then `tables` as written."""
    blocks = ['[site]\nname = "doctor-lab"\n', *(f"[[device]]\n{device}\n" for device in devices), tables]
    path = directory / "lab.toml"
    path.write_text("\n".join(blocks))
    return path


def calibrator(name: str, transport: str) -> str:
    return f'name = "{name}"\nstation = "bench"\nfamily = "vik202"\ntransport = "{transport}"\n'


def station(name: str, port: int) -> str:
    return f'name = "{name}"\nstation = "bench"\nfamily = "elution_station"\ntransport = {{ modbus = "tcp", host = "127.0.0.1", port = {port} }}\n'


def examined(config: Path | None) -> list[Finding]:
    return asyncio.run(examine(config))


def finding(findings: list[Finding], subject: str) -> Finding:
    (found,) = [f for f in findings if f.subject == subject]
    return found


def storage(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.subject.startswith("storage ")]


@pytest.fixture
def pty_path() -> Iterator[Path]:
    """The slave side of a fresh pseudo-terminal: a real tty, as a USB-serial port is."""
    master, slave = os.openpty()
    try:
        yield Path(os.ttyname(slave))
    finally:
        os.close(slave)
        os.close(master)


@pytest.fixture
def listening_port() -> Iterator[int]:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield int(server.getsockname()[1])


# --- config --------------------------------------------------------------------------------------


def test_a_config_that_does_not_load_is_one_fail_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = lab_config(tmp_path, [calibrator("vik-1", "/dev/ttyUSB0")], "[outbox]\nmax_bytez = 1\n")
    assert main(["doctor", "--config", str(config)]) == 1
    out, err = capsys.readouterr()
    config_lines = [line for line in out.splitlines() if " config: " in line]
    assert len(config_lines) == 1 and config_lines[0].startswith("FAIL config: ")
    assert "max_bytez" in config_lines[0] and str(config) in config_lines[0]
    assert "Traceback" not in out + err
    assert [line.split()[1] for line in out.splitlines()] == ["config:", "clock:"]  # nothing else could be checked


def test_a_missing_config_file_is_a_fail_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--config", str(tmp_path / "absent.toml")]) == 1
    assert capsys.readouterr().out.startswith(f"FAIL config: {tmp_path / 'absent.toml'}: cannot read")


def test_without_a_config_only_the_host_is_examined(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    findings = examined(None)
    assert [f.subject.split()[0] for f in findings] == ["storage", "clock"]
    assert findings[0].subject == f"storage {tmp_path / 'var'} (outbox, archive, state)"


# --- devices -------------------------------------------------------------------------------------


def test_serial_ports_present_missing_and_device_servers_open_or_closed(
    tmp_path: Path, pty_path: Path, listening_port: int
) -> None:
    closed = free_tcp_port()
    regular = tmp_path / "regular-file"
    regular.write_text("")
    config = lab_config(
        tmp_path,
        [
            calibrator("pty", str(pty_path)),
            calibrator("unplugged", "/dev/ttyUSB-hotlab-absent"),
            calibrator("regular", str(regular)),
            calibrator("server", f"socket://127.0.0.1:{listening_port}"),
            calibrator("server-off", f"rfc2217://127.0.0.1:{closed}"),
            station("station", listening_port),
            station("station-off", closed),
        ],
    )
    findings = examined(config)
    pty = finding(findings, f"device pty ({pty_path})")
    assert pty.status == "ok" and pty.detail.startswith("present, readable and writable by ")
    unplugged = finding(findings, "device unplugged (/dev/ttyUSB-hotlab-absent)")
    assert unplugged.status == "FAIL" and unplugged.detail.startswith("not present")
    assert str(finding(findings, f"device regular ({regular})")).endswith(
        ": not a character device, which a serial port is"
    )
    assert finding(findings, f"device server (socket://127.0.0.1:{listening_port})").status == "ok"
    server_off = finding(findings, f"device server-off (rfc2217://127.0.0.1:{closed})")
    assert server_off.status == "FAIL" and server_off.detail.startswith("cannot connect: Connection refused")
    station_line = f"ok   device station (modbus 127.0.0.1:{listening_port}): accepts TCP connections"
    assert str(finding(findings, f"device station (modbus 127.0.0.1:{listening_port})")) == station_line
    assert finding(findings, f"device station-off (modbus 127.0.0.1:{closed})").status == "FAIL"
    assert [f.subject.split()[0] for f in findings] == [
        "config",
        *["device"] * 7,
        "mqtt",
        "storage",
        "audit",
        "users",
        "clock",
    ]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory everyone may read but only its owner write (pytest's own temp dirs are its owner's alone)."""
    directory = Path(tempfile.mkdtemp(prefix="hotlab-doctor-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _unprivileged() -> list[str]:
    """The command prefix that runs the doctor as a user os.access() tells the truth for."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: no unprivileged user to check permissions as")
    probe = subprocess.run([*NOBODY, str(HOTLAB), "--help"], capture_output=True, timeout=30)
    if probe.returncode != 0:  # e.g. a checkout in a private (0700) directory
        pytest.skip(f"this hotlab cannot run as nobody: {probe.stderr.decode()[:200]}")
    return NOBODY


def test_ports_and_directories_are_checked_for_the_user_running_the_doctor(shared_dir: Path) -> None:
    prefix = _unprivileged()
    ports = []
    for _ in range(2):
        master, slave = os.openpty()
        ports.append((master, slave, os.ttyname(slave)))
    try:
        allowed, refused = ports[0][2], ports[1][2]
        os.chmod(allowed, 0o666)
        group = None
        if prefix:  # as root: the port belongs to root and dialout, as a USB-serial port does
            group = grp.getgrnam("dialout") if "dialout" in {g.gr_name for g in grp.getgrall()} else None
            os.chown(refused, 0, group.gr_gid if group else 0)
            os.chmod(refused, 0o660)
        else:  # as its owner: a port the owner has taken every right from
            os.chmod(refused, 0o000)
        config = lab_config(shared_dir, [calibrator("allowed", allowed), calibrator("refused", refused)])
        run = subprocess.run(
            [*prefix, str(HOTLAB), "doctor", "--config", str(config)], capture_output=True, text=True, timeout=60
        )
    finally:
        for master, slave, _ in ports:
            os.close(slave)
            os.close(master)
    lines = {line.split(":", 1)[0]: line for line in run.stdout.splitlines()}
    assert run.returncode == 1, run.stdout + run.stderr
    assert lines[f"ok   device allowed ({allowed})"]
    refused_line = lines[f"FAIL device refused ({refused})"]
    assert "present but not readable and writable by" in refused_line
    if group is not None:
        assert refused_line.endswith("(mode crw-rw----, group dialout): add the user to group dialout")
    # The config's directory belongs to someone else, so nothing can be created in it.
    storage = next(line for line in run.stdout.splitlines() if line.startswith("FAIL storage "))
    assert f"{shared_dir} (to create {shared_dir / 'var'} in) is not writable by" in storage


# --- storage -------------------------------------------------------------------------------------


def test_free_space_must_cover_the_outbox_and_the_archive(tmp_path: Path) -> None:
    # The rule (controller/doctor/host.py): 2.5 x the outbox's max_bytes, less its files, plus 1 GiB for the archive.
    free = shutil.disk_usage(tmp_path).free
    small = 64 * 1024  # the least max_bytes a config takes: 2.5 x 64 KiB = 160 KiB
    config = lab_config(tmp_path, [], f"[outbox]\nmax_bytes = {small}\n")
    (fits,) = storage(examined(config))
    assert fits.subject == f"storage {tmp_path / 'var'} (outbox, archive, state)"
    assert fits.detail.endswith("free, needs outbox 160.0 KiB + archive 1.0 GiB")
    assert fits.status == ("ok" if free >= 160 * 1024 + 1024**3 else "FAIL")
    config = lab_config(tmp_path, [], f"[outbox]\nmax_bytes = {free}\n")  # 2.5 x the free space cannot fit in it
    (too_big,) = storage(examined(config))
    assert too_big.status == "FAIL"


def test_directories_on_another_file_system_get_a_line_of_their_own(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second file system at /dev/shm")
    with tempfile.TemporaryDirectory(dir=shm) as other:
        config = lab_config(tmp_path, [], f'[history]\npath = "{other}/history.sqlite3"\n')
        found = storage(examined(config))
    assert [f.subject for f in found] == [f"storage {tmp_path / 'var'} (outbox, state)", f"storage {other} (archive)"]
    assert found[1].detail.endswith("free, needs archive 1.0 GiB")


def test_the_audit_key_is_found_as_the_units_give_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = lab_config(tmp_path)
    monkeypatch.delenv("HOTLAB_AUDIT_KEY", raising=False)
    monkeypatch.delenv("HOTLAB_AUDIT_KEY_FILE", raising=False)
    assert finding(examined(config), "audit key").status == "warn"
    key = tmp_path / "audit.key"
    key.write_text("ab" * 32 + "\n")  # `openssl rand -hex 32`: 64 characters
    monkeypatch.setenv("HOTLAB_AUDIT_KEY_FILE", str(key))
    assert str(finding(examined(config), "audit key")) == f"ok   audit key: 64 bytes from {key}"
    key.write_text("ab" * 8)  # RFC 2104 section 3: shorter than the 32-byte hash output is refused
    short = finding(examined(config), "audit key")
    assert short.status == "FAIL" and "16 bytes" in short.detail
    monkeypatch.setenv("HOTLAB_AUDIT_KEY_FILE", str(tmp_path / "absent.key"))
    assert finding(examined(config), "audit key").status == "FAIL"


# --- MQTT ----------------------------------------------------------------------------------------


def _mqtt_table(
    broker: MosquittoBroker, username: str | None = None, password_file: str | None = None, tls: str = ""
) -> str:
    table = f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nclient_id = "ctl"\nconnect_timeout_s = 5\n'
    if username is not None:
        table += f'username = "{username}"\npassword_file = "{password_file}"\n'
    return table + tls


def test_the_broker_accepts_the_right_password_and_refuses_a_wrong_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require_mosquitto()
    (tmp_path / "right.password").write_text("correct horse battery staple\n")
    (tmp_path / "wrong.password").write_text("not the password\n")
    (tmp_path / "broker").mkdir()
    with MosquittoBroker(users={"controller": "correct horse battery staple"}, workdir=tmp_path / "broker") as broker:
        right = examined(lab_config(tmp_path, [], _mqtt_table(broker, "controller", "right.password")))
        assert (
            str(finding(right, "mqtt"))
            == f"ok   mqtt: {broker.host}:{broker.port} accepted user controller (MQTT 5, as the controller connects)"
        )
        config = lab_config(tmp_path, [], _mqtt_table(broker, "controller", "wrong.password"))
        assert main(["doctor", "--config", str(config)]) == 1
        out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if line.startswith("FAIL mqtt: ")]
    assert line.startswith(f"FAIL mqtt: {broker.host}:{broker.port} refused user controller: ")
    assert "Bad user name or password" in line or "Not authorized" in line
    assert "not the password" not in out


def test_a_broker_that_is_down_and_the_web_panels_own_identity(tmp_path: Path) -> None:
    require_mosquitto()
    (tmp_path / "panel.password").write_text("panel-secret\n")
    (tmp_path / "broker").mkdir()
    with MosquittoBroker(users={"controller": "c", "panel": "panel-secret"}, workdir=tmp_path / "broker") as broker:
        (tmp_path / "c.password").write_text("c\n")
        web = '[web]\nmqtt_username = "panel"\nmqtt_password_file = "panel.password"\n'
        findings = examined(lab_config(tmp_path, [], _mqtt_table(broker, "controller", "c.password") + web))
        assert [f.status for f in findings if f.subject.startswith("mqtt")] == ["ok", "ok"]
        assert "accepted user panel" in finding(findings, "mqtt (web panel)").detail
        broker.stop()
        down = examined(lab_config(tmp_path, [], _mqtt_table(broker)))
    assert finding(down, "mqtt").status == "FAIL"
    assert finding(down, "mqtt").detail.startswith(f"cannot connect to {broker.host}:{broker.port}")


def test_the_broker_certificate_is_checked_against_the_configured_ca(tmp_path: Path) -> None:
    require_mosquitto()
    ca, cert, key = make_certificates(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    other_ca, _, _ = make_certificates(other)
    (tmp_path / "broker").mkdir()
    with MosquittoBroker(tls=TlsListener(ca, cert, key), workdir=tmp_path / "broker") as broker:
        good = examined(lab_config(tmp_path, [], _mqtt_table(broker, tls=f'[mqtt.tls]\nca_file = "{ca}"\n')))
        bad = examined(lab_config(tmp_path, [], _mqtt_table(broker, tls=f'[mqtt.tls]\nca_file = "{other_ca}"\n')))
    assert finding(good, "mqtt").detail.startswith(f"{broker.host}:{broker.port} (TLS) accepted an anonymous client")
    assert finding(bad, "mqtt").status == "FAIL"
    assert "certificate verify failed" in finding(bad, "mqtt").detail


# --- InfluxDB ------------------------------------------------------------------------------------


def _influx_v1(url: str, user: str, password_file: str, database: str, extra: str = "") -> str:
    """[influx] for an InfluxDB 1.x database: what the sink writes natively."""
    return f'[influx]\nurl = "{url}"\nusername = "{user}"\npassword_file = "{password_file}"\ndatabase = "{database}"\n{extra}'


def test_influxdb_1x_credentials_database_and_policies_are_checked_by_writes_of_nothing(
    tmp_path: Path, influx_server: InfluxService
) -> None:
    server = influx_server
    database = server.create_database()
    server.query(f'CREATE RETENTION POLICY "raw" ON "{database}" DURATION 30d REPLICATION 1')
    server.query("CREATE USER reader WITH PASSWORD 'reader-secret'")
    server.query(f'GRANT READ ON "{database}" TO reader')
    server.query("CREATE USER writer WITH PASSWORD 'writer-secret'")
    server.query(f'GRANT WRITE ON "{database}" TO writer')
    for name, secret in (("admin", server.password), ("wrong", "not-it"), ("reader", "reader-secret")):
        (tmp_path / f"{name}.password").write_text(secret + "\n")
    (tmp_path / "writer.password").write_text("writer-secret\n")
    user = server.username

    def influx(table: str) -> Finding:
        (found,) = [f for f in examined(lab_config(tmp_path, [], table)) if f.subject.startswith("influx ")]
        assert found.subject == f"influx {table.split(chr(34))[1]}"
        return found

    ok = influx(_influx_v1(server.url, user, "admin.password", database))
    assert str(ok).startswith(f"ok   influx {server.url}: InfluxDB 1.6")
    assert ok.detail.endswith(f"lets user {user} write to database {database} (a write of nothing)")
    assert server.series("SHOW MEASUREMENTS", database) == []  # nothing was written
    refused = influx(_influx_v1(server.url, user, "wrong.password", database))
    assert (
        refused.status == "FAIL" and f"refused the credentials of user {user}: authorization failed" in refused.detail
    )
    read_only = influx(_influx_v1(server.url, "reader", "reader.password", database))
    assert read_only.status == "FAIL" and f"does not let user reader write to database {database}" in read_only.detail
    down = influx(_influx_v1(f"http://127.0.0.1:{free_tcp_port()}", user, "admin.password", database))
    assert down.status == "FAIL" and down.detail.startswith("cannot reach it: ")

    # What the sink provisions at start (the database, the "raw" policy) may be missing if it may create it.
    fresh = server.create_database()
    by_admin = influx(_influx_v1(server.url, user, "admin.password", fresh))
    assert by_admin.status == "ok" and "which the sink creates at start (user hotlab is an admin)" in by_admin.detail
    server.query(f'GRANT WRITE ON "{fresh}" TO writer')
    by_writer = influx(_influx_v1(server.url, "writer", "writer.password", fresh))
    assert by_writer.status == "FAIL" and "retention policy not found: raw" in by_writer.detail
    assert f'an admin runs CREATE DATABASE "{fresh}"; CREATE RETENTION POLICY "raw"' in by_writer.detail
    not_provisioned = influx(_influx_v1(server.url, user, "admin.password", "no_such_db", "provision = false\n"))
    assert not_provisioned.status == "FAIL" and "database not found" in not_provisioned.detail


def test_influxdb_2x_token_and_bucket_are_checked_through_the_v2_write_api(
    tmp_path: Path, influx_server: InfluxService
) -> None:
    # The bridge serves the 1.x server as 1.8 does: /api/v2/write with `Token user:password`, org "-".
    server = influx_server
    database = server.create_database()
    (tmp_path / "token").write_text(server.token + "\n")
    (tmp_path / "bad-token").write_text(f"{server.username}:not-it\n")

    def influx(token_file: str, bucket: str) -> Finding:
        table = f'[influx]\nurl = "{server.v2_url}"\ntoken_file = "{token_file}"\norg = "-"\nbucket = "{bucket}"\n'
        (found,) = [f for f in examined(lab_config(tmp_path, [], table)) if f.subject.startswith("influx ")]
        return found

    ok = influx("token", f"{database}/autogen")
    assert ok.status == "ok" and ok.detail.endswith(
        f"lets the token write to bucket {database}/autogen (a write of nothing)"
    )
    assert influx("bad-token", f"{database}/autogen").status == "FAIL"
    missing = influx("token", "no_such_db/autogen")
    assert missing.status == "FAIL" and "database not found" in missing.detail


# --- clock ---------------------------------------------------------------------------------------

#: What the real tools print (timedatectl(1) `show --value`, chronyc(1) `tracking`), trimmed to the lines read.
CHRONY_TRACKING = """Reference ID    : C0A80101 (ntp.lab)
Stratum         : 3
System time     : 0.000012 seconds fast of NTP time
Leap status     : {leap}
"""
NO_SYSTEMD = "System has not been booted with systemd as init system (PID 1). Can't operate.\nFailed to connect to bus: Host is down"


def _tools(directory: Path, monkeypatch: pytest.MonkeyPatch, **scripts: tuple[int, str]) -> None:
    """Stand-in tools (name -> exit code, output) as the only programs on PATH."""
    directory.mkdir()
    for name, (code, output) in scripts.items():
        (directory / name).write_text(f"#!{sys.executable}\nimport sys\nprint({output!r})\nsys.exit({code})\n")
        (directory / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(directory))


@pytest.mark.parametrize(
    ("tools", "expected"),
    [
        ({"timedatectl": (0, "yes")}, "ok   clock: synchronised (timedatectl: NTPSynchronized=yes)"),
        ({"timedatectl": (0, "no")}, "FAIL clock: not synchronised (timedatectl: NTPSynchronized=no): enable NTP"),
        (
            {"timedatectl": (1, NO_SYSTEMD), "chronyc": (0, CHRONY_TRACKING.format(leap="Normal"))},
            "ok   clock: synchronised (chronyc: leap status Normal)",
        ),
        (
            {"chronyc": (0, CHRONY_TRACKING.format(leap="Not synchronised"))},
            "FAIL clock: not synchronised (chronyc: leap status Not synchronised)",
        ),
        (
            {"timedatectl": (1, NO_SYSTEMD), "chronyc": (1, "506 Cannot talk to daemon")},
            "warn clock: synchronisation cannot be determined (timedatectl: System has not been booted with systemd "
            "as init system (PID 1). Can't operate.; chronyc: 506 Cannot talk to daemon)",
        ),
        ({}, "warn clock: synchronisation cannot be determined (no timedatectl; no chronyc)"),
    ],
)
def test_the_clock_is_judged_by_timedatectl_then_chronyc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tools: dict[str, tuple[int, str]], expected: str
) -> None:
    _tools(tmp_path / "bin", monkeypatch, **tools)
    monkeypatch.chdir(tmp_path)
    assert str(finding(examined(None), "clock")) == expected

"""Config validation: the example loads, and every kind of mistake names file, key, problem and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from hotlab.controller.config import (
    CALIBRATOR_FAMILIES,
    ConfigError,
    ModbusRtuTransport,
    ModbusTcpTransport,
    SerialTransport,
    load_config,
)
from hotlab.drivers.calibrator import CALIBRATOR_DRIVERS

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "lab.toml"

MINIMAL = """
[site]
name = "lab-a"

[[device]]
name = "cal-1"
station = "hotcell-1"
family = "vik202"
transport = "socket://127.0.0.1:4001"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lab.toml"
    path.write_text(text)
    return path


def error_for(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    return message


def test_example_config_loads_completely() -> None:
    config = load_config(EXAMPLE)
    assert config.site == "radiopharmacy-a"
    assert [d.family for d in config.devices] == ["vik202", "crc15r", "vdc404", "atomlab500", "elution_station"]
    assert config.devices[0].transport == SerialTransport("/dev/ttyUSB0")
    assert config.devices[0].nuclide == "Tc-99m"
    assert config.devices[3].transport == SerialTransport("/dev/ttyUSB1")
    assert config.devices[4].transport == ModbusTcpTransport("10.0.20.40", 502, 1, "ABCD")
    assert config.devices[4].is_station
    assert config.outbox.path == EXAMPLE.parent.parent / "var" / "outbox.sqlite3"
    assert config.outbox.max_bytes == 268435456 and config.outbox.warn_fraction == 0.8
    assert config.mqtt is not None and config.mqtt.port == 1883 and config.mqtt.password is None
    assert config.influx is None
    assert config.history_path == EXAMPLE.parent.parent / "var" / "history.sqlite3"
    assert config.qc["devices"]["calibrator-1"] == {"check_source": "cs137-check"}


def test_defaults_and_relative_paths(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert config.mqtt is None  # no [mqtt]: local-only mode
    assert config.outbox.path == tmp_path / "var" / "outbox.sqlite3"
    assert config.devices[0].poll_interval_s == 2.0
    assert config.service.drain_timeout_s == 10.0


def test_nuclide_spellings_are_normalised(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL + 'nuclide = "68Ga"\n'))
    assert config.devices[0].nuclide == "Ga-68"


def test_modbus_rtu_transport(tmp_path: Path) -> None:
    text = """
[site]
name = "lab"
[[device]]
name = "gen"
station = "elution-1"
family = "elution_station"
[device.transport]
modbus = "rtu"
url = "socket://127.0.0.1:5020"
device_id = 7
word_order = "CDAB"
"""
    device = load_config(write(tmp_path, text)).devices[0]
    assert device.transport == ModbusRtuTransport("socket://127.0.0.1:5020", 19200, 7, "CDAB")
    assert device.poll_interval_s == 1.0
    # The driver's own link description, not a field-for-field copy of it.
    from hotlab.drivers.modbus_links import ModbusRtuLink

    assert type(device.transport) is ModbusRtuLink


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ('family = "vdc404"', None),
        (
            'family = "capintec"',
            (
                "device[0].family: 'capintec' is not allowed; allowed: vik202, crc15r, vdc404, "
                "atomlab500, elution_station"
            ),
        ),
        ('transport = "COM3x"', "device[0].transport: 'COM3x' is not a serial URL; allowed: a device path"),
        ('transport = "socket://host"', "device[0].transport: 'socket://host' needs a host and port"),
        ("transport = 4001", "device[0].transport: must be a serial URL string or a table { url = ... }, got 4001"),
        ('name = "cal/1"', "device[0].name: 'cal/1' is not valid; expected 1-64 characters"),
    ],
)
def test_device_field_errors(tmp_path: Path, change: str, expected: str | None) -> None:
    key = change.split(" = ")[0]
    device_part = MINIMAL.split("[[device]]")[1]
    kept = [line for line in device_part.splitlines() if not line.startswith(f"{key} = ")]
    text = MINIMAL.split("[[device]]")[0] + "[[device]]" + "\n".join(kept) + "\n" + change + "\n"
    if expected is None:
        load_config(write(tmp_path, text))
        return
    assert expected in error_for(tmp_path, text)


def test_unknown_key_suggests_the_right_one(tmp_path: Path) -> None:
    message = error_for(tmp_path, MINIMAL + "pol_interval_s = 5\n")
    assert "device[0].pol_interval_s: unknown key (did you mean 'poll_interval_s'?)" in message
    assert "allowed here:" in message and "timeout_s" in message


def test_numbers_are_range_checked(tmp_path: Path) -> None:
    assert "device[0].poll_interval_s: must be >= 0, got -1" in error_for(tmp_path, MINIMAL + "poll_interval_s = -1\n")
    assert "must be a finite number, got 'fast' (string)" in error_for(tmp_path, MINIMAL + 'poll_interval_s = "fast"\n')
    message = error_for(tmp_path, MINIMAL + "[outbox]\nwarn_fraction = 1.5\n")
    assert "outbox.warn_fraction: must be <= 1, got 1.5" in message
    message = error_for(tmp_path, MINIMAL + "[mqtt]\nport = 70000\n")
    assert "mqtt.port: must be <= 65535, got 70000" in message


def test_missing_and_duplicate(tmp_path: Path) -> None:
    assert "site: is required but missing" in error_for(tmp_path, "[[device]]\nname='x'\n")
    assert "site.name: is required but missing" in error_for(tmp_path, "[site]\n")
    duplicate = MINIMAL + MINIMAL.split("\n", 3)[3].replace("cal-1", "cal-1")
    assert "device[1].name: duplicate device name 'cal-1'" in error_for(tmp_path, duplicate)


def test_invalid_toml_names_the_line(tmp_path: Path) -> None:
    assert "not valid TOML" in error_for(tmp_path, "[site\nname = 1\n")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml")


def test_unknown_nuclide_lists_close_matches(tmp_path: Path) -> None:
    message = error_for(tmp_path, MINIMAL + 'nuclide = "Ga-86"\n')
    assert "device[0].nuclide:" in message and "Ga-68" in message


def test_modbus_transport_errors(tmp_path: Path) -> None:
    base = '[site]\nname = "lab"\n[[device]]\nname = "gen"\nstation = "e1"\nfamily = "elution_station"\n'
    assert "an elution station needs a table" in error_for(tmp_path, base + 'transport = "/dev/ttyUSB0"\n')
    message = error_for(tmp_path, base + 'transport = { modbus = "tcp", host = "h", word_order = "XYZW" }\n')
    assert "device[0].transport.word_order: 'XYZW' is not allowed; allowed: ABCD, CDAB, BADC, DCBA" in message
    message = error_for(tmp_path, base + 'transport = { modbus = "tcp", host = "h", device_id = 300 }\n')
    assert "device[0].transport.device_id: must be <= 247, got 300" in message
    assert "device[0].transport.host: is required" in error_for(tmp_path, base + 'transport = { modbus = "tcp" }\n')


def test_secrets_come_from_env_or_file_and_are_masked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_MQTT_PASSWORD", "s3cret-mqtt")
    (tmp_path / "token").write_text("s3cret-token\n")
    text = (
        MINIMAL
        + """
[mqtt]
username = "ctl"
password_env = "TEST_MQTT_PASSWORD"

[influx]
url = "http://127.0.0.1:8086"
token_file = "token"
org = "lab"
bucket = "hotlab"
"""
    )
    config = load_config(write(tmp_path, text))
    assert config.mqtt is not None and config.mqtt.password is not None and config.influx is not None
    assert config.mqtt.password.reveal() == "s3cret-mqtt"
    assert config.influx.auth_token() == "s3cret-token"
    shown = repr(config) + str(config)
    assert "s3cret" not in shown
    assert "Secret(<hidden>, from $TEST_MQTT_PASSWORD)" in shown


def test_secret_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOTLAB_TEST_UNSET", raising=False)
    inline = error_for(tmp_path, MINIMAL + '[mqtt]\nusername = "u"\npassword = "hunter2"\n')
    assert "mqtt.password: secrets are not accepted inline; set password_env" in inline
    assert "hunter2" not in inline
    unset = error_for(tmp_path, MINIMAL + '[mqtt]\nusername = "u"\npassword_env = "HOTLAB_TEST_UNSET"\n')
    assert "mqtt.password_env: environment variable 'HOTLAB_TEST_UNSET' is not set" in unset
    missing = error_for(tmp_path, MINIMAL + '[mqtt]\nusername = "u"\npassword_file = "nope"\n')
    assert "mqtt.password_file: cannot read" in missing
    no_user = error_for(tmp_path, MINIMAL + '[mqtt]\npassword_file = "/etc/hostname"\n')
    assert "mqtt.username: is required when a password is configured" in no_user


def test_influx_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFLUX_PW", "pw")
    v18 = MINIMAL + (
        '[influx]\nurl = "http://127.0.0.1:8086"\nusername = "hotlab"\npassword_env = "INFLUX_PW"\n'
        'database = "hotlab"\nretention_policy = "autogen"\n'
    )
    influx = load_config(write(tmp_path, v18)).influx
    assert influx is not None
    assert (influx.bucket, influx.org, influx.auth_token()) == ("hotlab/autogen", "-", "hotlab:pw")
    both = (
        MINIMAL + '[influx]\nurl = "http://h:8086"\ntoken_env = "INFLUX_PW"\nusername = "u"\nbucket = "b"\norg = "o"\n'
    )
    assert "influx.token_env: give either a token" in error_for(tmp_path, both)
    neither = MINIMAL + '[influx]\nurl = "http://h:8086"\ntoken_env = "INFLUX_PW"\norg = "o"\n'
    assert "influx: needs bucket (InfluxDB 2.x/3.x) or database" in error_for(tmp_path, neither)
    bad_url = MINIMAL + '[influx]\nurl = "h:8086"\ntoken_env = "INFLUX_PW"\norg = "o"\nbucket = "b"\n'
    assert "influx.url: 'h:8086' is not an http(s) URL; allowed: http:// or https:// and a host" in error_for(
        tmp_path, bad_url
    )


def test_influx_batch_size_has_the_bound_the_sink_accepts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # [influx] once accepted up to 100000 while the sink refused more than 50000 at start-up.
    monkeypatch.setenv("INFLUX_TOKEN", "t")
    influx = MINIMAL + '[influx]\nurl = "http://h:8086"\ntoken_env = "INFLUX_TOKEN"\norg = "o"\nbucket = "b"\n'
    assert load_config(write(tmp_path, influx + "batch_size = 50000\n")).influx is not None
    message = error_for(tmp_path, influx + "batch_size = 80000\n")
    assert message.endswith("influx.batch_size: must be <= 50000, got 80000")


def test_tls_files_must_exist_and_pair(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_text("x")
    (tmp_path / "c.crt").write_text("x")
    missing = error_for(tmp_path, MINIMAL + '[mqtt.tls]\nca_file = "nope.crt"\n')
    assert "mqtt.tls.ca_file: file" in missing and "does not exist" in missing
    unpaired = error_for(tmp_path, MINIMAL + '[mqtt.tls]\nca_file = "ca.crt"\ncert_file = "c.crt"\n')
    assert "mqtt.tls.key_file: a client certificate needs both cert_file and key_file" in unpaired


def test_driver_options_are_checked_against_the_driver(tmp_path: Path) -> None:
    ok = load_config(write(tmp_path, MINIMAL + "[device.options]\nmax_identical_readings = 5\n"))
    assert ok.devices[0].options == {"max_identical_readings": 5}
    message = error_for(tmp_path, MINIMAL + "[device.options]\nbaud = 9600\n")
    assert "device[0].options.baud: not an option of the vik202 driver; allowed:" in message
    assert "max_identical_readings" in message
    reserved = error_for(tmp_path, MINIMAL + "[device.options]\ntimeout_s = 1\n")
    assert "device[0].options.timeout_s: not an option" in reserved  # set by the controller, not by options


def test_qc_section_is_validated_by_the_qc_engine(tmp_path: Path) -> None:
    good = MINIMAL + (
        '[qc.sources.cs137]\nnuclide = "Cs-137"\nactivity = "7.4 MBq"\n'
        'reference_time = "2026-01-01T00:00:00Z"\n[qc.devices.cal-1]\ncheck_source = "cs137"\n'
    )
    assert load_config(write(tmp_path, good)).qc["devices"] == {"cal-1": {"check_source": "cs137"}}
    bad = MINIMAL + '[qc.devices.cal-1]\ncheck_source = "nope"\n'
    message = error_for(tmp_path, bad)
    assert "qc.devices.cal-1.check_source: no source 'nope'" in message


def test_qc_limit_errors_name_the_file_and_the_key_path(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + '[qc.limits.constancy]\nwarn = "five"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: qc.limits.constancy.warn: must be a finite number, got 'five' (string)"
    message = error_for(tmp_path, MINIMAL + "[qc.limits.constancyy]\nwarn = 1.0\n")
    assert f"{tmp_path / 'lab.toml'}: qc.limits.constancyy: unknown test (did you mean 'constancy'?)" in message


@pytest.mark.parametrize("family", list(CALIBRATOR_DRIVERS))
def test_every_registered_calibrator_family_can_be_configured(tmp_path: Path, family: str) -> None:
    config = load_config(write(tmp_path, MINIMAL.replace('"vik202"', f'"{family}"')))
    assert config.devices[0].family == family and not config.devices[0].is_station


def test_calibrator_families_are_the_driver_registry() -> None:
    # One source of truth: a driver added to the registry is a family a config may name, in registry order.
    assert CALIBRATOR_FAMILIES == tuple(CALIBRATOR_DRIVERS)


def test_audit_path_is_read_without_the_services_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hotlab.controller.config import load_audit_path

    monkeypatch.delenv("HOTLAB_TEST_UNSET", raising=False)
    secret_unset = MINIMAL + '[mqtt]\nusername = "u"\npassword_env = "HOTLAB_TEST_UNSET"\n'
    assert load_audit_path(write(tmp_path, secret_unset)) == tmp_path / "var" / "audit.jsonl"
    assert load_audit_path(write(tmp_path, secret_unset + '[service]\nstate_dir = "/srv/lab"\n')) == Path(
        "/srv/lab/audit.jsonl"
    )
    assert (
        load_audit_path(write(tmp_path, secret_unset + '[commands]\naudit_path = "trail/a.jsonl"\n'))
        == tmp_path / "trail" / "a.jsonl"
    )
    with pytest.raises(ConfigError, match=r"service.state_dr: unknown key \(did you mean 'state_dir'\?\)"):
        load_audit_path(write(tmp_path, MINIMAL + '[service]\nstate_dr = "x"\n'))


def test_load_secret_refuses_unreadable_and_non_text_files(tmp_path: Path) -> None:
    from hotlab.controller.config import load_secret

    binary = tmp_path / "token.bin"
    binary.write_bytes(b"\xff\xfe token")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_secret(file=binary)
    with pytest.raises(ConfigError, match="exactly one"):
        load_secret(env="X", file=binary)
    good = tmp_path / "token"
    good.write_text("t0ken\r\n")
    assert load_secret(file=good).reveal() == "t0ken"


def test_the_command_freshness_window_is_configurable_and_bounded(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, MINIMAL)).commands.max_age_s == 30.0
    assert load_config(write(tmp_path, MINIMAL + "[commands]\nmax_age_s = 10\n")).commands.max_age_s == 10.0
    assert "commands.max_age_s: must be >= 1, got 0" in error_for(tmp_path, MINIMAL + "[commands]\nmax_age_s = 0\n")


def test_modbus_tls_transport_needs_its_three_files(tmp_path: Path) -> None:
    """MODBUS/TCP Security: port 802 by default, and the CA, certificate and key must exist."""
    for name in ("ca.crt", "ctl.crt", "ctl.key"):
        (tmp_path / name).write_text("-----BEGIN-----\n")
    station = """
[site]
name = "lab"
[[device]]
name = "gen"
station = "elution-1"
family = "elution_station"
[device.transport]
modbus = "tls"
host = "station-1.lab"
[device.transport.tls]
ca_file = "ca.crt"
cert_file = "ctl.crt"
"""
    device = load_config(write(tmp_path, station + 'key_file = "ctl.key"\n')).devices[0]
    from hotlab.drivers.modbus_links import ModbusTlsLink

    assert device.transport == ModbusTlsLink(
        "station-1.lab", tmp_path / "ca.crt", tmp_path / "ctl.crt", tmp_path / "ctl.key", 802, 1, "ABCD"
    )
    assert "device[0].transport.tls.key_file: is required but missing" in error_for(tmp_path, station)
    assert "device[0].transport.tls.key_file" in error_for(tmp_path, station + 'key_file = "nowhere.key"\n')


def test_a_command_sender_reads_only_the_tables_it_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`hotlab cmd` needs the site, devices, broker, senders, trail and accounts: not the InfluxDB token."""
    from hotlab.controller.config import load_command_client

    monkeypatch.delenv("HOTLAB_TEST_UNSET", raising=False)
    monkeypatch.setenv("TEST_SENDER_KEY", "ab" * 32)
    text = MINIMAL + (
        '[mqtt]\nhost = "broker.lab"\n'
        '[[command_sender]]\nname = "admin-tool"\nkey_env = "TEST_SENDER_KEY"\n'
        '[influx]\nurl = "http://h:8086"\ntoken_env = "HOTLAB_TEST_UNSET"\norg = "o"\nbucket = "b"\n'
        '[commands]\naudit_path = "trail/audit.jsonl"\n'
    )
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match="HOTLAB_TEST_UNSET"):
        load_config(path)
    client = load_command_client(path)
    assert client.site == "lab-a" and client.mqtt.host == "broker.lab"
    assert [(d.name, d.station) for d in client.devices] == [("cal-1", "hotcell-1")]
    assert [s.name for s in client.senders] == ["admin-tool"] and client.senders[0].key_bytes() == b"\xab" * 32
    assert client.audit_path == tmp_path / "trail" / "audit.jsonl"
    assert client.users.resolved_path(client.audit_path) == tmp_path / "trail" / "users.sqlite3"
    with pytest.raises(ConfigError, match=r"lab.toml: mqtt: is required: commands travel over MQTT"):
        load_command_client(write(tmp_path, MINIMAL))

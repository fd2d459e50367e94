"""The controller's TOML configuration, validated up front with errors a lab technician can act on.

A bad config must stop `hotlab run` before any device is touched, and the error must say
which file, which key, what is wrong and what would be accepted. Every table is read through
`hotlab.controller.config_table.ConfigTable`, whose `ConfigError` carries exactly that as its
message and which refuses unknown keys with a "did you mean" hint (a typo such as
`pol_interval_s` must not silently fall back to a default).

Secrets (MQTT passwords, InfluxDB token/password, command sender keys) are only ever read from
an environment variable or a file named in the config, never from the TOML itself, and are held
in `Secret`, whose repr and str are masked so a logged or printed config never leaks them.
Relative paths (outbox, TLS files, secret files) are resolved against the config file's
directory, so a config works the same from any working directory.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from hotlab.controller.command_signing import sender_key
from hotlab.controller.config_file import read_config_file
from hotlab.controller.config_table import ConfigError, ConfigTable
from hotlab.controller.device_clock import DEFAULT_MAX_CLOCK_OFFSET_S
from hotlab.controller.event_loop import DEFAULT_EVENT_LOOP, EVENT_LOOPS
from hotlab.controller.measurements import MeasurementSettings
from hotlab.controller.plausibility import Plausibility
from hotlab.drivers.calibrator import CALIBRATOR_DRIVERS
from hotlab.drivers.elution_station import ElutionStationDriver
from hotlab.drivers.modbus_links import MODBUS_TLS_PORT, ModbusRtuLink, ModbusTcpLink, ModbusTlsLink

#: The calibrator families a config may name: exactly those the driver registry can build.
CALIBRATOR_FAMILIES: tuple[str, ...] = tuple(CALIBRATOR_DRIVERS)
STATION_FAMILIES: tuple[str, ...] = ("elution_station",)
WORD_ORDERS: tuple[str, ...] = ("ABCD", "CDAB", "BADC", "DCBA")
SERIAL_URL_SCHEMES: tuple[str, ...] = ("socket", "rfc2217")

# MQTT topic levels must not contain the separators or wildcards (MQTT 3.1.1 §4.7); keep names
# to a conservative set that is also a valid InfluxDB tag value without escaping.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
NAME_RULE = "1-64 characters: letters, digits, '_', '-', '.', starting with a letter or digit"

#: Operator roles, least privileged first: a role may do everything a role before it may.
ROLES: tuple[str, ...] = ("operator", "qc_officer", "admin")
#: A command runs only within this many seconds of its `issued_at` (controller/commands.py).
DEFAULT_COMMAND_MAX_AGE_S = 30.0
#: MQTT control commands (controller/commands.py) and the least role each needs unless [commands.min_role] says otherwise.
DEFAULT_MIN_ROLE: dict[str, str] = {
    "start_elution": "operator",
    "abort": "operator",
    "acknowledge_fault": "operator",
    "select_nuclide": "operator",
    "label_measurement": "operator",
    # label_measurement is one action, but what a label asks for is not one privilege: an accuracy
    # verdict (reference_source) is a QC record, a dosage (prescribed_activity) a clinical one.
    "label_accuracy": "qc_officer",
    "label_dosage": "operator",
    # start_qc opens a QC procedure (controller/qc/procedures.py); a constancy baseline is a QC officer's record.
    "start_qc": "operator",
    "qc_baseline": "qc_officer",
}
#: A command token shorter than this is guessable by brute force over MQTT; refuse it at load time.
MIN_TOKEN_CHARS = 16
#: Where the move from tokens in command payloads to signed commands is explained.
TOKEN_MIGRATION_DOC = "docs/mqtt.md#migrating-from-tokens"


class Secret:
    """A credential whose value is only available through `reveal()`; repr and str are masked."""

    __slots__ = ("_value", "origin")

    def __init__(self, value: str, origin: str) -> None:
        self._value = value
        self.origin = origin

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret(<hidden>, from {self.origin})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class SerialTransport:
    """A serial line by pyserial URL: /dev/ttyUSB0, COM3, socket://host:port, rfc2217://host:port."""

    url: str
    kind: Literal["serial"] = "serial"


#: A station's transport is the driver's own link description, built here once validated, so the two
#: cannot drift apart; the Transport names stay for the code that reads a config.
ModbusTcpTransport = ModbusTcpLink
ModbusRtuTransport = ModbusRtuLink
ModbusTlsTransport = ModbusTlsLink

Transport = SerialTransport | ModbusTcpTransport | ModbusTlsTransport | ModbusRtuTransport


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    name: str
    station: str
    family: str
    transport: Transport
    poll_interval_s: float = 2.0
    timeout_s: float = 2.0
    nuclide: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    #: A calibrator's plausibility check and measurement detection (`[device.plausibility]`,
    #: `[device.measurement]`); None for a station, and for a calibrator built in code: its family's
    #: defaults then apply (`plausibility_settings`, `measurement_settings`).
    plausibility: Plausibility | None = None
    measurement: MeasurementSettings | None = None

    @property
    def is_station(self) -> bool:
        return self.family in STATION_FAMILIES

    def plausibility_settings(self) -> Plausibility:
        """A calibrator's plausibility settings: as configured, else its family's defaults."""
        return self.plausibility or Plausibility.for_family(self.family)

    def measurement_settings(self) -> MeasurementSettings:
        return self.measurement or MeasurementSettings()


@dataclass(frozen=True, slots=True)
class TlsConfig:
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure_skip_hostname_check: bool = False


@dataclass(frozen=True, slots=True)
class MqttConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = "hotlab-controller"
    keepalive_s: int = 30
    username: str | None = None
    password: Secret | None = None
    tls: TlsConfig | None = None
    inflight_window: int = 128
    connect_timeout_s: float = 10.0


#: The InfluxDB 1.x retention policy the raw readings go to (docs/influxdb.md, "Retention and downsampling");
#: the dashboards read `"raw"."reading"`, so the name is fixed.
INFLUX_RAW_POLICY = "raw"
#: How many days InfluxDB 1.x keeps raw readings unless [influx] raw_days says otherwise.
DEFAULT_INFLUX_RAW_DAYS = 30


@dataclass(frozen=True, slots=True)
class InfluxTarget:
    """Where the InfluxDB sink writes, as [influx] and the sink's own table both name it.

    A 1.x `database` is written natively (/write with db, rp); raw readings go to the INFLUX_RAW_POLICY
    policy (kept `raw_days`), everything else to `retention_policy` (None: the database's default). A
    2.x/3.x `bucket` of `org` is written through /api/v2/write; raw readings go to `raw_bucket` if set.
    For a 1.x database, `bucket`/`org` are the names the v2 compatibility API of 1.8+ gives the same
    target ("db/rp", "-"), for tools that speak that API.
    """

    bucket: str
    org: str
    database: str | None = None
    retention_policy: str | None = None
    raw_bucket: str | None = None
    raw_days: int = DEFAULT_INFLUX_RAW_DAYS
    #: 1.x: create the database, the raw policy and the continuous queries at start (if the user may).
    provision: bool = True


@dataclass(frozen=True, slots=True)
class InfluxSection:
    """[influx] as parsed here; the InfluxDB sink maps it onto its own client settings.

    InfluxDB 2.x/3.x: url + token + org + bucket (+ raw_bucket). InfluxDB 1.x: url + username/password
    (or a token, 1.8+) + database (+ retention_policy, raw_days, provision).
    """

    url: str
    target: InfluxTarget
    token: Secret | None = None
    username: str | None = None
    password: Secret | None = None
    batch_size: int = 1000
    flush_interval_s: float = 1.0
    timeout_s: float = 10.0

    @property
    def bucket(self) -> str:
        return self.target.bucket

    @property
    def org(self) -> str:
        return self.target.org

    def auth_token(self) -> str:
        """The v2 API's token: the token, or "user:password" (what InfluxDB 1.8+ accepts as one)."""
        if self.token is not None:
            return self.token.reveal()
        password = self.password.reveal() if self.password is not None else ""
        return f"{self.username}:{password}"


@dataclass(frozen=True, slots=True)
class OutboxConfig:
    path: Path
    max_bytes: int = 256 * 1024 * 1024
    warn_fraction: float = 0.8


DEFAULT_RAW_DAYS = 30.0
DEFAULT_RETENTION_INTERVAL_S = 3600.0


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    """[history] retention: raw readings are kept this long, then only their per-minute summaries.

    Why: at 1 Hz raw polls of an empty chamber fill ~250 GB a year; the records a lab must keep
    (10 CFR 35.2063/35.2204: three years) are everything else, which is never thinned.
    """

    #: Days of raw readings kept in the archive; older readings become per-minute summaries.
    raw_days: float = DEFAULT_RAW_DAYS
    #: How often the controller looks for readings past the window.
    interval_s: float = DEFAULT_RETENTION_INTERVAL_S


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    #: On SIGTERM/SIGINT, how long to keep sending the backlog before leaving the rest on disk.
    drain_timeout_s: float = 10.0
    #: How often each device's status (up, latency, errors) is re-published while nothing changes.
    status_interval_s: float = 60.0
    #: Reconnect backoff bounds for devices and the broker (exponential with full jitter).
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    #: Where drivers keep small state (e.g. the last elution counter seen per station).
    state_dir: Path = Path("var")
    #: "uvloop" (faster, the default) or "asyncio" (the standard loop); controller/event_loop.py.
    event_loop: str = DEFAULT_EVENT_LOOP
    #: A device clock further than this from the controller's raises a clock alarm (controller/device_clock.py).
    max_clock_offset_s: float = DEFAULT_MAX_CLOCK_OFFSET_S


@dataclass(frozen=True, slots=True)
class OperatorConfig:
    """[[operator]]: a person whose token in a command's payload proves it is them.

    Only while a lab moves to signed commands (`[commands] accept_token_commands = true`,
    docs/mqtt.md#migrating-from-tokens): every subscriber to `hotlab/#` can read that token.
    """

    name: str
    role: str
    token: Secret


@dataclass(frozen=True, slots=True)
class CommandSenderConfig:
    """[[command_sender]]: a program that sends commands for people (the web panel, `hotlab cmd`), and the
    key it signs them with, shared with the controller alone (controller/command_signing.py)."""

    name: str
    #: Hex text of at least MIN_KEY_BYTES bytes, checked at load.
    key: Secret

    def key_bytes(self) -> bytes:
        return bytes.fromhex(self.key.reveal())


@dataclass(frozen=True, slots=True)
class WebConfig:
    """[web]: how the web panel acts on the lab (controller/web/)."""

    #: The [[command_sender]] the panel signs commands as; None: the panel shows, never acts.
    sender: str | None = None
    #: The panel's own broker identity (the ACL lets it publish commands); default: [mqtt]'s.
    mqtt_username: str | None = None
    mqtt_password: Secret | None = None

    def broker(self, mqtt: MqttConfig) -> MqttConfig:
        """The lab's broker as the panel uses it, for reading and acting alike: under the panel's own
        identity when [web] gives one (examples/mosquitto.acl), else [mqtt]'s."""
        if self.mqtt_username is None:
            return mqtt
        return replace(mqtt, username=self.mqtt_username, password=self.mqtt_password)


@dataclass(frozen=True, slots=True)
class CommandsConfig:
    """[commands]: where command attempts are audited and which role each command needs."""

    #: The hash-chained audit trail; None means `<state_dir>/audit.jsonl`.
    audit_path: Path | None = None
    min_role: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_MIN_ROLE))
    #: How far a command's `issued_at` may lie from the controller's clock, either way, for it to run.
    max_age_s: float = DEFAULT_COMMAND_MAX_AGE_S
    #: During a migration only: also run `hotlab.command/1` commands that carry an [[operator]]'s token.
    accept_token_commands: bool = False

    def resolved_audit_path(self, state_dir: Path) -> Path:
        return self.audit_path if self.audit_path is not None else state_dir / "audit.jsonl"


#: NIST SP 800-63B-4 §3.1.1.2: a password that is the only secret of an authentication needs at
#: least 15 characters, one used beside another factor at least 8; signing is username + password.
DEFAULT_MIN_PASSWORD_CHARS = 15
MIN_PASSWORD_CHARS_FLOOR = 8
#: Consecutive failed password checks that lock an account (SP 800-63B-4 §3.2.2 allows at most 100).
DEFAULT_MAX_FAILED_PASSWORDS = 5
#: How long a lock lasts. No regulation fixes it (21 CFR 11.300(d) asks for safeguards, not a
#: number); 15 minutes is a common choice that slows guessing to a few tries an hour.
DEFAULT_LOCKOUT_MIN = 15


@dataclass(frozen=True, slots=True)
class UsersConfig:
    """[users]: the account store of the people who sign records (controller/users.py)."""

    #: The SQLite store; None means `users.sqlite3` beside the audit trail that records its changes.
    path: Path | None = None
    min_password_chars: int = DEFAULT_MIN_PASSWORD_CHARS
    max_failed_passwords: int = DEFAULT_MAX_FAILED_PASSWORDS
    lockout_min: int = DEFAULT_LOCKOUT_MIN

    def resolved_path(self, audit_path: Path) -> Path:
        return self.path if self.path is not None else audit_path.parent / "users.sqlite3"


@dataclass(frozen=True, slots=True)
class LabConfig:
    site: str
    devices: tuple[DeviceConfig, ...]
    outbox: OutboxConfig
    service: ServiceConfig
    mqtt: MqttConfig | None = None
    influx: InfluxSection | None = None
    #: The local permanent archive (controller/history.py) for QC officers; None when disabled.
    history_path: Path | None = None
    #: When raw readings in the archive give way to per-minute summaries ([history] raw_days).
    history_retention: RetentionConfig = field(default_factory=RetentionConfig)
    #: The [qc] table as written (validated at load by hotlab.controller.qc.engine.QcConfig; see docs/qc.md).
    qc: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None
    #: [[operator]] entries: token commands, accepted only with `[commands] accept_token_commands = true`.
    operators: tuple[OperatorConfig, ...] = ()
    commands: CommandsConfig = field(default_factory=CommandsConfig)
    users: UsersConfig = field(default_factory=UsersConfig)
    #: [[command_sender]] entries; without any, every control command is refused (and audited).
    senders: tuple[CommandSenderConfig, ...] = ()
    web: WebConfig = field(default_factory=WebConfig)

    def command_sender(self, name: str) -> CommandSenderConfig | None:
        return next((sender for sender in self.senders if sender.name == name), None)


def load_secret(*, env: str | None = None, file: Path | None = None) -> Secret:
    """The value of environment variable `env`, or the contents of `file` without its final newline.

    The one way a secret enters hotlab, for the config's `*_env`/`*_file` keys and for command
    options alike: never as an inline value, which would sit in a TOML file or in the process
    arguments (visible in `ps`, /proc/<pid>/cmdline and shell history). `ConfigError` says what is wrong.
    """
    if (env is None) == (file is None):
        raise ConfigError("give exactly one of an environment variable name or a file")
    if env is not None:
        value = os.environ.get(env)
        if value is None:
            raise ConfigError(f"environment variable {env!r} is not set")
        return Secret(value, f"${env}")
    assert file is not None
    try:
        text = file.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"cannot read {str(file)!r}: {reason}") from None
    if not text:
        raise ConfigError(f"file {str(file)!r} is empty")
    return Secret(text, str(file))


def _secret(table: ConfigTable, stem: str, *, required: bool = False) -> Secret | None:
    """`<stem>_env` (environment variable name) or `<stem>_file` (path); the value never sits in the TOML."""
    if stem in table.data:
        raise table.error(
            stem,
            f"secrets are not accepted inline; set {stem}_env (an environment variable "
            f"name) or {stem}_file (a file holding only the secret)",
        )
    env_name = table.string(f"{stem}_env")
    file_path = table.path_value(f"{stem}_file")
    if env_name is not None and file_path is not None:
        raise table.error(f"{stem}_env", f"give either {stem}_env or {stem}_file, not both")
    if env_name is not None or file_path is not None:
        try:
            return load_secret(env=env_name, file=file_path)
        except ConfigError as exc:
            raise table.error(f"{stem}_env" if env_name is not None else f"{stem}_file", str(exc)) from None
    if required:
        raise table.error(None, f"needs {stem}_env or {stem}_file")
    return None


def load_config(path: str | Path) -> LabConfig:
    """Read and validate a lab config file; raise ConfigError with a precise message on any problem."""
    root = read_config_file(path)
    return parse_config(root.data, file=str(root.file), base_dir=root.base_dir, source=Path(path))


def load_audit_path(path: str | Path) -> Path:
    """Where the service configured in `path` writes its audit trail (`[commands] audit_path`, else
    `<state_dir>/audit.jsonl`).

    Only [service] and [commands] are read, with the same rules as `load_config`: whoever verifies
    the trail (a QA officer, a cron job) needs no MQTT, InfluxDB or operator secrets for it.
    """
    root = read_config_file(path)
    service = _parse_service(root.table("service"), root)
    return _parse_commands(root.table("commands")).resolved_audit_path(service.state_dir)


def load_users_config(path: str | Path) -> UsersConfig:
    """The [users] table of the lab configured in `path`, read like `load_audit_path`: only [users],
    so managing accounts needs none of the lab's other settings or secrets."""
    return _parse_users(read_config_file(path).table("users"))


def load_history_path(path: str | Path) -> Path | None:
    """The history archive the service configured in `path` keeps (None if disabled), read like
    `load_audit_path`: only [history], so a reader of the archive needs none of the lab's secrets."""
    root = read_config_file(path)
    return _parse_history(root.table("history"), root)[0]


def load_mqtt_config(path: str | Path) -> MqttConfig | None:
    """The broker the service configured in `path` reaches (None without [mqtt]), read like
    `load_audit_path`: only [mqtt], with the same rules as `load_config`."""
    root = read_config_file(path)
    table = root.table("mqtt")
    return _parse_mqtt(table) if table is not None else None


@dataclass(frozen=True, slots=True)
class CommandClientConfig:
    """What a program that sends commands (`hotlab cmd`) needs of a lab config."""

    site: str
    devices: tuple[DeviceConfig, ...]
    mqtt: MqttConfig
    senders: tuple[CommandSenderConfig, ...]
    #: The trail that records a password check, and the accounts it checks against.
    audit_path: Path
    users: UsersConfig


def load_command_client(path: str | Path) -> CommandClientConfig:
    """The site, devices, broker, senders, audit trail and accounts of the lab configured in `path`, read like
    `load_audit_path`: only those tables, so a script that sends commands needs none of the lab's other secrets."""
    root = read_config_file(path)
    site = _parse_site(root)
    devices = _parse_devices(root)
    mqtt_table = root.table("mqtt")
    if mqtt_table is None:
        raise root.error("mqtt", "is required: commands travel over MQTT")
    mqtt = _parse_mqtt(mqtt_table)
    service = _parse_service(root.table("service"), root)
    commands = _parse_commands(root.table("commands"))
    return CommandClientConfig(
        site=site,
        devices=devices,
        mqtt=mqtt,
        senders=_parse_senders(root),
        audit_path=commands.resolved_audit_path(service.state_dir),
        users=_parse_users(root.table("users")),
    )


def parse_config(
    data: Mapping[str, Any], *, file: str = "<config>", base_dir: Path | None = None, source: Path | None = None
) -> LabConfig:
    """Validate an already-parsed TOML document (useful for configs built in code, e.g. the simulated lab)."""
    root = ConfigTable(data, file=file, base_dir=base_dir)
    site = _parse_site(root)
    devices = _parse_devices(root)
    outbox = _parse_outbox(root.table("outbox"), root)
    service = _parse_service(root.table("service"), root)
    mqtt_table = root.table("mqtt")
    mqtt = _parse_mqtt(mqtt_table) if mqtt_table is not None else None
    influx_table = root.table("influx")
    influx = _parse_influx(influx_table) if influx_table is not None else None
    history_path, history_retention = _parse_history(root.table("history"), root)
    qc_table = root.table("qc")
    qc = _parse_qc(qc_table) if qc_table is not None else {}
    commands = _parse_commands(root.table("commands"))
    operators = _parse_operators(root, commands)
    users = _parse_users(root.table("users"))
    senders = _parse_senders(root)
    web = _parse_web(root.table("web"), mqtt, senders)
    root.finish()
    return LabConfig(
        site=site,
        devices=devices,
        outbox=outbox,
        service=service,
        mqtt=mqtt,
        influx=influx,
        history_path=history_path,
        history_retention=history_retention,
        qc=qc,
        source=source,
        operators=operators,
        commands=commands,
        users=users,
        senders=senders,
        web=web,
    )


def _parse_site(root: ConfigTable) -> str:
    table = root.table("site", required=True)
    assert table is not None
    site = table.string("name", required=True, pattern=NAME_PATTERN, rule=NAME_RULE)
    table.finish()
    return site


def _parse_operators(root: ConfigTable, commands: CommandsConfig) -> tuple[OperatorConfig, ...]:
    """[[operator]] tokens, for a migration only: without `accept_token_commands` they are an error, not ignored,
    so a lab that still relies on them learns why its consoles stopped working before anyone uses them."""
    operators: list[OperatorConfig] = []
    for table in root.tables("operator"):
        if not commands.accept_token_commands:
            raise table.error(
                None,
                "tokens in command payloads are no longer accepted (every subscriber can read them): give each "
                "sender a [[command_sender]] key and sign commands, see "
                f"{TOKEN_MIGRATION_DOC} (or set [commands] accept_token_commands = true for the transition)",
            )
        name = table.string("name", required=True, pattern=NAME_PATTERN, rule=NAME_RULE)
        role = table.string("role", required=True, choices=ROLES)
        token = _secret(table, "token", required=True)
        table.finish()
        assert token is not None
        if len(token.reveal()) < MIN_TOKEN_CHARS:
            raise table.error(
                "token_env" if token.origin.startswith("$") else "token_file",
                f"the token from {token.origin} has {len(token.reveal())} characters; at least "
                f"{MIN_TOKEN_CHARS} are needed (e.g. `openssl rand -hex 32`)",
            )
        for other in operators:
            if other.name == name:
                raise table.error("name", f"duplicate operator {name!r}; every operator needs one entry")
            if other.token == token:
                # Two people sharing a token could not be told apart in the audit trail.
                raise table.error(
                    None,
                    f"operator {name!r} has the same token as {other.name!r}; every operator needs their own token",
                )
        operators.append(OperatorConfig(name=name, role=role, token=token))
    return tuple(operators)


def _parse_commands(table: ConfigTable | None) -> CommandsConfig:
    if table is None:
        return CommandsConfig()
    audit_path = table.path_value("audit_path")
    min_role = dict(DEFAULT_MIN_ROLE)
    roles_table = table.table("min_role")
    if roles_table is not None:
        for action in DEFAULT_MIN_ROLE:
            role = roles_table.string(action, choices=ROLES)
            if role is not None:
                min_role[action] = role
        roles_table.finish()
    max_age_s = table.number("max_age_s", DEFAULT_COMMAND_MAX_AGE_S, minimum=1.0, maximum=3600.0)
    accept_tokens = table.boolean("accept_token_commands", False)
    table.finish()
    return CommandsConfig(
        audit_path=audit_path, min_role=min_role, max_age_s=max_age_s, accept_token_commands=accept_tokens
    )


def _parse_senders(root: ConfigTable) -> tuple[CommandSenderConfig, ...]:
    """[[command_sender]]: a name and a key of its own, so the audit trail can tell which sender vouched."""
    senders: list[CommandSenderConfig] = []
    keys: dict[bytes, str] = {}
    for table in root.tables("command_sender"):
        name = table.string("name", required=True, pattern=NAME_PATTERN, rule=NAME_RULE)
        key = _secret(table, "key", required=True)
        table.finish()
        assert key is not None
        key_name = "key_env" if key.origin.startswith("$") else "key_file"
        try:
            key_bytes = sender_key(key.reveal())
        except ValueError as exc:
            raise table.error(key_name, f"the key from {key.origin} {exc}") from None
        if any(sender.name == name for sender in senders):
            raise table.error("name", f"duplicate command sender {name!r}; every sender needs one entry")
        if key_bytes in keys:
            raise table.error(
                key_name,
                f"the key from {key.origin} is also the key of sender {keys[key_bytes]!r}; every sender needs its "
                "own key, or the audit trail could not tell them apart",
            )
        keys[key_bytes] = name
        senders.append(CommandSenderConfig(name=name, key=key))
    return tuple(senders)


def _parse_web(
    table: ConfigTable | None, mqtt: MqttConfig | None, senders: tuple[CommandSenderConfig, ...]
) -> WebConfig:
    """[web]: the sender the panel signs as (one of [[command_sender]]) and its broker identity ([mqtt]'s by default)."""
    default = WebConfig(
        mqtt_username=mqtt.username if mqtt is not None else None,
        mqtt_password=mqtt.password if mqtt is not None else None,
    )
    if table is None:
        return default
    sender = table.string("sender", pattern=NAME_PATTERN, rule=NAME_RULE)
    if sender is not None and not any(s.name == sender for s in senders):
        configured = ", ".join(s.name for s in senders) or "none"
        raise table.error("sender", f"no [[command_sender]] is named {sender!r}; configured: {configured}")
    username = table.string("mqtt_username")
    password = _secret(table, "mqtt_password")
    table.finish()
    if password is not None and username is None:
        raise table.error("mqtt_username", "is required when mqtt_password_env or mqtt_password_file is given")
    if username is None:
        return replace(default, sender=sender)
    return WebConfig(sender=sender, mqtt_username=username, mqtt_password=password)


def _parse_users(table: ConfigTable | None) -> UsersConfig:
    if table is None:
        return UsersConfig()
    path = table.path_value("path")
    min_chars = table.integer(
        "min_password_chars", DEFAULT_MIN_PASSWORD_CHARS, minimum=MIN_PASSWORD_CHARS_FLOOR, maximum=64
    )
    max_failed = table.integer("max_failed_passwords", DEFAULT_MAX_FAILED_PASSWORDS, minimum=1, maximum=100)
    lockout_min = table.integer("lockout_min", DEFAULT_LOCKOUT_MIN, minimum=1, maximum=1440)
    table.finish()
    return UsersConfig(
        path=path, min_password_chars=min_chars, max_failed_passwords=max_failed, lockout_min=lockout_min
    )


def _parse_devices(root: ConfigTable) -> tuple[DeviceConfig, ...]:
    devices: list[DeviceConfig] = []
    names: set[str] = set()
    for table in root.tables("device"):
        device = _parse_device(table)
        if device.name in names:
            raise table.error("name", f"duplicate device name {device.name!r}; every device needs its own name")
        names.add(device.name)
        devices.append(device)
    return tuple(devices)


def _parse_device(table: ConfigTable) -> DeviceConfig:
    families = CALIBRATOR_FAMILIES + STATION_FAMILIES
    name = table.string("name", required=True, pattern=NAME_PATTERN, rule=NAME_RULE)
    station = table.string("station", required=True, pattern=NAME_PATTERN, rule=NAME_RULE)
    family = table.string("family", required=True, choices=families)
    transport = _parse_transport(table, family)
    poll = table.number("poll_interval_s", 1.0 if family in STATION_FAMILIES else 2.0, minimum=0.0)
    timeout = table.number("timeout_s", 2.0, minimum=0.0, exclusive_minimum=True, maximum=300.0)
    nuclide = table.string("nuclide")
    if nuclide is not None:
        nuclide = _canonical_nuclide(table, nuclide)
    options_table = table.table("options")
    options = dict(options_table.data) if options_table is not None else {}
    if options_table is not None:
        _check_driver_options(options_table, family)
    plausibility, measurement = _parse_calibrator_tables(table, family)
    table.finish()
    return DeviceConfig(
        name=name,
        station=station,
        family=family,
        transport=transport,
        poll_interval_s=poll,
        timeout_s=timeout,
        nuclide=nuclide,
        options=options,
        plausibility=plausibility,
        measurement=measurement,
    )


def _parse_calibrator_tables(
    device: ConfigTable, family: str
) -> tuple[Plausibility | None, MeasurementSettings | None]:
    """`[device.plausibility]` and `[device.measurement]` of a calibrator, defaults filled in (docs/calibrator-protocols.md)."""
    if family in STATION_FAMILIES:
        for name in ("plausibility", "measurement"):
            if name in device.data:
                raise device.error(name, "only dose calibrators have readings to check and measure")
        return None, None
    plausibility = Plausibility.for_family(family)
    table = device.table("plausibility")
    if table is not None:
        plausibility = _parse_plausibility(table, plausibility)
    measurement = MeasurementSettings()
    table = device.table("measurement")
    if table is not None:
        measurement = MeasurementSettings(
            settle_readings=table.integer("settle_readings", measurement.settle_readings, minimum=2, maximum=1000),
            dwell_s=table.number("dwell_s", measurement.dwell_s, minimum=0.0, maximum=86_400.0, exclusive_minimum=True),
        )
        table.finish()
    return plausibility, measurement


def _parse_plausibility(table: ConfigTable, default: Plausibility) -> Plausibility:
    min_bq = table.number("min_bq", default.min_bq)
    max_bq = table.number("max_bq", default.max_bq)
    if not max_bq > min_bq:
        raise table.error("max_bq", f"must be above min_bq ({min_bq:g}), got {max_bq:g}")
    configured = "min_bq" in table.data or "max_bq" in table.data
    plausibility = Plausibility(
        min_bq=min_bq,
        max_bq=max_bq,
        range_source="site configuration" if configured else default.range_source,
        noise_rel=table.number("noise_rel", default.noise_rel, minimum=0.0, maximum=1.0),
        noise_floor_bq=table.number("noise_floor_bq", default.noise_floor_bq, minimum=0.0),
        background_bq=table.number("background_bq", default.background_bq, minimum=0.0),
        alarm_window=table.integer("alarm_window", default.alarm_window, minimum=1, maximum=100_000),
        alarm_fraction=table.number(
            "alarm_fraction", default.alarm_fraction, minimum=0.0, maximum=1.0, exclusive_minimum=True
        ),
    )
    table.finish()
    return plausibility


#: Constructor arguments the controller itself sets; [device.options] may not override them.
_RESERVED_DRIVER_ARGS = frozenset(
    {"self", "url", "device", "timeout_s", "station", "link", "counter_store", "last_counter_path"}
)


def _check_driver_options(options: ConfigTable, family: str) -> None:
    """Options go to the driver's constructor unchanged: reject names it does not take, now, with the list."""
    driver: type = CALIBRATOR_DRIVERS.get(family, ElutionStationDriver)  # the one station family
    parameters = inspect.signature(driver).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    allowed = sorted(
        p.name
        for p in parameters
        if p.name not in _RESERVED_DRIVER_ARGS and p.kind is not inspect.Parameter.VAR_POSITIONAL
    )
    for name in options.data:
        if name not in allowed:
            raise options.error(name, f"not an option of the {family} driver; allowed: {', '.join(allowed) or 'none'}")


def _canonical_nuclide(table: ConfigTable, text: str) -> str:
    from hotlab.physics.nuclides import UnknownNuclideError, get_nuclide

    try:
        return get_nuclide(text).name
    except UnknownNuclideError as exc:
        raise table.error("nuclide", str(exc)) from None


def _parse_transport(device: ConfigTable, family: str) -> Transport:
    raw = device.value("transport", required=True)
    if family in CALIBRATOR_FAMILIES:
        if isinstance(raw, str):
            return SerialTransport(_serial_url(device, "transport", raw))
        if not isinstance(raw, Mapping):
            raise device.wrong_type("transport", "a serial URL string or a table { url = ... }")
        table = device.table("transport")
        assert table is not None
        url = table.string("url", required=True)
        table.finish()
        return SerialTransport(_serial_url(table, "url", url))
    if not isinstance(raw, Mapping):
        raise device.error(
            "transport",
            'an elution station needs a table: { modbus = "tcp", host = ..., port = ... }, '
            '{ modbus = "tls", host = ..., tls = { ca_file = ..., cert_file = ..., key_file = ... } } '
            'or { modbus = "rtu", url = ..., baudrate = ... }',
        )
    table = device.table("transport")
    assert table is not None
    mode = table.string("modbus", required=True, choices=("tcp", "tls", "rtu"))
    device_id = table.integer("device_id", 1, minimum=0, maximum=247)  # Modbus unit ids 1-247, 0 = broadcast
    word_order = table.string("word_order", "ABCD", choices=WORD_ORDERS)
    result: Transport
    if mode == "tcp":
        host = table.string("host", required=True)
        port = table.integer("port", 502, minimum=1, maximum=65535)
        result = ModbusTcpLink(host=host, port=port, device_id=device_id, word_order=word_order)
    elif mode == "tls":
        result = _modbus_tls_link(table, device_id, word_order)
    else:
        url = table.string("url", required=True)
        baudrate = table.integer("baudrate", 19200, minimum=300, maximum=921600)
        result = ModbusRtuLink(
            url=_serial_url(table, "url", url), baudrate=baudrate, device_id=device_id, word_order=word_order
        )
    table.finish()
    return result


def _modbus_tls_link(table: ConfigTable, device_id: int, word_order: str) -> ModbusTlsLink:
    """MODBUS/TCP Security: `host` must be the name in the station's certificate; all three files must exist."""
    host = table.string("host", required=True)
    port = table.integer("port", MODBUS_TLS_PORT, minimum=1, maximum=65535)
    tls = table.table("tls", required=True)
    assert tls is not None
    files = {name: tls.path_value(name, must_exist=True) for name in ("ca_file", "cert_file", "key_file")}
    missing = [name for name, path in files.items() if path is None]
    if missing:
        raise tls.error(
            missing[0], "is required but missing (the station's CA, and the controller's certificate and key)"
        )
    tls.finish()
    ca_file, cert_file, key_file = (path for path in files.values() if path is not None)
    return ModbusTlsLink(
        host=host,
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
        port=port,
        device_id=device_id,
        word_order=word_order,
    )


def _serial_url(table: ConfigTable, key: str, url: str) -> str:
    """Accept device paths and the network URL schemes pyserial supports for device servers."""
    if url.startswith("/") or re.fullmatch(r"COM\d+", url):
        return url
    scheme, sep, rest = url.partition("://")
    if sep and scheme in SERIAL_URL_SCHEMES:
        host, colon, port = rest.rpartition(":")
        port = port.split("?", 1)[0].rstrip("/")
        if colon and host and port.isdigit() and 0 < int(port) < 65536:
            return url
        raise table.error(key, f"{url!r} needs a host and port, e.g. {scheme}://192.168.1.20:4001")
    allowed = "a device path (/dev/ttyUSB0, COM3), socket://host:port or rfc2217://host:port"
    raise table.error(key, f"{url!r} is not a serial URL; allowed: {allowed}")


def _parse_outbox(table: ConfigTable | None, root: ConfigTable) -> OutboxConfig:
    if table is None:
        return OutboxConfig(path=root.resolve("var/outbox.sqlite3"))
    path = table.path_value("path", root.resolve("var/outbox.sqlite3"))
    assert path is not None
    max_bytes = table.integer("max_bytes", 256 * 1024 * 1024, minimum=64 * 1024)
    warn = table.number("warn_fraction", 0.8, minimum=0.0, maximum=1.0, exclusive_minimum=True)
    table.finish()
    return OutboxConfig(path=path, max_bytes=max_bytes, warn_fraction=warn)


def _parse_qc(table: ConfigTable) -> dict[str, Any]:
    """The QC engine owns the [qc] schema (controller/qc/engine.py) and reads it with the same table."""
    from hotlab.controller.qc.engine import QcConfig

    QcConfig.from_table(table)
    return dict(table.data)


def _parse_history(table: ConfigTable | None, root: ConfigTable) -> tuple[Path | None, RetentionConfig]:
    default = root.resolve("var/history.sqlite3")
    if table is None:
        return default, RetentionConfig()
    enabled = table.boolean("enabled", True)
    path = table.path_value("path", default)
    retention = RetentionConfig(
        raw_days=table.number("raw_days", DEFAULT_RAW_DAYS, minimum=1.0, maximum=36_500.0),
        interval_s=table.number("retention_interval_s", DEFAULT_RETENTION_INTERVAL_S, minimum=1.0, maximum=86_400.0),
    )
    table.finish()
    return (path if enabled else None), retention


def _parse_service(table: ConfigTable | None, root: ConfigTable) -> ServiceConfig:
    if table is None:
        return ServiceConfig(state_dir=root.resolve("var"))
    drain = table.number("drain_timeout_s", 10.0, minimum=0.0, maximum=3600.0)
    status = table.number("status_interval_s", 60.0, minimum=1.0)
    initial = table.number("backoff_initial_s", 0.5, minimum=0.0, exclusive_minimum=True)
    maximum = table.number("backoff_max_s", 30.0, minimum=initial)
    state_dir = table.path_value("state_dir", root.resolve("var"))
    assert state_dir is not None
    event_loop = table.string("event_loop", DEFAULT_EVENT_LOOP, choices=EVENT_LOOPS)
    max_clock_offset = table.number(
        "max_clock_offset_s", DEFAULT_MAX_CLOCK_OFFSET_S, minimum=0.0, exclusive_minimum=True
    )
    table.finish()
    return ServiceConfig(
        drain_timeout_s=drain,
        status_interval_s=status,
        backoff_initial_s=initial,
        backoff_max_s=maximum,
        state_dir=state_dir,
        event_loop=event_loop,
        max_clock_offset_s=max_clock_offset,
    )


def _parse_mqtt(table: ConfigTable) -> MqttConfig:
    host = table.string("host", "127.0.0.1")
    port = table.integer("port", 1883, minimum=1, maximum=65535)
    client_id = table.string(
        "client_id",
        "hotlab-controller",
        pattern=re.compile(r"^[A-Za-z0-9_.:-]{1,64}$"),
        rule="1-64 characters: letters, digits, '_', '.', ':', '-'",
    )
    # Mosquitto and MQTT 3.1.1 §3.1.2.10: keepalive is a 16-bit number of seconds; 0 would disable the Last Will timing.
    keepalive = table.integer("keepalive_s", 30, minimum=5, maximum=65535)
    username = table.string("username")
    password = _secret(table, "password")
    if password is not None and username is None:
        raise table.error("username", "is required when a password is configured")
    window = table.integer("inflight_window", 128, minimum=1, maximum=1000)
    connect_timeout = table.number("connect_timeout_s", 10.0, minimum=0.0, exclusive_minimum=True)
    tls_table = table.table("tls")
    tls = _parse_tls(tls_table) if tls_table is not None else None
    table.finish()
    return MqttConfig(
        host=host,
        port=port,
        client_id=client_id,
        keepalive_s=keepalive,
        username=username,
        password=password,
        tls=tls,
        inflight_window=window,
        connect_timeout_s=connect_timeout,
    )


def _parse_tls(table: ConfigTable) -> TlsConfig:
    ca = table.path_value("ca_file", must_exist=True)
    cert = table.path_value("cert_file", must_exist=True)
    key = table.path_value("key_file", must_exist=True)
    if (cert is None) != (key is None):
        raise table.error(
            "cert_file" if cert is None else "key_file", "a client certificate needs both cert_file and key_file"
        )
    insecure = table.boolean("insecure_skip_hostname_check", False)
    table.finish()
    return TlsConfig(ca_file=ca, cert_file=cert, key_file=key, insecure_skip_hostname_check=insecure)


def _parse_influx(table: ConfigTable) -> InfluxSection:
    url = read_influx_url(table)
    token = _secret(table, "token")
    username = table.string("username")
    password = _secret(table, "password")
    if username is None and password is not None:
        raise table.error("username", "is required when a password is configured")
    target = read_influx_target(table, token=token is not None, username=username)
    batch, flush, timeout = read_influx_batching(table)
    table.finish()
    return InfluxSection(
        url=url,
        target=target,
        token=token,
        username=username,
        password=password,
        batch_size=batch,
        flush_interval_s=flush,
        timeout_s=timeout,
    )


def read_influx_target(table: ConfigTable, *, token: bool, username: str | None) -> InfluxTarget:
    """The target of an InfluxDB table and its credentials' form: a 2.x/3.x bucket or a 1.x database.

    Shared with `InfluxConfig.from_mapping` (controller/sinks/influx.py), like `read_influx_url`;
    `token` says whether a token was given, `username` is the 1.x user (the secrets are read by the caller).
    """
    if token and username is not None:
        raise table.error(
            "token_env",
            "give either a token (InfluxDB 2.x/3.x, or 1.8+) or username + password (InfluxDB 1.x), not both",
        )
    if not token and username is None:
        raise table.error(
            None,
            "needs token_env/token_file (InfluxDB 2.x/3.x) or username with password_env/password_file (InfluxDB 1.x)",
        )
    bucket = table.string("bucket")
    database = table.string("database")
    if bucket is not None and database is not None:
        raise table.error("database", "give either bucket (2.x/3.x) or database (1.x), not both")
    if bucket is None and database is None:
        raise table.error(None, "needs bucket (InfluxDB 2.x/3.x) or database (InfluxDB 1.x)")
    if database is None:
        for key in ("retention_policy", "raw_days", "provision"):
            if key in table.data:
                raise table.error(key, "belongs to a 1.x database; a 2.x/3.x bucket has its retention set in InfluxDB")
        org = table.string("org")
        if org is None:
            raise table.error("org", "is required with a bucket (InfluxDB 2.x/3.x)")
        return InfluxTarget(bucket=str(bucket), org=org, raw_bucket=table.string("raw_bucket"))
    for key in ("org", "raw_bucket"):
        if key in table.data:
            raise table.error(key, "belongs to a 2.x/3.x bucket; a 1.x database has retention policies instead")
    retention = table.string("retention_policy")
    if retention == INFLUX_RAW_POLICY:
        raise table.error(
            "retention_policy", f"{INFLUX_RAW_POLICY!r} is the raw readings' policy; name the one for everything else"
        )
    return InfluxTarget(
        bucket=f"{database}/{retention}" if retention else database,
        org="-",
        database=database,
        retention_policy=retention,
        raw_days=table.integer("raw_days", DEFAULT_INFLUX_RAW_DAYS, minimum=1),
        provision=table.boolean("provision", True),
    )


def read_influx_url(table: ConfigTable) -> str:
    """The required `url` of an InfluxDB table: http:// or https:// and a host.

    Shared with `InfluxConfig.from_mapping` (controller/sinks/influx.py), so [influx] and the sink's
    own settings accept the same URLs and say so in the same words.
    """
    url = table.string("url", required=True)
    if not re.match(r"^https?://[^/\s]+", url):
        raise table.error(
            "url", f"{url!r} is not an http(s) URL; allowed: http:// or https:// and a host, e.g. http://127.0.0.1:8086"
        )
    return url


def read_influx_batching(table: ConfigTable) -> tuple[int, float, float]:
    """`batch_size`, `flush_interval_s` and `timeout_s` of an InfluxDB table, defaults filled in.

    Shared with `InfluxConfig.from_mapping` for the same reason as `read_influx_url`: a batch the
    lab config accepts must never be one the sink refuses at start-up.
    """
    batch = table.integer("batch_size", 1000, minimum=1, maximum=50_000)  # the bound docs/influxdb.md gives
    flush = table.number("flush_interval_s", 1.0, minimum=0.0, exclusive_minimum=True)
    timeout = table.number("timeout_s", 10.0, minimum=0.0, exclusive_minimum=True)
    return batch, flush, timeout

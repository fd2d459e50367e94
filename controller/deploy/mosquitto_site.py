"""A hardened Mosquitto for one site, bridged to a central broker (docs/deployment.md).

Why generated rather than copied from a page: the ACL, the bridge's topics and the central
broker's ACL for that bridge all follow from one table of topic kinds (`DATA_TOPICS`, the users in
`SITE_USERS`), so a new kind of message is added once and reaches the three together;
examples/mosquitto.acl is this table rendered for any site (`site_acl("+")`), and a test keeps
the two equal.

Every option written here is one of mosquitto.conf(5) of Mosquitto 2.0 (Debian 12 ships 2.0.11):
an unknown or misspelled option stops mosquitto at start, so tests/test_broker_config.py starts
mosquitto on every generated config, and tests/test_site_bridge.py cuts a generated bridge for
30 s under load and counts every message at the central broker.

Choices, each for a reason given where it is made:
* one TLS listener, passwords for every client, the ACL (docs/mqtt.md, Security);
* the bridge sends the site's data out at QoS 1 and takes nothing in: commands are acted on only
  through the site's own broker, its ACL and the signed command path (`_bridge_conf`);
* MQTT 3.1.1 on the bridge, not 5, because Mosquitto 2.0's MQTT 5 bridge keeps no session
  (`BRIDGE_PROTOCOL`);
* queue limits sized for an outage of hours (`SiteBroker.max_queued_messages`).
"""

from __future__ import annotations

import math
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from hotlab.controller.config import NAME_PATTERN, NAME_RULE
from hotlab.controller.lab.embedded_broker import write_file
from hotlab.errors import InputError

#: What a controller publishes, below `hotlab/<site>/` (docs/mqtt.md, Topics): everything the bridge
#: sends to the central broker and every reader may read. `qc/#` covers `qc` itself (MQTT 3.1.1 §4.7.1.2).
DATA_TOPICS: tuple[str, ...] = (
    "+/+/reading",
    "+/+/measurement",
    "+/+/label",
    "+/+/qc/#",
    "+/+/status",
    "+/+/alarm",
    "+/+/clock_alarm",
    "+/elution",
    "controller/#",
)
#: Commands and the controller's replies, below `hotlab/<site>/`: never bridged.
COMMANDS = "+/+/cmd/+"
REPLIES = "+/+/cmd/+/reply"
#: The controller's own status, all an admin's script needs besides the replies.
CONTROLLER_STATUS = "controller/status"


@dataclass(frozen=True, slots=True)
class BrokerUser:
    """One broker user of a site: who it is for, and what it may read and write below `hotlab/<site>/`."""

    name: str
    purpose: str
    rules: tuple[tuple[str, str], ...]  # (read | write, topic pattern below hotlab/<site>/)


#: The site broker's users, each with its own password (docs/mqtt.md, Security): only the panel and
#: the admins' tools write commands, the controller reads them and writes everything else, readers
#: read by kind and never `cmd/+`.
SITE_USERS: tuple[BrokerUser, ...] = (
    BrokerUser(
        "hotlab-controller",
        "The controller (`hotlab run`, [mqtt] username).",
        (("read", COMMANDS), ("write", REPLIES), *(("write", topic) for topic in DATA_TOPICS)),
    ),
    BrokerUser(
        "hotlab-panel",
        "The web panel (`hotlab web`, [web] mqtt_username): sends commands, reads what it shows.",
        (("write", COMMANDS), ("read", REPLIES), *(("read", topic) for topic in DATA_TOPICS)),
    ),
    BrokerUser(
        "hotlab-admin",
        "An admin's scripts (`hotlab cmd`, with a config whose [mqtt] username is this one).",
        (("write", COMMANDS), ("read", REPLIES), ("read", CONTROLLER_STATUS)),
    ),
    BrokerUser(
        "dashboard",
        "Dashboards, InfluxDB bridges, the demo's live view: read by kind, never cmd/+.",
        (*(("read", topic) for topic in DATA_TOPICS), ("read", REPLIES)),
    ),
)

#: Mosquitto 2.0's MQTT 5 bridge sends no Session Expiry Interval, so the central broker ends its
#: session at every disconnect however `cleansession` is set (eclipse-mosquitto/mosquitto issues
#: #1632, #2424, #2980, open): MQTT 3.1.1, where `cleansession false` keeps the session, is the
#: protocol whose behaviour the bridge test shows. Every central engine named in docs/deployment.md
#: (Mosquitto, EMQX, HiveMQ) speaks it.
BRIDGE_PROTOCOL = "mqttv311"
#: The bridge's name in mosquitto.conf (`connection`) and its file in conf.d/.
BRIDGE_CONNECTION = "hotlab-central"
#: Where the files live on a Debian/Ubuntu host (its mosquitto package and systemd unit use these).
DEFAULT_INSTALL_DIR = Path("/etc/mosquitto")
DEFAULT_PERSISTENCE_DIR = Path("/var/lib/mosquitto")
DEFAULT_LOG_FILE = Path("/var/log/mosquitto/mosquitto.log")
#: The file names below the install directory.
CONF_NAME = "mosquitto.conf"
ACL_NAME = "hotlab.acl"
PASSWORD_NAME = "hotlab.passwd"
BRIDGE_DIR = "conf.d"
CENTRAL_ACL_NAME = "central.acl"
PASSWORD_SCRIPT_NAME = "make-passwords.sh"
#: MQTT over TLS (IANA service name "secure-mqtt").
MQTT_TLS_PORT = 8883


@dataclass(frozen=True, slots=True)
class Bridge:
    """The site broker's link to the central broker (or cluster): TLS, its own user, a persistent session."""

    host: str
    port: int
    cafile: Path
    username: str
    password: str
    #: Seconds without traffic before a ping; a dead link is noticed after about two of these.
    keepalive_interval_s: int = 30
    #: Reconnection delays in seconds: decorrelated jitter from the first up to the second
    #: (mosquitto.conf restart_timeout; these are Mosquitto's own defaults).
    restart_timeout_s: tuple[int, int] = (5, 30)

    def __repr__(self) -> str:
        return f"Bridge(host={self.host!r}, port={self.port}, username={self.username!r}, password=***)"


@dataclass(frozen=True, slots=True)
class SiteBroker:
    """Everything `write_site_broker` needs for one site's broker.

    Paths are where the files are when mosquitto runs (`install_dir`), which may differ from
    where they are written (staged on another machine, then copied).
    """

    site: str
    certfile: Path
    keyfile: Path
    #: With a CA, every client must also present a certificate it signed (mutual TLS), besides its password.
    client_cafile: Path | None = None
    listen_host: str | None = None  # None: every address
    listen_port: int = MQTT_TLS_PORT
    bridge: Bridge | None = None
    install_dir: Path = DEFAULT_INSTALL_DIR
    persistence_dir: Path = DEFAULT_PERSISTENCE_DIR
    log_file: Path = DEFAULT_LOG_FILE
    #: mosquitto drops root to this user right after reading its config (mosquitto.conf `user`).
    run_as: str = "mosquitto"
    #: The longest outage of the central link to ride out without dropping a message, and the
    #: site's message rate it is sized for: together, `max_queued_messages`.
    outage_hours: float = 24.0
    messages_per_s: float = 10.0

    @property
    def max_queued_messages(self) -> int:
        """How many QoS 1 messages the broker holds per client beyond those in flight.

        The bridge is such a client on the site broker: while the central link is down, every message
        for it waits here, and above this limit mosquitto drops new ones silently (mosquitto.conf(5),
        max_queued_messages). So: the site's rate for the whole outage to be ridden out.
        """
        return math.ceil(self.outage_hours * 3600 * self.messages_per_s)

    @property
    def remote_clientid(self) -> str:
        """The bridge's client id on the central broker: stable, so its session there survives reconnects."""
        return f"hotlab-bridge-{self.site}"

    @property
    def password_file(self) -> Path:
        return self.install_dir / PASSWORD_NAME


def check_site(site: str) -> str:
    """`site` if it is a valid `[site] name` (a topic level with no wildcard); InputError otherwise."""
    if not NAME_PATTERN.match(site):
        raise InputError(f"site name {site!r} is not valid: {NAME_RULE}")
    return site


def site_acl(site: str) -> str:
    """The site broker's ACL file (mosquitto.conf acl_file); `site` "+" gives the one for any site."""
    lines = [
        "# Mosquitto ACL for a hotlab site (mosquitto.conf: acl_file, with allow_anonymous false and a",
        '# password_file holding these users). docs/mqtt.md, "Security"; docs/deployment.md.',
        "# Generated from controller/deploy/mosquitto_site.py (`hotlab broker-config`): edit the table there.",
        "#",
        "# Only the web panel and the admin tools may publish commands (hotlab/<site>/<station>/<device>/cmd/<action>);",
        "# every command is also signed with its sender's key, so broker access alone acts on nothing.",
        "# The controller reads the command topics and publishes every other kind; readers read by kind,",
        "# never cmd/+. Mosquitto 2 checks read access for each message it delivers: a reader subscribed to",
        '# hotlab/# gets the kinds listed for it and nothing else. Never add a catch-all "pattern read hotlab/#":',
        "# a pattern applies to every user.",
        "#",
        "# Tested against a real Mosquitto in tests/test_cmd_cli.py and tests/test_broker_config.py.",
    ]
    if site == "+":
        lines.append('# "+" in the site level: any site; `hotlab broker-config --site NAME` writes the one for NAME.')
    for user in SITE_USERS:
        lines += ["", f"# {user.purpose}", f"user {user.name}"]
        lines += [f"topic {access} hotlab/{site}/{topic}" for access, topic in user.rules]
    return "\n".join(lines) + "\n"


def central_acl(config: SiteBroker) -> str:
    """The lines the central broker's ACL needs for this site's bridge: its data and its connection state, no more."""
    if config.bridge is None:
        raise ValueError("a site without a bridge has no central ACL")
    lines = [
        f"# Site {config.site}'s bridge (generated by `hotlab broker-config`): add to the central broker's ACL.",
        "# It publishes the site's data and, retained, its connection state (1 up, 0 down); it reads nothing.",
        f"user {config.bridge.username}",
        *(f"topic write hotlab/{config.site}/{topic}" for topic in DATA_TOPICS),
        f"topic write $SYS/broker/connection/{config.remote_clientid}/state",
    ]
    return "\n".join(lines) + "\n"


def mosquitto_conf(config: SiteBroker) -> str:
    """The site broker's mosquitto.conf; with a bridge, the bridge itself is in conf.d/ (it holds a password)."""
    listener = f"listener {config.listen_port}" + (f" {config.listen_host}" if config.listen_host else "")
    lines = [
        f"# Mosquitto for hotlab site {config.site}: generated by `hotlab broker-config` (docs/deployment.md).",
        "# Every option: mosquitto.conf(5), Mosquitto 2.0.",
        "",
        "# mosquitto reads this config as root and runs as this user from then on: it must be able to",
        "# read the certificate, key, password file and ACL, and write the database and log.",
        f"user {config.run_as}",
        "",
        "# One listener, TLS only (1.2 or later): broker passwords cross the network at connect.",
        listener,
        f"certfile {config.certfile}",
        f"keyfile {config.keyfile}",
        *([f"cafile {config.client_cafile}", "require_certificate true"] if config.client_cafile is not None else []),
        "tls_version tlsv1.2",
        "",
        "# Every client has its own user and password; the ACL says what each may read and write.",
        "allow_anonymous false",
        f"password_file {config.password_file}",
        f"acl_file {config.install_dir / ACL_NAME}",
        "",
        "# Queued messages (the bridge's above all) outlive a restart; a crash loses what came after",
        "# the last save, which is written whole each time, hence once a minute rather than per message.",
        "persistence true",
        f"persistence_location {config.persistence_dir}/",
        "autosave_interval 60",
        "",
        f"# A central-link outage of {config.outage_hours:g} h at {config.messages_per_s:g} messages/s is queued,",
        "# not dropped; a persistent client away longer than that is forgotten, so that one that",
        "# never returns does not hold that much memory for ever. 100 in flight: a backlog drains at",
        "# about 100 messages per round trip to the central broker.",
        f"max_queued_messages {config.max_queued_messages}",
        "max_inflight_messages 100",
        f"persistent_client_expiration {math.ceil(config.outage_hours)}h",
        "",
        f"log_dest file {config.log_file}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
    ]
    if config.bridge is not None:
        lines += ["", "# The bridge to the central broker.", f"include_dir {config.install_dir / BRIDGE_DIR}"]
    return "\n".join(lines) + "\n"


def _bridge_conf(config: SiteBroker, bridge: Bridge) -> str:
    """The bridge section (conf.d/hotlab-central.conf): out only, QoS 1, a persistent session, TLS.

    Direction: the site's data goes out; nothing comes in. Commands stay at the site: a command bridged
    in would be published by the bridge, which Mosquitto does not check against the site's ACL,
    so whoever may write on the central broker could act on a hot cell's devices; the person acting
    belongs at the bench, signing through the site's panel or `hotlab cmd`. Replies answer those
    senders, so they stay too.
    """
    base, cap = bridge.restart_timeout_s
    lines = [
        f"# Site {config.site} -> central broker. Holds the bridge's password: root:{config.run_as}, mode 0640.",
        f"connection {BRIDGE_CONNECTION}",
        f"address {bridge.host}:{bridge.port}",
        f"bridge_protocol_version {BRIDGE_PROTOCOL}",
        "# Only out, so no loop can form and no broker-specific bridge handshake is needed.",
        "try_private false",
        "bridge_attempt_unsubscribe false",
        "# A stable client id and no clean session on either side: what is queued or in flight survives",
        "# a cut link and is sent on reconnection (again if its PUBACK was lost: de-duplicate on msg_id).",
        f"remote_clientid {config.remote_clientid}",
        "cleansession false",
        "local_cleansession false",
        "start_type automatic",
        f"keepalive_interval {bridge.keepalive_interval_s}",
        f"restart_timeout {base} {cap}",
        "# The central broker sees this site's link as $SYS/broker/connection/<remote_clientid>/state: 1 or 0.",
        "notifications true",
        f"remote_username {bridge.username}",
        f"remote_password {bridge.password}",
        f"bridge_cafile {bridge.cafile}",
        "bridge_insecure false",
        "bridge_tls_version tlsv1.2",
        *(f"topic hotlab/{config.site}/{topic} out 1" for topic in DATA_TOPICS),
    ]
    return "\n".join(lines) + "\n"


def password_script(config: SiteBroker) -> str:
    """A shell script that creates the password file, asking for each site user's password (mosquitto_passwd)."""
    target = shlex.quote(str(config.password_file))
    lines = [
        "#!/bin/sh",
        f"# Creates {config.password_file} for site {config.site}, asking for each broker user's password",
        "# (twice, by mosquitto_passwd(1)); run again to replace them all. Run as root on the broker host.",
        "set -eu",
        "umask 077",
        f"file={target}",
    ]
    for index, user in enumerate(SITE_USERS):
        create = " -c" if index == 0 else ""
        lines += [f'echo "password for {user.name}:" >&2', f'mosquitto_passwd{create} "$file" {user.name}']
    lines += [
        "# mosquitto reads the file after it dropped root.",
        f'if [ "$(id -u)" = 0 ]; then chgrp {shlex.quote(config.run_as)} "$file"; chmod 0640 "$file"; fi',
    ]
    return "\n".join(lines) + "\n"


def write_site_broker(config: SiteBroker, out: Path) -> list[Path]:
    """Write the site's broker files to `out` and return them; the bridge's (it holds a password) owner-only."""
    check_site(config.site)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / CONF_NAME, out / ACL_NAME, out / PASSWORD_SCRIPT_NAME]
    write_file(written[0], mosquitto_conf(config))
    write_file(written[1], site_acl(config.site))
    write_file(written[2], password_script(config))
    os.chmod(written[2], 0o755)
    if config.bridge is not None:
        (out / BRIDGE_DIR).mkdir(exist_ok=True)
        bridge_file = out / BRIDGE_DIR / f"{BRIDGE_CONNECTION}.conf"
        write_file(bridge_file, _bridge_conf(config, config.bridge), private=True)
        write_file(out / CENTRAL_ACL_NAME, central_acl(config))
        written += [bridge_file, out / CENTRAL_ACL_NAME]
    return written

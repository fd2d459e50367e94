"""`hotlab broker-config --site NAME --out DIR ...`: a hardened Mosquitto for one site (docs/deployment.md).

Writes mosquitto.conf, the ACL, a script that creates the password file and, with `--central`,
the bridge to the central broker (conf.d/, owner-only: it holds the bridge's password) and the
lines the central broker's ACL needs for it. The logic is controller/deploy/mosquitto_site.py.

The bridge's password is read from a file (`--bridge-password-file`), never from the command
line, where it would sit in shell history and `ps`.

Exit codes (controller/cli/main.py): 0 written, 1 a file could not be written, 2 bad input.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hotlab.controller.deploy.mosquitto_site import (
    DEFAULT_INSTALL_DIR,
    DEFAULT_LOG_FILE,
    DEFAULT_PERSISTENCE_DIR,
    MQTT_TLS_PORT,
    PASSWORD_SCRIPT_NAME,
    Bridge,
    SiteBroker,
    check_site,
    write_site_broker,
)
from hotlab.errors import InputError


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "broker-config",
        help="write a hardened Mosquitto config for a site, optionally bridged to a central broker",
        description="Write a site's Mosquitto config: one TLS listener, a password per client, the hotlab "
        "ACL, persistence and queue limits for an outage of hours; with --central, a bridge that sends "
        "the site's data (never commands) to the central broker at QoS 1 with a persistent session.",
    )
    parser.add_argument("--site", required=True, help="the site's name, as [site] name in the controller's config")
    parser.add_argument("--out", type=Path, required=True, help="directory to write the files to")
    parser.add_argument(
        "--install-dir",
        type=Path,
        default=None,
        help=f"where the files will be when mosquitto runs (default: --out; on Debian {DEFAULT_INSTALL_DIR})",
    )
    parser.add_argument(
        "--listen",
        default=str(MQTT_TLS_PORT),
        metavar="[HOST:]PORT",
        help=f"the TLS listener (default {MQTT_TLS_PORT} on every address)",
    )
    parser.add_argument("--certfile", type=Path, required=True, help="the broker's TLS certificate (PEM)")
    parser.add_argument("--keyfile", type=Path, required=True, help="its private key (PEM)")
    parser.add_argument(
        "--client-cafile",
        type=Path,
        default=None,
        help="also require every client to present a certificate signed by this CA (mutual TLS)",
    )
    parser.add_argument(
        "--central", default=None, metavar="HOST[:PORT]", help=f"bridge to this central broker (port {MQTT_TLS_PORT})"
    )
    parser.add_argument(
        "--central-cafile", type=Path, default=None, help="CA that signed the central broker's certificate"
    )
    parser.add_argument(
        "--bridge-username", default=None, help="the bridge's user on the central broker (default hotlab-bridge-SITE)"
    )
    parser.add_argument(
        "--bridge-password-file", type=Path, default=None, help="file holding that user's password (first line)"
    )
    parser.add_argument(
        "--outage-hours",
        type=float,
        default=24.0,
        help="central-link outage to ride out without dropping a message (default 24)",
    )
    parser.add_argument(
        "--messages-per-s", type=float, default=10.0, help="the site's message rate to size that for (default 10)"
    )
    parser.add_argument(
        "--persistence-dir",
        type=Path,
        default=DEFAULT_PERSISTENCE_DIR,
        help=f"mosquitto's database (default {DEFAULT_PERSISTENCE_DIR})",
    )
    parser.add_argument(
        "--log-file", type=Path, default=DEFAULT_LOG_FILE, help=f"mosquitto's log (default {DEFAULT_LOG_FILE})"
    )
    parser.add_argument(
        "--run-as", default="mosquitto", help="the user mosquitto runs as once it read its config (default mosquitto)"
    )
    parser.set_defaults(func=_broker_config)


def _broker_config(args: argparse.Namespace) -> int:
    site = check_site(args.site)
    if args.outage_hours <= 0 or args.messages_per_s <= 0:
        raise InputError("--outage-hours and --messages-per-s must be positive")
    listen_host, listen_port = _host_port(args.listen, "--listen", default_port=None)
    config = SiteBroker(
        site=site,
        certfile=args.certfile.absolute(),
        keyfile=args.keyfile.absolute(),
        client_cafile=None if args.client_cafile is None else args.client_cafile.absolute(),
        listen_host=listen_host or None,
        listen_port=listen_port,
        bridge=_bridge(args, site),
        install_dir=(args.install_dir or args.out).absolute(),
        persistence_dir=args.persistence_dir.absolute(),
        log_file=args.log_file.absolute(),
        run_as=args.run_as,
        outage_hours=args.outage_hours,
        messages_per_s=args.messages_per_s,
    )
    written = write_site_broker(config, args.out)
    for path in written:
        print(path)
    print(
        f"next: install these as {config.install_dir} (the conf.d/ file root:{config.run_as}, mode 0640), "
        f"run {PASSWORD_SCRIPT_NAME} there as root, restart mosquitto; docs/deployment.md"
    )
    return 0


def _bridge(args: argparse.Namespace, site: str) -> Bridge | None:
    given = [name for name in ("central_cafile", "bridge_username", "bridge_password_file") if getattr(args, name)]
    if args.central is None:
        if given:
            raise InputError(f"--{given[0].replace('_', '-')} needs --central")
        return None
    if args.central_cafile is None or args.bridge_password_file is None:
        raise InputError("--central needs --central-cafile and --bridge-password-file: the bridge uses TLS and a user")
    host, port = _host_port(args.central, "--central", default_port=MQTT_TLS_PORT)
    try:
        password = args.bridge_password_file.read_text(encoding="utf-8").splitlines()[0].strip()
    except (OSError, UnicodeDecodeError, IndexError) as exc:
        raise InputError(f"cannot read the bridge password from {args.bridge_password_file}: {exc}") from None
    if not password or any(c.isspace() for c in password):
        raise InputError(f"{args.bridge_password_file}: the password must be one word on the first line")
    return Bridge(
        host=host,
        port=port,
        cafile=args.central_cafile.absolute(),
        username=args.bridge_username or f"hotlab-bridge-{site}",
        password=password,
    )


def _host_port(text: str, option: str, *, default_port: int | None) -> tuple[str, int]:
    """`HOST:PORT`, `PORT` (no default port) or `HOST` (with one); an IPv6 host goes in brackets."""
    host, separator, port_text = text.rpartition(":")
    if not separator:
        host, port_text = ("", text) if default_port is None else (text, str(default_port))
    host = host.removeprefix("[").removesuffix("]")
    if default_port is not None and not host:
        raise InputError(f"{option} {text!r}: give the host")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise InputError(f"{option} {text!r}: the port must be 1-65535")
    return host, int(port_text)

"""`hotlab install-units`: write the systemd units of the controller and the web panel, then say what is left.

The units (controller/deploy/systemd.py) name the `hotlab` executable of the environment this
command runs from, so run it from the installation the service should use, as root, and again after
every upgrade. `--out DIR` writes them elsewhere (to inspect or package them) and `--dry-run` prints
them. The user, the key and the config are not created here: the steps printed at the end do that,
so nothing on the machine changes except the two unit files.

Exit codes (controller/cli/main.py): 0 written, 1 a unit file could not be written, 2 bad options.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hotlab.controller.audit import KEY_FILE_ENV
from hotlab.controller.deploy.systemd import (
    AUDIT_KEY,
    CONTROLLER_UNIT,
    DEFAULT_CONFIG,
    DEFAULT_DRAIN_TIMEOUT_S,
    DEFAULT_USER,
    DEFAULT_WEB_HOST,
    DEFAULT_WEB_PORT,
    ENVIRONMENT_FILE,
    SERIAL_GROUP,
    STATE_DIR,
    UNIT_DIR,
    WEB_UNIT,
    UnitSettings,
    hidden_paths,
    hotlab_executable,
    runtime_paths,
    units,
    write_units,
)
from hotlab.errors import HotlabError, InputError


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "install-units",
        help="write systemd units for the controller and the web panel (docs/running.md)",
        description=f"Write {CONTROLLER_UNIT} (hotlab run) and {WEB_UNIT} (hotlab web) for this installation's "
        "hotlab executable, and print the remaining steps: user, audit key, config, systemctl.",
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--out", type=Path, default=UNIT_DIR, help=f"directory for the unit files (default {UNIT_DIR})")
    output.add_argument("--dry-run", action="store_true", help="print the units instead of writing them")
    parser.add_argument(
        "--user", default=DEFAULT_USER, help=f"system user the services run as (default {DEFAULT_USER})"
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"lab config (default {DEFAULT_CONFIG})")
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=DEFAULT_DRAIN_TIMEOUT_S,
        metavar="S",
        help="the config's [service] drain_timeout_s, from which the stop timeout is derived "
        f"(default {DEFAULT_DRAIN_TIMEOUT_S:g})",
    )
    parser.add_argument("--web-host", default=DEFAULT_WEB_HOST, help="address the web panel listens on")
    parser.add_argument("--web-port", type=int, default=DEFAULT_WEB_PORT, help="the web panel's TCP port")
    parser.set_defaults(func=_install)


def _install(args: argparse.Namespace) -> int:
    executable = hotlab_executable()
    if not executable.is_file():
        raise InputError(f"no hotlab executable at {executable}: run install-units from the environment hotlab is in")
    settings = UnitSettings(
        executable=executable,
        user=args.user,
        config=args.config.absolute(),
        drain_timeout_s=args.drain_timeout,
        web_host=args.web_host,
        web_port=args.web_port,
    )
    texts = units(settings)
    hidden = hidden_paths(runtime_paths(executable))
    if hidden:
        print(
            f"warning: ProtectHome=yes hides {', '.join(map(str, hidden))} from the service, which cannot start: "
            "install hotlab with a Python outside /home, /root and /run/user (e.g. python3 -m venv /opt/hotlab)",
            file=sys.stderr,
        )
    if args.dry_run:
        for name, text in texts.items():
            print(f"# --- {name}\n{text}")
        return 0
    try:
        written = write_units(texts, args.out)
    except OSError as exc:
        raise HotlabError(
            f"cannot write the units to {args.out}: {exc.strerror} (run as root, or give --out)"
        ) from None
    for path in written:
        print(f"wrote {path}")
    _print_next_steps(settings, args.out)
    return 0


def _print_next_steps(settings: UnitSettings, out: Path) -> None:
    user, config = settings.user, settings.config
    steps = [
        *([f"cp {out}/{CONTROLLER_UNIT} {out}/{WEB_UNIT} {UNIT_DIR}/"] if out.absolute() != UNIT_DIR else []),
        f"useradd --system --user-group --groups {SERIAL_GROUP} --home-dir {STATE_DIR} --shell /usr/sbin/nologin {user}",
        f"install -d -m 0755 {config.parent}",
        f"openssl rand -hex 32 | install -m 0400 -o {user} -g {user} /dev/stdin {AUDIT_KEY}   # the audit HMAC key",
        f"edit {config} (state, outbox, history and audit paths under {STATE_DIR}; docs/running.md), "
        f"chgrp {user} it and its secret files, chmod 0640; *_env secrets go in {ENVIRONMENT_FILE}",
        f"sudo -u {user} env {KEY_FILE_ENV}={AUDIT_KEY} {settings.executable} doctor --config {config}",
        "systemctl daemon-reload",
        f"systemctl enable --now {CONTROLLER_UNIT} {WEB_UNIT}",
    ]
    print("next, as root:")
    for number, step in enumerate(steps, 1):
        print(f"  {number}. {step}")

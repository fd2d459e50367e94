"""`hotlab web --config lab.toml`: the browser panel of a lab (docs/web.md), served by hotlab itself.

A process of its own beside the controller: it reads the lab's live state from the broker
([mqtt] of the config, or the panel's own broker identity in [web]), sends control commands signed
with the [[command_sender]] key `[web] sender` names, and checks passwords against the lab's user store, found as `hotlab user`
finds it (controller/cli/user.py). Logins and logouts are written to the audit trail, so the
trail's HMAC key is needed (--key-file or the environment), as for any command that writes it.
The panel's packages are the optional `web` extra: `pip install 'hotlab[web]'`.

Exit codes (controller/cli/main.py): 0 stopped, 2 bad input (config, missing key or packages).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import sys
from pathlib import Path

from hotlab.controller.cli.user import lab_files, required_audit_key
from hotlab.controller.config import load_config
from hotlab.controller.stop_signals import StopSignals
from hotlab.errors import InputError


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "web", help="serve the lab's browser panel (live lab, stations, calibrators, QC, review, audit)"
    )
    parser.add_argument("--config", type=Path, required=True, help="lab config (TOML): its [mqtt] and user store")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="TCP port (default 8080)")
    parser.add_argument("--tls-cert", type=Path, default=None, help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--tls-key", type=Path, default=None, help="the private key of --tls-cert (PEM)")
    parser.add_argument("--audit", type=Path, default=None, help="audit trail (default: the --config lab's)")
    parser.add_argument(
        "--users", type=Path, default=None, help="user store (default: [users] path, else beside the audit trail)"
    )
    parser.add_argument(
        "--key-file",
        type=Path,
        default=None,
        help="audit HMAC key file (default $HOTLAB_AUDIT_KEY_FILE or $HOTLAB_AUDIT_KEY)",
    )
    parser.set_defaults(func=_web)


def _web(args: argparse.Namespace) -> int:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise InputError("--tls-cert and --tls-key go together")
    if not 0 < args.port < 65536:
        raise InputError(f"--port {args.port} is not a TCP port (1-65535)")
    try:
        from hotlab.controller.web.app import create_app
        from hotlab.controller.web.commands import CommandSender
        from hotlab.controller.web.live import LiveFeed
        from hotlab.controller.web.panel import Panel
        from hotlab.controller.web.server import serving
    except ImportError as exc:
        raise InputError(f"the web panel needs the optional packages: pip install 'hotlab[web]' ({exc})") from None
    config = load_config(args.config)
    if config.mqtt is None:
        raise InputError(f"{args.config} has no [mqtt] table: the panel reads the lab's live state from the broker")
    files = lab_files(args)
    if not files.users.exists():
        raise InputError(f"no user store at {files.users} (the first `hotlab user add` creates it)")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.tls_cert is None and not _loopback(args.host):
        logging.getLogger("hotlab.web").warning(
            "serving on %s without TLS: passwords cross the network in clear; give --tls-cert and --tls-key",
            args.host,
        )
    with files.open_store(required_audit_key(args.key_file)) as store:
        commands = CommandSender.for_lab(config)
        if commands is None:
            logging.getLogger("hotlab.web").warning(
                "no [web] sender in %s: the panel shows the lab but cannot act on it", args.config
            )
        app = create_app(Panel(config, LiveFeed.for_lab(config, config.mqtt), store, commands=commands))

        async def serve() -> None:
            # SIGTERM (systemd's stop) ends the panel as gracefully as Ctrl-C: open pages' streams close.
            signals = StopSignals()
            with signals.interruptible_start():
                async with serving(app, args.host, args.port, tls_cert=args.tls_cert, tls_key=args.tls_key) as url:
                    signals.running()
                    print(f"web panel at {url} (Ctrl-C or SIGTERM stops)", file=sys.stderr, flush=True)
                    await signals.stop.wait()

        asyncio.run(serve())
    return 0


def _loopback(host: str) -> bool:
    """Whether only this machine can reach `host` (a name other than localhost counts as reachable)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

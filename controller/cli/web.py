"""`hotlab web --config lab.toml`: the browser panel of a lab (docs/web.md), served by hotlab itself.

A process of its own beside the controller: it reads the lab's live state from the broker
([mqtt] of the config) and checks passwords against the lab's user store, found as `hotlab user`
finds it (controller/cli/user.py). Logins and logouts are written to the audit trail, so the
trail's HMAC key is needed (--key-file or the environment), as for any command that writes it.
The panel's packages are the optional `web` extra: `pip install 'hotlab[web]'`.

Exit codes (controller/cli/main.py): 0 stopped, 2 bad input (config, missing key or packages).
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from hotlab.controller.cli.user import lab_files, required_audit_key
from hotlab.controller.config import load_config
from hotlab.errors import InputError


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("web", help="serve the lab's browser panel (live overview, login)")
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
        import uvicorn

        from hotlab.controller.web.app import create_app
        from hotlab.controller.web.live import LiveFeed
    except ImportError as exc:
        raise InputError(f"the web panel needs the optional packages: pip install 'hotlab[web]' ({exc})") from None
    config = load_config(args.config)
    if config.mqtt is None:
        raise InputError(f"{args.config} has no [mqtt] table: the panel reads the lab's live state from the broker")
    files = lab_files(args)
    if not files.users.exists():
        raise InputError(f"no user store at {files.users} (the first `hotlab user add` creates it)")
    with files.open_store(required_audit_key(args.key_file)) as store:
        app = create_app(LiveFeed(config.site, config.mqtt), store)
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=args.host,
                port=args.port,
                ssl_certfile=args.tls_cert,
                ssl_keyfile=args.tls_key,
                timeout_graceful_shutdown=2,
                log_level="info",
            )
        )
        asyncio.run(server.serve())
    return 0

"""Serving the panel over HTTP(S): as `hotlab web`'s own process, or inside `hotlab run` and `hotlab demo`.

uvicorn's `Server.serve` takes over SIGINT and SIGTERM while it runs; inside run and demo the
process already stops on those (controller/stop_signals.py), so the embedded server leaves them
alone and is stopped by its owner. The listening socket is bound here, before the server starts,
so a port in use is a one-line error instead of uvicorn's exit of the whole process.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import uvicorn
from starlette.applications import Starlette

from hotlab.errors import InputError

#: Seconds an open page's event stream gets to end when the panel stops.
GRACEFUL_STOP_S = 2
#: How long the server may take to start listening.
START_TIMEOUT_S = 15.0


class _EmbeddedServer(uvicorn.Server):
    """A server that never installs signal handlers: its owner decides when it stops."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket; InputError saying which address when it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        why = "the port is in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise InputError(f"the web panel cannot listen on {host}:{port}: {why}") from None
    sock.set_inheritable(True)
    return sock


def panel_url(host: str, port: int, *, tls: bool) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{shown}:{port}/"


@contextlib.asynccontextmanager
async def serving(
    app: Starlette,
    host: str,
    port: int,
    *,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    log_level: str = "warning",
) -> AsyncIterator[str]:
    """Serve `app` until the block ends; yields the panel's URL once it accepts connections."""
    sock = listening_socket(host, port)
    config = uvicorn.Config(
        app,
        ssl_certfile=tls_cert,
        ssl_keyfile=tls_key,
        timeout_graceful_shutdown=GRACEFUL_STOP_S,
        log_level=log_level,
        lifespan="on",
    )
    server = _EmbeddedServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="web-panel")
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            while not server.started:
                if task.done():
                    task.result()  # its exception, if it failed to start
                    raise InputError("the web panel stopped while starting")
                await asyncio.sleep(0.02)
        yield panel_url(host, sock.getsockname()[1], tls=tls_cert is not None)
    finally:
        server.should_exit = True
        await asyncio.gather(task, return_exceptions=True)
        sock.close()

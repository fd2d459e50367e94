"""The web panel inside `hotlab run` and `hotlab demo`: the same panel `hotlab web` serves, on 127.0.0.1.

It is still a client of the bus like any other: it reads the lab's live state from the broker,
acts through signed commands under the `[web] sender` key, and checks passwords against the lab's
user store; it only shares the process. Without a broker, or without the optional web packages,
the lab runs without it and the log says why (a newcomer's first run must not fail for a screen).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from hotlab.controller.audit import AuditLog
from hotlab.controller.config import LabConfig
from hotlab.controller.users import UserStore
from hotlab.errors import InputError

log = logging.getLogger("hotlab.web")

DEFAULT_PORT = 8080


@contextlib.asynccontextmanager
async def lab_panel(config: LabConfig, port: int | None, audit_key: bytes | None) -> AsyncIterator[str | None]:
    """Serve the panel of `config`'s lab on 127.0.0.1:`port` while the block runs; yields its URL, or
    None when it is not wanted (`port` None) or cannot run here (said in the log)."""
    if port is None:
        yield None
        return
    if config.mqtt is None:
        log.warning("web panel not started: the lab has no broker, and the panel shows what the bus carries")
        yield None
        return
    try:
        from hotlab.controller.web.app import create_app
        from hotlab.controller.web.commands import CommandSender
        from hotlab.controller.web.live import LiveFeed
        from hotlab.controller.web.panel import Panel
        from hotlab.controller.web.server import serving
    except ImportError as exc:
        log.warning("web panel not started: it needs the optional packages, pip install 'hotlab[web]' (%s)", exc)
        yield None
        return
    audit_path = config.commands.resolved_audit_path(config.service.state_dir)
    store = await asyncio.to_thread(
        UserStore, config.users.resolved_path(audit_path), AuditLog(audit_path, key=audit_key)
    )
    try:
        panel = Panel(config, LiveFeed.for_lab(config, config.mqtt), store, commands=CommandSender.for_lab(config))
        async with contextlib.AsyncExitStack() as stack:
            url: str | None = None
            try:
                url = await stack.enter_async_context(serving(create_app(panel), "127.0.0.1", port))
            except InputError as exc:  # the port is taken: the lab runs on, without its screen
                log.warning("web panel not started: %s", exc)
            yield url
    finally:
        await asyncio.to_thread(store.close)

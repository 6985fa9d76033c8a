"""Serving the app with uvicorn: one config from the settings, and a graceful shutdown.

uvicorn's own shutdown closes every WebSocket with 1012 at once.  The gateway
first stops accepting, lets its runs finish for ``CHAT_SHUTDOWN_GRACE_S``,
cancels the rest (``agent_completed`` with ``cancelled``/``shutdown``), lets each
session send those last events and close with 1012, and only then hands over to
uvicorn's shutdown.
"""

from __future__ import annotations

import gc
import math
import socket
from collections.abc import Callable
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from server.gateway import Gateway
from server.protocols import RefusingWebSocketsProtocol, http_protocol
from server.session import CLOSE_RESTART
from server.settings import Settings


def uvicorn_config(
    app: ASGIApp, settings: Settings, host: str, port: int, **extra: Any
) -> uvicorn.Config:
    """The uvicorn config that goes with the settings: request heads, frame size,
    keepalive, shutdown."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=settings.log_level,
        # Deadlines and limits on request heads, and handshake refusals that reach the
        # client (see server.protocols).
        http=http_protocol(settings),
        ws=RefusingWebSocketsProtocol,
        ws_max_size=settings.max_message_bytes,
        # Events are small JSON: compressing each costs more CPU than it saves bytes.
        ws_per_message_deflate=settings.ws_compression == "on",
        # Pings every heartbeat; a peer that does not answer within one more is gone.
        ws_ping_interval=settings.heartbeat_s,
        ws_ping_timeout=settings.heartbeat_s,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s) + 10,
        proxy_headers=False,
        # uvloop accepts one pending connection per turn of its loop (asyncio's takes
        # every one waiting): under load, new users would wait behind the streams.
        loop=settings.event_loop,
        **extra,
    )


def tune_gc(settings: Settings) -> None:
    """Set up CPython's cyclic garbage collector for a serving process (call it once, in
    the process that serves, before it serves).

    With the default first threshold (700 allocations) a process streaming tens of
    thousands of events a second runs hundreds of young collections a second; each
    finds the objects of events and timers only milliseconds old still alive
    (an agent's 20 ms sleep, a frame waiting for its loop turn), moves them on, and
    they reach the oldest generation, whose growth then sets off a full collection
    several times a second.  ``CHAT_GC_THRESHOLD`` allocations between young
    collections (50,000 by default) let those objects die young, freed by their
    reference counts, which is how they die anyway.  What the process holds once set
    up (modules, the app) is moved out of the collector's sight (``gc.freeze``).
    """
    if settings.gc_threshold:
        _, older, oldest = gc.get_threshold()
        gc.set_threshold(settings.gc_threshold, older, oldest)
    gc.freeze()


class GatewayServer(uvicorn.Server):
    """uvicorn's server, with the gateway's drain before uvicorn closes connections."""

    def __init__(
        self, config: uvicorn.Config, *, after_shutdown: Callable[[], None] | None = None
    ) -> None:
        super().__init__(config)
        # uvicorn re-raises a caught SIGTERM once it is done, so a ``finally`` around
        # ``run()`` would never run: what must happen last happens here.
        self._after_shutdown = after_shutdown

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()  # stop accepting before anything else
        app = self.config.app
        gateway = getattr(getattr(app, "state", None), "gateway", None)
        if isinstance(gateway, Gateway) and not self.force_exit:
            await gateway.drain(CLOSE_RESTART)
        try:
            await super().shutdown(sockets)
        finally:
            if self._after_shutdown is not None:
                self._after_shutdown()

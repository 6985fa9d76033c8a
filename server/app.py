"""The Starlette application factory."""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from bridge import tracing
from server import admin, agui_stream, aisdk_stream, routes
from server.auth import Authenticator
from server.gateway import Gateway
from server.settings import Settings
from server.ws import websocket_endpoint

STATIC_DIR = Path(__file__).parent / "static"
log = logging.getLogger("chat")


class SecurityHeaders:
    """Headers a browser honours for the page and every response (pure ASGI middleware)."""

    HEADERS: Final = [
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
        (
            b"content-security-policy",
            b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            b"connect-src 'self'; object-src 'none'; frame-ancestors 'none'; base-uri 'none'; "
            b"form-action 'none'",
        ),
    ]

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(settings: Settings | None = None, *, dev_secret: str | None = None) -> GatewayApp:
    """Build the gateway's ASGI app.  ``dev_secret`` signs tokens when no secret is set."""
    settings = settings or Settings.from_env()
    auth = Authenticator(settings, dev_secret=dev_secret)
    gateway = Gateway(settings, auth)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        # Under load the collector's full passes are what delays events at the tail:
        # fewer young passes promote fewer short-lived objects (a run's pending
        # appends, its tasks), so full passes come less often; and modules, routes
        # and settings, which live as long as the process, need not be walked by each.
        if settings.gc_young_threshold:
            _, middle, old = gc.get_threshold()
            gc.set_threshold(settings.gc_young_threshold, middle, old)
        if settings.gc_freeze == "on":
            gc.collect()
            gc.freeze()
        try:
            yield
        finally:
            await gateway.close()
            tracing.shutdown()  # what the batch processor holds goes out now

    route_list: list[BaseRoute] = [
        Route("/health", routes.health, methods=["GET"]),
        Route("/metrics", routes.metrics, methods=["GET"]),
        Route("/api/chat/stream", routes.chat_stream, methods=["POST"]),
        Route("/api/chat/runs/{run_id}/events", routes.run_events, methods=["GET"]),
        Route("/api/chat/agents/{run_id}/status", routes.run_status, methods=["GET"]),
        Route("/api/chat/agents/{run_id}/{action}", routes.lifecycle, methods=["POST"]),
        Route("/api/threads", routes.list_threads, methods=["GET"]),
        Route("/api/threads/{thread_id}/messages", routes.thread_messages, methods=["GET"]),
        Route("/api/threads/{thread_id}/events", routes.thread_events, methods=["GET"]),
        Route("/api/threads/{thread_id}", routes.delete_thread, methods=["DELETE"]),
        Route("/api/ag-ui/runs/{run_id}/events", agui_stream.rejoin, methods=["GET"]),
        Route("/api/ag-ui/{agent}", agui_stream.run_agent, methods=["POST"]),
        Route("/api/ai-sdk/chat", aisdk_stream.chat, methods=["POST"]),
        Route("/api/ai-sdk/chat/{id}/stream", aisdk_stream.resume, methods=["GET"]),
        *admin.routes(),
        Route(
            "/api/{rest:path}",
            routes.api_not_found,
            methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
        ),
        Mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="static"),
    ]
    middleware = [
        Middleware(
            CORSMiddleware,
            allow_origins=list(settings.allowed_origins),
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=[
                "Authorization",
                "Content-Type",
                "Last-Event-ID",
                "Idempotency-Key",
                "traceparent",
                "tracestate",
            ],
            # The run a front-end protocol's stream started, for its lifecycle routes.
            expose_headers=[
                "X-Chat-Run-Id",
                "X-Chat-Thread-Id",
                "X-Chat-Duplicate",
                "X-Chat-Active-Run-Ids",
            ],
            max_age=600,
        )
    ]
    middleware.append(Middleware(SecurityHeaders))
    # Off unless OTEL_TRACES_EXPORTER names an exporter (bridge/tracing.py); off, the
    # app is as it would be without tracing.
    if tracing.configure(content=settings.trace_content == "on"):
        middleware.append(Middleware(tracing.TraceContextMiddleware))
    app = Starlette(routes=route_list, middleware=middleware, lifespan=lifespan)
    app.state.gateway = gateway
    app.state.settings = settings
    return GatewayApp(app, gateway)


class GatewayApp:
    """The ASGI app: ``/ws`` straight to the gateway, everything else to Starlette.

    Every frame a session writes goes through the ASGI ``send``; reaching the
    endpoint outside Starlette's middleware stack keeps that ``send`` the
    server's own, with no wrapper per frame.  (CORS, exception pages and the
    security headers concern HTTP only.)
    """

    def __init__(self, starlette: Starlette, gateway: Gateway) -> None:
        self.starlette = starlette
        self.gateway = gateway
        self.state = starlette.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == "/ws":
            await websocket_endpoint(self.gateway, WebSocket(scope, receive, send), send)
            return
        await self.starlette(scope, receive, send)

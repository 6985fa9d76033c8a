"""HTTP routes: SSE streams, lifecycle control, run status and health.

Every route but ``/health`` needs a token (``Authorization: Bearer`` or
``?access_token=``).  Errors are ``{"ok": false, "error": {"code", "message"}}``
with the status that fits the code.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from bridge.errors import RunNotFound
from bridge.events import PROTOCOL
from server import sse
from server.auth import Principal, token_for_http
from server.errors import AuthError, ProtocolError, wire_error
from server.gateway import Gateway

log = logging.getLogger("chat.http")

Endpoint = Callable[[Request], Awaitable[Response]]
ACTIONS: Final = ("start", "stop", "cancel")


class OrjsonResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(exc: BaseException) -> Response:
    code, message, status = wire_error(exc)
    if code == "internal":
        log.error("request failed", exc_info=exc)
    return OrjsonResponse({"ok": False, "error": {"code": code, "message": message}}, status)


def api(endpoint: Endpoint) -> Endpoint:
    """Map any error the endpoint raises to the contract's JSON error."""

    @functools.wraps(endpoint)
    async def wrapper(request: Request) -> Response:
        try:
            return await endpoint(request)
        except Exception as exc:
            return error_response(exc)

    return wrapper


def gateway_of(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


def authenticate(request: Request) -> Principal:
    gateway = gateway_of(request)
    token = token_for_http(request.headers, request.scope.get("query_string", b""))
    try:
        return gateway.auth.verify(token)
    except AuthError:
        gateway.counters.auth_failures += 1
        raise


async def read_json_body(request: Request, limit: int) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLarge(f"body larger than {limit} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _TooLarge(f"body larger than {limit} bytes")
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError("bad_json", f"body is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ProtocolError("bad_message", "body must be a JSON object")
    return raw


class _TooLarge(ProtocolError):
    def __init__(self, message: str) -> None:
        super().__init__("too_large", message)


def _optional_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > 128:
        raise ProtocolError("bad_message", f"field {name!r} must be a non-empty string")
    return value


def _sse_response(stream: Any) -> StreamingResponse:
    return StreamingResponse(stream, media_type="text/event-stream", headers=sse.HEADERS)


@api
async def chat_stream(request: Request) -> Response:
    """``POST /api/chat/stream``: start a run and stream it."""
    gateway = gateway_of(request)
    user = authenticate(request)
    body = await read_json_body(request, gateway.settings.max_message_bytes)
    message = body.get("message")
    if not isinstance(message, str) or not message.strip():
        raise ProtocolError("bad_message", "field 'message' must be a non-empty string")
    record = await gateway.start_run(
        user,
        message,
        thread_id=_optional_str(body, "thread_id"),
        agent=_optional_str(body, "agent"),
    )
    wake = asyncio.Event()
    watch = await gateway.watch(user, record.run_id, 0, wake.set)
    ids = {"run_id": record.run_id, "thread_id": record.thread_id}
    stream = sse.stream_run(
        watch,
        wake,
        gateway.settings.heartbeat_s,
        head=sse.frame("stream_start", ids),
        tail=lambda status: sse.frame("stream_end", {**ids, "status": status}),
    )
    return _sse_response(stream)


def _after_seq(request: Request) -> int:
    raw = request.headers.get("last-event-id")
    source = "Last-Event-ID"
    if raw is None:
        raw = request.query_params.get("after_seq")
        source = "after_seq"
    if raw is None or raw.strip() == "":
        return 0
    text = raw.strip()
    if not text.isdigit():
        raise ProtocolError("bad_message", f"{source} must be an integer >= 0, got {raw[:32]!r}")
    return int(text)


@api
async def run_events(request: Request) -> Response:
    """``GET /api/chat/runs/{run_id}/events``: a run's events from a seq on, then live."""
    gateway = gateway_of(request)
    user = authenticate(request)
    run_id = request.path_params["run_id"]
    after = _after_seq(request)
    wake = asyncio.Event()
    watch = await gateway.watch(user, run_id, after, wake.set)
    return _sse_response(sse.stream_run(watch, wake, gateway.settings.heartbeat_s))


@api
async def lifecycle(request: Request) -> Response:
    """``POST /api/chat/agents/{run_id}/{start|stop|cancel}``."""
    gateway = gateway_of(request)
    user = authenticate(request)
    run_id = request.path_params["run_id"]
    action = request.path_params["action"]
    if action not in ACTIONS:
        raise RunNotFound(f"no action {action[:32]!r}; expected one of {', '.join(ACTIONS)}")
    status = await gateway.control(user, run_id, action)
    return OrjsonResponse({"ok": True, "run_id": run_id, "action": action, "status": status})


@api
async def run_status(request: Request) -> Response:
    """``GET /api/chat/agents/{run_id}/status``."""
    gateway = gateway_of(request)
    user = authenticate(request)
    record = await gateway.find_run(user, request.path_params["run_id"])
    return OrjsonResponse({"ok": True, **record.public()})


async def health(request: Request) -> Response:
    gateway = gateway_of(request)
    counters = gateway.counters
    return OrjsonResponse(
        {
            "status": "shutting_down" if gateway.shutting_down else "healthy",
            "protocol": PROTOCOL,
            "features": {
                "chat_streaming": True,
                "agent_lifecycle_control": True,
                "websocket_events": True,
                "sse_events": True,
                "resumable_runs": True,
            },
            "broker": gateway.broker.name,
            "agents": gateway.agents.names(),
            "default_agent": gateway.agents.default,
            "uptime_s": round(time.time() - gateway.counters.started_at, 3),
            "connections": counters.connections,
            "runs_active": len(gateway.supervisor),
            "counters": {
                "runs_started": counters.runs_started,
                "slow_consumer_closes": counters.slow_consumer_closes,
                "rate_limited": counters.rate_limited,
                "auth_failures": counters.auth_failures,
            },
            "memory": gateway.memory_report(),
        },
        status_code=503 if gateway.shutting_down else 200,
    )

"""HTTP routes: SSE streams, lifecycle control, run status and health.

Every route but ``/health`` needs a token (``Authorization: Bearer`` or
``?access_token=``).  Errors are ``{"ok": false, "error": {"code", "message"}}``
with the status that fits the code.
"""

from __future__ import annotations

import base64
import functools
import hmac
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from bridge.errors import BrokerUnavailable, RunNotFound
from bridge.events import PROTOCOL
from bridge.wire import RESPOND, Action
from server import commands, sse
from server.auth import Principal, bearer_from_headers, token_for_http
from server.commands import MAX_THREAD_ID_CHARS, client_ref, on_active, optional_id
from server.errors import AuthError, BodyTooLarge, ProtocolError, wire_error
from server.gateway import Gateway
from server.metrics import CONTENT_TYPE
from server.params import check_int, parse_int

log = logging.getLogger("chat.http")

Endpoint = Callable[[Request], Awaitable[Response]]


class OrjsonResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(exc: BaseException) -> Response:
    code, message, status = wire_error(exc)
    if isinstance(exc, BrokerUnavailable):
        # An outage, not a fault of this code: one line, no traceback (503).
        log.warning("request refused: %s", exc)
    elif code == "internal":
        log.error("request failed", exc_info=exc)
    return OrjsonResponse({"ok": False, "error": {"code": code, "message": message}}, status)


def api(endpoint: Endpoint) -> Endpoint:
    """Map any error the endpoint raises to the contract's JSON error."""

    @functools.wraps(endpoint)
    async def wrapper(request: Request) -> Response:
        try:
            return await endpoint(request)
        except ClientDisconnect:
            # The client went away, or was cut, before its body was whole: nobody is
            # left to answer, and nothing failed on this side.
            return Response(status_code=400)
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
    if declared is not None and parse_int(declared, "Content-Length") > limit:
        raise BodyTooLarge(f"body larger than {limit} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(f"body larger than {limit} bytes")
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError("bad_json", f"body is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ProtocolError("bad_message", "body must be a JSON object")
    return raw


@api
async def chat_stream(request: Request) -> Response:
    """``POST /api/chat/stream``: start a run and stream it.

    The stream counts against the user's connection cap before the run starts: a
    stream over the cap is refused with 429 and starts nothing.
    """
    gateway = gateway_of(request)
    user = authenticate(request)
    body = await read_json_body(request, gateway.settings.max_message_bytes)
    message = body.get("message")
    if not isinstance(message, str) or not message.strip():
        raise ProtocolError("bad_message", "field 'message' must be a non-empty string")
    thread_id = optional_id(body, "thread_id")
    agent = optional_id(body, "agent")
    policy = on_active(body)
    ref = client_ref(body)
    key: str | int | None = idempotency_header(request)
    if key is None:
        key = ref
    elif ref is None:
        ref = key
    ids: dict[str, str] = {}
    stream = await sse.open_stream(
        gateway, user, tail=lambda status: sse.frame("stream_end", {**ids, "status": status})
    )
    async with sse.opening(stream):
        # A repeat of the key streams the run its first send started, from its first event.
        sent = await gateway.send(
            user, message, thread_id=thread_id, agent=agent, ref=ref, key=key, on_active=policy
        )
        record = sent.record
        if sent.duplicate:
            stream.headers["x-chat-duplicate"] = "true"
        stream.headers["x-chat-run-id"] = record.run_id
        ids.update(run_id=record.run_id, thread_id=record.thread_id)
        stream.head = sse.frame("stream_start", ids)
        stream.attach(await gateway.watch(user, record.run_id, 0, stream.wake))
    return stream


def idempotency_header(request: Request) -> str | None:
    """The ``Idempotency-Key`` header, held to the bounds of a frame's ``id``."""
    raw = request.headers.get("idempotency-key")
    if raw is None:
        return None
    value = client_ref({"id": raw.strip()})
    if not isinstance(value, str) or not value:
        raise ProtocolError("bad_message", "header 'Idempotency-Key' must not be empty")
    return value


def _after_seq(request: Request) -> int:
    raw = request.headers.get("last-event-id")
    source = "Last-Event-ID"
    if raw is None:
        raw = request.query_params.get("after_seq")
        source = "after_seq"
    if raw is None or raw.strip() == "":
        return 0
    return parse_int(raw, source)


#: The rejoin point of a stream (``Last-Event-ID``, else ``?after_seq=``), for every framing.
after_seq = _after_seq


@api
async def run_events(request: Request) -> Response:
    """``GET /api/chat/runs/{run_id}/events``: a run's events from a seq on, then live."""
    gateway = gateway_of(request)
    user = authenticate(request)
    run_id = request.path_params["run_id"]
    after = _after_seq(request)
    stream = await sse.open_stream(gateway, user)
    async with sse.opening(stream):
        stream.attach(await gateway.watch(user, run_id, after, stream.wake, resume=True))
    return stream


@api
async def thread_events(request: Request) -> Response:
    """``GET /api/threads/{thread_id}/events``: every run of the thread not ended, from
    its first event, then every later run, until the client goes away."""
    gateway = gateway_of(request)
    user = authenticate(request)
    thread_id = request.path_params["thread_id"]
    stream = await sse.open_stream(gateway, user)
    async with sse.opening(stream):
        going = await stream.follow_thread(user, thread_id)
        stream.headers["x-chat-thread-id"] = thread_id
        stream.headers["x-chat-active-run-ids"] = ",".join(going)
    return stream


@api
async def lifecycle(request: Request) -> Response:
    """``POST /api/chat/agents/{run_id}/{start|stop|cancel}``."""
    gateway = gateway_of(request)
    user = authenticate(request)
    run_id = request.path_params["run_id"]
    action = request.path_params["action"]
    if action == RESPOND:
        return await _respond(request, gateway, user, run_id)
    if action not in set(Action):
        expected = ", ".join(Action)
        raise RunNotFound(f"no action {action[:32]!r}; expected one of {expected}")
    status = await gateway.control(user, run_id, action)
    return OrjsonResponse({"ok": True, "run_id": run_id, "action": action, "status": status})


async def _respond(request: Request, gateway: Gateway, user: Principal, run_id: str) -> Response:
    """``POST /api/chat/agents/{run_id}/respond``: answer one of the run's input requests."""
    body = await read_json_body(request, gateway.settings.max_message_bytes)
    request_id = commands.request_id(body)
    payload = commands.response_payload(body)
    status = await gateway.respond(user, run_id, request_id, payload)
    return OrjsonResponse(
        {"ok": True, "run_id": run_id, "request_id": request_id, "status": status}
    )


@api
async def run_status(request: Request) -> Response:
    """``GET /api/chat/agents/{run_id}/status``."""
    gateway = gateway_of(request)
    user = authenticate(request)
    status = await gateway.run_status(user, request.path_params["run_id"])
    return OrjsonResponse({"ok": True, **status})


# Threads --------------------------------------------------------------------------

MAX_PAGE: Final = 100


def _limit(request: Request, default: int = 20) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    return parse_int(raw, "limit", minimum=1, maximum=MAX_PAGE)


def encode_cursor(value: object) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(value)).decode().rstrip("=")


def decode_cursor(request: Request) -> Any:
    raw = request.query_params.get("cursor")
    if not raw:
        return None
    try:
        return orjson.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (ValueError, orjson.JSONDecodeError):
        raise _bad_cursor() from None


def _bad_cursor() -> ProtocolError:
    return ProtocolError("bad_message", "cursor is not one this server gave")


@api
async def list_threads(request: Request) -> Response:
    """``GET /api/threads``: the user's threads, newest first, by cursor."""
    gateway = gateway_of(request)
    user = authenticate(request)
    limit = _limit(request)
    cursor = decode_cursor(request)
    before: tuple[float, str] | None = None
    if cursor is not None:
        if (
            not isinstance(cursor, list)
            or len(cursor) != 2
            or isinstance(cursor[0], bool)
            or not isinstance(cursor[0], int | float)
            or not math.isfinite(cursor[0])
            or not isinstance(cursor[1], str)
            or len(cursor[1]) > MAX_THREAD_ID_CHARS
        ):
            raise _bad_cursor()
        before = (float(cursor[0]), cursor[1])
    rows = await gateway.store.list_threads(user.user_id, limit + 1, before)
    page, more = rows[:limit], len(rows) > limit
    next_cursor = encode_cursor([page[-1].updated_at, page[-1].id]) if more else None
    return OrjsonResponse(
        {"ok": True, "threads": [t.public() for t in page], "next_cursor": next_cursor}
    )


@api
async def thread_messages(request: Request) -> Response:
    """``GET /api/threads/{thread_id}/messages``: oldest first, by cursor."""
    gateway = gateway_of(request)
    user = authenticate(request)
    thread = await gateway.own_thread(user, request.path_params["thread_id"])
    limit = _limit(request, 50)
    cursor = decode_cursor(request)
    after_pos = 0
    if cursor is not None:
        try:
            after_pos = check_int(cursor, "cursor")  # a position the store can compare
        except ProtocolError:
            raise _bad_cursor() from None
    rows = await gateway.store.list_messages(thread.id, limit + 1, after_pos)
    page, more = rows[:limit], len(rows) > limit
    return OrjsonResponse(
        {
            "ok": True,
            "thread": thread.public(),
            "messages": [m.public() for m in page],
            "next_cursor": encode_cursor(page[-1].pos) if more else None,
        }
    )


@api
async def delete_thread(request: Request) -> Response:
    """``DELETE /api/threads/{thread_id}``."""
    gateway = gateway_of(request)
    user = authenticate(request)
    thread_id = request.path_params["thread_id"]
    await gateway.delete_thread(user, thread_id)
    return OrjsonResponse({"ok": True, "thread_id": thread_id, "deleted": True})


async def metrics(request: Request) -> Response:
    """``GET /metrics``: Prometheus text format; off, open, or behind its own token."""
    gateway = gateway_of(request)
    settings = gateway.settings
    if settings.metrics == "off":
        return error_response(RunNotFound("metrics are off"))
    if settings.metrics_token is not None:
        given = bearer_from_headers(request.headers) or ""
        if not hmac.compare_digest(given.encode(), settings.metrics_token.encode()):
            gateway.counters.auth_failures += 1
            return error_response(AuthError("metrics need their bearer token"))
    return Response(gateway.metrics.render(), media_type=CONTENT_TYPE)


async def api_not_found(request: Request) -> Response:
    """Any other ``/api/`` path: the contract's JSON error, not the static files' 404."""
    return error_response(RunNotFound(f"no route {request.method} {request.url.path}"))


async def health(request: Request) -> Response:
    gateway = gateway_of(request)
    counters = gateway.counters
    reachable = await gateway.broker.healthy()
    status = "healthy"
    if gateway.shutting_down:
        status = "shutting_down"
    elif not reachable:
        status = "degraded"  # the broker is out: no new runs until it is back
    return OrjsonResponse(
        {
            "status": status,
            "protocol": PROTOCOL,
            "features": {
                "chat_streaming": True,
                "agent_lifecycle_control": True,
                "websocket_events": True,
                "sse_events": True,
                "resumable_runs": True,
                "threads": True,
                "idempotent_sends": True,
                "double_texting": True,
                "thread_watching": True,
                "input_requests": True,
                "ag_ui": True,
                "ai_sdk_ui_stream": True,
            },
            "broker": gateway.broker.name,
            "broker_reachable": reachable,
            "pid": os.getpid(),
            "store": gateway.store.name,
            "store_failures": gateway.persistence.failures,
            "agents": gateway.agents.names(),
            "default_agent": gateway.agents.default,
            "uptime_s": round(time.time() - gateway.counters.started_at, 3),
            "connections": counters.connections,
            "sse_streams": counters.sse_streams,
            "runs_active": len(gateway.supervisor),
            "counters": {
                "runs_started": counters.runs_started,
                "slow_consumer_closes": counters.slow_consumer_closes,
                "rate_limited": counters.rate_limited,
                "auth_failures": counters.auth_failures,
            },
            "memory": gateway.memory_report(),
        },
        status_code=200 if status == "healthy" else 503,
    )


def new_message(content: str, limit: int) -> str:
    """A front-end protocol's new message, held to ``CHAT_MAX_MESSAGE_BYTES`` as any other.

    Raises:
        ProtocolError: ``too_large`` (413) when it is longer.
    """
    if len(content.encode()) > limit:
        raise BodyTooLarge(f"the new message is larger than {limit} bytes")
    return content

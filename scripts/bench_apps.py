"""The servers the gateway is compared with in ``scripts/bench.py``, as ASGI apps.

Each app answers the ``load`` agent's message (``chunks=N chunk_chars=C thinking=T
tools=K tool_ms=M delay_ms=D``) with the events the gateway sends for it, in the
same order, with the same ``seq``/``ts`` envelope and data of the same shape and
size: ``user_message``, ``agent_started``, the thinking events, the tool calls,
the chunks, ``response_complete`` and ``agent_completed``.

* ``bare``: a Starlette WebSocket endpoint that sends ready-made frames (the text
  of every event is prepared once per message text; only the run's ids and
  ``ts`` are filled in), through the connection's ASGI send, on ``/ws``; and a
  bare echo endpoint on ``/echo``, the round-trip baseline.  The limit of this
  stack: no authentication, no run log, no per-session writer.
* ``socketio``: python-socketio's ASGI server (default settings, its default JSON
  encoder), emitting each event as a Socket.IO event named after its ``type``
  whose argument is the envelope.  A run's events go to a room named after the run.
* ``sse``: sse-starlette's ``EventSourceResponse`` on ``POST /api/chat/stream``,
  framed like the gateway's route (``stream_start``, ``id``/``event``/``data``
  per event, ``stream_end``), each envelope encoded with orjson.

Every app also accepts ``resume`` (``run_id``, ``after_seq`` 0) to watch a run
that is going on: the events sent so far, then the live ones (the fan-out
scenario), and ``ping`` (answered by ``pong``).  None of them checks tokens.

Run one with the same uvicorn settings as the gateway::

    python scripts/bench_apps.py bare --port 8101
    python scripts/bench_apps.py socketio --port 8102
    python scripts/bench_apps.py sse --port 8103
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Final

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from agents.load import LoadSpec, Pacer, chunk_text

PROTOCOL: Final = "chat.v1"
HEARTBEAT_S: Final = 15.0
MAX_MESSAGE_BYTES: Final = 64 * 1024
APPS: Final = ("bare", "socketio", "sse")

#: One planned event: its type and data, or None for a pause of ``data`` seconds.
Step = tuple[str | None, Any]


class Paced(float):
    """A pause between chunks, on the model's clock like the ``load`` agent's
    (:class:`agents.load.Pacer`): it ends ``self`` seconds after the previous one's due
    time."""


async def pause(seconds: float, pacer: Pacer) -> None:
    if isinstance(seconds, Paced):
        await pacer.wait(seconds)
    else:
        await asyncio.sleep(seconds)


@dataclass(frozen=True, slots=True)
class Dynamic:
    """Data made when the event is sent (it holds a duration): same shape and size."""

    call: int = 0
    tool_ms: int = 0

    def data(self, kind: str, started: float) -> dict[str, Any]:
        took = round((time.perf_counter() - started) * 1000, 3)
        if kind == "tool_completed":
            return {
                "call_id": f"call_{self.call}",
                "tool": "sleep",
                "ok": True,
                "duration_ms": took,
                "result": {"slept_ms": self.tool_ms},
            }
        return {"status": "completed", "duration_ms": took}


def new_id(prefix: str) -> str:
    """Ids shaped like the gateway's (``r_``/``t_``/``m_`` and 16 url-safe characters)."""
    return f"{prefix}{secrets.token_urlsafe(12)}"


@lru_cache(maxsize=256)
def plan(content: str) -> tuple[Step, ...]:
    """The events after ``user_message`` for a ``load`` message, with the pauses between.

    Raises:
        ValueError: the message is not a ``load`` message (``fail=1`` is not modelled).
    """
    try:
        spec = LoadSpec.parse(content)
    except Exception as exc:  # the agent's input error
        raise ValueError(str(exc)) from None
    if spec.fail:
        raise ValueError("the comparison servers do not model fail=1")
    steps: list[Step] = [("agent_started", {"agent": "load"})]
    for i in range(spec.thinking):
        text = f"thinking {i + 1} of {spec.thinking}"
        steps.append(("agent_thinking", {"text": text, "kind": "reasoning"}))
    for j in range(1, spec.tools + 1):
        call = f"call_{j}"
        steps.append(
            ("tool_executing", {"call_id": call, "tool": "sleep", "args": {"ms": spec.tool_ms}})
        )
        steps.append((None, spec.tool_ms / 1000))
        steps.append(("tool_completed", Dynamic(j, spec.tool_ms)))
    delay = spec.delay_ms / 1000
    texts = []
    for i in range(spec.chunks):
        if i and delay:
            steps.append((None, Paced(delay)))
        text = chunk_text(i, spec.chunk_chars)
        texts.append(text)
        steps.append(("response_chunk", {"text": text, "index": i}))
    # Like the gateway's: an id of 18 characters, and "stored" once the answer is persisted.
    steps.append(
        (
            "response_complete",
            {
                "message_id": "m_" + "x" * 16,
                "content": "".join(texts),
                "fallback": False,
                "stored": True,
            },
        )
    )
    steps.append(("agent_completed", Dynamic()))
    return tuple(steps)


def envelope(
    kind: str, run_id: str | None, thread_id: str | None, seq: int | None, data: Any
) -> dict[str, Any]:
    return {
        "type": kind,
        "run_id": run_id,
        "thread_id": thread_id,
        "seq": seq,
        "ts": time.time(),
        "data": data,
    }


def user_message_data(content: str, ref: Any) -> dict[str, Any]:
    return {"message_id": new_id("m_"), "content": content, "ref": ref}


def ready_data(user: str) -> dict[str, Any]:
    return {
        "session_id": new_id("s_"),
        "user_id": user,
        "protocol": PROTOCOL,
        "heartbeat_s": HEARTBEAT_S,
        "max_message_bytes": MAX_MESSAGE_BYTES,
    }


async def envelopes(
    content: str, ref: Any, run_id: str, thread_id: str
) -> AsyncIterator[dict[str, Any]]:
    """A run's envelopes as dicts, each stamped when it is made (socketio and sse)."""
    steps = plan(content)
    started = time.perf_counter()
    pacer = Pacer()
    yield envelope("user_message", run_id, thread_id, 1, user_message_data(content, ref))
    seq = 1
    for kind, data in steps:
        if kind is None:
            await pause(data, pacer)
            continue
        seq += 1
        if isinstance(data, Dynamic):
            data = data.data(kind, started)
        yield envelope(kind, run_id, thread_id, seq, data)


# bare: ready-made frames ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Template:
    """One event's text around its run ids and ``ts``: ``head + ids + mid + ts + tail``."""

    kind: str
    head: str
    mid: str
    tail: str  # empty: the data is made when the event is sent
    dynamic: Dynamic | None = None


@lru_cache(maxsize=256)
def templates(content: str) -> tuple[Template | float, ...]:
    """The frames of a message's run after ``user_message``; a float is a pause."""
    out: list[Template | float] = []
    seq = 1
    for kind, data in plan(content):
        if kind is None:
            out.append(data if isinstance(data, Paced) else float(data))
            continue
        seq += 1
        head = '{"type":"' + kind + '","run_id":"'
        mid = '","seq":' + str(seq) + ',"ts":'
        if isinstance(data, Dynamic):
            out.append(Template(kind, head, mid, "", data))
        else:
            out.append(Template(kind, head, mid, ',"data":' + orjson.dumps(data).decode() + "}"))
    return tuple(out)


@dataclass(eq=False)
class BareRun:
    run_id: str
    thread_id: str
    watchers: list[Callable[[str], Any]] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)


def bare_app() -> Starlette:
    runs: dict[str, BareRun] = {}

    async def run(content: str, ref: Any, send: Callable[[str], Any]) -> None:
        try:
            frames = templates(content)
        except ValueError as exc:
            error = envelope(
                "error", None, None, None, {"code": "bad_message", "message": str(exc), "ref": ref}
            )
            await send(orjson.dumps(error).decode())
            return
        record = BareRun(new_id("r_"), new_id("t_"))
        record.watchers.append(send)
        runs[record.run_id] = record
        ids = record.run_id + '","thread_id":"' + record.thread_id
        watchers = record.watchers
        sent = record.sent
        started = time.perf_counter()
        pacer = Pacer()
        first = envelope(
            "user_message", record.run_id, record.thread_id, 1, user_message_data(content, ref)
        )
        text = orjson.dumps(first).decode()
        sent.append(text)
        await send(text)
        try:
            for frame in frames:
                if isinstance(frame, float):
                    await pause(frame, pacer)
                    continue
                tail = frame.tail
                if frame.dynamic is not None:
                    data = frame.dynamic.data(frame.kind, started)
                    tail = ',"data":' + orjson.dumps(data).decode() + "}"
                text = frame.head + ids + frame.mid + repr(time.time()) + tail
                sent.append(text)
                for watcher in watchers:
                    await watcher(text)
        finally:
            runs.pop(record.run_id, None)

    async def resume(frame: dict[str, Any], send: Callable[[str], Any]) -> None:
        record = runs.get(frame.get("run_id", ""))
        ref = frame.get("id")
        if record is None:
            data = {"code": "not_found", "message": "no such run", "ref": ref}
            await send(orjson.dumps(envelope("error", None, None, None, data)).decode())
            return
        # Snapshot and attach with no await between: every event is sent once, in order.
        backlog = list(record.sent)
        queue: list[str] = []
        record.watchers.append(_buffering(queue))
        ack = {
            "ref": ref,
            "action": "resume",
            "run_id": record.run_id,
            "status": "running",
            "last_seq": len(backlog),
        }
        await send(orjson.dumps(envelope("ack", None, None, None, ack)).decode())
        for text in backlog:
            await send(text)
        while queue:
            await send(queue.pop(0))
        index = next(i for i, w in enumerate(record.watchers) if getattr(w, "queue", None) is queue)
        record.watchers[index] = send

    async def ws_endpoint(websocket: WebSocket) -> None:
        offered = websocket.scope.get("subprotocols") or []
        await websocket.accept(subprotocol=PROTOCOL if PROTOCOL in offered else None)

        # The connection's ASGI send itself, as the gateway's sessions use it: no
        # per-message state checks of Starlette's WebSocket.send.
        asgi_send = websocket._send

        async def send(text: str) -> None:
            await asgi_send({"type": "websocket.send", "text": text})

        await send(
            orjson.dumps(
                envelope("connection_ready", None, None, None, ready_data("bench"))
            ).decode()
        )
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            try:
                frame = orjson.loads(message.get("text") or message.get("bytes") or b"")
                kind = frame["type"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue
            if kind == "user_message":
                await run(frame["content"], frame.get("id"), send)
            elif kind == "resume":
                await resume(frame, send)
            elif kind == "ping":
                data = {"ref": frame.get("id")}
                await send(orjson.dumps(envelope("pong", None, None, None, data)).decode())

    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        asgi_send = websocket._send
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is not None:
                await asgi_send({"type": "websocket.send", "text": text})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "healthy", "app": "bare"})

    return Starlette(
        routes=[
            WebSocketRoute("/ws", ws_endpoint),
            WebSocketRoute("/echo", echo),
            Route("/health", health),
        ]
    )


def _buffering(queue: list[str]) -> Callable[[str], Any]:
    """A watcher that keeps live frames while a resume sends its backlog."""

    async def keep(text: str) -> None:
        queue.append(text)

    keep.queue = queue  # type: ignore[attr-defined]
    return keep


# python-socketio ----------------------------------------------------------------------


def socketio_app() -> Any:
    import socketio  # the bench extra

    # Connections are accepted before the connect handler runs, so that the handler
    # can send connection_ready as the gateway does.
    sio = socketio.AsyncServer(
        async_mode="asgi",
        always_connect=True,
        ping_interval=HEARTBEAT_S,
        ping_timeout=HEARTBEAT_S,
        max_http_buffer_size=MAX_MESSAGE_BYTES,
    )
    runs: dict[str, list[dict[str, Any]]] = {}

    async def connect(sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        ready = envelope("connection_ready", None, None, None, ready_data("bench"))
        await sio.emit("connection_ready", ready, to=sid)

    async def user_message(sid: str, frame: dict[str, Any]) -> None:
        run_id, thread_id = new_id("r_"), new_id("t_")
        await sio.enter_room(sid, run_id)
        sent: list[dict[str, Any]] = []
        runs[run_id] = sent
        try:
            async for event in envelopes(frame["content"], frame.get("id"), run_id, thread_id):
                sent.append(event)
                await sio.emit(event["type"], event, room=run_id)
        except ValueError as exc:
            data = {"code": "bad_message", "message": str(exc), "ref": frame.get("id")}
            await sio.emit("error", envelope("error", None, None, None, data), to=sid)
        finally:
            runs.pop(run_id, None)

    async def resume(sid: str, frame: dict[str, Any]) -> None:
        run_id = frame.get("run_id", "")
        sent = runs.get(run_id)
        if sent is None:
            data = {"code": "not_found", "message": "no such run", "ref": frame.get("id")}
            await sio.emit("error", envelope("error", None, None, None, data), to=sid)
            return
        # Watchers join during the run's pause (the tool call), so the backlog is complete.
        backlog = list(sent)
        ack = {
            "ref": frame.get("id"),
            "action": "resume",
            "run_id": run_id,
            "status": "running",
            "last_seq": len(backlog),
        }
        await sio.emit("ack", envelope("ack", None, None, None, ack), to=sid)
        for event in backlog:
            await sio.emit(event["type"], event, to=sid)
        await sio.enter_room(sid, run_id)

    async def ping(sid: str, frame: dict[str, Any]) -> None:
        await sio.emit("pong", envelope("pong", None, None, None, {"ref": frame.get("id")}), to=sid)

    # Registered by call, not as decorators: socketio has no type hints.
    for name, handler in (
        ("connect", connect),
        ("user_message", user_message),
        ("resume", resume),
        ("ping", ping),
    ):
        sio.on(name, handler)
    return socketio.ASGIApp(sio, socketio_path="socket.io")


# sse-starlette ----------------------------------------------------------------------


def sse_app() -> Starlette:
    from sse_starlette import EventSourceResponse, ServerSentEvent  # the bench extra

    async def chat_stream(request: Request) -> Response:
        body = orjson.loads(await request.body())
        content = body.get("message")
        if not isinstance(content, str):
            return JSONResponse({"ok": False, "error": {"code": "bad_message"}}, 400)
        try:
            plan(content)
        except ValueError as exc:
            return JSONResponse(
                {"ok": False, "error": {"code": "bad_message", "message": str(exc)}}, 400
            )
        run_id, thread_id = new_id("r_"), new_id("t_")
        ids = {"run_id": run_id, "thread_id": thread_id}

        async def stream() -> AsyncIterator[ServerSentEvent]:
            yield ServerSentEvent(orjson.dumps(ids).decode(), event="stream_start", sep="\n")
            async for event in envelopes(content, None, run_id, thread_id):
                yield ServerSentEvent(
                    orjson.dumps(event).decode(),
                    event=event["type"],
                    id=str(event["seq"]),
                    sep="\n",
                )
            end = {**ids, "status": "completed"}
            yield ServerSentEvent(orjson.dumps(end).decode(), event="stream_end", sep="\n")

        return EventSourceResponse(stream(), ping=int(HEARTBEAT_S), sep="\n")

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "healthy", "app": "sse"})

    return Starlette(
        routes=[Route("/api/chat/stream", chat_stream, methods=["POST"]), Route("/health", health)]
    )


# Serving ------------------------------------------------------------------------------


def make_app(name: str) -> Any:
    if name == "bare":
        return bare_app()
    if name == "socketio":
        return socketio_app()
    if name == "sse":
        return sse_app()
    raise ValueError(f"unknown app {name!r}; expected one of {', '.join(APPS)}")


def uvicorn_config(app: Any, host: str, port: int) -> uvicorn.Config:
    """The settings ``server.serve.uvicorn_config`` gives the gateway with default settings."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        ws_max_size=MAX_MESSAGE_BYTES,
        ws_ping_interval=HEARTBEAT_S,
        ws_ping_timeout=HEARTBEAT_S,
        timeout_graceful_shutdown=5,
        proxy_headers=False,
        loop="asyncio",  # the gateway's CHAT_EVENT_LOOP
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench_apps.py", description="Serve one of the comparison apps of scripts/bench.py."
    )
    parser.add_argument("app", choices=APPS)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("the comparison servers bind to loopback only")
    uvicorn.Server(uvicorn_config(make_app(args.app), args.host, args.port)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

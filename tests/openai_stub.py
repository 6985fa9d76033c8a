"""An OpenAI-compatible chat-completions server for tests: scripted, streamed, observant.

``POST /v1/chat/completions`` answers each request with the next scripted
:class:`Reply`: an HTTP error with an OpenAI-style JSON body, or a 200 whose
body is Server-Sent Events in the exact shape OpenAI and vLLM stream them
(``data: {"object": "chat.completion.chunk", ...}\\n\\n`` … ``data: [DONE]\\n\\n``).
A stream can stop at a :class:`Hold` until the test releases it, sleep, or send
an error event mid-stream.  Every request is recorded (body, headers), with how
many chunks it was sent and when its client disconnected before the stream
ended (``time.monotonic()``, the clock the tests use too).

The server is a Starlette app on a real uvicorn in a thread, on a free loopback
port, like :func:`tests.support.run_server`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from tests.support import free_port

MODEL = "test-model"
_ids = itertools.count(1)


# What a stream is made of --------------------------------------------------------------


@dataclass
class Hold:
    """The stream stops here until :meth:`release` (or ``timeout_s``, or a disconnect)."""

    timeout_s: float = 10.0
    gate: threading.Event = field(default_factory=threading.Event)
    #: Set when the stream reaches the hold.
    reached: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        self.gate.set()


@dataclass
class Sleep:
    seconds: float


@dataclass
class StreamError:
    """An error event inside a stream, as OpenAI and vLLM send one after a 200."""

    message: str
    code: int = 500


Item = dict[str, Any] | Hold | Sleep | StreamError


@dataclass
class Reply:
    status: int = 200
    #: The stream's items (chunk objects and controls); None for an error reply.
    items: list[Item] | None = None
    #: The JSON body of an error reply.
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    #: The usage its last chunk reports when the request asks for it
    #: (``stream_options.include_usage``); None: counted by :func:`count_usage`.
    usage: dict[str, int] | None = None


def count_usage(request: Request, reply: Reply) -> dict[str, int]:
    """The usage the stub reports unless the reply names one: a token per word of
    the request's messages, a token per chunk of the reply."""
    prompt = sum(len(str(m.get("content") or "").split()) for m in request.messages)
    completion = sum(1 for item in reply.items or () if isinstance(item, dict))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def chunk(delta: dict[str, Any], finish: str | None = None, chunk_id: str = "") -> dict[str, Any]:
    """One ``chat.completion.chunk`` object, as OpenAI streams it."""
    return {
        "id": chunk_id or "chatcmpl-stub",
        "object": "chat.completion.chunk",
        "created": 1764000000,
        "model": MODEL,
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def content(text: str) -> dict[str, Any]:
    return {"content": text}


def reasoning(text: str, field_name: str = "reasoning_content") -> dict[str, Any]:
    return {field_name: text}


def call_start(index: int, call_id: str, name: str, arguments: str = "") -> dict[str, Any]:
    """The first fragment of a tool call: index, id, type and name."""
    return {
        "tool_calls": [
            {
                "index": index,
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
        ]
    }


def call_args(index: int, piece: str) -> dict[str, Any]:
    """A further piece of a tool call's arguments."""
    return {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}


def stream(*items: Item, finish: str = "stop") -> Reply:
    """A 200 streamed reply: the role chunk, the items (deltas are wrapped as chunks),
    the chunk with ``finish_reason``, then ``[DONE]``."""
    chunk_id = f"chatcmpl-{next(_ids)}"
    body: list[Item] = [chunk({"role": "assistant", "content": ""}, chunk_id=chunk_id)]
    for item in items:
        body.append(chunk(item, chunk_id=chunk_id) if isinstance(item, dict) else item)
    body.append(chunk({}, finish=finish, chunk_id=chunk_id))
    return Reply(items=body)


def tool_turn(*calls: tuple[str, str, list[str]]) -> Reply:
    """A turn that calls tools: ``(call_id, name, argument pieces)`` each, one after the other."""
    items: list[Item] = []
    for index, (call_id, name, pieces) in enumerate(calls):
        items.append(call_start(index, call_id, name))
        items.extend(call_args(index, piece) for piece in pieces)
    return stream(*items, finish="tool_calls")


def error(status: int, message: str, **headers: str) -> Reply:
    """An HTTP error with OpenAI's JSON error body."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return Reply(
        status=status,
        body={"error": {"message": message, "type": kind, "param": None, "code": None}},
        headers=headers,
    )


# The server ------------------------------------------------------------------------


@dataclass
class Request:
    """One request the stub got, and what became of its stream."""

    body: dict[str, Any]
    headers: dict[str, str]
    received_at: float
    chunks_sent: int = 0
    completed: bool = False
    #: When the client went away before the stream ended (``time.monotonic()``).
    disconnected_at: float | None = None
    #: The usage its stream reported (``stream_options.include_usage``), if it did.
    usage: dict[str, int] | None = None

    @property
    def messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = self.body["messages"]
        return messages


class OpenAIStub:
    """The scripted server's state, shared between the test and the server's thread."""

    def __init__(self) -> None:
        self.port = 0
        self._lock = threading.Lock()
        self._script: deque[Reply] = deque()
        self.requests: list[Request] = []
        self._holds: list[Hold] = []

    @property
    def url(self) -> str:
        """The base URL clients are given (``.../v1``)."""
        return f"http://127.0.0.1:{self.port}/v1"

    def queue(self, *replies: Reply) -> None:
        with self._lock:
            self._script.extend(replies)
            for reply in replies:
                self._holds.extend(i for i in reply.items or () if isinstance(i, Hold))

    def reset(self) -> None:
        self.release_all()
        with self._lock:
            self._script.clear()
            self.requests.clear()
            self._holds.clear()

    def release_all(self) -> None:
        with self._lock:
            for hold in self._holds:
                hold.release()

    @property
    def pending(self) -> int:
        """Scripted replies not asked for yet."""
        with self._lock:
            return len(self._script)

    def _next(self, request: Request) -> Reply:
        with self._lock:
            self.requests.append(request)
            if self._script:
                return self._script.popleft()
        return error(500, "the stub's script is exhausted")

    # ASGI -----------------------------------------------------------------------

    async def completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        request = Request(json.loads(raw), headers, time.monotonic())
        reply = self._next(request)
        if reply.items is None:
            await self._send_json(send, reply)
            return
        await send(
            {
                "type": "http.response.start",
                "status": reply.status,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                ],
            }
        )
        options = request.body.get("stream_options") or {}
        include_usage = bool(options.get("include_usage"))
        watcher = asyncio.create_task(self._watch(receive, request))
        try:
            for item in reply.items:
                if request.disconnected_at is not None:
                    return
                if isinstance(item, Hold):
                    item.reached.set()
                    await self._wait(request, item.gate.is_set, item.timeout_s)
                elif isinstance(item, Sleep):
                    await self._wait(request, lambda: False, item.seconds)
                elif isinstance(item, StreamError):
                    body = {"error": {"message": item.message, "code": item.code}}
                    await self._event(send, request, json.dumps(body))
                else:
                    # As OpenAI does: every chunk says ``usage: null`` when it is asked for.
                    sent = {**item, "usage": None} if include_usage else item
                    await self._event(send, request, json.dumps(sent))
            if request.disconnected_at is None and include_usage:
                # The last chunk, without choices, carries the usage.
                usage = reply.usage or count_usage(request, reply)
                last = {**chunk({}), "choices": [], "usage": usage}
                await self._event(send, request, json.dumps(last))
                request.usage = usage
            if request.disconnected_at is None:
                await self._event(send, request, "[DONE]")
        except OSError:  # the client went away as a chunk was sent
            if request.disconnected_at is None:
                request.disconnected_at = time.monotonic()
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        if request.disconnected_at is None:
            request.completed = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _event(send: Send, request: Request, data: str) -> None:
        await send(
            {"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True}
        )
        request.chunks_sent += 1

    @staticmethod
    async def _wait(request: Request, done: Any, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not done() and request.disconnected_at is None and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    @staticmethod
    async def _watch(receive: Receive, request: Request) -> None:
        """Note the moment the client goes away while the stream is still open."""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                request.disconnected_at = time.monotonic()
                return

    @staticmethod
    async def _send_json(send: Send, reply: Reply) -> None:
        body = json.dumps(reply.body or {}).encode()
        headers = [(b"content-type", b"application/json")]
        headers += [(k.lower().encode(), v.encode()) for k, v in reply.headers.items()]
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _Endpoint:
    """An ASGI endpoint for Starlette's Route (a plain callable would be wrapped)."""

    def __init__(self, stub: OpenAIStub) -> None:
        self.stub = stub

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.stub.completions(scope, receive, send)


@contextlib.contextmanager
def run_stub() -> Iterator[OpenAIStub]:
    """Serve an :class:`OpenAIStub` on a free loopback port for the duration."""
    stub = OpenAIStub()
    app = Starlette(routes=[Route("/v1/chat/completions", _Endpoint(stub), methods=["POST"])])
    stub.port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=stub.port,
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"openai-stub:{stub.port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the OpenAI stub did not start")
        time.sleep(0.01)
    try:
        yield stub
    finally:
        stub.release_all()
        server.should_exit = True
        thread.join(timeout=10)

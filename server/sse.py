"""Server-Sent Events: the same outbox as the WebSocket, framed as text.

An :class:`SseStream` is a client of the gateway like a WebSocket session: it
counts against ``CHAT_MAX_CONNECTIONS_PER_USER``, it reads its run's log through
a :class:`~server.outbox.Outbox` with its own cursor, and the gateway's watchdog
asks that outbox whether it must be cut, with the same settings.  The only
difference is the framing: each event is ``id: <seq>``/``event:``/``data:``, a
``: ping`` comment goes out when nothing happened for a heartbeat, and a cut is
an ``error`` frame (``slow_consumer``, or ``unauthorized`` when the token
expired) before the stream ends.

The body is sent with the server's ASGI ``send``, which waits while the client
leaves the transport's buffer full: that wait is what the outbox sees as a
stuck send.  A stream cut as a slow consumer gets its last frames only if the
client reads them within ``CHAT_SEND_TIMEOUT_S``; otherwise its connection is
dropped (through the server's ``chat.connection.abort`` extension, so the server
sees a lost connection rather than an unfinished response), and the run log it
held is let go either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Final

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from bridge import events
from bridge.broker import ThreadFollow, Watch
from bridge.events import Event
from server.auth import Principal
from server.errors import RateLimited
from server.gateway import Gateway
from server.outbox import CLOSE_NORMAL, CLOSE_SLOW, Outbox, Policy
from server.protocols import ABORT

log = logging.getLogger("chat.http")

PING: Final = b": ping\n\n"
#: How long a dropped connection's loss may take to be reported (one loop turn, really).
DROP_WAIT_S: Final = 1.0
HEADERS: Final = {
    "Cache-Control": "no-store",
    "X-Accel-Buffering": "no",
    "Connection": "keep-alive",
}


def frame(event: str, data: object) -> bytes:
    """An SSE message with no ``id`` (``stream_start``, ``stream_end``, ``error``)."""
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def frame_event(event: Event) -> bytes:
    """A run event with its ``seq`` as ``id``; a connection ``error`` as code and message."""
    if event.seq is None and event.type == "error":
        data = event.data
        return frame("error", {"code": data["code"], "message": data["message"]})
    return event.sse()


class SseStream(Response):
    """One SSE response: a gateway client whose body is its outbox, framed."""

    transport = "sse"
    media_type = "text/event-stream"

    def __init__(
        self,
        gateway: Gateway,
        user: Principal,
        *,
        head: bytes | None = None,
        tail: Callable[[str | None], bytes] | None = None,
        framer: Callable[[Event], bytes] | None = None,
        until: Callable[[], bool] | None = None,
    ) -> None:
        # As StreamingResponse does: no body, so no Content-Length.
        self.status_code = 200
        self.background = None
        self.init_headers(HEADERS)
        settings = gateway.settings
        self.gateway = gateway
        self.user_id = user.user_id
        self.head = head
        self._tail = tail
        #: How each event is written (another protocol's framing); ``chat.v1``'s by default.
        self.framer = framer or frame_event
        #: Whether the framing has ended the stream before the run's end (an AG-UI interrupt).
        self._until = until
        # The token's expiry, on the loop's clock (the stream is made inside the loop).
        left = user.expires_at + gateway.auth.leeway_s - time.time()
        self._expires_at = asyncio.get_running_loop().time() + left
        self.box = Outbox(
            Policy(settings.send_buffer_bytes, settings.send_timeout_s),
            expires_at=self._expires_at,
        )
        self._wake = asyncio.Event()
        self._aborted = asyncio.Event()
        self._closed = asyncio.Event()
        self._status: str | None = None
        #: A thread's stream: it stays open between runs, until the client goes away.
        self.follows: ThreadFollow | None = None
        self._seen: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    # LocalSession -------------------------------------------------------------------

    @property
    def closed(self) -> asyncio.Event:
        return self._closed

    def wake(self) -> None:
        """The watch's wake-up: the run published an event."""
        self._wake.set()

    def attach(self, watch: Watch) -> None:
        # Backlog asked for at once (``Last-Event-ID``, ``after_seq``) is allowed on top.
        self.box.watch(watch, allowance=watch.lag_bytes())
        self._wake.set()

    def close(self, code: int, reason: str, *, drain: bool = True) -> None:
        if self.box.close(code, reason, drain=drain) and not drain:
            self._aborted.set()
        self._wake.set()

    async def follow_thread(self, user: Principal, thread_id: str) -> list[str]:
        """Stream every run of the thread not ended, from its first event, and every
        run of it created later; the runs not ended."""

        def announced(run_id: str) -> None:
            if self.box.closing or not self._first_sight(run_id):
                return
            task = asyncio.get_running_loop().create_task(self._follow_run(user, run_id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        self.follows, going = await self.gateway.follow_thread(user, thread_id, announced)
        for run_id in going:
            if self._first_sight(run_id):
                await self._follow_run(user, run_id)
        return going

    def _first_sight(self, run_id: str) -> bool:
        if run_id in self._seen:
            return False
        self._seen.add(run_id)
        return True

    async def _follow_run(self, user: Principal, run_id: str) -> None:
        try:
            self.attach(await self.gateway.watch(user, run_id, 0, self.wake))
        except Exception as exc:  # ended and forgotten meanwhile: nothing to follow
            log.debug("thread stream: run %s not followed: %r", run_id, exc)

    def check(self, now: float) -> None:
        cut = self.box.verdict(now)
        if cut is not None:
            self.box.cut(cut)
            if not cut.drain:
                self._aborted.set()
            self._wake.set()

    def buffered_bytes(self) -> int:
        return self.box.buffered_bytes()

    # ASGI ---------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway = self.gateway
        loop = asyncio.get_running_loop()
        at = self._expires_at
        expiry = loop.call_at(at, lambda: self.check(max(loop.time(), at)))
        tasks: list[asyncio.Task[None]] = []
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            writer = asyncio.create_task(self._write(send))
            listener = asyncio.create_task(_until_disconnect(receive))
            aborted = asyncio.create_task(self._wait_aborted())
            tasks = [writer, listener, aborted]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if writer.done() and not self.box.aborted:
                writer.result()
            elif self.box.aborted and not listener.done() and not await self._abort(writer, send):
                await _drop(scope, listener)
        finally:
            expiry.cancel()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if self.follows is not None:
                self.follows.close()
            for task in self._tasks:
                task.cancel()
            self.box.finish()
            await gateway.remove_session(self)
            self._closed.set()

    async def _wait_aborted(self) -> None:
        await self._aborted.wait()

    async def _abort(self, writer: asyncio.Task[None], send: Send) -> bool:
        """End a stream the outbox cut: the writer stops, the client is told if it reads.

        Returns whether the response was completed (else its connection must be dropped).
        """
        box = self.box
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await writer
        if box.close_code == CLOSE_SLOW:
            self.gateway.counters.slow_consumer_closes += 1
            self.gateway.counters.slow_consumer_by["sse"] += 1
        last = self.framer(events.error(box.error_code or "internal", box.close_reason))
        if self._tail is not None:
            last += self._tail(None)
        with contextlib.suppress(Exception):
            # Behind what the client has not read: one that reads again within the send
            # timeout sees why; one that never does has its connection dropped.
            async with asyncio.timeout(self.gateway.settings.send_timeout_s):
                await send({"type": "http.response.body", "body": last, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return True
        return False

    async def _send(self, send: Send, body: bytes) -> None:
        box = self.box
        box.in_send = True
        await send({"type": "http.response.body", "body": body, "more_body": True})
        box.sends += 1
        box.in_send = False

    async def _write(self, send: Send) -> None:
        """Pump the outbox until the run's ``agent_completed`` (or a close), then the tail."""
        box = self.box
        wake = self._wake
        heartbeat = self.gateway.settings.heartbeat_s
        counters = self.gateway.counters
        if self.head is not None:
            await self._send(send, self.head)
        while True:
            wake.clear()
            ready, more = await box.take()
            if ready:
                last = ready[-1]
                if last.type == "agent_completed":
                    self._status = str(last.data.get("status"))
                body = b"".join(self.framer(event) for event in ready)
                if body:
                    await self._send(send, body)
                counters.events_delivered += sum(1 for event in ready if event.seq is not None)
                if self._until is not None and self._until():
                    break
            if more:
                continue
            if box.aborted:
                return
            if box.closing or (not box.watching and self.follows is None):
                break
            try:
                async with asyncio.timeout(heartbeat):
                    await wake.wait()
            except TimeoutError:
                await self._send(send, PING)
        end = b""
        if box.error_code is not None:  # cut after draining: the token expired
            end += self.framer(events.error(box.error_code, box.close_reason))
        if self._tail is not None:
            end += self._tail(self._status)
        await send({"type": "http.response.body", "body": end, "more_body": False})
        if not box.closing:
            box.close(CLOSE_NORMAL, "stream ended")


async def _drop(scope: Scope, listener: asyncio.Task[None]) -> None:
    """Drop the connection of a response that cannot be finished, through the
    server's abort extension (see :data:`server.protocols.ABORT`), and wait for the
    server to report it lost; a server without the extension closes it itself."""
    abort = (scope.get("extensions") or {}).get(ABORT, {}).get("abort")
    if abort is None:
        return
    abort()
    with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
        async with asyncio.timeout(DROP_WAIT_S):
            await asyncio.shield(listener)


async def _until_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


@contextlib.asynccontextmanager
async def opening(stream: SseStream) -> AsyncIterator[SseStream]:
    """While a route sets up ``stream`` (starts or finds its run, attaches the watch):
    a failure gives its place in the user's connection cap back before it is raised."""
    try:
        yield stream
    except BaseException:
        await stream.gateway.remove_session(stream)
        raise


async def open_stream(
    gateway: Gateway,
    user: Principal,
    *,
    head: bytes | None = None,
    tail: Callable[[str | None], bytes] | None = None,
    framer: Callable[[Event], bytes] | None = None,
    headers: dict[str, str] | None = None,
    until: Callable[[], bool] | None = None,
) -> SseStream:
    """A stream counted against the user's connection cap.

    Raises:
        RateLimited: the user already has ``CHAT_MAX_CONNECTIONS_PER_USER`` open.
    """
    stream = SseStream(gateway, user, head=head, tail=tail, framer=framer, until=until)
    for name, value in (headers or {}).items():
        stream.headers[name] = value
    if not await gateway.add_session(stream):
        limit = gateway.settings.max_connections_per_user
        raise RateLimited(f"more than {limit} connections for this user")
    return stream

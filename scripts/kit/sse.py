"""Server-Sent Events: one incremental parser, and a keep-alive HTTP/1.1 connection over it.

:class:`SseParser` is Sans-I/O: bytes in, :class:`SseMessage` records out. It
follows the WHATWG HTML "event stream interpretation": lines end with CRLF, LF
or CR; a blank line ends a message; ``field: value`` loses one space after the
colon; ``data`` lines join with LF; a line that starts with ``:`` is a comment.
A block of comments alone yields nothing.

:class:`SseConn` sends ``POST`` requests on one connection and feeds each
response body, de-chunked by httptools (the HTTP parser uvicorn uses), to a
fresh parser; the load clients and the benchmark drive SSE streams with it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Final, cast

import httptools
import orjson

HOST: Final = "127.0.0.1"


class SseMessage:
    """One message of an event stream: the fields it had, as bytes (``None`` where absent)."""

    __slots__ = ("data", "event", "id", "retry")

    def __init__(
        self,
        event: bytes | None = None,
        data: bytes | None = None,
        id: bytes | None = None,
        retry: int | None = None,
    ) -> None:
        self.event = event
        #: The ``data`` lines joined with LF (JSON decoders take bytes as they are).
        self.data = data
        self.id = id
        self.retry = retry

    def __repr__(self) -> str:
        return f"SseMessage(event={self.event!r}, data={self.data!r}, id={self.id!r})"


def parse_block(block: bytes) -> SseMessage | None:
    """One message from the lines between two blank lines (LF-separated); None if only comments."""
    event: bytes | None = None
    data: bytes | None = None
    ident: bytes | None = None
    retry: int | None = None
    seen = False
    for line in block.split(b"\n"):
        if not line or line[0] == 0x3A:  # ":" starts a comment
            continue
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        seen = True
        if name == b"data":
            data = value if data is None else data + b"\n" + value
        elif name == b"event":
            event = value
        elif name == b"id":
            ident = value
        elif name == b"retry" and value.isdigit():
            retry = int(value)
    if not seen:
        return None
    return SseMessage(event, data, ident, retry)


class SseParser:
    """Incremental event-stream parser: :meth:`feed` bytes as they come, get whole messages."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[SseMessage]:
        buf = self._buf + data if self._buf else data
        if b"\r" in buf:
            # A CR at the very end may be the first half of a CRLF: keep it for the next feed.
            held = buf.endswith(b"\r")
            if held:
                buf = buf[:-1]
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            if held:
                buf += b"\r"
        blocks = buf.split(b"\n\n")
        self._buf = blocks.pop()
        out = []
        for block in blocks:
            message = parse_block(block)
            if message is not None:
                out.append(message)
        return out


def parse_text(text: str) -> list[SseMessage]:
    """Every message of a whole event stream."""
    return SseParser().feed(text.encode() + b"\n\n")


OnMessage = Callable[[SseMessage, float], None]


class SseConn(asyncio.Protocol):
    """A keep-alive HTTP/1.1 connection for ``POST`` requests answered by SSE streams.

    Each message is handed to ``on_message(message, received_at)`` from
    ``data_received`` (no queue, no task switch); ``received_at`` is
    ``time.time()`` when the bytes arrived. ``done`` resolves to the response's
    status when its body has ended.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._http = httptools.HttpResponseParser(self)
        self._sse = SseParser()
        self._now = 0.0
        self.status = 0
        self.on_message: OnMessage | None = None
        self.done: asyncio.Future[int] | None = None
        self.busy = False
        self.lost = False
        #: Body bytes received (the SSE text, chunked framing excluded).
        self.bytes = 0

    # asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without deriving from it.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("connection closed mid-response"))
            self.done.exception()

    def data_received(self, data: bytes) -> None:
        self._now = time.time()
        try:
            self._http.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.done is not None and not self.done.done():
                self.done.set_exception(ConnectionError(f"bad HTTP response: {exc}"))
                self.done.exception()
            if self.transport is not None:
                self.transport.abort()

    # httptools callbacks -----------------------------------------------------------------

    def on_headers_complete(self) -> None:
        self.status = self._http.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.bytes += len(body)
        handler = self.on_message
        messages = self._sse.feed(body)
        if handler is not None:
            now = self._now
            for message in messages:
                handler(message, now)

    def on_message_complete(self) -> None:
        self.busy = False
        self._sse = SseParser()
        if self.done is not None and not self.done.done():
            self.done.set_result(self.status)

    # Requests ----------------------------------------------------------------------------

    def request(self, path: str, netloc: str, body: bytes, headers: Sequence[str]) -> None:
        """Send ``POST path`` with a JSON ``body``; the previous response must have ended."""
        assert self.transport is not None and not self.busy
        self.done = asyncio.get_running_loop().create_future()
        self.busy = True
        self.status = 0
        head = [
            f"POST {path} HTTP/1.1",
            f"Host: {netloc}",
            "Content-Type: application/json",
            "Accept: text/event-stream",
            f"Content-Length: {len(body)}",
            *headers,
        ]
        self.transport.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_sse(port: int, host: str = HOST, timeout: float = 10.0) -> SseConn:
    """A connection to ``host:port`` for :meth:`SseConn.request`."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        _, conn = await loop.create_connection(SseConn, host, port)
    return conn


def json_data(message: SseMessage) -> object:
    """The message's ``data`` decoded as JSON (None when it has none)."""
    return None if message.data is None else orjson.loads(message.data)

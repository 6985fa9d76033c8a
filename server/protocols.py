"""uvicorn's HTTP and WebSocket protocols, held to deadlines and limits on request heads.

uvicorn's httptools protocol gives a connection all the time it wants to send a
request head: ``timeout_keep_alive`` only runs between requests, so a client
that sends one header line every few seconds (slowloris) keeps its connection,
and its file descriptor, for good; nor does it bound a head's size.  The
subclass here gives each head a deadline (``CHAT_HEADER_TIMEOUT_S``, from the
accept or from the first byte of a later request on the connection; 408 then),
a size (``CHAT_MAX_HEAD_BYTES``; 431), gives its body a deadline too
(``CHAT_BODY_TIMEOUT_S`` from the end of the head: a body that dribbles in, or a
chunked one that never ends, is answered 408 and closed), and counts per client address the
connections that have not yet sent their first head
(``CHAT_MAX_OPENING_PER_ADDRESS``; a connection over it is answered 429 and
closed at once).

A WebSocket handshake that the websockets library refuses (a header line over
its 8,192 bytes, more than 128 headers) leaves the refusal in the library's
output, which uvicorn never writes: the client waits for a 101 that never comes.
The WebSocket subclass writes the refusal (431, 414, else 400) and closes.
"""

from __future__ import annotations

import asyncio
import http
import ipaddress
import logging
import random
import struct
from collections import Counter
from typing import Any, ClassVar, Final

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState
from websockets.frames import Frame
from websockets.http11 import Request
from websockets.protocol import Protocol, State

from server.flags import Flag, MessageQueue
from server.heartbeat import Wheel, wheel_for
from server.settings import Settings

log = logging.getLogger("chat.http")

#: The ASGI extension through which an app drops its connection (a response it cut,
#: whose last bytes the client did not take): ``scope["extensions"][ABORT]["abort"]()``.
#: uvicorn then sees the connection lost, not a response left unfinished, which it
#: would log at error level.
ABORT: Final = "chat.connection.abort"


class OpeningLimiter:
    """How many connections of each client address are being opened: accepted, and
    not yet past their first request head.  No I/O."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._opening: Counter[str] = Counter()
        self.refused = 0

    def admit(self, address: str) -> bool:
        """Count one more connection of ``address``, unless it has ``limit`` already."""
        if self._opening[address] >= self.limit:
            self.refused += 1
            return False
        self._opening[address] += 1
        return True

    def release(self, address: str) -> None:
        self._opening[address] -= 1
        if self._opening[address] <= 0:
            del self._opening[address]

    def opening(self, address: str) -> int:
        return self._opening[address]


def address_key(host: str) -> str:
    """What the limiter counts by: the address, or for IPv6 its /64 network (one
    subscriber's share, which holds any number of addresses)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def plain_response(status: int, text: str) -> bytes:
    """A whole ``Connection: close`` response with a short text body."""
    body = text.encode()
    phrase = http.HTTPStatus(status).phrase
    return (
        f"HTTP/1.1 {status} {phrase}\r\n"
        "content-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    ).encode() + body


class HeadLimitedHttpProtocol(HttpToolsProtocol):
    """httptools' protocol with a deadline and a size for each request head, and the
    per-address count of connections being opened.  One subclass per server holds
    its settings and its limiter: see :func:`http_protocol`."""

    header_timeout_s: ClassVar[float]
    body_timeout_s: ClassVar[float]
    max_head_bytes: ClassVar[int]
    limiter: ClassVar[OpeningLimiter]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._address: str | None = None  # counted by the limiter while set
        self._in_head = True  # between a head's first byte (or the accept) and its end
        self._received = 0  # bytes received while in the head: what the parser buffers
        self._parsed = 0  # the head's size, as the parser reports its parts
        self._deadline: asyncio.TimerHandle | None = None
        self._body_deadline: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.client is not None:
            address = address_key(self.client[0])
            if not self.limiter.admit(address):
                log.debug("refused a connection of %s: too many being opened", address)
                self._refuse(429, "too many connections being opened from this address")
                return
            self._address = address
        self._arm_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._past_opening()
        self._cancel_deadline()
        self._cancel_body_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # what follows a refusal is not read
        in_head = self._in_head
        super().data_received(data)
        if in_head and self._in_head and not self._refused:
            # The head has not ended: all of this chunk is head, held by the parser.
            self._received += len(data)
            if self._received > self.max_head_bytes:
                self._refuse(431, f"request head larger than {self.max_head_bytes} bytes")

    # Parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._in_head:  # a later request on a kept-alive connection
            self._in_head = True
            self._received = self._parsed = 0
            self._arm_deadline()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._parsed += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._parsed += len(name) + len(value) + 4  # ": " and CRLF

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_deadline()
        self._past_opening()
        if self._refused:
            return
        if self._parsed > self.max_head_bytes:
            # The request is not started; the parser's later callbacks are ignored.
            self._refuse(431, f"request head larger than {self.max_head_bytes} bytes")
            return
        # The body has its own deadline, until the parser has seen all of it.
        self._body_deadline = self.loop.call_later(self.body_timeout_s, self._body_timed_out)
        extensions: dict[str, Any] = dict(self.scope.get("extensions") or {})
        extensions[ABORT] = {"abort": self.transport.abort}
        self.scope["extensions"] = extensions
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._cancel_body_deadline()
        if not self._refused:
            super().on_message_complete()

    def handle_websocket_upgrade(self) -> None:
        self._cancel_body_deadline()
        if not self._refused:
            super().handle_websocket_upgrade()

    # Deadline and refusals

    def _arm_deadline(self) -> None:
        self._cancel_deadline()
        self._deadline = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _cancel_body_deadline(self) -> None:
        if self._body_deadline is not None:
            self._body_deadline.cancel()
            self._body_deadline = None

    def _body_timed_out(self) -> None:
        self._body_deadline = None
        if self.transport.is_closing():
            return
        reason = f"request body not complete within {self.body_timeout_s:g} s"
        log.debug("closed a connection of %s: %s", self.client, reason)
        self._refused = True
        if self.cycle is None or not self.cycle.response_started:
            self.transport.write(plain_response(408, reason + "\n"))
        # else answered already (a 401 before the body was read, say): only close.
        self.transport.close()

    def _head_timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._received == 0 and self._parsed == 0 and self.cycle is None:
            self._refused = True
            self.transport.close()  # nothing was sent: nothing to answer
            return
        self._refuse(408, f"request head not complete within {self.header_timeout_s:g} s")

    def _refuse(self, status: int, reason: str) -> None:
        """Answer ``status`` and close; nothing more of the connection is read."""
        self._refused = True
        self._cancel_deadline()
        self._past_opening()
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:
            # (Not in the middle of a response to an earlier request on the connection.)
            self.transport.write(plain_response(status, reason + "\n"))
        self.transport.close()

    def _past_opening(self) -> None:
        if self._address is not None:
            self.limiter.release(self._address)
            self._address = None


#: What a refused handshake answers when the websockets library left no response.
HANDSHAKE_REFUSED: Final = plain_response(400, "invalid WebSocket handshake\n")


#: The ASGI extension (in ``scope["extensions"]``) and message type of a batch of
#: text frames sent in one socket write: ``{"type": SEND_BATCH, "texts": [...]}``.
SEND_BATCH: Final = "chat.websocket.send_batch"


class RefusingWebSocketsProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets (Sans-I/O) protocol, which writes the library's refusal
    of a handshake it could not parse instead of leaving the client waiting, and
    accepts a batch of text frames (:data:`SEND_BATCH`) that it writes to the socket
    at once: frames ready together cost one ASGI send and one transport write."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # An idle connection keeps these for its whole life: the lighter versions
        # of server.flags hold no deque each (asyncio.Queue holds four).
        self.queue = MessageQueue()  # type: ignore[assignment]
        self.writable = Flag()  # type: ignore[assignment]
        self.writable.set()

    # Keepalive: the loop's heartbeat wheel instead of two timers per connection
    # (server.heartbeat); the same pings, the same 1011 close when a pong is late.

    _wheel: Wheel | None = None

    def start_keepalive(self) -> None:
        if self.ping_interval is not None and self.ping_interval > 0:
            self._wheel = wheel_for(self.ping_interval)
            self._wheel.schedule(self, self.loop.time() + self.ping_interval)

    def stop_keepalive(self) -> None:
        super().stop_keepalive()
        if self._wheel is not None:
            self._wheel.discard(self)

    def heartbeat_due(self, now: float) -> None:
        if self.pending_ping_payload is None or self.ping_timeout is None:
            self.send_keepalive_ping()
        else:
            self.keepalive_timeout()  # no pong within the timeout

    def send_keepalive_ping(self) -> None:
        wheel = self._wheel
        if wheel is None or self.close_sent or self.transport.is_closing():
            return
        payload = self.pending_ping_payload = struct.pack("!I", random.getrandbits(32))
        self.ping_sent_at = sent = self.loop.time()
        self.conn.send_ping(payload)
        self.transport.write(b"".join(self.conn.data_to_send()))
        assert self.ping_interval is not None
        wheel.schedule(self, sent + (self.ping_timeout or self.ping_interval))

    def handle_pong(self, event: Frame) -> None:
        if self.pending_ping_payload is None or bytes(event.data) != self.pending_ping_payload:
            return  # unsolicited, or the answer to an earlier ping
        now = self.loop.time()
        self.last_ping_rtt = now - self.ping_sent_at
        self.pending_ping_payload = None
        wheel = self._wheel
        if wheel is not None and self.ping_interval is not None and self.ping_timeout is not None:
            wheel.schedule(self, now + max(0.0, self.ping_interval - self.last_ping_rtt))

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:  # the handshake was accepted; the app has not run yet
            scope["extensions"][SEND_BATCH] = {}
            self._restart_parser()

    def _restart_parser(self) -> None:
        """Let the library's handshake parser go once the request is read.

        The websockets server's parser is one generator that reads the request and
        then frames; its frame keeps the parsed request (headers and all) for the
        connection's life.  With nothing buffered it waits at a frame boundary, in
        the state a fresh frame parser starts in: that one replaces it.
        """
        conn = self.conn
        reader = conn.reader
        if reader.buffer or reader.eof or conn.parser_exc is not None:
            return  # frames already sent behind the request: keep parsing them as is
        parser = Protocol.parse(conn)
        next(parser)
        conn.parser = parser

    async def send(self, message: Any) -> None:
        if message["type"] != SEND_BATCH:
            await super().send(message)
            if message["type"] == "websocket.accept" and self.handshake_complete:
                # The handshake's request and response (their headers parsed into
                # objects) are not read again once the response is written; the
                # app keeps what it needs in its scope.
                self.request = self.response = None  # type: ignore[assignment]
            return
        await self.writable.wait()
        if self.disconnected:
            raise ClientDisconnected()
        if not self.handshake_complete or self.initial_response is not None:
            raise RuntimeError(f"'{SEND_BATCH}' before the handshake was accepted")
        if self.close_sent:
            raise RuntimeError(
                f"Unexpected ASGI message '{SEND_BATCH}', after sending 'websocket.close'."
            )
        if not self.conn.extensions and self.conn.state is State.OPEN:
            self.transport.write(text_frames(message["texts"]))
            return
        conn = self.conn
        try:
            for text in message["texts"]:
                conn.send_text(text.encode())
        except InvalidState:
            raise ClientDisconnected() from None
        self.transport.write(b"".join(conn.data_to_send()))

    # Writing without an ASGI send, for a writer that is not waiting for anything.

    def can_write_now(self) -> bool:
        """Whether text frames may be written at once (:meth:`write_now`): the
        handshake accepted, no close sent or received, the peer taking what it is
        sent (the transport's buffer under its high-water mark)."""
        return (
            self.writable.is_set()
            and not self.disconnected
            and self.handshake_complete
            and self.initial_response is None
            and not self.close_sent
            and self.conn.state is State.OPEN
            and not self.transport.is_closing()
        )

    def write_now(self, texts: list[str]) -> None:
        """Write text frames in one transport write, when :meth:`can_write_now`."""
        if self.conn.extensions:
            conn = self.conn
            for text in texts:
                conn.send_text(text.encode())
            self.transport.write(b"".join(conn.data_to_send()))
        else:
            self.transport.write(text_frames(texts))

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.handshake_initiated or self.conn.handshake_exc is None:
            return
        if self.transport.is_closing():
            return
        output = b"".join(self.conn.data_to_send())
        log.debug("refused a WebSocket handshake: %s", self.conn.handshake_exc)
        # Nothing is left for uvicorn's shutdown to answer or close.
        self.handshake_complete = True
        self.close_sent = True
        self.transport.write(output or HANDSHAKE_REFUSED)
        self.transport.close()


def text_frames(texts: list[str]) -> bytes:
    """Unmasked, final text frames of a server with no extension negotiated (RFC 6455
    5.2), the bytes the websockets library would make for each, without its frame
    objects."""
    parts: list[bytes] = []
    for text in texts:
        data = text.encode()
        n = len(data)
        if n < 126:
            parts.append(bytes((0x81, n)))
        elif n < 65536:
            parts.append(b"\x81\x7e" + n.to_bytes(2, "big"))
        else:
            parts.append(b"\x81\x7f" + n.to_bytes(8, "big"))
        parts.append(data)
    return b"".join(parts)


def direct_writer(send: Any) -> RefusingWebSocketsProtocol | None:
    """The gateway's WebSocket protocol behind an ASGI ``send``, when ``send`` is that
    protocol's own (uvicorn hands the app the protocol's bound ``send`` unless a
    middleware wraps it, as its message logger does): a writer may then write frames
    at once (:meth:`RefusingWebSocketsProtocol.write_now`)."""
    protocol = getattr(send, "__self__", None)
    return protocol if isinstance(protocol, RefusingWebSocketsProtocol) else None


def http_protocol(settings: Settings) -> type[HeadLimitedHttpProtocol]:
    """The HTTP protocol class of one server, with its settings and its own limiter."""

    class ServerHttpProtocol(HeadLimitedHttpProtocol):
        header_timeout_s = settings.header_timeout_s
        body_timeout_s = settings.body_timeout_s
        max_head_bytes = settings.max_head_bytes
        limiter = OpeningLimiter(settings.max_opening_per_address)

    return ServerHttpProtocol

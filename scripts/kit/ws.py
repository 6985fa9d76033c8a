"""A WebSocket client for load: websockets' Sans-I/O ``ClientProtocol`` under an asyncio protocol.

The opening handshake (``Sec-WebSocket-Accept``, subprotocol negotiation), the
frames the client sends, ping answers, fragmented messages, protocol errors and
the closing handshake are websockets' (``websockets.client.ClientProtocol``,
RFC 6455); this module pumps bytes between it and the socket.

One fast path, because the benchmark measured it: the protocol costs about
1.9 µs per received frame against 0.4 µs for finding the frame's end by hand,
which made the client, not the server, the limit of the bare-endpoint figures
(see docs/benchmarks.md). So while the connection is open, a whole frame that
is final, text or binary, unmasked, with no RSV bit (what a server without
extensions sends for every message) is handed over directly; every other frame
is fed, whole, to the protocol, whose parser therefore always stands between
two frames. Each message is handed to ``on_text(payload,
received_at)`` from ``data_received``, with no queue and no task switch, so
that one event loop can keep up with many fast streams; ``received_at`` is
``time.time()`` when the bytes arrived. No extension is offered (no
compression): every server is measured sending plain frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Final, cast

from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from scripts.kit.args import loopback_target

#: Largest message the client accepts.
MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024

OnText = Callable[[bytes, float], None]
OnClose = Callable[[int, str], None]

_TEXT: Final = Opcode.TEXT
_BINARY: Final = Opcode.BINARY
_CONT: Final = Opcode.CONT
_CLOSE: Final = Opcode.CLOSE
_OPEN: Final = State.OPEN


class HandshakeError(Exception):
    """The server did not switch protocols, or its answer to the upgrade was not valid."""

    def __init__(self, status: int, detail: str = "") -> None:
        super().__init__(f"HTTP {status} {detail}".strip())
        self.status = status


class WsClient(asyncio.Protocol):
    """One WebSocket connection: bytes from the socket into the protocol, its output back out."""

    def __init__(
        self, protocol: ClientProtocol, on_text: OnText, on_close: OnClose | None = None
    ) -> None:
        self.protocol = protocol
        self.on_text = on_text
        self.on_close = on_close
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.handshake: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.close_code: int | None = None
        self.close_reason = ""
        self.subprotocol: str | None = None
        self._fragments: list[bytes] | None = None
        #: Bytes of the fast path not yet a whole frame.
        self._buf = bytearray()

    # asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without deriving from it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        now = time.time()
        protocol = self.protocol
        if protocol.state is not _OPEN or protocol.reader.buffer:
            # The handshake, the closing, or a frame the protocol is partway through.
            self._to_protocol(data, now)
            return
        # The fast path (see the module's docstring): whole final text or binary frames,
        # unmasked, with no RSV bit, go to on_text; every other frame, whole, to the protocol.
        buf = self._buf
        buf += data
        n = len(buf)
        pos = 0
        on_text = self.on_text
        while n - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            length = b1 & 0x7F
            head = 2
            if length == 126:
                if n - pos < 4:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                head = 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            if b1 & 0x80:
                head += 4
            if length > MAX_MESSAGE_BYTES:
                rest = bytes(buf[pos:])
                buf.clear()
                self._to_protocol(rest, now)  # the protocol fails the connection (1009)
                return
            end = pos + head + length
            if end > n:
                break
            if (b0 == 0x81 or b0 == 0x82) and not b1 & 0x80 and self._fragments is None:
                on_text(bytes(buf[pos + head : end]), now)
            else:
                self._to_protocol(bytes(buf[pos:end]), now)
                if protocol.state is not _OPEN:
                    buf.clear()  # closing: the protocol discards whatever follows
                    return
            pos = end
        if pos:
            del buf[:pos]

    def _to_protocol(self, data: bytes, now: float) -> None:
        protocol = self.protocol
        protocol.receive_data(data)
        events = protocol.events_received()
        self._flush()
        on_text = self.on_text
        for event in events:
            if type(event) is Frame:
                opcode = event.opcode
                if opcode is _TEXT or opcode is _BINARY:
                    if event.fin:
                        on_text(bytes(event.data), now)
                    else:
                        self._fragments = [bytes(event.data)]
                elif opcode is _CONT and self._fragments is not None:
                    self._fragments.append(bytes(event.data))
                    if event.fin:
                        whole, self._fragments = b"".join(self._fragments), None
                        on_text(whole, now)
                elif opcode is _CLOSE and self.transport is not None:
                    # The close frame is answered (flushed above); the socket can go.
                    self.transport.close()
            elif isinstance(event, Response):
                self._answered(event)
        if protocol.parser_exc is not None and self.transport is not None:
            self.transport.close()  # a protocol error: the close frame is on its way out

    def connection_lost(self, exc: Exception | None) -> None:
        protocol = self.protocol
        protocol.receive_eof()
        rcvd, sent = protocol.close_rcvd, protocol.close_sent
        if rcvd is not None:
            self.close_code, self.close_reason = rcvd.code, rcvd.reason
        elif protocol.parser_exc is not None and sent is not None:
            self.close_code, self.close_reason = sent.code, sent.reason
        else:
            self.close_code = 1006
            self.close_reason = str(exc) if exc else "connection lost"
        self._fail_handshake(ConnectionError(f"connection closed ({self.close_code})"))
        if not self.closed.done():
            self.closed.set_result(None)
        if self.on_close is not None:
            callback, self.on_close = self.on_close, None
            callback(self.close_code, self.close_reason)

    # The opening handshake ---------------------------------------------------------------

    def _answered(self, response: Response) -> None:
        failure = self.protocol.handshake_exc
        if failure is None:
            self.subprotocol = self.protocol.subprotocol
            if not self.handshake.done():
                self.handshake.set_result(None)
            return
        status = response.status_code
        detail = response.reason_phrase if status != 101 else str(failure)
        self._fail_handshake(HandshakeError(status, detail))

    def _fail_handshake(self, exc: Exception) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(exc)
            self.handshake.exception()  # retrieved: a failed connect reports it itself

    # Sending -----------------------------------------------------------------------------

    def _flush(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        for chunk in self.protocol.data_to_send():
            if chunk:
                transport.write(chunk)
            elif transport.can_write_eof():
                transport.write_eof()

    def send_text(self, text: str | bytes) -> None:
        """Send one text frame (``bytes`` must be UTF-8 already); dropped once closing."""
        if self.protocol.state is not State.OPEN:
            return
        self.protocol.send_text(text.encode() if isinstance(text, str) else text)
        self._flush()

    @property
    def is_open(self) -> bool:
        return self.protocol.state is State.OPEN and self.handshake.done()

    async def close(self, code: int = 1000, reason: str = "", timeout: float = 2.0) -> None:
        """Close cleanly: send a close frame, wait for the server's, then drop the socket."""
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(code, reason[:120])
            self._flush()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.closed), timeout)
        if self.transport is not None and not self.closed.done():
            self.transport.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def ws_connect(
    url: str,
    on_text: OnText,
    *,
    on_close: OnClose | None = None,
    subprotocols: Sequence[str] = (),
    headers: Sequence[tuple[str, str]] = (),
    timeout: float = 10.0,
) -> WsClient:
    """Open a WebSocket to a loopback ``ws://`` URL.

    Raises:
        UsageError: the URL is not loopback.
        HandshakeError: the server answered the upgrade with another status, or
            with an invalid answer.
        OSError, TimeoutError, ConnectionError: the connection failed.
    """
    target = loopback_target(url)
    protocol = ClientProtocol(
        parse_uri(target.ws_url),
        subprotocols=[Subprotocol(s) for s in subprotocols] or None,
        max_size=MAX_MESSAGE_BYTES,
    )
    request = protocol.connect()
    for name, value in headers:
        request.headers[name] = value
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        _, client = await loop.create_connection(
            lambda: WsClient(protocol, on_text, on_close), target.host, target.port
        )
        try:
            protocol.send_request(request)
            client._flush()
            await client.handshake
        except BaseException:
            client.abort()
            raise
    return client

"""The WebSocket endpoint ``/ws``: handshake checks, then one session until it ends.

Refusals (bad token 4401, foreign origin 4403, too many connections 4429, the
Redis broker out of reach 1013) are
sent as close codes after the handshake, with ``chat.v1`` selected when it was
offered, so that a browser can see why.  While the session lives, this task
watches it: a session its outbox cut as a slow consumer (see
:mod:`server.outbox`) is closed with 4408 at once; a session whose token expires
is closed with 4401 after what is ready to send.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Final

from starlette.types import Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from agents.supervisor import new_id
from bridge import events, logctx
from bridge.errors import BrokerUnavailable
from bridge.wire import CloseCode
from server.auth import token_for_websocket
from server.errors import AuthError
from server.gateway import Gateway
from server.origin import origin_allowed
from server.protocols import SEND_BATCH
from server.session import (
    CLOSE_FORBIDDEN,
    CLOSE_SLOW,
    CLOSE_TOO_BIG,
    CLOSE_TOO_MANY,
    CLOSE_UNAUTHORIZED,
    Session,
)

log = logging.getLogger("chat.ws")

#: "Try again later": the shared broker (Redis) cannot be reached.
CLOSE_UNAVAILABLE: Final = CloseCode.TRY_AGAIN_LATER
#: A close frame is a control frame: 125 bytes of payload, 2 of them the code (RFC 6455 5.5).
MAX_REASON_BYTES: Final = 123


def fit_reason(reason: str) -> str:
    """``reason`` cut to what a close frame carries, on a character boundary."""
    raw = reason.encode("utf-8", "replace")
    if len(raw) <= MAX_REASON_BYTES:
        return reason
    return raw[: MAX_REASON_BYTES - 3].decode("utf-8", "ignore") + "..."


async def websocket_endpoint(gateway: Gateway, websocket: WebSocket, send: Send) -> None:
    """Serve one connection.  ``send`` is the server's own ASGI ``send`` (see
    :class:`server.app.GatewayApp`), which the session's writer uses for frames."""
    settings = gateway.settings
    headers = websocket.headers
    token, subprotocol = token_for_websocket(headers, websocket.scope["query_string"])
    await websocket.accept(subprotocol=subprotocol)
    if not origin_allowed(headers.get("origin"), headers.get("host"), settings.allowed_origins):
        await websocket.close(CLOSE_FORBIDDEN, "origin not allowed")
        return
    try:
        user = gateway.auth.verify(token)
    except AuthError as exc:
        gateway.counters.auth_failures += 1
        await websocket.close(CLOSE_UNAUTHORIZED, fit_reason(str(exc)))
        return

    async def close(code: int, reason: str) -> None:
        await websocket.close(code, fit_reason(reason))

    loop = asyncio.get_running_loop()
    # The token's expiry on the loop's clock, which the outbox is given.
    expires_at = loop.time() + user.expires_at + gateway.auth.leeway_s - time.time()
    session = Session(gateway, user, new_id("s_"), send, close, expires_at=expires_at)
    session.send_batch = SEND_BATCH in websocket.scope.get("extensions", {})
    logctx.SESSION_ID.set(session.id)  # for its log lines, and those of the runs it starts
    try:
        added = await gateway.add_session(session)
    except BrokerUnavailable:
        # Connections are counted in the shared broker: none can be opened without it.
        await websocket.close(CLOSE_UNAVAILABLE, "broker unavailable")
        return
    if not added:
        limit = settings.max_connections_per_user
        await websocket.close(CLOSE_TOO_MANY, f"more than {limit} connections for this user")
        return
    session.enqueue(
        events.connection_ready(
            session.id, user.user_id, settings.heartbeat_s, settings.max_message_bytes
        )
    )
    # At expiry the outbox's verdict is asked at once rather than at the watchdog's next turn.
    expiry = loop.call_at(expires_at, session.expire)
    writer = asyncio.create_task(session.write_loop(), name=f"writer {session.id}")
    reader = asyncio.create_task(_read_loop(websocket, session), name=f"reader {session.id}")
    # A future, not a task waiting on the flag: one object less per connection.
    aborted = session.aborted.waiter()
    try:
        # A stalled send or an overflow is found by the gateway's watchdog asking the
        # outbox, which aborts the session.
        await asyncio.wait({writer, reader, aborted}, return_when=asyncio.FIRST_COMPLETED)
        if session.aborted.is_set():
            if session.close_code == CLOSE_SLOW:
                gateway.counters.slow_consumer_closes += 1
                gateway.counters.slow_consumer_by["ws"] += 1
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer
            with contextlib.suppress(Exception):
                # The close frame waits behind what the peer has not read yet: a
                # peer that reads again within the send timeout sees 4408; one that
                # never does is dropped when the timeout ends.
                async with asyncio.timeout(settings.send_timeout_s):
                    await session.close_now()
    finally:
        expiry.cancel()
        await gateway.remove_session(session)
        for task in (reader, writer, aborted):
            task.cancel()
        for task in (reader, writer, aborted):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        session.detach_all()


async def _read_loop(websocket: WebSocket, session: Session) -> None:
    limit = session.gateway.settings.max_message_bytes
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                session.enqueue(
                    events.error("bad_message", "binary frames are not accepted; send JSON text")
                )
                continue
            # A character takes at most 4 bytes: encode only when it could matter.
            if len(text) * 4 > limit and len(text.encode("utf-8", "surrogatepass")) > limit:
                session.close(CLOSE_TOO_BIG, f"frame larger than {limit} bytes", drain=False)
                return
            await session.handle_frame(text)
            if session.box.control_full:
                # Backpressure: read no more frames until the writer has sent the answers.
                await session.room_for_control()
    except WebSocketDisconnect:
        return

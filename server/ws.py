"""The WebSocket endpoint ``/ws``: handshake, authentication, then one session."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from starlette.websockets import WebSocket, WebSocketDisconnect

from agents.supervisor import new_id
from bridge import events
from server.auth import token_for_websocket
from server.errors import AuthError
from server.gateway import Gateway
from server.session import CLOSE_TOO_BIG, CLOSE_UNAUTHORIZED, Session

log = logging.getLogger("chat.ws")


async def websocket_endpoint(websocket: WebSocket) -> None:
    gateway: Gateway = websocket.app.state.gateway
    settings = gateway.settings
    token, subprotocol = token_for_websocket(websocket.headers, websocket.scope["query_string"])
    # Refusals are sent after the handshake, as close codes a browser can read.
    await websocket.accept(subprotocol=subprotocol)
    try:
        user = gateway.auth.verify(token)
    except AuthError as exc:
        await websocket.close(CLOSE_UNAUTHORIZED, str(exc))
        return

    async def send(text: str) -> None:
        await websocket.send({"type": "websocket.send", "text": text})

    async def close(code: int, reason: str) -> None:
        await websocket.close(code, reason)

    session = Session(gateway, user, new_id("s_"), send, close)
    gateway.counters.connections += 1
    session.enqueue(
        events.connection_ready(
            session.id, user.user_id, settings.heartbeat_s, settings.max_message_bytes
        )
    )
    writer = asyncio.create_task(session.write_loop(), name=f"writer {session.id}")
    receiver: asyncio.Task[None] = asyncio.create_task(_read_loop(websocket, session))
    try:
        await asyncio.wait({writer, receiver}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gateway.counters.connections -= 1
        receiver.cancel()
        if not writer.done():
            # The peer left: nothing more can be written.
            writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await writer
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await receiver
        session.detach_all()


async def _read_loop(websocket: WebSocket, session: Session) -> None:
    limit = session.gateway.settings.max_message_bytes
    try:
        while True:
            message = await websocket.receive()
            kind = message["type"]
            if kind == "websocket.disconnect":
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
                await session.closed.wait()
                return
            await session.handle_frame(text)
    except WebSocketDisconnect:
        return

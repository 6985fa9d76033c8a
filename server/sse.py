"""Server-Sent Events: the same run logs as the WebSocket, rendered as text.

A stream reads a run's log with its own cursor exactly as a WebSocket session
does; it only frames each ready event as ``id: <seq>``/``event:``/``data:`` and
sends a ``: ping`` comment when nothing happened for a heartbeat.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Final

import orjson

from bridge.broker import Watch
from bridge.errors import ResumeUnavailable
from server.errors import wire_error

BATCH: Final = 256
PING: Final = b": ping\n\n"
HEADERS: Final = {
    "Cache-Control": "no-store",
    "X-Accel-Buffering": "no",
    "Connection": "keep-alive",
}


def frame(event: str, data: object) -> bytes:
    """An SSE message with no ``id`` (``stream_start``, ``stream_end``, ``error``)."""
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


async def stream_run(
    watch: Watch,
    wake: asyncio.Event,
    heartbeat_s: float,
    *,
    head: bytes | None = None,
    tail: Callable[[str | None], bytes] | None = None,
    sent: Callable[[int], None] | None = None,
) -> AsyncIterator[bytes]:
    """Yield the run's events from the watch's cursor until ``agent_completed``.

    ``sent`` is told how many events each write carried.  ``tail`` gets the run's
    final status (None when the stream ended early) and makes the last message.
    The watch is closed when the stream ends, however it ends; the run goes on.
    """
    status: str | None = None
    try:
        if head is not None:
            yield head
        while True:
            wake.clear()
            try:
                batch = await watch.read(BATCH)
            except ResumeUnavailable as exc:
                code, message, _ = wire_error(exc)
                yield frame("error", {"code": code, "message": message})
                break
            if batch:
                last = batch[-1]
                if last.type == "agent_completed":
                    status = str(last.data.get("status"))
                yield b"".join(event.sse() for event in batch)
                if sent is not None:
                    sent(len(batch))
                continue
            if watch.finished:
                break
            try:
                async with asyncio.timeout(heartbeat_s):
                    await wake.wait()
            except TimeoutError:
                yield PING
    finally:
        watch.close()
    if tail is not None:
        yield tail(status)

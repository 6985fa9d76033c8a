"""Request heads against a real uvicorn on loopback: slowloris, huge heads, and WebSocket
handshakes the websockets library refuses.

Slow clients connect from 127.0.0.1 and a bystander from 127.0.0.2 (Linux routes the
whole of 127.0.0.0/8 to the loopback interface), so the per-address limit has two
addresses to tell apart.  Figures go to ``var/figures/slowloris.json``; they are
recorded, never asserted as wall-clock thresholds.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import Counter
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from server.protocols import OpeningLimiter, address_key
from tests.support import LiveServer, check_run_invariants, run_server, ws_client
from tests.test_faults import record_figures

BYSTANDER = "127.0.0.2"


def _second_loopback_address() -> str:
    with socket.socket() as sock:
        try:
            sock.bind((BYSTANDER, 0))
        except OSError:
            pytest.skip(f"{BYSTANDER} is not a loopback address here")
    return BYSTANDER


def test_opening_limiter_counts_per_address() -> None:
    limiter = OpeningLimiter(2)
    assert limiter.admit("a") and limiter.admit("a") and not limiter.admit("a")
    assert limiter.admit("b") and limiter.refused == 1
    limiter.release("a")
    assert limiter.opening("a") == 1 and limiter.admit("a")
    for _ in range(2):
        limiter.release("a")
    limiter.release("b")
    assert limiter.opening("a") == limiter.opening("b") == 0
    assert address_key("127.0.0.1") == address_key("::ffff:127.0.0.1") == "127.0.0.1"
    assert address_key("2001:db8:1:2:3::4") == address_key("2001:db8:1:2::9") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")


async def _first_line(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """The first line the server sends, or b"" when it closes without a word."""
    async with asyncio.timeout(timeout):
        line = await reader.readline()
    return line.rstrip(b"\r\n")


async def _slowloris(port: int, every_s: float, give_up_s: float) -> tuple[bytes, float]:
    """A client that sends one header line every ``every_s`` and never ends its head:
    what the server answered, and after how long."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    began = time.monotonic()
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        deadline = began + give_up_s
        while time.monotonic() < deadline:
            try:
                answer = await _first_line(reader, every_s)
                return answer, time.monotonic() - began
            except TimeoutError:
                with contextlib.suppress(ConnectionError):
                    writer.write(b"X-Slow: 1\r\n")
        return b"still open", time.monotonic() - began
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_slow_heads_are_cut_at_the_deadline_and_opening_connections_capped_per_address(
    user: str,
) -> None:
    bystander = _second_loopback_address()
    timeout_s, cap, slow_clients = 2.0, 16, 200
    with run_server(header_timeout_s=timeout_s, max_opening_per_address=cap) as srv:
        slow = [
            asyncio.create_task(_slowloris(srv.port, every_s=0.5, give_up_s=timeout_s + 15))
            for _ in range(slow_clients)
        ]
        await asyncio.sleep(0.5)  # every slow client has connected and sent a line
        # Meanwhile a client of another address is served as usual, over HTTP and /ws.
        transport = httpx.AsyncHTTPTransport(local_address=bystander)
        async with httpx.AsyncClient(base_url=srv.http, transport=transport, timeout=10) as c:
            began = time.monotonic()
            assert (await c.get("/health")).status_code == 200
            health_s = time.monotonic() - began
        began = time.monotonic()
        async with ws_client(srv, user, local_addr=(bystander, 0)) as client:
            events = await client.run("What is 12 * 7?")
        run_s = time.monotonic() - began
        check_run_invariants(events)
        results = await asyncio.gather(*slow)
        answers = Counter(answer for answer, _ in results)
        assert answers == {
            b"HTTP/1.1 408 Request Timeout": cap,
            b"HTTP/1.1 429 Too Many Requests": slow_clients - cap,
        }, answers
        cut_after = sorted(t for answer, t in results if b"408" in answer)
        refused_after = max(t for answer, t in results if b"429" in answer)
        # The connections cut free their places: this address may open connections again.
        async with httpx.AsyncClient(base_url=srv.http, timeout=10) as c:
            assert (await c.get("/health")).status_code == 200
        idle_s = await _idle_connection_is_closed(srv, timeout_s)
        await _a_later_request_on_a_kept_alive_connection_has_the_deadline_too(srv)
    record_figures(
        "slowloris",
        {
            "slow_clients": slow_clients,
            "header_timeout_s": timeout_s,
            "max_opening_per_address": cap,
            "cut_408": answers[b"HTTP/1.1 408 Request Timeout"],
            "refused_429": answers[b"HTTP/1.1 429 Too Many Requests"],
            "first_cut_after_s": round(cut_after[0], 3),
            "last_cut_after_s": round(cut_after[-1], 3),
            "last_refusal_after_s": round(refused_after, 3),
            "idle_closed_after_s": round(idle_s, 3),
            "bystander_health_s": round(health_s, 4),
            "bystander_demo_run_s": round(run_s, 4),
        },
    )


async def _idle_connection_is_closed(srv: LiveServer, timeout_s: float) -> float:
    """A connection that sends nothing is closed at the deadline, with no answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    began = time.monotonic()
    try:
        assert await _first_line(reader, timeout_s + 10) == b""
        return time.monotonic() - began
    finally:
        writer.close()


async def _a_later_request_on_a_kept_alive_connection_has_the_deadline_too(
    srv: LiveServer,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 ")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        writer.write(b"GET /health HTTP/1.1\r\n")  # and never the rest
        assert await _first_line(reader, 20) == b"HTTP/1.1 408 Request Timeout"
    finally:
        writer.close()


async def _raw_request(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        return await _first_line(reader, 10)
    finally:
        writer.close()


async def test_a_head_larger_than_the_limit_is_431() -> None:
    limit = 16 * 1024
    with run_server(max_head_bytes=limit) as srv:
        start = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        one_long_line = start + b"X-Pad: " + b"a" * 100_000 + b"\r\n"  # not even finished
        many_lines = start + b"X-Pad: aaaaaaaaaaaaaaaa\r\n" * 2_000 + b"\r\n"
        for request in (one_long_line, many_lines):
            assert await _raw_request(srv.port, request) == (
                b"HTTP/1.1 431 Request Header Fields Too Large"
            )
        fits = start + b"X-Pad: " + b"a" * (limit // 2) + b"\r\n\r\n"
        assert await _raw_request(srv.port, fits) == b"HTTP/1.1 200 OK"


async def test_a_16_kb_token_gets_a_clear_refusal_of_the_handshake(user: str) -> None:
    """A header line over the WebSocket layer's 8,192 bytes is answered 431 at once, and
    an HTTP request with the same token is 401 naming the limit."""
    with run_server() as srv:
        token = srv.token(user, pad="x" * 12_000)
        assert len(token) > 16_000
        attempts: list[dict[str, Any]] = [
            {"subprotocols": ["chat.v1", f"bearer.{token}"]},
            {
                "subprotocols": ["chat.v1"],
                "additional_headers": {"Authorization": f"Bearer {token}"},
            },
        ]
        refused_after = []
        for kwargs in attempts:
            began = time.monotonic()
            with pytest.raises(InvalidStatus) as info:
                async with asyncio.timeout(15), connect(srv.ws, **kwargs):
                    pass
            refused_after.append(round(time.monotonic() - began, 4))
            assert info.value.response.status_code == 431
            assert b"no more than 8192 bytes" in info.value.response.body
        async with httpx.AsyncClient(base_url=srv.http, timeout=10) as client:
            resp = await client.get("/api/threads", headers={"Authorization": f"Bearer {token}"})
        assert resp.status_code == 401
        assert resp.json()["error"]["message"] == "token larger than 8192 bytes"
        async with ws_client(srv, user) as client:  # the server is none the worse
            check_run_invariants(await client.run("What is 12 * 7?"))
    print(f"\n16 KB token: handshake refused after {refused_after} s")


async def _slow_body(
    port: int, head: bytes, piece: bytes, every_s: float, give_up_s: float
) -> tuple[bytes, float]:
    """A client whose head is whole but whose body comes one ``piece`` every ``every_s``:
    the server's first line (b"" for a close without a word), and after how long; or
    b"still open" when nothing ended it within ``give_up_s``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    began = time.monotonic()
    try:
        writer.write(head)
        first = b""
        deadline = began + give_up_s
        while time.monotonic() < deadline:
            try:
                line = await _first_line(reader, every_s)
            except TimeoutError:
                with contextlib.suppress(ConnectionError):
                    writer.write(piece)
                continue
            if not first:
                first = line or b"closed"
            if not line:  # the connection is closed
                return first, time.monotonic() - began
            # An early answer (a 401 before the body was read): wait for the close.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await reader.read()
                return first, time.monotonic() - began
        return b"still open", time.monotonic() - began
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_slow_bodies_are_cut_at_their_deadline(user: str) -> None:
    timeout_s = 1.5
    with run_server(header_timeout_s=5.0, body_timeout_s=timeout_s) as srv:
        host = b"Host: 127.0.0.1\r\n"
        heads = {
            # A body that dribbles in after a whole head: no answer yet.
            "dribble": (
                b"POST /api/chat/stream HTTP/1.1\r\n"
                + host
                + f"Authorization: Bearer {srv.token(user)}\r\n".encode()
                + b"Content-Type: application/json\r\nContent-Length: 60000\r\n\r\n"
            ),
            # A route that answers without reading the body: the connection is closed.
            "unread": b"GET /health HTTP/1.1\r\n" + host + b"Content-Length: 60000\r\n\r\n",
            # The same on a route that answers 401 before reading the body.
            "answered": (
                b"POST /api/chat/stream HTTP/1.1\r\n" + host + b"Content-Type: application/json\r\n"
                b"Content-Length: 60000\r\n\r\n"
            ),
            # A chunked body that never ends, with a valid token.
            "chunked": (
                b"POST /api/chat/stream HTTP/1.1\r\n"
                + host
                + f"Authorization: Bearer {srv.token(user)}\r\n".encode()
                + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            ),
        }
        pieces = {"dribble": b"x", "unread": b"x", "answered": b"x", "chunked": b"1\r\na\r\n"}
        results = await asyncio.gather(
            *(
                _slow_body(srv.port, heads[k], pieces[k], every_s=0.3, give_up_s=timeout_s + 10)
                for k in heads
            )
        )
        outcome = dict(zip(heads, results, strict=True))
        # A request whose body comes in time is served as usual meanwhile.
        async with httpx.AsyncClient(base_url=srv.http, timeout=10) as c:
            assert (await c.get("/health")).status_code == 200
    assert outcome["dribble"][0] == b"HTTP/1.1 408 Request Timeout", outcome
    assert outcome["chunked"][0] == b"HTTP/1.1 408 Request Timeout", outcome
    assert outcome["answered"][0] == b"HTTP/1.1 401 Unauthorized", outcome
    assert outcome["unread"][0] == b"HTTP/1.1 200 OK", outcome
    assert all(answer != b"still open" for answer, _ in results), outcome
    record_figures(
        "slow_bodies",
        {"body_timeout_s": timeout_s, **{k: round(t, 3) for k, (_, t) in outcome.items()}},
    )


async def test_frames_sent_as_one_batch_arrive_whole_and_in_order() -> None:
    """The gateway's WebSocket protocol offers the send-batch extension and writes a
    batch of frames in one go: every frame arrives, in order, and a plain send after
    it follows it (a real uvicorn on loopback, an ASGI app of the test's own)."""
    import threading

    import uvicorn

    from server.protocols import SEND_BATCH
    from server.serve import uvicorn_config
    from server.settings import Settings
    from tests.support import SECRET, free_port

    offered: list[bool] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        offered.append(SEND_BATCH in scope.get("extensions", {}))
        if offered[-1]:
            await send({"type": SEND_BATCH, "texts": [f"frame {i}" for i in range(200)]})
        await send({"type": "websocket.send", "text": "after"})
        await send({"type": "websocket.close", "code": 1000})

    port = free_port()
    settings = Settings(jwt_secret=SECRET, log_level="warning", db_url="sqlite:///:memory:")
    server = uvicorn.Server(uvicorn_config(app, settings, "127.0.0.1", port, lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(2000):
            if server.started:
                break
            await asyncio.sleep(0.01)
        async with connect(f"ws://127.0.0.1:{port}/") as ws:
            got = [message async for message in ws]
    finally:
        server.should_exit = True
        thread.join(timeout=20)
    assert offered == [True]
    assert got == [f"frame {i}" for i in range(200)] + ["after"]

"""Outbound policies against a real gateway: SSE held to the WebSocket's limits, bursts
of client frames answered at the client's pace, bursty runs read by fast clients.

Figures (times, memory) are printed and written to ``var/figures/``, never asserted as
wall-clock thresholds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.exceptions import ConnectionClosed

from tests.support import (
    LiveServer,
    check_run_invariants,
    health,
    http_client,
    parse_sse,
    run_server,
    spawn_server,
    wait_for,
    ws_client,
)
from tests.test_faults import record_figures

KiB = 1024


def unread_stream(srv: LiveServer, user: str, message: str) -> socket.socket:
    """``POST /api/chat/stream`` on a socket that is never read (small receive buffer,
    so that the kernel holds little of what the server sends)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * KiB)
    sock.connect(("127.0.0.1", srv.port))
    body = orjson.dumps({"message": message, "agent": "load"})
    head = (
        f"POST /api/chat/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {srv.token(user)}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


async def test_unread_sse_streams_are_cut_and_memory_falls_back(tmp_path: Path) -> None:
    # Answers of 24 MB each: the answer bound is raised so that only the reader is at fault.
    env = {
        "CHAT_RESUME_WINDOW_S": "3",
        "CHAT_SEND_TIMEOUT_S": "2",
        "CHAT_MAX_ANSWER_BYTES": str(32 * 1024 * 1024),
    }
    with spawn_server(tmp_path, **env) as srv:
        rss_before = srv.rss_kib()
        socks = [
            unread_stream(srv, f"reader-{i}", "chunks=60000 chunk_chars=400 thinking=0")
            for i in range(8)
        ]
        try:

            async def started() -> bool:
                body = await health(srv)
                return bool(body["counters"]["runs_started"] >= 8)

            await wait_for(started, timeout=30)
            began = time.monotonic()

            async def all_cut() -> bool:
                body = await health(srv)
                return bool(body["sse_streams"] == 0 and body["runs_active"] == 0)

            cut_s = await wait_for(all_cut, timeout=120)
            peak = srv.peak_rss_kib()

            async def forgotten() -> bool:
                return bool((await health(srv))["memory"]["runs_in_memory"] == 0)

            await wait_for(forgotten, timeout=30)
            await asyncio.sleep(2)
            body = await health(srv)
            rss_after = srv.rss_kib()
        finally:
            for sock in socks:
                sock.close()
    record_figures(
        "sse_unread",
        {
            "streams": 8,
            "events_per_run": 60004,
            "rss_before_kib": rss_before,
            "peak_rss_kib": peak,
            "rss_after_cut_kib": rss_after,
            "all_cut_after_s": round(time.monotonic() - began, 3),
            "cut_wait_s": round(cut_s, 3),
            "outbound_buffered_bytes_after": body["memory"]["outbound_buffered_bytes"],
        },
    )
    assert body["counters"]["slow_consumer_closes"] == 8
    assert body["memory"]["outbound_buffered_bytes"] == 0
    assert body["memory"]["run_log_bytes"] == 0
    # Every stream's hold on its run's log is gone: memory falls back toward the start.
    assert rss_after - rss_before < (peak - rss_before) / 2


@contextlib.contextmanager
def server_errors() -> Iterator[list[logging.LogRecord]]:
    """The records uvicorn's error logger writes at error level meanwhile (it does not
    propagate to the root logger, so it is listened to directly, once uvicorn's config
    has set up its loggers)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


async def test_sse_stream_whose_send_stalls_is_cut(user: str) -> None:
    # A buffer so large that only the stall can cut; the run ends, nothing grows.
    with (
        run_server(
            send_timeout_s=1.0,
            send_buffer_bytes=512 * 1024 * 1024,
            max_answer_bytes=32 * 1024 * 1024,
        ) as srv,
        server_errors() as errors,
    ):
        sock = unread_stream(srv, user, "chunks=20000 chunk_chars=400 thinking=0")
        try:
            began = time.monotonic()

            async def cut() -> bool:
                body = await health(srv)
                return bool(body["counters"]["slow_consumer_closes"] == 1)

            await wait_for(cut, timeout=30)
            cut_s = time.monotonic() - began

            async def gone() -> bool:  # after the last frames' own send timeout
                return bool((await health(srv))["sse_streams"] == 0)

            await wait_for(gone, timeout=30)
            body = await health(srv)
            assert body["memory"]["outbound_buffered_bytes"] == 0
        finally:
            sock.close()
        async with http_client(srv) as http:  # others are served as before
            resp = await http.post(
                "/api/chat/stream", json={"message": "hi"}, headers=srv.headers(user)
            )
        assert parse_sse(resp.text)[-1]["event"] == "stream_end"
    record_figures("sse_stall", {"send_timeout_s": 1.0, "cut_after_s": round(cut_s, 3)})
    # The cut stream's connection was dropped, not left as an unfinished response.
    assert [r.getMessage() for r in errors] == []


async def test_sse_stream_ends_when_the_token_expires(user: str) -> None:
    with run_server() as srv:
        token = srv.token(user, ttl_s=2)
        began = time.monotonic()
        async with http_client(srv) as http:
            resp = await http.post(
                "/api/chat/stream",
                json={"message": "chunks=200 delay_ms=50", "agent": "load"},
                headers={"Authorization": f"Bearer {token}"},
            )
        ended_s = time.monotonic() - began
        messages = parse_sse(resp.text)
        assert messages[-2]["event"] == "error"
        assert messages[-2]["data"] == {"code": "unauthorized", "message": "token expired"}
        assert messages[-1]["event"] == "stream_end" and messages[-1]["data"]["status"] is None
        run_id = messages[0]["data"]["run_id"]
        got = [m["data"] for m in messages if m.get("id")]
        assert got and got[-1]["type"] != "agent_completed"  # cut mid-run
        # A fresh token resumes the run from where the stream stopped.
        async with http_client(srv) as http:
            again = await http.get(
                f"/api/chat/runs/{run_id}/events",
                headers={**srv.headers(user), "Last-Event-ID": str(got[-1]["seq"])},
            )
        rest = [m["data"] for m in parse_sse(again.text) if m.get("id")]
        check_run_invariants(got + rest)
    record_figures("sse_token_expiry", {"ttl_s": 2, "stream_ended_after_s": round(ended_s, 3)})


async def test_sse_streams_count_against_the_connection_cap(user: str) -> None:
    with run_server(max_connections_per_user=2) as srv:
        async with http_client(srv) as http:
            long = {"message": "tools=1 tool_ms=60000", "agent": "load"}
            one = http.stream("POST", "/api/chat/stream", json=long, headers=srv.headers(user))
            async with one as first:
                lines = first.aiter_lines()  # (kept: a dropped iterator closes the stream)
                assert await anext(lines) == "event: stream_start"
                async with ws_client(srv, user):  # a socket and a stream: the cap
                    refused = await http.post(
                        "/api/chat/stream", json=long, headers=srv.headers(user)
                    )
                    assert refused.status_code == 429
                    assert refused.json()["error"]["code"] == "rate_limited"
                    assert "connections" in refused.json()["error"]["message"]
                    body = await health(srv)
                    assert body["runs_active"] == 1  # the refused stream started nothing
                    assert body["sse_streams"] == 1, body
                    assert body["connections"] == 1, body
                    with pytest.raises(ConnectionClosed) as info:
                        async with ws_client(srv, user):
                            pass
                    assert info.value.rcvd is not None and info.value.rcvd.code == 4429
                other = await http.post(  # other users are not affected
                    "/api/chat/stream", json={"message": "hi"}, headers=srv.headers(user + "-b")
                )
                assert parse_sse(other.text)[-1]["event"] == "stream_end"

            async def freed() -> bool:
                return bool((await health(srv))["sse_streams"] == 0)

            await wait_for(freed, timeout=10)
            again = await http.post(
                "/api/chat/stream", json={"message": "hi"}, headers=srv.headers(user)
            )
            assert again.status_code == 200


def frames_in_one_write(client: Any, texts: list[str]) -> None:
    """Send many text frames in a single TCP write, as a burst."""
    protocol = client.ws.protocol
    for text in texts:
        protocol.send_text(text.encode())
    client.ws.transport.write(b"".join(protocol.data_to_send()))


@pytest.mark.parametrize("kind", ["ping", "bad"])
async def test_a_burst_of_frames_gets_every_answer_and_no_4408(user: str, kind: str) -> None:
    n = 3000
    with run_server() as srv:
        async with ws_client(srv, user) as client:
            if kind == "ping":
                texts = [orjson.dumps({"type": "ping", "id": i}).decode() for i in range(n)]
            else:
                texts = [orjson.dumps({"type": "nope", "id": i}).decode() for i in range(n)]
            began = time.monotonic()
            frames_in_one_write(client, texts)
            refs = []
            for _ in range(n):
                message = await client.recv(timeout=30)
                expected = "pong" if kind == "ping" else "error"
                assert message["type"] == expected, message
                refs.append(message["data"]["ref"])
            answered_s = time.monotonic() - began
            assert refs == list(range(n))
            await client.send(type="ping", id="after")  # still open
            assert (await client.recv())["data"]["ref"] == "after"
        assert (await health(srv))["counters"]["slow_consumer_closes"] == 0
    record_figures(f"burst_{kind}", {"frames": n, "all_answered_after_s": round(answered_s, 3)})


async def test_a_fast_reader_of_a_bursty_run_is_not_cut_a_stopped_one_is(user: str) -> None:
    buffer = 64 * KiB
    # 32 events of 16 KiB between two writer turns: 8x the buffer in each burst.
    burst = "chunks=1000 chunk_chars=16384 thinking=0"
    with run_server(send_buffer_bytes=buffer, max_answer_bytes=32 * 1024 * 1024) as srv:
        async with ws_client(srv, user, max_size=None) as fast:
            began = time.monotonic()
            await fast.send(type="user_message", content=burst, agent="load")
            events = await fast.recv_until("agent_completed", timeout=120)
            read_s = time.monotonic() - began
            check_run_invariants([e for e in events if e.get("run_id")])
            assert events[-1]["data"]["status"] == "completed"
            assert sum(e["type"] == "response_chunk" for e in events) == 1000
            await fast.send(type="ping", id="open")
            assert (await fast.recv())["type"] == "pong"
        assert (await health(srv))["counters"]["slow_consumer_closes"] == 0

        async with ws_client(srv, user + "-slow", max_size=None) as slow:
            await slow.send(type="user_message", agent="load", content="chunks=200000 thinking=0")
            await slow.recv()
            slow.ws.transport.pause_reading()

            async def cut() -> bool:
                return bool((await health(srv))["counters"]["slow_consumer_closes"] == 1)

            await wait_for(cut, timeout=60)
            slow.ws.transport.resume_reading()
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    await slow.recv(timeout=30)
            assert info.value.rcvd is not None and info.value.rcvd.code == 4408
    record_figures(
        "bursty_fast_reader",
        {"send_buffer_bytes": buffer, "events": len(events), "read_s": round(read_s, 3)},
    )

"""What an idle WebSocket costs the gateway, against real servers on loopback.

The figure (VmRSS per connection of a ``python -m server`` process holding
2,000 idle connections) is written to ``var/figures/idle_memory.json``; it is
held to the 32 KiB per connection the gateway promises for idle clients.  The
other tests check what makes it small: nothing of the handshake is kept once
the connection is open, and frames sent right behind the handshake are still
read.
"""

from __future__ import annotations

import asyncio
import gc
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from scripts.kit.measure import raise_nofile
from scripts.kit.scenarios import close_all, open_many
from scripts.kit.tokens import TokenCache
from server.flags import Flag, MessageQueue
from server.protocols import RefusingWebSocketsProtocol
from server.session import Session
from tests.support import SECRET, run_server, spawn_server, ws_client
from tests.test_faults import record_figures

KiB = 1024
IDLE = 2000


async def test_an_idle_connection_costs_at_most_32_kib(tmp_path: Path) -> None:
    soft, _ = raise_nofile(IDLE + 500)
    if soft < IDLE + 200:
        pytest.skip(f"RLIMIT_NOFILE {soft} is too low for {IDLE} connections")
    tokens = TokenCache(SECRET, 3600)
    with spawn_server(tmp_path, CHAT_MAX_CONNECTIONS_PER_USER="100000") as srv:
        warm, _ = await open_many("gateway", srv.port, [f"warm-{i}" for i in range(50)], tokens)
        await close_all(warm)
        await asyncio.sleep(0.5)
        before = srv.rss_kib()
        conns, failures = await open_many(
            "gateway", srv.port, [f"idle-{i:05d}" for i in range(IDLE)], tokens
        )
        await asyncio.sleep(1.0)
        after = srv.rss_kib()
        held = sum(1 for c in conns if c.is_open)
        sample = conns[:: IDLE // 10]
        for conn in sample:
            conn.send("ping", id="p")
        await asyncio.wait([c.pong for c in sample], timeout=10)
        answered = sum(1 for c in sample if c.pong.done())
        await close_all(conns)
    per_connection = (after - before) * KiB / max(len(conns), 1)
    figures = {
        "connections": IDLE,
        "held": held,
        "failures": failures,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "bytes_per_connection": round(per_connection),
    }
    record_figures("idle_memory", figures)
    assert held == IDLE and answered == len(sample), figures
    assert per_connection <= 32 * KiB, figures


def _protocols() -> list[RefusingWebSocketsProtocol]:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, RefusingWebSocketsProtocol)]


async def test_an_open_connection_keeps_nothing_of_its_handshake() -> None:
    with run_server() as srv:
        async with ws_client(srv, "alice") as client:
            protocols = [p for p in _protocols() if p.handshake_complete and not p.disconnected]
            assert len(protocols) == 1
            proto = protocols[0]
            # Neither the protocol nor the library's parser holds the parsed request.
            assert proto.request is None and proto.response is None
            frame = proto.conn.parser.gi_frame
            assert frame is not None and "request" not in frame.f_locals
            assert isinstance(proto.queue, MessageQueue) and isinstance(proto.writable, Flag)
            # And the connection still reads and answers frames.
            await client.send(type="ping", id="after")
            pong = await client.recv()
            assert pong["type"] == "pong" and pong["data"]["ref"] == "after", pong


async def test_keepalive_pings_come_from_one_wheel_per_loop_with_no_timer_per_connection() -> None:
    with run_server(heartbeat_s=0.4) as srv:
        async with ws_client(srv, "alice") as a, ws_client(srv, "bob") as b:
            pings = {"alice": 0, "bob": 0}
            for name, client in (("alice", a), ("bob", b)):
                ping = client.ws.protocol

                def counted(name: str = name, received: Any = ping.receive_data) -> Any:
                    def receive(data: bytes) -> None:
                        # A server ping is an unmasked control frame of opcode 9.
                        if data[:1] == b"\x89":
                            pings[name] += 1
                        received(data)

                    return receive

                ping.receive_data = counted()  # type: ignore[method-assign]
            await asyncio.sleep(2.2)
            protocols = [p for p in _protocols() if p.handshake_complete and not p.disconnected]
            wheels = {id(p._wheel): p._wheel for p in protocols}
            assert len(protocols) == 2 and len(wheels) == 1
            wheel = next(iter(wheels.values()))
            assert wheel is not None and len(wheel) == 2
            assert all(p.ping_timer is None and p.pong_timer is None for p in protocols)
            # Both answered every ping (the client library does) and are still open.
            await a.send(type="ping", id="a")
            assert (await a.recv())["type"] == "pong"
        record_figures("keepalive_wheel", {"heartbeat_s": 0.4, "held_s": 2.2, "pings": pings})
        # One ping per 0.4 s, each at most one tick (0.1 s) late: 4 or 5 in 2.2 s
        # (fewer if the machine is loaded, never more).
        assert all(2 <= n <= 6 for n in pings.values()), pings


async def test_the_watchdog_leaves_idle_sessions_alone_and_still_cuts_an_expired_one() -> None:
    with run_server(send_timeout_s=4.0) as srv:  # the watchdog goes round every second
        async with ws_client(srv, "alice") as idle, ws_client(srv, "bob") as other:
            gc.collect()
            sessions = [
                o for o in gc.get_objects() if isinstance(o, Session) and not o.closed.is_set()
            ]
            assert {s.user_id for s in sessions} == {"alice", "bob"}
            asked: dict[str, int] = {"alice": 0, "bob": 0}
            for session in sessions:

                def counted(now: float, s: Session = session, check: Any = session.check) -> None:
                    asked[s.user_id] += 1
                    check(now)

                session.check = counted  # type: ignore[method-assign]
            bob = next(s for s in sessions if s.user_id == "bob")
            await asyncio.sleep(2.5)
            assert asked == {"alice": 0, "bob": 0}, asked
            # A token past its expiry is the watchdog's to find (here with the
            # session's own expiry timer out of the way): it is cut with 4401.
            # (The server's loop runs on the monotonic clock, in its own thread.)
            bob.box.expires_at = time.monotonic() - 10
            with pytest.raises(ConnectionClosed) as closed:
                await other.recv(timeout=5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
            assert asked["bob"] >= 1 and asked["alice"] == 0, asked
            await idle.send(type="ping", id="still")
            assert (await idle.recv())["type"] == "pong"

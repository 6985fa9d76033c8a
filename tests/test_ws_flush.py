"""The write path of WebSocket sessions against a real uvicorn on loopback: a run's
events are written by the loop's flusher, one write per session per loop turn,
not by waking each session's writer for every event; what the flusher cannot
write (connection messages, commands in flight) still goes out in order."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from typing import Any

from websockets.frames import Frame, Opcode

from server.app import GatewayApp, create_app
from server.protocols import text_frames
from server.session import Session
from server.settings import Settings
from tests.support import ROOT, SECRET, LiveServer, check_run_invariants, serving, ws_client


@contextlib.contextmanager
def served() -> Iterator[tuple[LiveServer, GatewayApp]]:
    """A gateway in a thread, as :func:`tests.support.run_server`, with its app."""
    settings = Settings(jwt_secret=SECRET, log_level="warning", db_url="sqlite:///:memory:")
    app = create_app(settings)
    with serving(app, settings) as server:
        yield LiveServer(settings, server.config.port), app


def sessions(app: GatewayApp) -> list[Session]:
    found = [s for s in app.gateway.clients.all() if isinstance(s, Session)]
    return found


def record_figures(name: str, figures: dict[str, Any]) -> None:
    out = ROOT / "var" / "figures"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\n{name}: {figures}")


def test_text_frames_are_the_bytes_websockets_makes() -> None:
    for n in (0, 1, 125, 126, 127, 65535, 65536, 100_000):
        text = "é" * (n // 2) + "a" * (n % 2)
        expected = Frame(Opcode.TEXT, text.encode()).serialize(mask=False, extensions=[])
        assert text_frames([text]) == expected, n
    assert text_frames(["a", "bc"]) == b"\x81\x01a\x81\x02bc"


async def test_a_paced_run_is_written_by_the_flusher_not_a_writer_wake_up_per_event(
    user: str,
) -> None:
    chunks = 300
    with served() as (srv, app):
        async with ws_client(srv, user) as client:
            (session,) = sessions(app)
            turns_before = session.writer_turns
            events = await client.run(
                f"chunks={chunks} chunk_chars=6 delay_ms=2 thinking=2 tools=1 tool_ms=5",
                agent="load",
            )
            run_events = [e for e in events if e.get("run_id")]
            check_run_invariants(run_events)
            assert run_events[-1]["data"]["status"] == "completed"
            assert sum(e["type"] == "response_chunk" for e in run_events) == chunks
            turns = session.writer_turns - turns_before
            direct = session.direct_writes
    # Each event used to be a wake-up of the writer: now the ack and the first events
    # (sent while the command was in flight) take a few turns, the rest none.
    assert direct >= chunks // 2, (direct, turns)
    assert turns <= 20, (direct, turns)
    record_figures(
        "ws_flush_paced_run",
        {"run_events": len(run_events), "direct_writes": direct, "writer_turns": turns},
    )


async def test_pings_during_a_stream_are_answered_and_the_stream_stays_in_order(
    user: str,
) -> None:
    pings = 60
    with served() as (srv, app):
        async with ws_client(srv, user) as client:
            await client.send(
                type="user_message",
                id="m1",
                content="chunks=400 chunk_chars=6 delay_ms=1 thinking=1",
                agent="load",
            )
            got: list[dict[str, Any]] = []

            async def ping() -> None:
                for i in range(pings):
                    await client.send(type="ping", id=f"p{i}")
                    await asyncio.sleep(0.002)

            pinger = asyncio.create_task(ping())
            async with asyncio.timeout(30):
                while True:
                    message = await client.recv()
                    got.append(message)
                    if message["type"] == "agent_completed":
                        break
            await pinger
            while sum(m["type"] == "pong" for m in got) < pings:
                got.append(await client.recv())
            (session,) = sessions(app)
            direct = session.direct_writes
    run_events = [m for m in got if m.get("run_id")]
    check_run_invariants(run_events)
    assert run_events[0]["type"] == "user_message" and run_events[-1]["type"] == "agent_completed"
    assert sum(e["type"] == "response_chunk" for e in run_events) == 400
    pongs = [m["data"]["ref"] for m in got if m["type"] == "pong"]
    assert pongs == [f"p{i}" for i in range(pings)]
    assert direct > 0
    record_figures(
        "ws_flush_pings_in_stream",
        {"run_events": len(run_events), "pongs": len(pongs), "direct_writes": direct},
    )


async def test_many_sessions_watching_one_run_each_get_every_event_once(user: str) -> None:
    watchers = 15
    with served() as (srv, app):
        async with contextlib.AsyncExitStack() as stack:
            owner = await stack.enter_async_context(ws_client(srv, user))
            await owner.send(
                type="user_message",
                id="m1",
                content="chunks=200 chunk_chars=6 delay_ms=2 thinking=0",
                agent="load",
            )
            first = (await owner.recv_until("user_message"))[-1]
            run_id = first["run_id"]
            others = [
                await stack.enter_async_context(ws_client(srv, user)) for _ in range(watchers)
            ]
            for i, other in enumerate(others):
                await other.send(type="resume", id=f"r{i}", run_id=run_id, after_seq=0)
            mine = await owner.recv_until("agent_completed", run_id=run_id)
            check_run_invariants([e for e in mine if e.get("run_id") == run_id])
            for other in others:
                seen = await other.recv_until("agent_completed", run_id=run_id)
                theirs = [e for e in seen if e.get("run_id") == run_id]
                check_run_invariants(theirs)
                assert [e["seq"] for e in theirs] == list(range(1, theirs[-1]["seq"] + 1))
            direct = sum(s.direct_writes for s in sessions(app))
    assert direct > watchers

"""The WebSocket endpoint against a real uvicorn on loopback, with the websockets client."""

from __future__ import annotations

import asyncio
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.support import LiveServer, check_run_invariants, of_run, run_server, ws_client


async def test_demo_flow_every_event_in_order(server: LiveServer, user: str) -> None:
    async with ws_client(server, user) as client:
        ready = client.ready["data"]
        assert ready["user_id"] == user and ready["protocol"] == "chat.v1"
        assert ready["max_message_bytes"] == 65536 and ready["heartbeat_s"] == 15
        assert client.ws.subprotocol == "chat.v1"
        began = time.monotonic()
        events = await client.run("What is 12 * 7?", id="c-1")
        elapsed = time.monotonic() - began
    types = [e["type"] for e in events]
    assert types[:5] == [
        "user_message",
        "agent_started",
        "agent_thinking",
        "tool_executing",
        "tool_completed",
    ]
    assert set(types[5:-2]) == {"response_chunk"}
    assert types[-2:] == ["response_complete", "agent_completed"]
    first = events[0]
    assert first["data"]["content"] == "What is 12 * 7?" and first["data"]["ref"] == "c-1"
    assert first["run_id"].startswith("r_") and first["thread_id"].startswith("t_")
    assert isinstance(first["ts"], float)
    assert events[3]["data"]["args"] == {"expression": "12 * 7"}
    assert events[4]["data"]["result"] == 84
    assert "84" in events[-2]["data"]["content"]
    assert events[-1]["data"]["status"] == "completed"
    check_run_invariants(events)
    assert elapsed < 10  # the contract's bound for the demo flow, far above what it takes


async def test_token_in_header_and_in_query(server: LiveServer, user: str) -> None:
    token = server.token(user)
    async with connect(server.ws, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        assert '"connection_ready"' in str(await ws.recv())
        assert ws.subprotocol is None
    async with connect(f"{server.ws}?access_token={token}") as ws:
        assert '"connection_ready"' in str(await ws.recv())


@pytest.mark.parametrize("token", [None, "garbage", "a.b.c"])
async def test_bad_token_closes_4401_after_the_handshake(
    server: LiveServer, token: str | None
) -> None:
    protocols = ["chat.v1"] + ([f"bearer.{token}"] if token else [])
    async with connect(server.ws, subprotocols=protocols) as ws:  # type: ignore[arg-type]
        assert ws.subprotocol == "chat.v1"  # the upgrade itself succeeded
        with pytest.raises(ConnectionClosed) as info:
            await ws.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 4401


async def test_bad_frames_get_errors_and_the_connection_stays_open(
    server: LiveServer, user: str
) -> None:
    async with ws_client(server, user) as client:
        for frame, code in [
            ("{nope", "bad_json"),
            ('"\\ud800"', "bad_json"),
            ("[1, 2]", "bad_message"),
            ('{"type": "user_message", "content": ""}', "bad_message"),
            ('{"type": "resume", "run_id": "r_x", "after_seq": -4}', "bad_message"),
            ('{"type": "teleport", "id": "q"}', "unknown_type"),
            ('{"type": "stop", "run_id": "r_nope", "id": 9}', "not_found"),
            ('{"type": "user_message", "content": "hi", "agent": "nobody"}', "bad_message"),
        ]:
            await client.ws.send(frame)
            reply = await client.recv()
            assert reply["type"] == "error", (frame, reply)
            assert reply["data"]["code"] == code, (frame, reply)
            assert reply["run_id"] is None and reply["seq"] is None
        await client.ws.send(b'{"type": "ping"}')
        assert (await client.recv())["data"]["code"] == "bad_message"
        await client.send(type="ping", id="p1")
        pong = await client.recv()
        assert pong["type"] == "pong" and pong["data"]["ref"] == "p1"


async def test_frame_over_the_limit_closes_1009(user: str) -> None:
    with run_server(max_message_bytes=1024) as live:
        async with ws_client(live, user) as client:
            assert client.ready["data"]["max_message_bytes"] == 1024
            await client.send(type="user_message", content="x" * 600)  # fits
            await client.recv_until("agent_completed")
            await client.send(type="user_message", content="é" * 600)  # 1200 bytes
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    await client.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009


async def test_stop_start_cancel_from_the_socket(server: LiveServer, user: str) -> None:
    async with ws_client(server, user) as client:
        await client.send(type="user_message", agent="load", content="chunks=400 delay_ms=5")
        first = await client.recv()
        run_id = first["run_id"]
        await client.recv_until("response_chunk")
        await client.send(type="stop", run_id=run_id, id="s1")
        got = await client.recv_until("run_status")
        acks = [m for m in got if m["type"] == "ack"]
        assert acks and acks[0]["data"] == {
            "ref": "s1",
            "action": "stop",
            "run_id": run_id,
            "status": "paused",
        }
        assert got.index(acks[0]) < len(got) - 1  # the ack before run_status
        assert got[-1]["data"]["status"] == "paused"
        # Nothing of the run arrives while it is paused.
        with pytest.raises(TimeoutError):
            await client.recv(timeout=0.3)
        await client.send(type="stop", run_id=run_id, id="s2")  # no-op: ack, no event
        noop = await client.recv()
        assert noop["type"] == "ack" and noop["data"]["status"] == "paused"
        await client.send(type="start", run_id=run_id, id="s3")
        got = await client.recv_until("run_status")
        assert [m["type"] for m in got][:1] == ["ack"]
        assert got[-1]["data"]["status"] == "running"
        await client.send(type="cancel", run_id=run_id, id="s4")
        rest = await client.recv_until("agent_completed")
        ack = next(m for m in rest if m["type"] == "ack")
        assert ack["data"]["status"] == "cancelled"
        assert rest[-1]["data"]["status"] == "cancelled"
        await client.send(type="start", run_id=run_id, id="s5")
        conflict = await client.recv()
        assert conflict["type"] == "error" and conflict["data"]["code"] == "conflict"
        assert conflict["data"]["ref"] == "s5"
        await client.send(type="cancel", run_id=run_id, id="s6")  # no-op on cancelled
        assert (await client.recv())["data"]["status"] == "cancelled"


async def test_another_users_run_is_not_found(server: LiveServer, user: str) -> None:
    async with ws_client(server, user) as alice:
        events = await alice.run("chunks=2", agent="load")
        run_id = events[0]["run_id"]
        thread_id = events[0]["thread_id"]
    async with ws_client(server, user + "-other") as mallory:
        for frame in (
            {"type": "resume", "run_id": run_id, "after_seq": 0},
            {"type": "cancel", "run_id": run_id},
            {"type": "stop", "run_id": run_id},
            {"type": "user_message", "content": "hi", "thread_id": thread_id},
        ):
            await mallory.send(**frame)
            reply = await mallory.recv()
            assert reply["type"] == "error" and reply["data"]["code"] == "not_found", frame


async def test_abrupt_drop_then_resume_gets_every_later_event_once(
    server: LiveServer, user: str
) -> None:
    async with ws_client(server, user) as client:
        await client.send(type="user_message", agent="load", content="chunks=200 delay_ms=3")
        seen = await client.recv_until("response_chunk")
        seen += [await client.recv() for _ in range(10)]
        run_id = seen[0]["run_id"]
        client.ws.transport.abort()  # no close frame: the network just went away
    last = max(m["seq"] for m in seen if m.get("run_id") == run_id)
    await asyncio.sleep(0.1)
    async with ws_client(server, user) as again:
        await again.send(type="resume", run_id=run_id, after_seq=last, id="r1")
        rest = await again.recv_until("agent_completed")
    ack = rest[0]
    assert ack["type"] == "ack" and ack["data"]["action"] == "resume"
    later = of_run(rest, run_id)
    assert [m["seq"] for m in later] == list(range(last + 1, last + 1 + len(later)))
    check_run_invariants(of_run(seen, run_id) + later)
    chunks = [m for m in of_run(seen, run_id) + later if m["type"] == "response_chunk"]
    assert len(chunks) == 200


async def test_finished_run_replays_identically(server: LiveServer, user: str) -> None:
    async with ws_client(server, user) as client:
        live = await client.run("tools=2 chunks=5", agent="load")
        run_id = live[0]["run_id"]
        await client.send(type="resume", run_id=run_id, after_seq=0)
        replay = await client.recv_until("agent_completed")
        await client.send(type="resume", run_id=run_id, after_seq=7)
        tail = await client.recv_until("agent_completed")
    assert replay[0]["type"] == "ack" and replay[0]["data"]["status"] == "completed"
    assert replay[1:] == live
    assert tail[1:] == live[7:]


async def test_a_resume_past_the_runs_last_event_is_a_bad_message(
    server: LiveServer, user: str
) -> None:
    async with ws_client(server, user) as client:
        live = await client.run("chunks=2", agent="load")
        run_id, last = live[0]["run_id"], live[-1]["seq"]
        await client.send(type="resume", run_id=run_id, after_seq=last + 5, id="ahead")
        answer = await client.recv_until("error")
        await client.send(type="ping", id="still")
        pong = await client.recv_until("pong")
    error = answer[-1]["data"]
    assert error["code"] == "bad_message" and error["ref"] == "ahead"
    assert f"beyond the run's last seq {last}" in error["message"]
    assert pong[-1]["data"]["ref"] == "still"  # the session goes on


async def test_run_outlives_its_client(server: LiveServer, user: str) -> None:
    async with ws_client(server, user) as client:
        await client.send(type="user_message", agent="load", content="chunks=30 delay_ms=10")
        first = await client.recv()
    run_id = first["run_id"]
    await asyncio.sleep(0.5)  # the run goes on with nobody watching
    async with ws_client(server, user) as again:
        await again.send(type="resume", run_id=run_id, after_seq=0)
        events = of_run(await again.recv_until("agent_completed"), run_id)
    check_run_invariants(events)
    assert events[-1]["data"]["status"] == "completed"


async def test_a_session_sees_runs_it_started_or_resumed_only(
    server: LiveServer, user: str
) -> None:
    async with ws_client(server, user) as one, ws_client(server, user) as two:
        await one.send(type="user_message", agent="load", content="chunks=20 delay_ms=5")
        run_id = (await one.recv())["run_id"]
        with pytest.raises(TimeoutError):
            await two.recv(timeout=0.2)
        await two.send(type="resume", run_id=run_id, after_seq=0)
        from_two = of_run(await two.recv_until("agent_completed"), run_id)
        from_one = of_run(await one.recv_until("agent_completed"), run_id)
    assert [m["seq"] for m in from_one] == list(range(2, from_one[-1]["seq"] + 1))
    assert from_two[-1] == from_one[-1]
    check_run_invariants(from_two)


async def test_resume_of_dropped_events_is_unavailable(user: str) -> None:
    with run_server(run_log_max_bytes=4096) as live:
        async with ws_client(live, user) as client:
            events = await client.run("chunks=100 chunk_chars=16 delay_ms=1", agent="load")
            run_id = events[0]["run_id"]
            await client.send(type="resume", run_id=run_id, after_seq=0, id="old")
            reply = await client.recv()
            assert reply["type"] == "error" and reply["data"]["code"] == "resume_unavailable"
            assert reply["data"]["ref"] == "old"
            await client.send(type="resume", run_id=run_id, after_seq=events[-3]["seq"])
            tail = await client.recv_until("agent_completed")
            assert [m["type"] for m in tail] == ["ack", "response_complete", "agent_completed"]
            await client.send(type="resume", run_id=run_id, after_seq=10_000)
            assert (await client.recv())["data"]["code"] == "bad_message"


async def test_compression_is_off_unless_configured(user: str) -> None:
    for setting, negotiated in (("off", False), ("on", True)):
        with run_server(ws_compression=setting) as live:
            async with ws_client(live, user) as client:
                extensions = client.ws.response.headers.get("Sec-WebSocket-Extensions", "")
                assert ("permessage-deflate" in extensions) is negotiated, setting
                assert (await client.run("chunks=2", agent="load"))[-1]["type"] == "agent_completed"

"""SSE, lifecycle, status and health routes against a real uvicorn, with httpx."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from tests.support import LiveServer, check_run_invariants, http_client, parse_sse, ws_client


async def stream(
    client: httpx.AsyncClient, body: dict[str, Any], headers: dict[str, str]
) -> tuple[httpx.Response, list[dict[str, Any]]]:
    async with client.stream("POST", "/api/chat/stream", json=body, headers=headers) as resp:
        text = (await resp.aread()).decode()
    return resp, parse_sse(text)


async def test_sse_demo_flow(server: LiveServer, user: str) -> None:
    async with http_client(server) as client:
        resp, messages = await stream(client, {"message": "What is 12 * 7?"}, server.headers(user))
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.headers["cache-control"] == "no-store"
    assert resp.headers["x-accel-buffering"] == "no"
    start, *run, end = messages
    assert start["event"] == "stream_start" and "id" not in start
    assert end["event"] == "stream_end" and "id" not in end
    assert end["data"]["status"] == "completed"
    run_id = start["data"]["run_id"]
    assert end["data"]["run_id"] == run_id
    assert start["data"]["thread_id"] == run[0]["data"]["thread_id"]
    events = [m["data"] for m in run]
    for message in run:
        assert message["event"] == message["data"]["type"]
        assert int(message["id"]) == message["data"]["seq"]
    assert [e["type"] for e in events][:5] == [
        "user_message",
        "agent_started",
        "agent_thinking",
        "tool_executing",
        "tool_completed",
    ]
    assert events[4]["data"]["result"] == 84 and "84" in events[-2]["data"]["content"]
    check_run_invariants(events)


async def test_run_events_replay_after_seq_and_last_event_id(server: LiveServer, user: str) -> None:
    headers = server.headers(user)
    async with http_client(server) as client:
        _, messages = await stream(client, {"message": "chunks=6", "agent": "load"}, headers)
        run_id = messages[0]["data"]["run_id"]
        full = [m["data"] for m in messages[1:-1]]
        url = f"/api/chat/runs/{run_id}/events"
        everything = parse_sse((await client.get(url, headers=headers)).text)
        assert [m["data"] for m in everything] == full
        after = parse_sse((await client.get(url, params={"after_seq": 4}, headers=headers)).text)
        assert [m["data"]["seq"] for m in after] == [e["seq"] for e in full[4:]]
        # Last-Event-ID wins over after_seq.
        both = await client.get(
            url, params={"after_seq": 1}, headers={**headers, "Last-Event-ID": "9"}
        )
        assert parse_sse(both.text)[0]["data"]["seq"] == 10
        token = server.token(user)
        by_query = await client.get(url, params={"access_token": token, "after_seq": 10})
        assert by_query.status_code == 200
        assert [m["event"] for m in parse_sse(by_query.text)] == ["agent_completed"]
        for bad in ("-1", "x", "1.5"):
            resp = await client.get(url, params={"after_seq": bad}, headers=headers)
            assert resp.status_code == 400 and resp.json()["error"]["code"] == "bad_message"


async def test_run_events_follow_a_live_run(server: LiveServer, user: str) -> None:
    headers = server.headers(user)
    async with ws_client(server, user) as ws, http_client(server) as client:
        await ws.send(type="user_message", agent="load", content="chunks=40 delay_ms=10")
        run_id = (await ws.recv())["run_id"]
        url = f"/api/chat/runs/{run_id}/events"
        async with client.stream("GET", url, headers=headers) as resp:
            text = (await resp.aread()).decode()
        # Read the socket's copy too: a client that stops reading cannot close promptly.
        on_socket = await ws.recv_until("agent_completed")
    events = [m["data"] for m in parse_sse(text)]
    assert events[1:] == on_socket
    check_run_invariants(events)
    assert events[-1]["data"]["status"] == "completed"


async def test_lifecycle_routes(server: LiveServer, user: str) -> None:
    headers = server.headers(user)
    async with ws_client(server, user) as ws, http_client(server) as client:
        await ws.send(type="user_message", agent="load", content="chunks=500 delay_ms=5")
        first = await ws.recv()
        run_id = first["run_id"]
        base = f"/api/chat/agents/{run_id}"

        resp = await client.post(f"{base}/stop", headers=headers)
        assert resp.status_code == 200
        assert resp.json() == {"ok": True, "run_id": run_id, "action": "stop", "status": "paused"}
        await ws.recv_until("run_status")
        again = await client.post(f"{base}/stop", headers=headers)
        assert again.status_code == 200 and again.json()["status"] == "paused"

        status = (await client.get(f"{base}/status", headers=headers)).json()
        assert status["ok"] is True and status["status"] == "paused"
        assert status["run_id"] == run_id and status["thread_id"] == first["thread_id"]
        assert status["agent"] == "load" and status["last_seq"] >= 2
        assert status["created_at"] <= status["updated_at"]

        resp = await client.post(f"{base}/start", headers=headers)
        assert resp.json()["status"] == "running"
        resp = await client.post(f"{base}/cancel", headers=headers)
        assert resp.json()["status"] == "cancelled"
        end = await ws.recv_until("agent_completed")
        assert end[-1]["data"]["status"] == "cancelled"

        conflict = await client.post(f"{base}/start", headers=headers)
        assert conflict.status_code == 409
        assert conflict.json()["ok"] is False
        assert conflict.json()["error"]["code"] == "conflict"
        assert (await client.post(f"{base}/cancel", headers=headers)).status_code == 200
        assert (await client.post(f"{base}/explode", headers=headers)).status_code == 404
        final = (await client.get(f"{base}/status", headers=headers)).json()
        assert final["status"] == "cancelled" and final["error_code"] == "cancelled"

        missing = await client.post("/api/chat/agents/r_nothing/stop", headers=headers)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


async def test_completed_run_conflicts_on_stop_and_cancel(server: LiveServer, user: str) -> None:
    headers = server.headers(user)
    async with http_client(server) as client:
        _, messages = await stream(client, {"message": "chunks=1", "agent": "load"}, headers)
        base = f"/api/chat/agents/{messages[0]['data']['run_id']}"
        for action in ("stop", "start", "cancel"):
            resp = await client.post(f"{base}/{action}", headers=headers)
            assert resp.status_code == 409, action


async def test_other_users_run_is_404_everywhere(server: LiveServer, user: str) -> None:
    async with http_client(server) as client:
        _, messages = await stream(
            client, {"message": "chunks=1", "agent": "load"}, server.headers(user)
        )
        run_id = messages[0]["data"]["run_id"]
        thread_id = messages[0]["data"]["thread_id"]
        other = server.headers(user + "-other")
        for method, url in [
            ("GET", f"/api/chat/agents/{run_id}/status"),
            ("POST", f"/api/chat/agents/{run_id}/cancel"),
            ("GET", f"/api/chat/runs/{run_id}/events"),
        ]:
            resp = await client.request(method, url, headers=other)
            assert resp.status_code == 404, url
            assert resp.json()["error"]["code"] == "not_found"
        resp = await client.post(
            "/api/chat/stream", json={"message": "hi", "thread_id": thread_id}, headers=other
        )
        assert resp.status_code == 404


@pytest.mark.parametrize(
    ("headers", "params"),
    [
        ({}, {}),
        ({"Authorization": "Bearer nonsense"}, {}),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, {}),
        ({}, {"access_token": "a.b.c"}),
    ],
)
async def test_routes_need_a_valid_token(
    server: LiveServer, headers: dict[str, str], params: dict[str, str]
) -> None:
    async with http_client(server) as client:
        for method, url in [
            ("POST", "/api/chat/stream"),
            ("GET", "/api/chat/runs/r_x/events"),
            ("POST", "/api/chat/agents/r_x/stop"),
            ("GET", "/api/chat/agents/r_x/status"),
        ]:
            resp = await client.request(method, url, headers=headers, params=params)
            assert resp.status_code == 401, url
            assert resp.json()["error"]["code"] == "unauthorized"


async def test_bad_bodies(server: LiveServer, user: str) -> None:
    headers = server.headers(user)
    async with http_client(server) as client:
        for content, code in [
            (b"{nope", "bad_json"),
            (b"[1]", "bad_message"),
            (b"{}", "bad_message"),
            (b'{"message": ""}', "bad_message"),
            (b'{"message": "hi", "agent": 3}', "bad_message"),
            (b'{"message": "hi", "agent": "nobody"}', "bad_message"),
        ]:
            resp = await client.post("/api/chat/stream", content=content, headers=headers)
            assert resp.status_code == 400, content
            assert resp.json()["error"]["code"] == code, content
        huge = {"message": "x" * 70_000}
        resp = await client.post("/api/chat/stream", json=huge, headers=headers)
        assert resp.status_code == 413 and resp.json()["error"]["code"] == "too_large"


async def test_unknown_api_paths_get_json_errors(server: LiveServer, user: str) -> None:
    async with http_client(server) as client:
        for method, url in [("GET", "/api/nothing"), ("GET", "/api/chat/stream")]:
            resp = await client.request(method, url, headers=server.headers(user))
            assert resp.status_code in (404, 405), url
            assert resp.json()["ok"] is False, url


async def test_page_and_responses_carry_security_headers(server: LiveServer) -> None:
    async with http_client(server) as client:
        page = await client.get("/")
    assert page.status_code == 200
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"


async def test_sse_carries_the_client_id_as_ref(server: LiveServer, user: str) -> None:
    async with http_client(server) as client:
        _, messages = await stream(
            client, {"message": "chunks=1", "agent": "load", "id": "c-9"}, server.headers(user)
        )
    assert messages[1]["data"]["data"]["ref"] == "c-9"


def test_sse_sends_a_ping_comment_each_heartbeat(user: str) -> None:
    from tests.support import run_server

    with run_server(heartbeat_s=0.2) as live, httpx.Client(base_url=live.http, timeout=15) as http:
        body = {"message": "tools=1 tool_ms=1000", "agent": "load"}
        with http.stream("POST", "/api/chat/stream", json=body, headers=live.headers(user)) as r:
            lines = list(r.iter_lines())
    pings = [line for line in lines if line == ": ping"]
    assert len(pings) >= 3, lines  # a one-second tool call, a ping every 0.2 s
    assert parse_sse("\n".join(lines))[-1]["event"] == "stream_end"


async def test_health(server: LiveServer) -> None:
    async with http_client(server) as client:
        resp = await client.get("/health")
    body = resp.json()
    assert resp.status_code == 200 and body["status"] == "healthy"
    assert body["features"] == {
        "chat_streaming": True,
        "agent_lifecycle_control": True,
        "websocket_events": True,
        "sse_events": True,
        "resumable_runs": True,
        "threads": True,
        "idempotent_sends": True,
        "double_texting": True,
        "thread_watching": True,
        "input_requests": True,
        "ag_ui": True,
        "ai_sdk_ui_stream": True,
    }
    assert body["broker"] in ("memory", "redis") and body["broker_reachable"] is True
    assert "demo" in body["agents"]


async def test_cors_for_allowed_origins_only(user: str) -> None:
    from tests.support import run_server

    with run_server(allowed_origins=("https://app.example",)) as live:
        async with http_client(live) as client:
            ok = await client.options(
                "/api/chat/stream",
                headers={
                    "Origin": "https://app.example",
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization,content-type",
                },
            )
            assert ok.status_code == 200
            assert ok.headers["access-control-allow-origin"] == "https://app.example"
            bad = await client.options(
                "/api/chat/stream",
                headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
            )
            assert "access-control-allow-origin" not in bad.headers


async def test_sse_client_leaving_does_not_end_the_run(server: LiveServer, user: str) -> None:
    headers = server.headers(user)
    async with http_client(server) as client:
        async with client.stream(
            "POST",
            "/api/chat/stream",
            json={"message": "chunks=30 delay_ms=10", "agent": "load"},
            headers=headers,
        ) as resp:
            lines = resp.aiter_lines()
            async for line in lines:
                if line.startswith("data: ") and "run_id" in line:
                    run_id = line.split('"run_id":"')[1].split('"')[0]
                    break
        await asyncio.sleep(0.5)
        replay = await client.get(f"/api/chat/runs/{run_id}/events", headers=headers)
    events = [m["data"] for m in parse_sse(replay.text)]
    check_run_invariants(events)
    assert events[-1]["data"]["status"] == "completed"


async def test_a_finished_run_read_from_its_last_seq_ends_at_once(
    server: LiveServer, user: str
) -> None:
    """Nothing follows a run's ``agent_completed``: a stream asked for what comes after
    it ends with nothing, on each broker (on Redis it used to stay open for good)."""
    async with ws_client(server, user) as client:
        events = await client.run("chunks=2", agent="load")
        run_id, last = events[-1]["run_id"], events[-1]["seq"]
        async with http_client(server) as rest:
            answer = await rest.get(
                f"/api/chat/runs/{run_id}/events",
                params={"after_seq": last},
                headers=server.headers(user),
                timeout=10,
            )
            assert answer.status_code == 200 and answer.text == ""
            answer = await rest.get(
                f"/api/chat/runs/{run_id}/events",
                params={"after_seq": last - 1},
                headers=server.headers(user),
                timeout=10,
            )
            assert [m["event"] for m in parse_sse(answer.text)] == ["agent_completed"]

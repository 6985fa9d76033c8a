"""Faults injected for real against a gateway on loopback: slow readers, half-open peers,
expiring tokens, hostile origins, limits and SIGTERM.

Figures measured here (times, memory) are printed and written to ``var/figures/``;
they are reported, never asserted as wall-clock thresholds.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.support import (
    ROOT,
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

MiB = 1024 * 1024


def record_figures(name: str, figures: dict[str, Any]) -> None:
    out = ROOT / "var" / "figures"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\n{name}: {figures}")


async def close_code_after_draining(client: Any, run_id: str) -> tuple[int | None, int]:
    """Read until the server closes; the close code and the last seq of ``run_id`` seen."""
    last = 0
    try:
        while True:
            message = orjson.loads(await asyncio.wait_for(client.ws.recv(), 30))
            if message.get("run_id") == run_id:
                assert message["seq"] == last + 1 or last == 0, (last, message["seq"])
                last = message["seq"]
    except ConnectionClosed as exc:
        return (exc.rcvd.code if exc.rcvd else None), last


async def test_slow_consumer_is_closed_4408_others_unaffected_memory_bounded(
    tmp_path: Path,
) -> None:
    chunks = 300_000
    # A log bound that keeps the whole run (about 410 bytes an event, counted with its
    # overhead), so that the reader cut off early can still resume from where it was.
    log_bound = 160 * MiB
    # Its answer (2.4 MB) is larger than the default answer bound.
    with spawn_server(
        tmp_path, CHAT_RUN_LOG_MAX_BYTES=str(log_bound), CHAT_MAX_ANSWER_BYTES=str(4 * MiB)
    ) as srv:
        rss_before = srv.rss_kib()
        async with ws_client(srv, "slow-reader") as slow, ws_client(srv, "bystander") as fast:
            await slow.send(
                type="user_message", agent="load", content=f"chunks={chunks} thinking=0"
            )
            run_id = (await slow.recv())["run_id"]
            slow.ws.transport.pause_reading()  # the tab stops reading

            began = time.monotonic()
            events = await fast.run("What is 12 * 7?")
            bystander_s = time.monotonic() - began
            check_run_invariants(events)
            assert "84" in events[-2]["data"]["content"]

            async def closed_as_slow() -> bool:
                return (await health(srv))["counters"]["slow_consumer_closes"] >= 1

            detect_s = await wait_for(closed_as_slow, timeout=60)
            slow.ws.transport.resume_reading()
            code, last_seq = await close_code_after_draining(slow, run_id)
        assert code == 4408

        # The run went on without its reader; once it is done, a new connection resumes
        # with nothing lost.  (Resuming while it still streams 100,000 events a second
        # would make a test client this slow a slow consumer again.)
        async def run_done() -> bool:
            async with http_client(srv) as http:
                status = await http.get(
                    f"/api/chat/agents/{run_id}/status", headers=srv.headers("slow-reader")
                )
            return bool(status.json()["status"] == "completed")

        await wait_for(run_done, timeout=120)
        seqs: list[int] = []
        async with ws_client(srv, "slow-reader", max_size=None) as again:
            await again.send(type="resume", run_id=run_id, after_seq=last_seq)
            async with asyncio.timeout(120):  # one bound for the whole replay
                while True:
                    message = orjson.loads(await again.ws.recv())
                    assert message["type"] != "error", message
                    if message["run_id"] == run_id:
                        seqs.append(message["seq"])
                    if message["type"] == "agent_completed":
                        break
        assert seqs == list(range(last_seq + 1, last_seq + 1 + len(seqs)))
        assert message["data"]["status"] == "completed"
        assert seqs[-1] == chunks + 4  # user_message, started, chunks, complete, completed
        body = await health(srv)
        peak_kib = srv.peak_rss_kib()
    record_figures(
        "slow_consumer",
        {
            "events_in_run": chunks + 4,
            "bystander_demo_run_s": round(bystander_s, 3),
            "slow_consumer_detected_after_s": round(detect_s, 3),
            "last_seq_before_4408": last_seq,
            "rss_before_kib": rss_before,
            "peak_rss_kib": peak_kib,
            "run_log_bytes_held": body["memory"]["run_log_bytes"],
            "runs_in_memory": body["memory"]["runs_in_memory"],
        },
    )
    # Bounded: the run log's bound plus the interpreter, far below an unbounded buffer
    # of the whole run (which would be several times the log's bound).
    assert body["memory"]["run_log_bytes"] <= log_bound * body["memory"]["runs_in_memory"]
    assert peak_kib - rss_before < 2 * log_bound // 1024


async def test_half_open_peer_found_by_keepalive_and_its_run_resumable(user: str) -> None:
    with run_server(heartbeat_s=0.3) as srv:
        async with ws_client(srv, user) as client:
            await client.send(type="user_message", agent="load", content="chunks=60 delay_ms=25")
            run_id = (await client.recv())["run_id"]
            client.ws.transport.pause_reading()  # stops answering pings: half-open

            async def freed() -> bool:
                return (await health(srv))["connections"] == 0

            freed_s = await wait_for(freed, timeout=10)
            client.ws.transport.abort()
        async with ws_client(srv, user) as again:
            await again.send(type="resume", run_id=run_id, after_seq=0)
            events = [m for m in await again.recv_until("agent_completed") if m["run_id"]]
    check_run_invariants(events)
    assert events[-1]["data"]["status"] == "completed"
    record_figures("keepalive", {"heartbeat_s": 0.3, "half_open_freed_after_s": round(freed_s, 3)})


async def test_token_expiring_during_the_connection_closes_4401(user: str) -> None:
    with run_server() as srv:
        short = srv.token(user, ttl_s=2)
        async with ws_client(srv, user, token=short) as client:
            await client.send(type="user_message", agent="load", content="chunks=100 delay_ms=50")
            run_id = (await client.recv())["run_id"]
            began = time.monotonic()
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    await client.recv(timeout=10)
            closed_after = time.monotonic() - began
        assert info.value.rcvd is not None and info.value.rcvd.code == 4401
        assert "expired" in info.value.rcvd.reason
        async with ws_client(srv, user) as again:  # a fresh token, and the run resumes
            await again.send(type="resume", run_id=run_id, after_seq=0)
            events = [m for m in await again.recv_until("agent_completed") if m["run_id"]]
        check_run_invariants(events)
    record_figures("token_expiry", {"closed_after_s": round(closed_after, 3)})


def _tokens(public_pem: str | None = None) -> dict[str, str]:
    from jose import jwt

    from tests.support import SECRET
    from tests.test_auth import claims, unsigned

    now = int(time.time())
    good = {"aud": "chat", "iss": "idp"}
    return {
        "garbage": "not-a-token",
        "wrong signature": jwt.encode(claims(**good), "wrong-secret", algorithm="HS256"),
        "expired": jwt.encode(claims(exp=now - 30, **good), SECRET, algorithm="HS256"),
        "alg none": unsigned(claims(**good)),
        "no sub": jwt.encode({"exp": now + 60, "iat": now, **good}, SECRET, algorithm="HS256"),
        "wrong aud": jwt.encode(claims(aud="other", iss="idp"), SECRET, algorithm="HS256"),
        "wrong iss": jwt.encode(claims(aud="chat", iss="other"), SECRET, algorithm="HS256"),
    }


async def assert_rejected(srv: LiveServer, token: str | None, label: str) -> None:
    protocols: list[Any] = ["chat.v1"] + ([f"bearer.{token}"] if token else [])
    async with connect(srv.ws, subprotocols=protocols) as ws:
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 10)
    assert info.value.rcvd is not None and info.value.rcvd.code == 4401, label
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http_client(srv) as client:
        resp = await client.post("/api/chat/stream", json={"message": "hi"}, headers=headers)
    assert resp.status_code == 401, label


async def test_auth_matrix_on_socket_and_http() -> None:
    with run_server(jwt_audience="chat", jwt_issuer="idp") as srv:
        await assert_rejected(srv, None, "no token")
        for label, token in _tokens().items():
            await assert_rejected(srv, token, label)
        async with ws_client(srv, "fine") as client:  # a good token still works
            assert client.ready["data"]["user_id"] == "fine"


async def test_hs_rs_confusion_rejected(tmp_path: Path) -> None:
    import base64
    import hashlib
    import hmac

    from jose import jwt

    from server.settings import Settings
    from tests.test_auth import claims, rsa_pair

    private, public = rsa_pair()
    settings = Settings(jwt_public_key=public, log_level="warning", db_url="sqlite:///:memory:")
    with run_server(settings) as srv:

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        head = b64(orjson.dumps({"alg": "HS256", "typ": "JWT"}))
        body = b64(orjson.dumps(claims()))
        sig = hmac.new(public.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
        await assert_rejected(srv, f"{head}.{body}.{b64(sig)}", "HS256 signed with public key")
        good = jwt.encode(claims(sub="rs-user"), private, algorithm="RS256")
        async with ws_client(srv, token=good) as client:
            assert client.ready["data"]["user_id"] == "rs-user"


async def test_hostile_origin_closed_4403_own_and_listed_origins_allowed(user: str) -> None:
    with run_server(allowed_origins=("https://app.example",)) as srv:
        protocols: list[Any] = ["chat.v1", f"bearer.{srv.token(user)}"]
        async with connect(srv.ws, subprotocols=protocols, origin="https://evil.example") as ws:  # type: ignore[arg-type]
            assert ws.subprotocol == "chat.v1"
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 10)
        assert info.value.rcvd is not None and info.value.rcvd.code == 4403
        for origin in (f"http://127.0.0.1:{srv.port}", "https://app.example"):
            async with connect(srv.ws, subprotocols=protocols, origin=origin) as ws:  # type: ignore[arg-type]
                assert json.loads(await ws.recv())["type"] == "connection_ready", origin


async def test_connection_cap_closes_the_newest_4429(user: str) -> None:
    with run_server(max_connections_per_user=2) as srv:
        async with ws_client(srv, user) as one, ws_client(srv, user) as two:
            protocols: list[Any] = ["chat.v1", f"bearer.{srv.token(user)}"]
            async with connect(srv.ws, subprotocols=protocols) as third:
                with pytest.raises(ConnectionClosed) as info:
                    await asyncio.wait_for(third.recv(), 10)
            assert info.value.rcvd is not None and info.value.rcvd.code == 4429
            for client in (one, two):
                await client.send(type="ping", id="still")
                assert (await client.recv())["type"] == "pong"
            async with ws_client(srv, user + "-b"):  # other users are not affected
                pass


async def test_rate_limit_per_minute_socket_and_http(user: str) -> None:
    with run_server(rate_limit_per_minute=3) as srv:
        async with ws_client(srv, user) as client:
            for _ in range(2):  # refused runs do not count against the window
                await client.send(type="user_message", content="hi", agent="nobody")
                assert (await client.recv())["data"]["code"] == "bad_message"
            for _ in range(3):
                await client.run("chunks=1", agent="load")
            await client.send(type="user_message", content="chunks=1", agent="load", id="x")
            reply = await client.recv()
            assert reply["type"] == "error" and reply["data"]["code"] == "rate_limited"
            assert reply["data"]["ref"] == "x"
        async with http_client(srv) as http:
            resp = await http.post(
                "/api/chat/stream", json={"message": "hi"}, headers=srv.headers(user)
            )
        assert resp.status_code == 429 and resp.json()["error"]["code"] == "rate_limited"


async def test_active_runs_limit(user: str) -> None:
    with run_server(max_active_runs_per_user=2) as srv:
        async with ws_client(srv, user) as client:
            for _ in range(2):
                await client.send(
                    type="user_message", agent="load", content="tools=1 tool_ms=60000"
                )
            started = [m for m in await client.recv_until("user_message") if m["run_id"]]
            await client.recv_until("tool_executing")
            await client.send(type="user_message", content="hi", id="third")
            got = await client.recv_until("error")
            assert got[-1]["data"]["code"] == "rate_limited" and got[-1]["data"]["ref"] == "third"
            await client.send(type="cancel", run_id=started[0]["run_id"])
            await client.recv_until("agent_completed", run_id=started[0]["run_id"])
            await client.send(type="user_message", agent="load", content="chunks=1")
            assert (await client.recv_until("user_message"))[-1]["type"] == "user_message"


async def test_sigterm_ends_runs_then_closes_1012(tmp_path: Path) -> None:
    with spawn_server(tmp_path, CHAT_SHUTDOWN_GRACE_S="1") as srv:
        async with ws_client(srv, "a") as a, ws_client(srv, "b") as b:
            await a.send(type="user_message", agent="load", content="tools=1 tool_ms=60000")
            await b.send(type="user_message", agent="load", content="chunks=5000 delay_ms=20")
            await b.send(type="user_message", agent="load", content="chunks=10 delay_ms=20")
            run_a = (await a.recv())["run_id"]
            await a.recv_until("tool_executing")
            async with httpx.AsyncClient(base_url=srv.http, timeout=30) as http:
                sse = http.stream(
                    "POST",
                    "/api/chat/stream",
                    json={"message": "chunks=5000 delay_ms=20", "agent": "load"},
                    headers=srv.headers("c"),
                )
                async with sse as resp:
                    lines = resp.aiter_lines()
                    first = await anext(lines)
                    assert first == "event: stream_start"
                    await asyncio.sleep(0.3)
                    assert srv.proc is not None
                    began = time.monotonic()
                    srv.proc.send_signal(signal.SIGTERM)
                    sse_text = "\n".join([first, *[line async for line in lines]])
            results: dict[str, Any] = {}
            for name, client in (("a", a), ("b", b)):
                got: list[dict[str, Any]] = []
                with pytest.raises(ConnectionClosed) as info:
                    while True:
                        got.append(await client.recv(timeout=30))
                results[name] = (got, info.value.rcvd.code if info.value.rcvd else None)
            shutdown_s = time.monotonic() - began
        # uvicorn re-raises the signal once its shutdown is done: ended by SIGTERM, cleanly.
        assert srv.proc.wait(timeout=30) in (0, -signal.SIGTERM)
        assert "Traceback" not in srv.log()
    got_a, code_a = results["a"]
    assert code_a == 1012
    end_a = [m for m in got_a if m["type"] == "agent_completed"]
    assert len(end_a) == 1 and end_a[0]["run_id"] == run_a
    assert end_a[0]["data"]["status"] == "cancelled"
    assert end_a[0]["data"]["error"]["code"] == "shutdown"
    tool = next(m for m in got_a if m["type"] == "tool_completed")
    assert tool["data"]["error"] == "cancelled"
    got_b, code_b = results["b"]
    assert code_b == 1012
    ends_b = {m["run_id"]: m["data"] for m in got_b if m["type"] == "agent_completed"}
    assert len(ends_b) == 2
    # The short run finished within the grace; the long one was cut short.
    assert sorted(d["status"] for d in ends_b.values()) == ["cancelled", "completed"]
    messages = parse_sse(sse_text)
    assert messages[-1]["event"] == "stream_end"
    assert messages[-1]["data"]["status"] == "cancelled"
    assert messages[-2]["event"] == "agent_completed"
    record_figures(
        "sigterm", {"shutdown_grace_s": 1, "sigterm_to_all_closed_s": round(shutdown_s, 3)}
    )


async def test_runs_started_together_cannot_pass_the_active_limit(user: str) -> None:
    with run_server(max_active_runs_per_user=2) as srv:
        async with ws_client(srv, user) as first:
            thread_id = (await first.run("chunks=1", agent="load"))[0]["thread_id"]

        async def start_one(i: int) -> str:
            # Each on its own connection, naming a thread (so each start waits for the
            # database): the five starts are in flight at once.
            async with ws_client(srv, user) as client:
                await client.send(
                    type="user_message",
                    agent="load",
                    content="tools=1 tool_ms=2000",
                    thread_id=thread_id,
                    id=f"m{i}",
                )
                reply = await client.recv()
                if reply["type"] == "error":
                    assert reply["data"]["code"] == "rate_limited", reply
                    return "refused"
                assert reply["type"] == "user_message"
                await client.recv_until("agent_completed")
                return "started"

        outcomes = await asyncio.gather(*(start_one(i) for i in range(5)))
    assert sorted(outcomes) == ["refused"] * 3 + ["started"] * 2

"""Faults of processes sharing a real redis-server: processes killed, stalled and cut off,
Redis restarted, and starts of one user racing on several processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.redis_server import RestartableRedis, redis_server_bin
from tests.support import (
    LiveServer,
    ServerProcess,
    check_run_invariants,
    free_port,
    of_run,
    spawn_server,
    wait_for,
    ws_client,
)
from tests.test_faults import record_figures


def shared_env(redis_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"CHAT_BROKER_URL": redis_url, "CHAT_DB_URL": f"sqlite:///{tmp_path}/chat.db", **extra}


def stored_run(tmp_path: Path, run_id: str) -> tuple[str, str | None, int] | None:
    """The run's row in the store: status, error code, last seq."""
    with contextlib.closing(sqlite3.connect(tmp_path / "chat.db")) as db:
        row = db.execute(
            "SELECT status, error_code, last_seq FROM runs WHERE id = ?", (run_id,)
        ).fetchone()
    return None if row is None else (row[0], row[1], int(row[2]))


async def status_of(server: LiveServer, user: str, run_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=server.http, headers=server.headers(user)) as rest:
        response = await rest.get(f"/api/chat/agents/{run_id}/status", timeout=10)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def replay(server: ServerProcess, user: str, run_id: str) -> list[dict[str, Any]]:
    async with ws_client(server, user) as client:
        await client.send(type="resume", run_id=run_id, after_seq=0)
        return of_run(await client.recv_until("agent_completed", run_id=run_id), run_id)


def redis_or_skip(tmp_path: Path) -> RestartableRedis:
    binary = redis_server_bin()
    if binary is None:
        pytest.skip("redis-server not installed")
    return RestartableRedis(binary, free_port(), str(tmp_path))


@pytest.mark.parametrize("stop", ["kill", "sigterm"])
async def test_watchers_through_a_killed_process_expire_with_its_lease(
    redis_url: str, tmp_path: Path, stop: str
) -> None:
    """Runs on A, watched only through B, paused; B killed -9 (or stopped cleanly): the
    runs end client_gone."""
    env = shared_env(
        redis_url,
        tmp_path,
        CHAT_RUN_LEASE_S="2",
        CHAT_DETACH_GRACE_S="2",
        CHAT_MAX_ACTIVE_RUNS_PER_USER="5",
    )
    user = "hana"
    with spawn_server(tmp_path, **env) as a, spawn_server(tmp_path, **env) as b:
        run_ids: list[str] = []
        async with ws_client(a, user) as on_a:
            for i in range(5):
                await on_a.send(
                    type="user_message", agent="load", content="chunks=3000 delay_ms=20", ref=i
                )
            while len(run_ids) < 5:
                message = await on_a.recv()
                if message["type"] == "user_message":
                    run_ids.append(message["run_id"])
            b_client = ws_client(b, user)
            on_b = await b_client.__aenter__()
            for run_id in run_ids:
                await on_b.send(type="resume", run_id=run_id, after_seq=0, id=run_id)
            acked = 0
            while acked < 5:
                acked += (await on_b.recv())["type"] == "ack"
        # A's socket is gone: B's watchers are the only ones.
        async with httpx.AsyncClient(base_url=a.http, headers=a.headers(user)) as rest:
            for run_id in run_ids:
                stopped = await rest.post(f"/api/chat/agents/{run_id}/stop")
                assert stopped.json()["status"] == "paused"
        await asyncio.sleep(3)  # longer than the detach grace: B's watchers hold the runs
        assert [(await status_of(a, user, r))["status"] for r in run_ids] == ["paused"] * 5
        assert b.proc is not None
        killed_at = time.monotonic()
        os.kill(b.proc.pid, signal.SIGKILL if stop == "kill" else signal.SIGTERM)
        b.proc.wait(timeout=30)
        on_b.ws.transport.abort()  # no closing handshake with a process that is gone
        with contextlib.suppress(Exception):
            await b_client.__aexit__(None, None, None)

        async def all_ended() -> bool:
            statuses = [(await status_of(a, user, r))["status"] for r in run_ids]
            return statuses == ["cancelled"] * 5

        await wait_for(all_ended, timeout=30, interval=0.2)
        ended_s = time.monotonic() - killed_at
        for run_id in run_ids:
            assert (await status_of(a, user, run_id))["error_code"] == "client_gone"
            events = await replay(a, user, run_id)
            check_run_invariants(events)
            end = events[-1]["data"]
            assert end["status"] == "cancelled" and end["error"]["code"] == "client_gone"
        async with ws_client(a, user) as again:  # the user's runs no longer count
            events = await again.run("chunks=2", agent="load")
        assert events[-1]["data"]["status"] == "completed"
    record_figures(
        f"watchers_lost_{stop}",
        {"lease_s": 2, "detach_grace_s": 2, "stopped_to_runs_cancelled_s": round(ended_s, 3)},
    )


async def test_redis_restart_mid_run_keeps_store_and_status_right(tmp_path: Path) -> None:
    redis = redis_or_skip(tmp_path)
    await redis.start()
    user = "ivan"
    try:
        with spawn_server(tmp_path, **shared_env(redis.url, tmp_path)) as srv:
            async with ws_client(srv, user) as ws:
                await ws.send(type="user_message", agent="load", content="chunks=150 delay_ms=20")
                seen = await ws.recv_until("response_chunk")
                await redis.kill()  # restarted empty: it keeps nothing on disk
                await asyncio.sleep(1.0)
                await redis.start()
                seen += await ws.recv_until("agent_completed", timeout=60)
            run_id = seen[0]["run_id"]
            run = of_run(seen, run_id)
            check_run_invariants(run)
            assert run[-1]["data"]["status"] == "completed"
            last_seq = run[-1]["seq"]
            status = await status_of(srv, user, run_id)
            assert (status["status"], status["last_seq"]) == ("completed", last_seq)

            async def stored() -> bool:
                return stored_run(tmp_path, run_id) == ("completed", None, last_seq)

            await wait_for(stored, timeout=10)

            # While Redis is down, a new socket is refused with a close code that says so.
            await redis.kill()
            protocols: list[Any] = ["chat.v1", f"bearer.{srv.token(user)}"]
            async with connect(srv.ws, subprotocols=protocols) as refused:
                with pytest.raises(ConnectionClosed) as info:
                    await asyncio.wait_for(refused.recv(), 15)
            assert info.value.rcvd is not None
            assert (info.value.rcvd.code, info.value.rcvd.reason) == (1013, "broker unavailable")
            assert "Traceback" not in srv.log()
    finally:
        await redis.kill()


async def test_racing_starts_on_two_processes_never_pass_the_limits(
    redis_url: str, tmp_path: Path
) -> None:
    """Many simultaneous starts of one user split across two processes: the active-runs
    limit, the per-minute window and the connection cap each hold exactly."""
    results: dict[str, Any] = {}
    for limit_name, extra in (
        ("active", {"CHAT_MAX_ACTIVE_RUNS_PER_USER": "3", "CHAT_RATE_LIMIT_PER_MINUTE": "1000"}),
        (
            "per_minute",
            {"CHAT_MAX_ACTIVE_RUNS_PER_USER": "1000", "CHAT_RATE_LIMIT_PER_MINUTE": "5"},
        ),
    ):
        env = shared_env(
            redis_url,
            tmp_path,
            CHAT_MAX_CONNECTIONS_PER_USER="100",
            CHAT_DETACH_GRACE_S="2",
            **extra,
        )
        user = f"kim-{limit_name}"
        with spawn_server(tmp_path, **env) as a, spawn_server(tmp_path, **env) as b:
            content = "chunks=400 delay_ms=20" if limit_name == "active" else "chunks=1"

            async def start(
                server: ServerProcess, client: httpx.AsyncClient, user: str, content: str
            ) -> int:
                async with client.stream(
                    "POST",
                    f"{server.http}/api/chat/stream",
                    json={"message": content, "agent": "load"},
                    headers=server.headers(user),
                ) as response:
                    return response.status_code

            async with httpx.AsyncClient(timeout=30) as client:
                codes = await asyncio.gather(
                    *(start(s, client, user, content) for _ in range(12) for s in (a, b))
                )
        accepted = codes.count(200)
        assert codes.count(429) == len(codes) - accepted, codes
        limit = 3 if limit_name == "active" else 5
        assert 1 <= accepted <= limit, codes
        results[f"{limit_name}_limit"] = limit
        results[f"{limit_name}_accepted_of_24"] = accepted

    env = shared_env(redis_url, tmp_path, CHAT_MAX_CONNECTIONS_PER_USER="3")
    with spawn_server(tmp_path, **env) as a, spawn_server(tmp_path, **env) as b:
        user = "kim-connections"

        async def open_one(server: ServerProcess) -> tuple[int | None, Any]:
            ws = await connect(server.ws, subprotocols=["chat.v1", f"bearer.{server.token(user)}"])  # type: ignore[list-item]
            try:
                await asyncio.wait_for(ws.recv(), 10)
                return None, ws  # connection_ready: open
            except ConnectionClosed as exc:
                return (exc.rcvd.code if exc.rcvd else None), None

        opened = await asyncio.gather(*(open_one(s) for _ in range(8) for s in (a, b)))
        try:
            refused = [code for code, ws in opened if ws is None]
            open_count = len(opened) - len(refused)
            assert set(refused) <= {4429}, refused
            assert 1 <= open_count <= 3, refused
        finally:
            for _, ws in opened:
                if ws is not None:
                    await ws.close()
    results["connection_cap"] = 3
    results["connections_open_of_16"] = open_count
    record_figures("racing_limits", results)


async def test_a_reaped_process_that_wakes_up_is_fenced(redis_url: str, tmp_path: Path) -> None:
    """A stalled past its lease (SIGSTOP): B ends its run node_lost; after SIGCONT A appends
    nothing more, its own client gets the same single ending, and the run stays failed."""
    env = shared_env(redis_url, tmp_path, CHAT_RUN_LEASE_S="2")
    user = "lena"
    with spawn_server(tmp_path, **env) as a, spawn_server(tmp_path, **env) as b:
        assert a.proc is not None
        async with ws_client(a, user) as on_a, ws_client(b, user) as on_b:
            await on_a.send(type="user_message", agent="load", content="chunks=500 delay_ms=20")
            seen_a = await on_a.recv_until("response_chunk")
            run_id = seen_a[0]["run_id"]
            await on_b.send(type="resume", run_id=run_id, after_seq=0)
            seen_b = await on_b.recv_until("response_chunk", run_id=run_id)
            stopped_at = time.monotonic()
            os.kill(a.proc.pid, signal.SIGSTOP)
            try:
                seen_b += await on_b.recv_until("agent_completed", timeout=30, run_id=run_id)
                ended_s = time.monotonic() - stopped_at
                await asyncio.sleep(1.0)  # A stays stopped past the ending
            finally:
                os.kill(a.proc.pid, signal.SIGCONT)
            seen_a += await on_a.recv_until("agent_completed", timeout=30, run_id=run_id)
            # Whatever A's agent still does, nothing of it reaches anyone.
            await asyncio.sleep(2.0)
            with pytest.raises(TimeoutError):
                extra = await on_b.recv(timeout=0.5)
                pytest.fail(f"an event after the ending: {extra}")
        from_b, from_a = of_run(seen_b, run_id), of_run(seen_a, run_id)
        for events in (from_a, from_b):
            check_run_invariants(events)
            end = events[-1]["data"]
            assert end["status"] == "failed" and end["error"]["code"] == "node_lost"
        assert from_a[-1] == from_b[-1]
        last_seq = from_b[-1]["seq"]
        for server in (a, b):
            status = await status_of(server, user, run_id)
            assert (status["status"], status["error_code"], status["last_seq"]) == (
                "failed",
                "node_lost",
                last_seq,
            )
            assert await replay(server, user, run_id) == from_b
        assert stored_run(tmp_path, run_id) == ("failed", "node_lost", last_seq)
        async with ws_client(a, user) as again:  # A joined again: it runs new runs
            events = await again.run("chunks=3", agent="load")
            check_run_invariants(events)
            assert events[-1]["data"]["status"] == "completed"
            # and B reaches them under A's new name, through the command bus
            await again.send(type="user_message", agent="load", content="chunks=500 delay_ms=20")
            new_run = (await again.recv())["run_id"]
            async with httpx.AsyncClient(base_url=b.http, headers=b.headers(user)) as rest:
                base = f"/api/chat/agents/{new_run}"
                assert (await rest.post(f"{base}/stop")).json()["status"] == "paused"
                assert (await rest.post(f"{base}/cancel")).json()["status"] == "cancelled"
            ended = of_run(await again.recv_until("agent_completed", run_id=new_run), new_run)
            assert ended[-1]["data"]["status"] == "cancelled"
        assert "reaped while alive" in a.log() or "its events are refused" in a.log()
    record_figures("fencing", {"lease_s": 2, "stopped_to_node_lost_s": round(ended_s, 3)})


async def test_node_lost_answer_is_the_chunks_clients_saw_though_trimmed(
    redis_url: str, tmp_path: Path
) -> None:
    env = shared_env(redis_url, tmp_path, CHAT_RUN_LEASE_S="2", CHAT_RUN_LOG_MAX_BYTES="8192")
    user = "mona"
    with spawn_server(tmp_path, **env) as a, spawn_server(tmp_path, **env) as b:
        assert a.proc is not None
        async with ws_client(a, user) as on_a:
            await on_a.send(
                type="user_message", agent="load", content="chunks=600 chunk_chars=80 delay_ms=10"
            )
            run_id = (await on_a.recv())["run_id"]
            async with ws_client(b, user) as on_b:
                await on_b.send(type="resume", run_id=run_id, after_seq=0)
                seen = await on_b.recv_until("ack")
                chunks = 0
                while chunks < 200:  # well past what the stream keeps
                    message = await on_b.recv()
                    seen.append(message)
                    chunks += message["type"] == "response_chunk"
                os.kill(a.proc.pid, signal.SIGKILL)
                seen += await on_b.recv_until("agent_completed", timeout=30, run_id=run_id)
        events = of_run(seen, run_id)
        check_run_invariants(events)  # from seq 1: the content is every chunk's text
        complete = events[-2]["data"]
        assert complete["fallback"] is True
        assert len(complete["content"]) > 200 * 80
        assert events[-1]["data"]["error"]["code"] == "node_lost"


async def test_a_run_cut_off_from_redis_past_the_outage_limit_is_ended(
    tmp_path: Path,
) -> None:
    redis = redis_or_skip(tmp_path)
    await redis.start()
    user = "nora"
    try:
        env = shared_env(redis.url, tmp_path, CHAT_REDIS_OUTAGE_S="2")
        with spawn_server(tmp_path, **env) as srv:
            async with ws_client(srv, user) as ws:
                await ws.send(type="user_message", agent="load", content="chunks=600 delay_ms=20")
                seen = await ws.recv_until("response_chunk")
                run_id = seen[0]["run_id"]
                await redis.kill()
                killed_at = time.monotonic()
                seen += await ws.recv_until("agent_completed", timeout=30, run_id=run_id)
                ended_s = time.monotonic() - killed_at
            run = of_run(seen, run_id)
            check_run_invariants(run)
            end = run[-1]["data"]
            assert end["status"] == "failed" and end["error"]["code"] == "broker_unavailable"
            last_seq = run[-1]["seq"]

            async def stored() -> bool:
                return stored_run(tmp_path, run_id) == ("failed", "broker_unavailable", last_seq)

            await wait_for(stored, timeout=10)  # recorded while Redis is still down
            await redis.start()  # back, empty: the run's ending is written there too

            async def recorded() -> bool:
                try:
                    status = await status_of(srv, user, run_id)
                except AssertionError:
                    return False
                return (status["status"], status["error_code"], status["last_seq"]) == (
                    "failed",
                    "broker_unavailable",
                    last_seq,
                )

            await wait_for(recorded, timeout=20, interval=0.2)
            async with ws_client(srv, user) as again:
                events = await again.run("chunks=2", agent="load")
            assert events[-1]["data"]["status"] == "completed"
    finally:
        await redis.kill()
    record_figures(
        "redis_outage_limit", {"outage_s": 2, "killed_to_run_ended_s": round(ended_s, 3)}
    )


async def test_stale_pooled_connections_after_a_redis_restart_are_retried_once(
    tmp_path: Path,
) -> None:
    """A Redis restarted between requests leaves the pool's connections dead: the first
    requests after it are served (each dead connection tried again once, on a new
    one), not refused as if Redis were down; while Redis is really down a stream
    request is answered 503, and nothing is logged as a traceback."""
    redis = redis_or_skip(tmp_path)
    await redis.start()
    user = "wen"
    body = {"message": "chunks=3 delay_ms=1", "agent": "load"}
    try:
        with spawn_server(tmp_path, **shared_env(redis.url, tmp_path)) as srv:
            async with httpx.AsyncClient(base_url=srv.http, timeout=30) as client:

                async def stream() -> httpx.Response:
                    return await client.post(
                        "/api/chat/stream", json=body, headers=srv.headers(user)
                    )

                # Several requests at once: the pool holds several connections.
                warm = await asyncio.gather(*(stream() for _ in range(4)))
                assert [r.status_code for r in warm] == [200] * 4
                await redis.kill()
                await redis.start()
                after = await asyncio.gather(*(stream() for _ in range(4)))
                statuses = [r.status_code for r in after]
                assert statuses == [200] * 4, [r.text[:200] for r in after]
                assert all("agent_completed" in r.text for r in after)
                async with ws_client(srv, user) as ws:
                    await ws.send(type="user_message", agent="load", content="chunks=2")
                    seen = await ws.recv_until("agent_completed")
                assert seen[-1]["data"]["status"] == "completed"

                await redis.kill()
                down = await stream()
                assert down.status_code == 503, down.text
            log_text = srv.log()
            assert "Traceback" not in log_text, log_text[-3000:]
    finally:
        await redis.kill()

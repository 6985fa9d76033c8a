"""Several gateway processes sharing a real redis-server: any process serves any run."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import (
    ROOT,
    SECRET,
    check_run_invariants,
    free_port,
    health,
    of_run,
    spawn_server,
    ws_client,
)
from tests.test_faults import record_figures


def completed_run(got: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events of the run that ``got`` ends with, its invariants checked and the
    run completed."""
    run = of_run(got, got[-1]["run_id"])
    check_run_invariants(run)
    assert run[-1]["data"]["status"] == "completed"
    return run


async def test_a_run_started_on_one_process_is_served_by_another(
    redis_url: str, tmp_path: Path
) -> None:
    env = {"CHAT_BROKER_URL": redis_url, "CHAT_DB_URL": f"sqlite:///{tmp_path}/chat.db"}
    with spawn_server(tmp_path, **env) as a, spawn_server(tmp_path, **env) as b:
        async with ws_client(a, "alice") as on_a, ws_client(b, "alice") as on_b:
            await on_a.send(type="user_message", agent="load", content="chunks=300 delay_ms=10")
            first = await on_a.recv()
            run_id = first["run_id"]
            # Watched and resumed on the other process.
            await on_b.send(type="resume", run_id=run_id, after_seq=0, id="rb")
            ack = await on_b.recv()
            assert ack["type"] == "ack" and ack["data"]["status"] in ("queued", "running")
            seen_b = await on_b.recv_until("response_chunk")

            async with httpx.AsyncClient(base_url=b.http, headers=b.headers("alice")) as rest:
                base = f"/api/chat/agents/{run_id}"
                stopped = await rest.post(f"{base}/stop")
                assert stopped.status_code == 200 and stopped.json()["status"] == "paused"
                seen_a = await on_a.recv_until("run_status")
                async with httpx.AsyncClient(base_url=a.http, headers=a.headers("alice")) as at_a:
                    status_a = await at_a.get(f"{base}/status")
                assert status_a.json()["status"] == "paused"
                assert (await rest.get(f"{base}/status")).json()["status"] == "paused"
                assert (await rest.post(f"{base}/start")).json()["status"] == "running"
                await asyncio.sleep(0.2)
                assert (await rest.post(f"{base}/cancel")).json()["status"] == "cancelled"
                other = await rest.post(f"{base}/cancel", headers=b.headers("mallory"))
                assert other.status_code == 404
            from_a = of_run(seen_a + await on_a.recv_until("agent_completed"), run_id)
            from_b = of_run(seen_b + await on_b.recv_until("agent_completed"), run_id)
        whole = [first, *from_a]
        check_run_invariants(whole)
        assert whole[-1]["data"]["status"] == "cancelled"
        # Both processes delivered the same events, gap-free, in the same order.
        assert from_b == whole
        statuses = [m["data"]["status"] for m in whole if m["type"] == "run_status"]
        assert statuses == ["paused", "running"]

        async with ws_client(b, "alice") as again:  # a finished run replays from either
            await again.send(type="resume", run_id=run_id, after_seq=0)
            replay = of_run(await again.recv_until("agent_completed"), run_id)
        assert replay == whole


async def test_per_user_limits_are_shared(redis_url: str, tmp_path: Path) -> None:
    env = {
        "CHAT_BROKER_URL": redis_url,
        "CHAT_DB_URL": f"sqlite:///{tmp_path}/chat.db",
        "CHAT_MAX_CONNECTIONS_PER_USER": "2",
        "CHAT_RATE_LIMIT_PER_MINUTE": "2",
    }
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    with spawn_server(tmp_path, **env) as a, spawn_server(tmp_path, **env) as b:
        async with ws_client(a, "carol") as one, ws_client(b, "carol"):
            protocols: list[Any] = ["chat.v1", f"bearer.{a.token('carol')}"]
            async with connect(a.ws, subprotocols=protocols) as third:
                with pytest.raises(ConnectionClosed) as info:
                    await asyncio.wait_for(third.recv(), 10)
            assert info.value.rcvd is not None and info.value.rcvd.code == 4429
            await one.run("chunks=1", agent="load")
        async with ws_client(b, "carol") as two:
            await two.run("chunks=1", agent="load")
            await two.send(type="user_message", agent="load", content="chunks=1")
            assert (await two.recv())["data"]["code"] == "rate_limited"


async def test_killed_process_runs_end_node_lost_on_the_other(
    redis_url: str, tmp_path: Path
) -> None:
    env = {
        "CHAT_BROKER_URL": redis_url,
        "CHAT_DB_URL": f"sqlite:///{tmp_path}/chat.db",
        "CHAT_RUN_LEASE_S": "2",
    }
    with spawn_server(tmp_path, **env) as a, spawn_server(tmp_path, **env) as b:
        async with ws_client(a, "dave") as on_a:
            await on_a.send(
                type="user_message", agent="load", content="tools=1 tool_ms=60000 chunks=3"
            )
            run_id = (await on_a.recv())["run_id"]
            await on_a.recv_until("tool_executing")
            async with ws_client(b, "dave") as on_b:
                await on_b.send(type="resume", run_id=run_id, after_seq=0)
                seen = await on_b.recv_until("tool_executing")
                assert a.proc is not None
                killed_at = time.monotonic()
                os.kill(a.proc.pid, signal.SIGKILL)
                rest = await on_b.recv_until("agent_completed", timeout=30)
                noticed_s = time.monotonic() - killed_at
        events = of_run(seen + rest, run_id)
        check_run_invariants(events)
        end = events[-1]["data"]
        assert end["status"] == "failed" and end["error"]["code"] == "node_lost"
        assert events[-2]["data"]["fallback"] is True
        tool = next(e for e in events if e["type"] == "tool_completed")
        assert tool["data"]["ok"] is False
        async with httpx.AsyncClient(base_url=b.http, headers=b.headers("dave")) as rest_b:
            status = (await rest_b.get(f"/api/chat/agents/{run_id}/status")).json()
        assert status["status"] == "failed" and status["error_code"] == "node_lost"
        body = await health(b)
        assert body["broker"] == "redis" and body["broker_reachable"] is True
    record_figures("node_lost", {"lease_s": 2, "killed_to_agent_completed_s": round(noticed_s, 3)})
    assert noticed_s < 30  # the bound of the wait above, not a performance target


async def test_redis_outage_is_reported_and_survived(tmp_path: Path) -> None:
    from tests.redis_server import redis_argv, redis_server_bin

    binary = redis_server_bin()
    if binary is None:
        pytest.skip("redis-server not installed")
    port = free_port()
    argv = redis_argv(binary, port, str(tmp_path))

    async def start_redis() -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        for _ in range(200):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                return proc
            except OSError:
                await asyncio.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    redis_proc = await start_redis()
    url = f"redis://127.0.0.1:{port}/0"
    try:
        with spawn_server(tmp_path, CHAT_BROKER_URL=url) as srv:
            assert (await health(srv))["broker_reachable"] is True
            redis_proc.kill()  # Redis goes away
            await redis_proc.wait()
            async with httpx.AsyncClient(base_url=srv.http, timeout=15) as client:
                during = await client.get("/health")
                assert during.status_code == 503
                assert during.json()["status"] == "degraded"
                started = await client.post(
                    "/api/chat/stream",
                    json={"message": "chunks=1", "agent": "load"},
                    headers=srv.headers("erin"),
                )
                assert started.status_code == 503
                assert "unreachable" in started.json()["error"]["message"]
                redis_proc = await start_redis()  # and comes back
                after = await client.get("/health")
                assert after.status_code == 200 and after.json()["broker_reachable"] is True
            async with ws_client(srv, "erin") as ws:  # reconnected by itself: runs work again
                events = await ws.run("chunks=2", agent="load")
                assert events[-1]["data"]["status"] == "completed"

                # A run streaming through an outage: its events wait, then go on.
                await ws.send(type="user_message", agent="load", content="chunks=150 delay_ms=20")
                seen = await ws.recv_until("response_chunk")
                redis_proc.kill()
                await redis_proc.wait()
                await asyncio.sleep(1.0)
                redis_proc = await start_redis()
                seen += await ws.recv_until("agent_completed", timeout=60)
            run = [m for m in seen if m.get("run_id") == seen[0]["run_id"]]
            check_run_invariants(run)
            assert run[-1]["data"]["status"] == "completed"
            assert sum(1 for m in run if m["type"] == "response_chunk") == 150
    finally:
        if redis_proc.returncode is None:
            redis_proc.kill()
            await redis_proc.wait()


def test_workers_refused_without_a_shared_broker() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    done = subprocess.run(
        [sys.executable, "-m", "server", "--workers", "2"],
        env={**env, "PYTHONPATH": str(ROOT), "CHAT_JWT_SECRET": SECRET},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--workers > 1 needs a shared broker" in done.stderr


async def test_two_workers_share_one_port(redis_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    env.update(
        PYTHONPATH=str(ROOT),
        CHAT_JWT_SECRET=SECRET,
        CHAT_BROKER_URL=redis_url,
        CHAT_DB_URL=f"sqlite:///{tmp_path}/chat.db",
        CHAT_LOG_LEVEL="warning",
    )
    log = (tmp_path / "workers.log").open("wb")
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once, then awaited over the network
        [sys.executable, "-m", "server", "--workers", "2", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        pids: set[int] = set()
        deadline = time.monotonic() + 60
        async with httpx.AsyncClient(timeout=5) as client:
            while len(pids) < 2 and time.monotonic() < deadline:
                try:
                    resp = await client.get(
                        f"http://127.0.0.1:{port}/health", headers={"Connection": "close"}
                    )
                    pids.add(resp.json()["pid"])
                except httpx.HTTPError:
                    await asyncio.sleep(0.1)
        assert len(pids) == 2, (tmp_path / "workers.log").read_text()[-3000:]
        from server.settings import Settings
        from tests.support import LiveServer

        live = LiveServer(Settings(jwt_secret=SECRET), port)
        async with ws_client(live, "frank") as one:
            await one.send(type="user_message", agent="load", content="chunks=50 delay_ms=5")
            run_id = (await one.recv())["run_id"]
            for _ in range(4):  # whichever worker each connection lands on
                async with ws_client(live, "frank") as other:
                    await other.send(type="resume", run_id=run_id, after_seq=0)
                    got = of_run(await other.recv_until("agent_completed"), run_id)
                    check_run_invariants(got)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


async def test_deleting_a_thread_cancels_its_runs_on_other_processes(
    redis_url: str, tmp_path: Path
) -> None:
    env = {"CHAT_BROKER_URL": redis_url, "CHAT_DB_URL": f"sqlite:///{tmp_path}/chat.db"}
    with spawn_server(tmp_path, **env) as a, spawn_server(tmp_path, **env) as b:
        async with ws_client(a, "gina") as on_a:
            await on_a.send(type="user_message", agent="load", content="chunks=500 delay_ms=20")
            first = await on_a.recv()
            await on_a.recv_until("response_chunk")
            async with httpx.AsyncClient(base_url=b.http, headers=b.headers("gina")) as rest:
                deleted = await rest.delete(f"/api/threads/{first['thread_id']}")
            assert deleted.status_code == 200
            end = await on_a.recv_until("agent_completed")
        assert end[-1]["data"]["status"] == "cancelled"


async def test_appends_of_many_runs_share_script_calls_and_write_only_what_changed(
    tmp_path: Path,
) -> None:
    """20 runs streaming at once through one process: their appends reach Redis in
    shared fenced script calls (far fewer calls than events), every event is appended
    once, and the record's fields set at the run's start are not written again."""
    import redis.asyncio as aioredis

    from tests.redis_server import redis_server, redis_server_bin

    if redis_server_bin() is None:
        pytest.skip("redis-server not installed (Debian package redis-server)")
    runs, chunks = 20, 100
    with redis_server() as url:  # its own: the command counts are this test's alone
        env = {
            "CHAT_BROKER_URL": url,
            "CHAT_DB_URL": f"sqlite:///{tmp_path}/chat.db",
            "CHAT_REDIS_APPEND_WINDOW_MS": "5",
            "CHAT_MAX_CONNECTIONS_PER_USER": "100",
            "CHAT_MAX_ACTIVE_RUNS_PER_USER": "100",
        }
        r = aioredis.Redis.from_url(url)
        try:
            with spawn_server(tmp_path, **env) as srv:
                async with contextlib.AsyncExitStack() as stack:
                    clients = [
                        await stack.enter_async_context(ws_client(srv, "hana")) for _ in range(runs)
                    ]
                    await r.config_resetstat()
                    started = time.monotonic()
                    results = await asyncio.gather(
                        *(c.run(f"chunks={chunks} delay_ms=10", agent="load") for c in clients)
                    )
                    wall_s = time.monotonic() - started
                stats = await r.info("commandstats")
            # What an ending written elsewhere would take for the answer so far.
            answers = {
                got[-1]["run_id"]: await r.get(f"chat:answer:{got[-1]['run_id']}")
                for got in results
            }
        finally:
            await r.aclose()
    events = 0
    for got in results:
        run = completed_run(got)
        events += len(run)
        content = next(e for e in run if e["type"] == "response_complete")["data"]["content"]
        assert answers[got[-1]["run_id"]] == content.encode()

    def calls(command: str) -> int:
        return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))

    figures = {
        "runs": runs,
        "events": events,
        "wall_s": round(wall_s, 2),
        "xadd": calls("xadd"),
        "evalsha": calls("evalsha"),
        "hsetnx": calls("hsetnx"),
        "hset": calls("hset"),
        "events_per_script_call": round(events / max(calls("evalsha"), 1), 1),
    }
    record_figures("redis_batched_appends", figures)
    # Every event appended once (the user_message of each run too), none twice.
    assert figures["xadd"] == events
    # One fenced script call per flush of each run would be about one per event; the
    # lease, the limits and the watcher counts add a few calls of their own.
    assert figures["evalsha"] * 4 < events
    # The record's fields are written at the run's start, not again with each append.
    assert figures["hsetnx"] == 0


#: Counts the asyncio tasks a process creates, by coroutine, written to
#: TASK_COUNTS_FILE every 50 ms: loaded by ``python -m server`` as its
#: ``sitecustomize`` (uvicorn ends the process by its signal: no ``atexit``).
TASK_COUNTER = """
import asyncio.base_events, collections, json, os, threading, time

_counts = collections.Counter()
_create_task = asyncio.base_events.BaseEventLoop.create_task


def create_task(self, coro, **kwargs):
    code = getattr(coro, "cr_code", None)
    _counts[code.co_qualname if code is not None else type(coro).__qualname__] += 1
    return _create_task(self, coro, **kwargs)


def _write():
    path = os.environ["TASK_COUNTS_FILE"]
    while True:
        time.sleep(0.05)
        with open(path + ".new", "w") as out:
            json.dump(dict(_counts), out)
        os.replace(path + ".new", path)


asyncio.base_events.BaseEventLoop.create_task = create_task
threading.Thread(target=_write, daemon=True).start()
"""


async def test_paced_runs_append_through_one_writer_without_a_task_per_event(
    tmp_path: Path,
) -> None:
    """100 runs at a model's pace through one process on Redis: their appends go
    through the broker's one writer, which takes every run's pending events each
    turn, so the process creates far fewer Redis tasks than it appends events (a
    flusher task per run per append made about one per event), and every event
    reaches its client once and in order."""
    import orjson

    from tests.redis_server import redis_server, redis_server_bin

    if redis_server_bin() is None:
        pytest.skip("redis-server not installed (Debian package redis-server)")
    runs, chunks = 100, 60
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(TASK_COUNTER)
    counts_file = tmp_path / "tasks.json"
    with redis_server() as url:
        env = {
            "CHAT_BROKER_URL": url,
            "CHAT_DB_URL": f"sqlite:///{tmp_path}/chat.db",
            "CHAT_MAX_CONNECTIONS_PER_USER": str(2 * runs),
            "CHAT_MAX_ACTIVE_RUNS_PER_USER": str(2 * runs),
            "CHAT_RATE_LIMIT_PER_MINUTE": "100000",
            "PYTHONPATH": str(hooks),
            "TASK_COUNTS_FILE": str(counts_file),
        }
        with spawn_server(tmp_path, **env) as srv:
            async with contextlib.AsyncExitStack() as stack:
                clients = [
                    await stack.enter_async_context(ws_client(srv, "hana")) for _ in range(runs)
                ]
                started = time.monotonic()
                results = await asyncio.gather(
                    *(c.run(f"chunks={chunks} delay_ms=10", agent="load") for c in clients)
                )
                wall_s = time.monotonic() - started
            await asyncio.sleep(0.5)  # the counts written since the last run ended
            tasks: dict[str, int] = orjson.loads(counts_file.read_bytes())
    events = 0
    for got in results:
        run = completed_run(got)
        events += len(run)
    redis_tasks = {name: n for name, n in tasks.items() if name.startswith("Redis")}
    figures = {
        "runs": runs,
        "events": events,
        "wall_s": round(wall_s, 2),
        "redis_tasks": sum(redis_tasks.values()),
        "redis_tasks_per_event": round(sum(redis_tasks.values()) / events, 3),
        "by_coroutine": dict(sorted(redis_tasks.items(), key=lambda kv: -kv[1])[:6]),
    }
    record_figures("redis_one_writer_tasks", figures)
    # A writer turn every millisecond at most (the coalescing window) against about ten
    # events a millisecond: one task per event would be one per run's append.
    assert figures["redis_tasks_per_event"] < 0.5


async def test_a_lone_run_is_not_held_back_by_the_append_window(
    redis_url: str, tmp_path: Path
) -> None:
    """The coalescing window gathers the appends of a busy process; a run alone finds
    the writer idle and its writes go at once. With a window of 1.5 s, each of the
    fenced writes before a run's first event (its record, its start) waited for it."""
    env = {
        "CHAT_BROKER_URL": redis_url,
        "CHAT_DB_URL": f"sqlite:///{tmp_path}/chat.db",
        "CHAT_REDIS_APPEND_WINDOW_MS": "1500",
    }
    with spawn_server(tmp_path, **env) as srv:
        async with ws_client(srv, "lone") as c:
            waits = []
            for _ in range(3):
                sent = time.monotonic()
                await c.send(type="user_message", content="chunks=3", agent="load")
                got = await c.recv_until("agent_started")
                waits.append(time.monotonic() - sent)
                got += await c.recv_until("agent_completed")
                completed_run(got)
    # Not a speed figure: a window applied to any of those writes makes this 1.5 s or more.
    assert min(waits) < 1.5, waits


async def test_a_run_whose_write_cannot_be_made_fails_alone(redis_url: str) -> None:
    """One writer serves every run: a run whose write cannot be made (or whose answer
    cannot be handled) is failed, and the other runs' events still land; no drain waits
    for good."""
    async with asyncio.timeout(60):  # a drain that waits for good fails the test
        await _a_run_whose_write_cannot_be_made(redis_url)


async def _a_run_whose_write_cannot_be_made(redis_url: str) -> None:
    from bridge.broker import RunRecord
    from bridge.errors import BrokerUnavailable
    from bridge.events import make_event
    from bridge.redis import RedisBroker
    from scripts.redis_appends import Controller

    broker = RedisBroker(
        redis_url, run_log_max_bytes=1 << 20, resume_window_s=60, append_window_s=0.001
    )
    await broker.start()
    try:
        now = time.time()
        ids = ["r_bad_make", "r_good", "r_bad_answer"]
        for run_id in ids:
            record = RunRecord(run_id, f"t_{run_id}", "u", "load", "running", now, now)
            await broker.create_run(record, Controller())
        appender = broker.appender
        make, done = appender._append_commands, appender._done

        def failing_make(owned: Any, batch: Any, *, recreate: bool) -> Any:
            if owned.record.run_id == "r_bad_make":
                raise KeyError("data the write cannot be made of")
            return make(owned, batch, recreate=recreate)

        def failing_done(owned: Any, applied: Any, *, appended: bool) -> None:
            if owned.record.run_id == "r_bad_answer":
                raise RuntimeError("handling the answer failed")
            done(owned, applied, appended=appended)

        appender._append_commands = failing_make  # type: ignore[method-assign]
        appender._done = failing_done  # type: ignore[method-assign]
        for seq in range(1, 4):
            for run_id in ids:
                event = make_event(
                    "response_chunk",
                    {"text": "x", "index": seq - 1},
                    run_id=run_id,
                    thread_id=f"t_{run_id}",
                    seq=seq,
                )
                with contextlib.suppress(BrokerUnavailable):
                    await broker.publish(event)
        for run_id in ids:
            owned = broker.core.owned[run_id]
            if run_id == "r_good":
                await asyncio.wait_for(appender.drain(owned), 10)
            else:
                with pytest.raises(BrokerUnavailable):
                    await asyncio.wait_for(appender.drain(owned), 10)
        good = await broker.core.r.hget(broker.core.k("run", "r_good"), "last_seq")
        assert int(good) == 3
    finally:
        await broker.close()

"""Conversation semantics (contract section 6) over a real gateway: idempotent sends
and watching a thread, on the in-memory broker and on Redis with two processes."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

import httpx

from tests.support import (
    LiveServer,
    check_run_invariants,
    http_client,
    of_run,
    parse_sse,
    spawn_server,
    wait_for,
    ws_client,
)
from tests.test_faults import record_figures


async def stored_messages(server: LiveServer, user: str, thread_id: str) -> list[dict[str, Any]]:
    """The thread's stored messages, once every run of it is recorded as ended."""
    async with http_client(server, headers=server.headers(user)) as rest:
        answer = await rest.get(f"/api/threads/{thread_id}/messages")
        assert answer.status_code == 200, answer.text
        messages: list[dict[str, Any]] = answer.json()["messages"]
    return messages


async def post_stream(
    rest: httpx.AsyncClient, body: dict[str, Any], **headers: str
) -> tuple[int, list[dict[str, Any]], httpx.Headers]:
    answer = await rest.post("/api/chat/stream", json=body, headers=headers)
    return answer.status_code, parse_sse(answer.text), answer.headers


def run_events_of(sse_messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m["data"] for m in sse_messages if "id" in m]


# 6.1 Idempotent sends --------------------------------------------------------------


async def test_a_repeated_id_on_the_socket_starts_no_second_run(
    server: LiveServer, user: str
) -> None:
    async with ws_client(server, user) as client:
        first = await client.run("chunks=5", agent="load", id="m-1")
        check_run_invariants(first)
        run_id = first[0]["run_id"]
        thread_id = first[0]["thread_id"]
        assert first[0]["data"]["ref"] == "m-1"

        await client.send(type="user_message", agent="load", content="chunks=5", id="m-1")
        ack = await client.recv()
        assert ack["type"] == "ack", ack
        assert ack["data"]["action"] == "user_message"
        assert ack["data"]["ref"] == "m-1"
        assert ack["data"]["run_id"] == run_id
        assert ack["data"]["status"] == "completed"
        assert ack["data"]["duplicate"] is True

        # The same id with other content is a conflict, and starts nothing either.
        await client.send(type="user_message", agent="load", content="chunks=6", id="m-1")
        refused = await client.recv()
        assert refused["type"] == "error" and refused["data"]["code"] == "conflict", refused
        assert refused["data"]["ref"] == "m-1"

        # An integer id is a key of its own, not the string "7".
        seven = await client.run("chunks=2", agent="load", id=7, thread_id=thread_id)
        check_run_invariants(seven)
        other = await client.run("chunks=2", agent="load", id="7", thread_id=thread_id)
        check_run_invariants(other)
        assert other[0]["run_id"] != seven[0]["run_id"]
        await client.send(type="ping", id="p")
        assert (await client.recv())["type"] == "pong"  # nothing else was sent meanwhile

    async def recorded() -> bool:
        messages = await stored_messages(server, user, thread_id)
        return len(messages) == 6

    await wait_for(recorded)
    messages = await stored_messages(server, user, thread_id)
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3
    assert messages[0]["run_id"] == run_id


async def test_a_repeated_idempotency_key_streams_the_first_run(
    server: LiveServer, user: str
) -> None:
    async with http_client(server, headers=server.headers(user)) as rest:
        body = {"message": "chunks=30 delay_ms=5", "agent": "load"}
        (s1, m1, h1), (s2, m2, h2) = await asyncio.gather(
            post_stream(rest, body, **{"Idempotency-Key": "k-1"}),
            post_stream(rest, body, **{"Idempotency-Key": "k-1"}),
        )
        assert s1 == s2 == 200
        runs = {h1["x-chat-run-id"], h2["x-chat-run-id"]}
        assert len(runs) == 1, runs
        assert {h1.get("x-chat-duplicate"), h2.get("x-chat-duplicate")} == {None, "true"}
        one, two = run_events_of(m1), run_events_of(m2)
        check_run_invariants(one)
        assert one == two  # both from the first event, the same events
        assert m1[0]["event"] == m2[0]["event"] == "stream_start"
        assert m1[-1]["event"] == m2[-1]["event"] == "stream_end"

        # The body's id is the same key as the header, and a repeat over the socket too.
        status, again, headers = await post_stream(rest, {**body, "id": "k-1"})
        assert status == 200 and headers["x-chat-duplicate"] == "true"
        assert run_events_of(again) == one
        async with ws_client(server, user) as client:
            await client.send(type="user_message", content=body["message"], agent="load", id="k-1")
            ack = await client.recv()
        assert ack["data"]["duplicate"] is True and ack["data"]["run_id"] == one[0]["run_id"]

        # Other content under the key: 409, no run.
        refused = await rest.post(
            "/api/chat/stream",
            json={"message": "chunks=1", "agent": "load"},
            headers={"Idempotency-Key": "k-1"},
        )
        assert refused.status_code == 409
        assert refused.json()["error"]["code"] == "conflict"
        empty = await rest.post(
            "/api/chat/stream", json=body, headers={"Idempotency-Key": "k" * 129}
        )
        assert empty.status_code == 400

    thread_id = one[0]["thread_id"]
    messages = await stored_messages(server, user, thread_id)
    assert [m["role"] for m in messages] == ["user", "assistant"]


async def test_a_key_is_the_users_own(server: LiveServer, user: str) -> None:
    """Another user's key of the same name is another key: it starts its own run."""
    async with ws_client(server, user) as mine, ws_client(server, f"{user}-b") as theirs:
        a = await mine.run("chunks=2", agent="load", id="same")
        b = await theirs.run("chunks=2", agent="load", id="same")
    check_run_invariants(a)
    check_run_invariants(b)
    assert a[0]["run_id"] != b[0]["run_id"]


async def test_a_send_refused_by_a_limit_gives_its_key_up(server: LiveServer, user: str) -> None:
    async with ws_client(server, user) as client:
        await client.send(type="user_message", agent="nope", content="hi", id="m-x")
        refused = await client.recv()
        assert refused["type"] == "error" and refused["data"]["code"] == "bad_message"
        # The key was given up: the same id starts a run now.
        events = await client.run("chunks=2", agent="load", id="m-x")
    check_run_invariants(events)
    assert events[0]["data"]["ref"] == "m-x"


async def test_fifty_concurrent_sends_of_one_id_through_two_processes_make_one_run(
    redis_url: str, tmp_path: Path
) -> None:
    env = {
        "CHAT_BROKER_URL": redis_url,
        "CHAT_DB_URL": f"sqlite:///{tmp_path}/chat.db",
        "CHAT_MAX_CONNECTIONS_PER_USER": "200",
        "CHAT_RATE_LIMIT_PER_MINUTE": "200",
    }
    user = f"idem-{time.monotonic_ns()}"
    content = "chunks=40 delay_ms=5"
    with spawn_server(tmp_path, **env) as a, spawn_server(tmp_path, **env) as b:

        async def over_ws(server: LiveServer) -> tuple[str, bool, list[dict[str, Any]]]:
            async with ws_client(server, user) as client:
                await client.send(type="user_message", agent="load", content=content, id="once")
                first = await client.recv(timeout=30)
                if first["type"] == "ack":
                    return first["data"]["run_id"], True, []
                assert first["type"] == "user_message", first
                rest = await client.recv_until("agent_completed", timeout=60)
                return first["run_id"], False, [first, *rest]

        async def over_http(server: LiveServer) -> tuple[str, bool, list[dict[str, Any]]]:
            async with httpx.AsyncClient(
                base_url=server.http, headers=server.headers(user), timeout=60
            ) as rest:
                status, messages, headers = await post_stream(
                    rest, {"message": content, "agent": "load"}, **{"Idempotency-Key": "once"}
                )
            assert status == 200, messages
            return (
                headers["x-chat-run-id"],
                headers.get("x-chat-duplicate") == "true",
                (run_events_of(messages)),
            )

        began = time.perf_counter()
        sends = [over_ws(s) for s in (a, b) * 13] + [over_http(s) for s in (a, b) * 12]
        results = await asyncio.gather(*sends)
        elapsed = time.perf_counter() - began
        assert len(results) == 50
        run_ids = {run_id for run_id, _, _ in results}
        assert len(run_ids) == 1, run_ids
        firsts = [r for r in results if not r[1]]
        assert len(firsts) == 1, [r[:2] for r in results]
        whole = firsts[0][2]
        check_run_invariants(whole)
        for _, _, events in results:
            if events:  # every HTTP repeat streams the very same run
                assert events == whole
        async with httpx.AsyncClient(base_url=a.http, headers=a.headers(user)) as rest:
            threads = (await rest.get("/api/threads")).json()["threads"]
        assert len(threads) == 1
        thread_id = whole[0]["thread_id"]
        assert threads[0]["thread_id"] == thread_id
        messages = await stored_messages(a, user, thread_id)
        assert [m["role"] for m in messages] == ["user", "assistant"]
    record_figures(
        "idempotent_sends",
        {
            "sends": 50,
            "processes": 2,
            "runs_started": len(run_ids),
            "seconds_for_all_sends_to_finish": round(elapsed, 3),
        },
    )


# 6.3 Watching a thread -------------------------------------------------------------


async def read_runs(
    client: Any, count: int, timeout: float = 30
) -> dict[str, list[dict[str, Any]]]:
    """Run events a client receives until ``count`` runs have ended, by run."""
    runs: dict[str, list[dict[str, Any]]] = {}
    ended = 0
    async with asyncio.timeout(timeout):
        while ended < count:
            message = await client.recv(timeout)
            if message.get("run_id") is None or message.get("seq") is None:
                continue
            runs.setdefault(message["run_id"], []).append(message)
            if message["type"] == "agent_completed":
                ended += 1
    return runs


async def two_sessions_watching_one_thread(
    first: LiveServer, second: LiveServer, user: str
) -> None:
    async with ws_client(first, user) as one, ws_client(second, user) as two:
        opening = await one.run("chunks=3", agent="load")
        check_run_invariants(opening)
        thread_id = opening[0]["thread_id"]
        for client in (one, two):
            await client.send(type="watch_thread", thread_id=thread_id, id="w")
            ack = await client.recv()
            assert ack["type"] == "ack", ack
            assert ack["data"]["action"] == "watch_thread"
            assert ack["data"]["thread_id"] == thread_id
            assert ack["data"]["active_run_ids"] == []

        # Each session starts runs; each sees every run of the other, from its first event.
        await one.send(
            type="user_message", agent="load", content="chunks=20 delay_ms=5", thread_id=thread_id
        )
        first_runs = await asyncio.gather(read_runs(one, 1), read_runs(two, 1))
        await two.send(
            type="user_message", agent="load", content="chunks=10 delay_ms=5", thread_id=thread_id
        )
        second_runs = await asyncio.gather(read_runs(one, 1), read_runs(two, 1))
        for seen_by_one, seen_by_two in (first_runs, second_runs):
            assert seen_by_one.keys() == seen_by_two.keys() and len(seen_by_one) == 1
            (run_id,) = seen_by_one
            check_run_invariants(seen_by_one[run_id])
            assert seen_by_one[run_id][0]["seq"] == 1
            assert seen_by_one[run_id][0]["type"] == "user_message"
            assert seen_by_one[run_id] == seen_by_two[run_id]

        # A thread's run already going when a session watches: from its first event.
        await one.send(
            type="user_message", agent="load", content="chunks=60 delay_ms=10", thread_id=thread_id
        )
        started = await one.recv()
        assert started["type"] == "user_message"
        async with ws_client(second, user) as late:
            await late.send(type="watch_thread", thread_id=thread_id, id="late")
            ack = await late.recv()
            assert ack["data"]["active_run_ids"] == [started["run_id"]]
            late_runs = await read_runs(late, 1)
        own = [started, *of_run(await one.recv_until("agent_completed"), started["run_id"])]
        check_run_invariants(own)
        assert late_runs[started["run_id"]] == own
        assert (await read_runs(two, 1))[started["run_id"]] == own

        # Unwatched: no more new runs of the thread reach the session.
        await two.send(type="unwatch_thread", thread_id=thread_id, id="u")
        unwatched = await two.recv()
        assert unwatched["type"] == "ack" and unwatched["data"]["action"] == "unwatch_thread"
        await one.run("chunks=2", agent="load", thread_id=thread_id)
        await two.send(type="ping", id="after")
        pong = await two.recv_until("pong")
        assert [m["type"] for m in pong] == ["pong"], pong

        # Only the owner may watch it.
        async with ws_client(first, f"{user}-other") as other:
            await other.send(type="watch_thread", thread_id=thread_id, id="x")
            refused = await other.recv()
        assert refused["type"] == "error" and refused["data"]["code"] == "not_found"


async def test_two_sessions_watching_one_thread_see_every_run(
    server: LiveServer, user: str
) -> None:
    await two_sessions_watching_one_thread(server, server, user)


async def test_two_sessions_on_two_processes_watch_one_thread(
    redis_url: str, tmp_path: Path
) -> None:
    env = {"CHAT_BROKER_URL": redis_url, "CHAT_DB_URL": f"sqlite:///{tmp_path}/chat.db"}
    with spawn_server(tmp_path, **env) as a, spawn_server(tmp_path, **env) as b:
        await two_sessions_watching_one_thread(a, b, f"watch-{time.monotonic_ns()}")


async def test_a_thread_watched_over_sse(server: LiveServer, user: str) -> None:
    async with ws_client(server, user) as client:
        opening = await client.run("chunks=2", agent="load")
        thread_id = opening[0]["thread_id"]
        async with http_client(server, headers=server.headers(user)) as rest:
            missing = await rest.get(
                f"/api/threads/{thread_id}/events", headers=server.headers("mallory")
            )
            assert missing.status_code == 404
            async with rest.stream("GET", f"/api/threads/{thread_id}/events") as stream:
                assert stream.status_code == 200
                assert stream.headers["content-type"].startswith("text/event-stream")
                run_ids = []
                for _ in range(2):
                    run = await client.run("chunks=5 delay_ms=2", agent="load", thread_id=thread_id)
                    check_run_invariants(run)
                    run_ids.append(run[0]["run_id"])
                text = ""
                async with asyncio.timeout(15):
                    async for piece in stream.aiter_text():
                        text += piece
                        if text.count("event: agent_completed") == 2:
                            break
        received = run_events_of(parse_sse(text))
    for run_id in run_ids:
        events = of_run(received, run_id)
        check_run_invariants(events)
        assert events[0]["seq"] == 1


# 6.2 Double-texting ----------------------------------------------------------------

SLOW = "thinking=0 chunks=200 chunk_chars=4 delay_ms=10"


async def a_run_going(client: Any) -> tuple[str, str, list[dict[str, Any]]]:
    """Open a thread, then start a slow run in it and read until it has answered a bit."""
    opening = await client.run("chunks=1", agent="load")
    thread_id = opening[0]["thread_id"]
    await client.send(type="user_message", agent="load", content=SLOW, thread_id=thread_id)
    seen = await client.recv_until("response_chunk")
    seen += [await client.recv() for _ in range(3)]
    return thread_id, seen[0]["run_id"], seen


async def until_recorded(server: LiveServer, user: str, thread_id: str, count: int) -> None:
    async def recorded() -> bool:
        return len(await stored_messages(server, user, thread_id)) >= count

    await wait_for(recorded)


def pairs(messages: list[dict[str, Any]]) -> list[tuple[str, str | None]]:
    return [(m["role"], m["run_id"]) for m in messages]


async def test_reject_refuses_a_message_while_a_run_goes(server: LiveServer, user: str) -> None:
    async with ws_client(server, user) as client:
        thread_id, going, seen = await a_run_going(client)
        await client.send(
            type="user_message",
            agent="load",
            content="chunks=1",
            thread_id=thread_id,
            on_active="reject",
            id="second",
        )
        while True:  # the going run's events interleave
            message = await client.recv()
            if message["type"] == "error":
                break
            seen.append(message)
        assert message["data"]["code"] == "conflict" and message["data"]["ref"] == "second"
        assert going in message["data"]["message"]
        seen += await client.recv_until("agent_completed", run_id=going)
        check_run_invariants(of_run(seen, going))
        async with http_client(server, headers=server.headers(user)) as rest:
            refused = await rest.post(
                "/api/chat/stream",
                json={"message": "x", "thread_id": thread_id, "on_active": "bogus"},
            )
            assert refused.status_code == 400
    await until_recorded(server, user, thread_id, 4)
    stored = await stored_messages(server, user, thread_id)
    assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"]
    assert {m["run_id"] for m in stored[2:]} == {going}


async def test_enqueue_runs_a_threads_messages_one_after_another(
    server: LiveServer, user: str
) -> None:
    async with ws_client(server, user) as client:
        thread_id, going, seen = await a_run_going(client)
        for n in (2, 3):
            await client.send(
                type="user_message", agent="load", content=f"chunks={n}", thread_id=thread_id
            )
        # Both queued runs' user_message come at once, before the going run ends.
        queued: list[str] = []
        while len(queued) < 2:
            message = await client.recv()
            seen.append(message)
            if message["type"] == "user_message":
                queued.append(message["run_id"])
        async with http_client(server, headers=server.headers(user)) as rest:
            status = await rest.get(f"/api/chat/agents/{queued[0]}/status")
            assert status.json()["status"] == "queued"
            metrics = (await rest.get("/metrics")).text
        assert 'status="queued"' in metrics
        for run_id in (going, *queued):
            seen += await client.recv_until("agent_completed", run_id=run_id, timeout=30)
    order = [
        (m["type"], m["run_id"]) for m in seen if m["type"] in ("agent_started", "agent_completed")
    ]
    assert order[-4:] == [
        ("agent_started", queued[0]),
        ("agent_completed", queued[0]),
        ("agent_started", queued[1]),
        ("agent_completed", queued[1]),
    ]
    assert order.index(("agent_completed", going)) < order.index(("agent_started", queued[0]))
    for run_id in (going, *queued):
        check_run_invariants(of_run(seen, run_id))
    await until_recorded(server, user, thread_id, 8)
    stored = await stored_messages(server, user, thread_id)
    first = stored[0]["run_id"]
    assert pairs(stored) == [
        ("user", first),
        ("assistant", first),
        ("user", going),
        ("assistant", going),
        ("user", queued[0]),
        ("assistant", queued[0]),
        ("user", queued[1]),
        ("assistant", queued[1]),
    ]


async def test_cancelling_a_queued_run_takes_it_out_of_the_queue(
    server: LiveServer, user: str
) -> None:
    async with ws_client(server, user) as client:
        thread_id, going, seen = await a_run_going(client)
        await client.send(
            type="user_message", agent="load", content="chunks=2", thread_id=thread_id
        )
        await client.send(
            type="user_message", agent="load", content="chunks=3", thread_id=thread_id
        )
        queued: list[str] = []
        while len(queued) < 2:
            message = await client.recv()
            seen.append(message)
            if message["type"] == "user_message":
                queued.append(message["run_id"])
        await client.send(type="cancel", run_id=queued[0], id="c")
        seen += await client.recv_until("agent_completed", run_id=queued[0])
        seen += await client.recv_until("agent_completed", run_id=going, timeout=30)
        seen += await client.recv_until("agent_completed", run_id=queued[1], timeout=30)
    cancelled = of_run(seen, queued[0])
    check_run_invariants(cancelled)
    assert cancelled[-1]["data"]["status"] == "cancelled"
    assert "agent_started" not in [m["type"] for m in cancelled]
    check_run_invariants(of_run(seen, queued[1]))
    assert of_run(seen, queued[1])[-1]["data"]["status"] == "completed"
    await until_recorded(server, user, thread_id, 6)
    stored = await stored_messages(server, user, thread_id)
    assert [r for _, r in pairs(stored)][2:] == [going, going, queued[1], queued[1]]


async def test_interrupt_keeps_the_partial_answer(server: LiveServer, user: str) -> None:
    async with ws_client(server, user) as client:
        thread_id, going, seen = await a_run_going(client)
        await client.send(
            type="user_message",
            agent="load",
            content="chunks=2",
            thread_id=thread_id,
            on_active="interrupt",
        )
        seen += await client.recv_until("agent_completed", run_id=going)
        interrupted = of_run(seen, going)
        check_run_invariants(interrupted)
        end = interrupted[-1]["data"]
        assert end["status"] == "cancelled" and end["error"]["code"] == "interrupted"
        partial = next(m for m in interrupted if m["type"] == "response_complete")["data"]
        assert partial["content"]  # it had answered part of it
        rest = await client.recv_until("agent_completed")
        new_run = rest[-1]["run_id"]
        check_run_invariants(of_run([*seen, *rest], new_run))
    await until_recorded(server, user, thread_id, 6)
    stored = await stored_messages(server, user, thread_id)
    first = stored[0]["run_id"]
    assert pairs(stored) == [
        ("user", first),
        ("assistant", first),
        ("user", going),
        ("assistant", going),
        ("user", new_run),
        ("assistant", new_run),
    ]
    assert stored[3]["content"] == partial["content"]


async def test_rollback_removes_the_run_from_the_thread(server: LiveServer, user: str) -> None:
    async with ws_client(server, user) as client:
        thread_id, going, seen = await a_run_going(client)
        async with http_client(server, headers=server.headers(user)) as rest:
            status, messages, _ = await post_stream(
                rest,
                {
                    "message": "chunks=2",
                    "agent": "load",
                    "thread_id": thread_id,
                    "on_active": "rollback",
                },
            )
        assert status == 200
        new_events = run_events_of(messages)
        check_run_invariants(new_events)
        new_run = new_events[0]["run_id"]
        seen += await client.recv_until("agent_completed", run_id=going)
        rolled = of_run(seen, going)
        check_run_invariants(rolled)
        assert rolled[-1]["data"]["error"]["code"] == "rolled_back"
    await until_recorded(server, user, thread_id, 4)
    stored = await stored_messages(server, user, thread_id)
    first = stored[0]["run_id"]
    assert pairs(stored) == [
        ("user", first),
        ("assistant", first),
        ("user", new_run),
        ("assistant", new_run),
    ]


async def test_two_messages_sent_at_once_to_an_idle_thread_run_one_after_the_other(
    server: LiveServer, user: str
) -> None:
    async with ws_client(server, user) as one, ws_client(server, user) as two:
        opening = await one.run("chunks=1", agent="load")
        thread_id = opening[0]["thread_id"]
        content = "thinking=0 chunks=30 delay_ms=5"
        await asyncio.gather(
            one.send(type="user_message", agent="load", content=content, thread_id=thread_id),
            two.send(type="user_message", agent="load", content=content, thread_id=thread_id),
        )
        a, b = await asyncio.gather(
            one.recv_until("agent_completed"), two.recv_until("agent_completed")
        )
    check_run_invariants(a)
    check_run_invariants(b)
    first, second = sorted((a, b), key=lambda run: run[-1]["ts"])
    began = next(m for m in second if m["type"] == "agent_started")["ts"]
    assert began >= first[-1]["ts"]


async def test_enqueue_holds_across_processes(redis_url: str, tmp_path: Path) -> None:
    env = {"CHAT_BROKER_URL": redis_url, "CHAT_DB_URL": f"sqlite:///{tmp_path}/chat.db"}
    user = f"queue-{time.monotonic_ns()}"
    with spawn_server(tmp_path, **env) as a, spawn_server(tmp_path, **env) as b:
        async with ws_client(a, user) as on_a, ws_client(b, user) as on_b:
            thread_id, going, seen_a = await a_run_going(on_a)
            await on_b.send(
                type="user_message", agent="load", content="chunks=3", thread_id=thread_id
            )
            first_b = await on_b.recv()
            assert first_b["type"] == "user_message"
            queued = first_b["run_id"]
            seen_b = [first_b, *await on_b.recv_until("agent_completed", timeout=30)]
            seen_a += await on_a.recv_until("agent_completed", run_id=going, timeout=30)
        check_run_invariants(of_run(seen_a, going))
        check_run_invariants(seen_b)
        # It began on b only once the run going on a had ended.
        ended_a = of_run(seen_a, going)[-1]["ts"]
        began_b = next(m for m in seen_b if m["type"] == "agent_started")["ts"]
        assert began_b >= ended_a
        record_figures(
            "queue_handoff",
            {
                "broker": "redis",
                "processes": 2,
                "ms_from_the_run_ending_on_a_to_the_queued_run_beginning_on_b": round(
                    (began_b - ended_a) * 1000, 1
                ),
            },
        )
        await until_recorded(a, user, thread_id, 6)
        stored = await stored_messages(a, user, thread_id)
        assert [r for _, r in pairs(stored)][2:] == [going, going, queued, queued]


# The pure parts --------------------------------------------------------------------


def test_the_new_frames_parse() -> None:
    from server.commands import UserMessage, WatchThread, parse_command
    from server.errors import ProtocolError

    watch = parse_command('{"type": "watch_thread", "thread_id": "t1", "id": 3}')
    assert watch == WatchThread("t1", watch=True, id=3)
    assert parse_command('{"type": "unwatch_thread", "thread_id": "t1"}') == WatchThread(
        "t1", watch=False
    )
    message = parse_command('{"type": "user_message", "content": "hi", "on_active": "rollback"}')
    assert isinstance(message, UserMessage) and message.on_active == "rollback"
    for bad in (
        '{"type": "watch_thread"}',
        '{"type": "watch_thread", "thread_id": ""}',
        '{"type": "user_message", "content": "hi", "on_active": "later"}',
    ):
        try:
            parse_command(bad)
        except ProtocolError as exc:
            assert exc.code == "bad_message"
        else:
            raise AssertionError(f"{bad} parsed")


def test_a_run_created_message_crosses_the_bus() -> None:
    from bridge import bus

    message = bus.run_created("t_1", "r_1")
    assert bus.decode(bus.encode(message)) == message
    assert bus.decode(b'{"kind": "run", "thread_id": "t"}') is None


async def test_a_retried_agui_post_rejoins_its_run(server: LiveServer, user: str) -> None:
    from tests.test_frontends import agui_post, run_input

    body = run_input(f"t-{user}", "client-run", "chunks=20 delay_ms=5")
    (first, one), (again, two) = await asyncio.gather(
        agui_post(server, user, body), agui_post(server, user, body)
    )
    assert first.status_code == again.status_code == 200
    assert first.headers["x-chat-run-id"] == again.headers["x-chat-run-id"]
    assert [m["data"] for m in one] == [m["data"] for m in two]
    # The runId used again for another message: a run of its own.
    other, _ = await agui_post(server, user, run_input(f"t-{user}", "client-run", "chunks=1"))
    assert other.status_code == 200
    assert other.headers["x-chat-run-id"] != first.headers["x-chat-run-id"]
    stored = await stored_messages(server, user, f"t-{user}")
    assert [m["role"] for m in stored] == ["user", "assistant"] * 2


async def test_a_retried_ai_sdk_post_streams_its_run_and_an_edit_is_a_new_one(
    server: LiveServer, user: str
) -> None:
    """The AI SDK's message id is the send's key: a POST retried (two at once here) makes
    one run, both streams the whole of it; the same id with an edited text is a new run,
    and another user's same ids are theirs."""

    def body(text: str, message_id: str = "msg-1") -> dict[str, Any]:
        part = {"type": "text", "text": text}
        return {
            "id": f"c-{user}",
            "messages": [{"id": message_id, "role": "user", "parts": [part]}],
            "trigger": "submit-message",
            "agent": "load",
        }

    async def post(payload: dict[str, Any], who: str = user) -> httpx.Response:
        async with httpx.AsyncClient(base_url=server.http, timeout=30) as client:
            headers = server.headers(who)
            return await client.post("/api/ai-sdk/chat", json=payload, headers=headers)

    first, again = await asyncio.gather(
        post(body("chunks=20 delay_ms=5")), post(body("chunks=20 delay_ms=5"))
    )
    assert first.status_code == again.status_code == 200
    assert first.headers["x-chat-run-id"] == again.headers["x-chat-run-id"]
    assert first.text == again.text and first.text.rstrip().endswith("data: [DONE]")
    edited = await post(body("chunks=1"))
    assert edited.status_code == 200
    assert edited.headers["x-chat-run-id"] != first.headers["x-chat-run-id"]
    other = await post(body("chunks=1", "msg-2"))
    assert other.headers["x-chat-run-id"] not in (
        first.headers["x-chat-run-id"],
        edited.headers["x-chat-run-id"],
    )
    stored = await stored_messages(server, user, f"c-{user}")
    assert [m["role"] for m in stored] == ["user", "assistant"] * 3
    # Another user naming the same chat id and message id: their own chat is refused
    # (the chat is this user's), so nothing of theirs joins this user's run.
    theirs = await post(body("chunks=20 delay_ms=5"), f"{user}-other")
    assert theirs.status_code == 404


async def test_messages_sent_at_once_with_reject_or_interrupt_never_run_side_by_side(
    redis_url: str, tmp_path: Path
) -> None:
    """Eight ``reject`` sends at once to an idle thread, through two processes: one run,
    seven ``conflict``s.  Then eight ``interrupt`` sends at once: each cancels the run
    before it, and no two runs of the thread ever go at the same time."""
    env = {
        "CHAT_BROKER_URL": redis_url,
        "CHAT_DB_URL": f"sqlite:///{tmp_path}/chat.db",
        "CHAT_MAX_ACTIVE_RUNS_PER_USER": "20",
        "CHAT_RATE_LIMIT_PER_MINUTE": "100",
    }
    user = f"turns-{time.monotonic_ns()}"
    with spawn_server(tmp_path, **env) as a, spawn_server(tmp_path, **env) as b:
        async with ws_client(a, user) as opener:
            thread_id = (await opener.run("chunks=1", agent="load"))[0]["thread_id"]

        async def send(server: LiveServer, policy: str, n: int) -> list[dict[str, Any]]:
            async with ws_client(server, user) as client:
                await client.send(
                    type="user_message",
                    agent="load",
                    content="thinking=0 chunks=40 delay_ms=10",
                    thread_id=thread_id,
                    on_active=policy,
                    id=f"{policy}-{n}",
                )
                first = await client.recv(timeout=30)
                if first["type"] == "error":
                    return [first]
                rest = await client.recv_until(
                    "agent_completed", run_id=first["run_id"], timeout=60
                )
                return [first, *rest]

        rejects = await asyncio.gather(*(send((a, b)[n % 2], "reject", n) for n in range(8)))
        ran = [events for events in rejects if events[0]["type"] != "error"]
        refused = [events[0] for events in rejects if events[0]["type"] == "error"]
        assert len(ran) == 1 and len(refused) == 7, [e[0] for e in rejects]
        assert {e["data"]["code"] for e in refused} == {"conflict"}
        check_run_invariants(of_run(ran[0], ran[0][0]["run_id"]))

        interrupts = await asyncio.gather(*(send((a, b)[n % 2], "interrupt", n) for n in range(8)))
        spans = []
        for events in interrupts:
            assert events[0]["type"] != "error", events[0]["data"]
            run = of_run(events, events[0]["run_id"])
            check_run_invariants(run)
            started = [e["ts"] for e in run if e["type"] == "agent_started"]
            end = run[-1]
            assert end["data"]["status"] in ("completed", "cancelled"), end
            if end["data"]["status"] == "cancelled":
                assert end["data"]["error"]["code"] == "interrupted", end
            spans.append((started[0] if started else end["ts"], end["ts"]))
        spans.sort()
        for (_, ended), (began, _) in itertools.pairwise(spans):
            assert began >= ended, spans  # one run of the thread at a time
        assert sum(1 for events in interrupts if events[-1]["data"]["status"] == "completed") == 1

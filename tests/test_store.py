"""The conversation store on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from agents.base import AgentRegistry, RunContext
from agents.demo import DemoAgent
from agents.load import LoadAgent
from agents.supervisor import Supervisor, SupervisorConfig
from agents.tools import builtin_tools
from bridge.memory import InMemoryBroker
from server.persistence import Persistence, title_of
from server.store import MessageRow, RunRow, Store, ThreadRow, open_store
from server.store.base import refused
from server.store.migrations import LATEST
from tests.support import check_run_invariants, parse_sse, spawn_server, ws_client
from tests.test_bridge import collect
from tests.test_faults import record_figures

# Writes go through the store's steps, as the persistence does, one transaction each.


async def create_thread(store: Store, row: ThreadRow) -> None:
    await store.write(store.thread_steps(row))


async def add_message(store: Store, row: MessageRow, owner: str) -> bool:
    return not refused(await store.write(store.message_steps(row, owner)))


async def upsert_run(store: Store, row: RunRow) -> bool:
    return not refused(await store.write(store.run_steps(row)))


async def test_migrations_from_empty_and_from_the_previous_schema(db_url: str) -> None:
    old = open_store(db_url)
    await old.open(target=LATEST - 1)
    assert await old.schema_version() == LATEST - 1
    # Rows written as the previous version's code wrote them.
    await old.driver.execute(
        "INSERT INTO threads (id, owner, title, created_at, updated_at) "
        "VALUES ('t_1', 'alice', 'hello', 1, 1)"
    )
    await old.driver.execute(
        "INSERT INTO messages (id, thread_id, role, content, run_id, fallback, created_at) "
        "VALUES ('m_1', 't_1', 'user', 'hello', 'r_1', 0, 1)"
    )
    await old.driver.execute(
        "INSERT INTO runs (id, thread_id, owner, agent, status, error_code, created_at, "
        "updated_at, last_seq) VALUES ('r_1', 't_1', 'alice', 'demo', 'running', NULL, 1, 1, 3)"
    )
    await old.close()

    store = open_store(db_url)
    await store.open()  # migrates the old database to the newest schema
    try:
        assert await store.schema_version() == LATEST
        assert (await store.get_thread("t_1")) == ThreadRow("t_1", "alice", "hello", 1.0, 1.0)
        [message] = await store.list_messages("t_1", 10, 0)
        assert message.content == "hello" and message.pos >= 1
        run = await store.get_run("r_1")
        assert run is not None and run.status == "running" and run.node is None
        await upsert_run(
            store, RunRow("r_2", "t_1", "alice", "load", "running", None, 2, 2, 1, "n1")
        )
        assert (await store.get_run("r_2")).node == "n1"  # type: ignore[union-attr]
        await store.migrate()  # idempotent
        assert await store.schema_version() == LATEST
    finally:
        await store.close()


async def test_threads_messages_runs_and_pagination(db_url: str) -> None:
    store = open_store(db_url)
    await store.open()
    try:
        for i in range(5):
            await create_thread(store, ThreadRow(f"t_{i}", "alice", f"title {i}", i, 10.0 + i))
        await create_thread(store, ThreadRow("t_bob", "bob", "bob's", 0, 100.0))
        page1 = await store.list_threads("alice", 2, None)
        assert [t.id for t in page1] == ["t_4", "t_3"]
        page2 = await store.list_threads("alice", 2, (page1[-1].updated_at, page1[-1].id))
        assert [t.id for t in page2] == ["t_2", "t_1"]
        page3 = await store.list_threads("alice", 2, (page2[-1].updated_at, page2[-1].id))
        assert [t.id for t in page3] == ["t_0"]

        for i in range(7):
            role = "user" if i % 2 == 0 else "assistant"
            row = MessageRow(f"m_{i}", "t_1", role, f"text {i}", None, False, i)
            assert await add_message(store, row, "alice")
        first = await store.list_messages("t_1", 3, 0)
        assert [m.id for m in first] == ["m_0", "m_1", "m_2"]
        rest = await store.list_messages("t_1", 10, first[-1].pos)
        assert [m.id for m in rest] == ["m_3", "m_4", "m_5", "m_6"]
        assert [m.id for m in await store.recent_messages("t_1", 2)] == ["m_5", "m_6"]

        await upsert_run(store, RunRow("r_1", "t_1", "alice", "demo", "running", None, 1, 1, 2))
        await upsert_run(store, RunRow("r_1", "t_1", "alice", "demo", "paused", None, 1, 2, 5))
        await upsert_run(store, RunRow("r_2", "t_1", "alice", "demo", "completed", None, 1, 2, 9))
        assert (await store.get_run("r_1")).status == "paused"  # type: ignore[union-attr]
        assert await store.fail_unfinished_runs("server_restart", 3.0) == 1
        run = await store.get_run("r_1")
        assert run is not None and (run.status, run.error_code) == ("failed", "server_restart")
        assert (await store.get_run("r_2")).status == "completed"  # type: ignore[union-attr]

        assert not await store.delete_thread("t_1", "bob", 4.0)  # not bob's
        assert await store.delete_thread("t_1", "alice", 4.0)
        assert not await store.delete_thread("t_1", "alice", 5.0)  # gone already
        assert await store.get_thread("t_1") is None
        assert await store.list_messages("t_1", 10, 0) == []
        assert await store.get_run("r_1") is None
    finally:
        await store.close()


class HistoryAgent:
    """Answers with what it was given as context."""

    name = "history"
    description = "test agent"

    async def run(self, ctx: RunContext) -> None:
        await ctx.say(" | ".join(f"{m.role}:{m.content}" for m in ctx.history) or "(none)")


def supervisor_with(store_url: str) -> tuple[Supervisor, InMemoryBroker, Persistence]:
    broker = InMemoryBroker(run_log_max_bytes=1 << 20, resume_window_s=60)
    persistence = Persistence(open_store(store_url), timeout_s=5, history_messages=50, node="n")
    agents = AgentRegistry([DemoAgent(), LoadAgent(), HistoryAgent()], "demo")
    sup = Supervisor(broker, agents, builtin_tools(), SupervisorConfig(), recorder=persistence)
    return sup, broker, persistence


async def test_thread_context_reaches_the_agent(db_url: str) -> None:
    sup, broker, persistence = supervisor_with(db_url)
    await persistence.store.open()
    try:
        first = await sup.start_run(owner="alice", content="What is 2 + 3?")
        events = await collect(broker, first.run_id)
        answer = events[-2]["data"]
        assert answer["stored"] is True and "5" in answer["content"]
        second = await sup.start_run(
            owner="alice", content="and again?", thread_id=first.thread_id, agent="history"
        )
        events = await collect(broker, second.run_id)
        check_run_invariants(events)
        assert events[-2]["data"]["content"] == (
            f"user:What is 2 + 3? | assistant:{answer['content']}"
        )
        await persistence.flush()  # the store is written behind the stream
        stored = await persistence.store.list_messages(first.thread_id, 10, 0)
        assert [m.role for m in stored] == ["user", "assistant", "user", "assistant"]
        assert stored[1].id == answer["message_id"]  # response_complete names the stored row
        assert stored[2].id == events[0]["data"]["message_id"]  # the user_message's id
        thread = await persistence.store.get_thread(first.thread_id)
        assert thread is not None and thread.title == "What is 2 + 3?"
        run = await persistence.store.get_run(second.run_id)
        assert run is not None and run.status == "completed" and run.last_seq == events[-1]["seq"]
        from bridge.errors import RunNotFound

        with pytest.raises(RunNotFound):
            await sup.start_run(owner="mallory", content="hi", thread_id=first.thread_id)
    finally:
        await persistence.store.close()


async def test_cancelled_runs_store_their_partial_answer(db_url: str) -> None:
    sup, broker, persistence = supervisor_with(db_url)
    await persistence.store.open()
    try:
        record = await sup.start_run(owner="a", content="chunks=500 delay_ms=5", agent="load")
        while (await broker.get_run(record.run_id)).last_seq < 8:  # type: ignore[union-attr]
            await asyncio.sleep(0.005)
        await broker.command(record.run_id, "cancel")
        events = await collect(broker, record.run_id)
        complete = events[-2]["data"]
        assert events[-1]["data"]["status"] == "cancelled" and complete["content"]
        await persistence.flush()
        [_, answer] = await persistence.store.list_messages(record.thread_id, 10, 0)
        assert answer.id == complete["message_id"] and answer.content == complete["content"]
    finally:
        await persistence.store.close()


async def test_a_storage_failure_never_loses_the_live_stream(tmp_path: Path) -> None:
    sup, broker, persistence = supervisor_with(f"sqlite:///{tmp_path}/chat.db")
    await persistence.store.open()
    await persistence.store.close()  # the database goes away
    events = await collect(
        broker, (await sup.start_run(owner="a", content="What is 6 * 7?")).run_id
    )
    check_run_invariants(events)
    assert events[-2]["data"]["stored"] is False and "42" in events[-2]["data"]["content"]
    assert events[-1]["data"]["status"] == "completed"
    assert persistence.failures >= 2
    from server.persistence import StorageUnavailable

    with pytest.raises(StorageUnavailable):  # ownership cannot be checked: refused
        await sup.start_run(owner="a", content="hi", thread_id="t_some")


def run_row(run_id: str, thread_id: str, owner: str, status: str, seq: int = 1) -> RunRow:
    return RunRow(run_id, thread_id, owner, "load", status, None, 1.0, 1.0 + seq, seq)


async def test_a_deleted_thread_takes_no_writes_and_keeps_its_id_until_its_runs_end(
    db_url: str,
) -> None:
    store = open_store(db_url)
    await store.open()
    try:
        await create_thread(store, ThreadRow("t", "alice", "notes", 1.0, 1.0))
        assert await upsert_run(store, run_row("r_a", "t", "alice", "running"))
        assert await add_message(
            store, MessageRow("m_1", "t", "user", "hi", "r_a", False, 2), "alice"
        )
        # Bob's writes never land in Alice's thread.
        assert not await add_message(
            store, MessageRow("m_b", "t", "user", "x", "r_b", False, 3), "bob"
        )
        assert not await upsert_run(store, run_row("r_b", "t", "bob", "running"))
        assert await store.get_run("r_b") is None
        assert [m.id for m in await store.list_messages("t", 10, 0)] == ["m_1"]

        assert await store.delete_thread("t", "alice", 4.0)
        assert await store.get_thread("t") is None
        assert await store.list_threads("alice", 10, None) == []
        assert await store.list_messages("t", 10, 0) == []
        assert await store.unfinished_runs("t", "alice") == ["r_a"]
        # The id is not free while r_a can still write: Bob's claim takes nothing.
        await create_thread(store, ThreadRow("t", "bob", "mine", 5.0, 5.0))
        assert await store.get_thread("t") is None
        # r_a's answer is refused, its status is still recorded; no new run is admitted.
        assert not await add_message(
            store, MessageRow("m_2", "t", "assistant", "late", "r_a", False, 6), "alice"
        )
        assert await upsert_run(store, run_row("r_a", "t", "alice", "running", 7))
        assert not await upsert_run(store, run_row("r_a2", "t", "alice", "queued"))
        assert await store.purge_deleted_threads() == 0
        # r_a ends: it goes, and the tombstone with it.
        assert await upsert_run(store, run_row("r_a", "t", "alice", "cancelled", 9))
        assert await store.get_run("r_a") is None

        await create_thread(store, ThreadRow("t", "bob", "mine", 10.0, 10.0))
        thread = await store.get_thread("t")
        assert thread is not None and thread.owner == "bob"
        # Late writes of Alice's ended run find Bob's thread: refused, nothing lands.
        assert not await add_message(
            store, MessageRow("m_3", "t", "assistant", "late", "r_a", False, 11), "alice"
        )
        assert not await upsert_run(store, run_row("r_a", "t", "alice", "completed", 12))
        assert await store.list_messages("t", 10, 0) == []
        assert await store.get_run("r_a") is None
        assert (await store.get_thread("t")) == thread  # not even touched

        # A tombstone whose run died with its process is removed once the run is failed.
        await create_thread(store, ThreadRow("u", "alice", "other", 1.0, 1.0))
        assert await upsert_run(store, run_row("r_u", "u", "alice", "running"))
        assert await store.delete_thread("u", "alice", 13.0)
        assert await store.fail_unfinished_runs("server_restart", 14.0) == 1
        assert await store.purge_deleted_threads() == 1
        await create_thread(store, ThreadRow("u", "bob", "free", 15.0, 15.0))
        assert (await store.get_thread("u")).owner == "bob"  # type: ignore[union-attr]
    finally:
        await store.close()


async def test_an_ended_run_keeps_its_ending_whatever_is_written_late(db_url: str) -> None:
    """A process stopped past its lease writes its run's earlier statuses once it wakes
    up, after another process recorded the run's ending: the ending stays."""
    store = open_store(db_url)
    await store.open()
    try:
        await create_thread(store, ThreadRow("t", "alice", "notes", 1.0, 1.0))
        assert await upsert_run(store, run_row("r", "t", "alice", "queued", 1))
        lost = RunRow("r", "t", "alice", "load", "failed", "node_lost", 1.0, 9.0, 7)
        assert await upsert_run(store, lost)
        for late in ("queued", "running", "paused", "completed"):
            # Matched, so not taken for refused; and nothing changes.
            assert await upsert_run(store, run_row("r", "t", "alice", late, 1))
            run = await store.get_run("r")
            assert run is not None
            assert (run.status, run.error_code, run.last_seq, run.updated_at) == (
                "failed",
                "node_lost",
                7,
                9.0,
            )
        # Before its ending a run moves freely.
        assert await upsert_run(store, run_row("r2", "t", "alice", "running", 2))
        assert await upsert_run(store, run_row("r2", "t", "alice", "paused", 5))
        assert await upsert_run(store, run_row("r2", "t", "alice", "completed", 9))
        run = await store.get_run("r2")
        assert run is not None and (run.status, run.last_seq) == ("completed", 9)
    finally:
        await store.close()


async def test_a_runs_first_record_is_one_insert_checked_against_its_thread(
    db_url: str,
) -> None:
    """The first record (``queued``) is the insert alone, with the same checks: refused
    in another user's thread or a deleted one, and a row already there (a late write of
    a run whose ending was recorded) stays as it is without the write being refused."""
    store = open_store(db_url)
    await store.open()

    async def first(row: RunRow) -> bool:
        steps = store.run_steps(row, first=True)
        assert len(steps) == 1
        return not refused(await store.write(steps))

    try:
        await create_thread(store, ThreadRow("t", "alice", "notes", 1.0, 1.0))
        assert await first(run_row("r", "t", "alice", "queued", 0))
        run = await store.get_run("r")
        assert run is not None and (run.status, run.owner, run.last_seq) == ("queued", "alice", 0)
        assert not await first(run_row("r_b", "t", "bob", "queued", 0))
        assert await store.get_run("r_b") is None
        assert not await first(run_row("r_x", "t_missing", "alice", "queued", 0))

        lost = RunRow("r", "t", "alice", "load", "failed", "node_lost", 1.0, 9.0, 7)
        assert await upsert_run(store, lost)
        assert await first(run_row("r", "t", "alice", "queued", 0))
        run = await store.get_run("r")
        assert run is not None and (run.status, run.error_code, run.last_seq) == (
            "failed",
            "node_lost",
            7,
        )

        assert await store.delete_thread("t", "alice", 10.0)
        assert not await first(run_row("r2", "t", "alice", "queued", 0))
        assert await store.get_run("r2") is None
    finally:
        await store.close()


async def test_a_lost_runs_ending_is_stored_though_its_thread_was_never_written(
    db_url: str,
) -> None:
    """The process that ran a run stopped before its writes reached the database; the
    process that found it lost records its ending, making its thread; the owner's writes
    that land later fill the thread in and leave the ending as it is."""
    from bridge.broker import RunRecord

    store = open_store(db_url)
    await store.open()
    persistence = Persistence(store, timeout_s=5, history_messages=10, node="b")
    refused_runs: list[str] = []
    persistence.on_refused = lambda run: refused_runs.append(run.run_id)
    try:
        lost = RunRecord("r", "t_new", "alice", "load", "failed", 1.0, 9.0, 7, "node_lost")
        await persistence.run_lost(lost)
        await persistence.flush()
        thread = await store.get_thread("t_new")
        assert thread is not None and (thread.owner, thread.title) == ("alice", "")
        run = await store.get_run("r")
        assert run is not None and (run.status, run.error_code, run.last_seq) == (
            "failed",
            "node_lost",
            7,
        )
        # Another user naming the id neither takes the thread nor gives it a title.
        await create_thread(store, ThreadRow("t_new", "bob", "mine", 2.0, 2.0))
        assert (await store.get_thread("t_new")) == thread
        # The stopped process wakes up: its thread, message and first statuses land.
        await create_thread(store, ThreadRow("t_new", "alice", "hello there", 1.0, 1.0))
        assert await add_message(
            store, MessageRow("m_1", "t_new", "user", "hello there", "r", False, 1.0), "alice"
        )
        assert await upsert_run(store, run_row("r", "t_new", "alice", "queued", 0))
        assert await upsert_run(store, run_row("r", "t_new", "alice", "running", 1))
        thread = await store.get_thread("t_new")
        assert thread is not None and (thread.owner, thread.title) == ("alice", "hello there")
        assert [m.id for m in await store.list_messages("t_new", 10, 0)] == ["m_1"]
        run = await store.get_run("r")
        assert run is not None and (run.status, run.error_code, run.last_seq) == (
            "failed",
            "node_lost",
            7,
        )
        # A lost run of a thread that exists is recorded in it, and refused in another
        # user's.
        await create_thread(store, ThreadRow("t_bob", "bob", "bob's", 1.0, 1.0))
        await persistence.run_lost(
            RunRecord("r_x", "t_bob", "alice", "load", "failed", 1.0, 2.0, 3, "node_lost")
        )
        await persistence.flush()
        assert await store.get_run("r_x") is None and refused_runs == ["r_x"]
        assert (await store.get_thread("t_bob")).title == "bob's"  # type: ignore[union-attr]
    finally:
        await persistence.stop()
        await store.close()


async def test_a_delete_and_runs_starting_in_its_thread_are_ordered(db_url: str) -> None:
    """Runs are admitted to a thread (their first record written, then a message) from
    one connection while the thread is deleted from another: every admitted run is one
    the delete then sees as unfinished, none is admitted after it, and no message is
    written after it."""
    starts, delete = open_store(db_url), open_store(db_url)
    await starts.open()
    await delete.open()
    admitted_total = refused_total = 0
    try:
        for i in range(30):
            tid = f"t_{i}"
            await create_thread(starts, ThreadRow(tid, "alice", "race", 1.0, 1.0))

            async def admit(n: int, tid: str = tid) -> bool:
                await asyncio.sleep(n * 0.0005)
                run_id = f"r_{tid}_{n}"
                ok = await upsert_run(starts, run_row(run_id, tid, "alice", "queued"))
                message = MessageRow(f"m_{tid}_{n}", tid, "user", "hi", run_id, False, 3.0)
                await add_message(starts, message, "alice")
                return ok

            async def delete_then_look(tid: str = tid) -> list[str]:
                await asyncio.sleep(0.002)
                assert await delete.delete_thread(tid, "alice", 2.0)
                return await delete.unfinished_runs(tid, "alice")

            *admissions, seen = await asyncio.gather(
                *(admit(n) for n in range(10)), delete_then_look()
            )
            admitted = {f"r_{tid}_{n}" for n, ok in enumerate(admissions) if ok}
            assert admitted <= set(seen), (i, admitted, seen)
            assert set(await delete.unfinished_runs(tid, "alice")) == admitted
            # The delete took the messages written before it; none was written after.
            assert await delete.list_messages(tid, 100, 0) == [], i
            admitted_total += len(admitted)
            refused_total += len(admissions) - len(admitted)
    finally:
        await starts.close()
        await delete.close()
    record_figures(
        f"delete_ordering_{db_url.split(':', 1)[0]}",
        {"admitted_before_the_delete": admitted_total, "refused_after_it": refused_total},
    )
    assert admitted_total and refused_total  # both sides of the race were taken


def test_titles() -> None:
    assert title_of("  What   is\n12 * 7?  ") == "What is 12 * 7?"
    assert len(title_of("x" * 500)) == 80


# Over HTTP, with real server processes -------------------------------------------------


async def api(srv: Any, method: str, url: str, user: str = "alice", **kw: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=srv.http, timeout=15) as client:
        return await client.request(method, url, headers=srv.headers(user), **kw)


async def test_history_survives_a_restart_and_routes_are_owner_only(
    db_url: str, tmp_path: Path
) -> None:
    with spawn_server(tmp_path, CHAT_DB_URL=db_url) as srv:
        async with ws_client(srv, "alice") as client:
            first = await client.run("What is 12 * 7?")
            thread_id = first[0]["thread_id"]
            for i in range(3):
                more = await client.run(f"chunks={i + 1}", agent="load", thread_id=thread_id)
                assert more[0]["thread_id"] == thread_id
            await client.run("chunks=1", agent="load")  # a second thread
        run_id = first[0]["run_id"]
    with spawn_server(tmp_path, CHAT_DB_URL=db_url) as srv:  # a new process, same database
        threads = (await api(srv, "GET", "/api/threads")).json()
        assert [t["thread_id"] for t in threads["threads"]][1] == thread_id
        assert threads["threads"][1]["title"] == "What is 12 * 7?"
        page = (await api(srv, "GET", "/api/threads", params={"limit": 1})).json()
        assert len(page["threads"]) == 1 and page["next_cursor"]
        page2 = (
            await api(
                srv, "GET", "/api/threads", params={"limit": 1, "cursor": page["next_cursor"]}
            )
        ).json()
        assert page2["threads"][0]["thread_id"] == thread_id and page2["next_cursor"] is None

        url = f"/api/threads/{thread_id}/messages"
        messages = (await api(srv, "GET", url, params={"limit": 5})).json()
        assert [m["role"] for m in messages["messages"]] == ["user", "assistant"] * 2 + ["user"]
        assert messages["messages"][0]["content"] == "What is 12 * 7?"
        assert "84" in messages["messages"][1]["content"]
        assert messages["messages"][1]["message_id"] == first[-2]["data"]["message_id"]
        rest = (await api(srv, "GET", url, params={"cursor": messages["next_cursor"]})).json()
        assert len(rest["messages"]) == 3 and rest["next_cursor"] is None

        status = (await api(srv, "GET", f"/api/chat/agents/{run_id}/status")).json()
        assert status["status"] == "completed" and status["last_seq"] == first[-1]["seq"]

        for method, path in [
            ("GET", url),
            ("DELETE", f"/api/threads/{thread_id}"),
            ("GET", f"/api/chat/agents/{run_id}/status"),
        ]:
            resp = await api(srv, method, path, user="mallory")
            assert resp.status_code == 404, path
        assert (await api(srv, "GET", "/api/threads", user="mallory")).json()["threads"] == []
        bad = await api(srv, "GET", "/api/threads", params={"cursor": "!!"})
        assert bad.status_code == 400

        assert (await api(srv, "DELETE", f"/api/threads/{thread_id}")).status_code == 200
        assert (await api(srv, "GET", url)).status_code == 404
        assert len((await api(srv, "GET", "/api/threads")).json()["threads"]) == 1


async def test_a_run_killed_with_its_process_is_failed_after_restart(
    db_url: str, tmp_path: Path
) -> None:
    with spawn_server(tmp_path, CHAT_DB_URL=db_url) as srv:
        async with ws_client(srv, "alice") as client:
            await client.send(type="user_message", agent="load", content="chunks=1000 delay_ms=20")
            run_id = (await client.recv())["run_id"]
            await client.recv_until("response_chunk")
            status = (await api(srv, "GET", f"/api/chat/agents/{run_id}/status")).json()
            assert status["status"] == "running"
            # The store is written behind the stream: wait until it has the run running.
            store = open_store(db_url)
            await store.open()
            try:
                deadline = time.monotonic() + 30
                while (row := await store.get_run(run_id)) is None or row.status != "running":
                    assert time.monotonic() < deadline, row
                    await asyncio.sleep(0.02)
            finally:
                await store.close()
            assert srv.proc is not None
            os.kill(srv.proc.pid, signal.SIGKILL)
            srv.proc.wait(timeout=10)
    with spawn_server(tmp_path, CHAT_DB_URL=db_url) as srv:
        status = (await api(srv, "GET", f"/api/chat/agents/{run_id}/status")).json()
    assert status["status"] == "failed" and status["error_code"] == "server_restart"


async def test_processes_starting_together_migrate_once(db_url: str) -> None:
    stores = [open_store(db_url) for _ in range(4)]
    try:
        await asyncio.gather(*(store.open() for store in stores))
        assert [await store.schema_version() for store in stores] == [LATEST] * 4
    finally:
        for store in stores:
            await store.close()


# Deleting a thread while a run starts in it; a crash right after runs start ---------------


async def sse_run(
    http: httpx.AsyncClient, srv: Any, user: str, body: dict[str, Any]
) -> tuple[int, list[dict[str, Any]]]:
    """``POST /api/chat/stream`` read to its end: the status code and the run's events."""
    async with http.stream(
        "POST", "/api/chat/stream", json=body, headers=srv.headers(user)
    ) as resp:
        text = "".join([chunk async for chunk in resp.aiter_text()])
    if resp.status_code != 200:
        return resp.status_code, []
    return 200, [m["data"] for m in parse_sse(text) if "id" in m]


async def test_a_deleted_threads_id_never_carries_a_run_into_another_users_thread(
    db_url: str, tmp_path: Path
) -> None:
    """Alice deletes her thread and, a moment later, sends a slow message to it; Bob then
    claims the freed id.  Whatever the interleaving, Bob's thread never holds anything of
    Alice's, and a run of Alice's in the deleted thread is refused or cancelled: it can
    only complete as the first run of a new thread of hers, started after the delete."""
    tries = 40
    outcomes: Counter[str] = Counter()
    limits = {"CHAT_RATE_LIMIT_PER_MINUTE": "100000", "CHAT_MAX_ACTIVE_RUNS_PER_USER": "100"}
    with spawn_server(tmp_path, CHAT_DB_URL=db_url, **limits) as srv:
        clients = [httpx.AsyncClient(base_url=srv.http, timeout=30) for _ in range(4)]
        seeder, deleter, starter, bob = clients
        try:
            for i in range(tries):
                thread_id = f"team-notes-{i}"
                status, seed = await sse_run(
                    seeder,
                    srv,
                    "alice",
                    {"message": "chunks=2", "agent": "load", "thread_id": thread_id},
                )
                assert status == 200 and seed[-1]["data"]["status"] == "completed"
                # The message goes from 2 ms before the DELETE to 4 ms after it.
                offset_s = (i % 7 - 2) / 1000

                async def delete(
                    thread_id: str = thread_id, delay_s: float = max(0.0, -offset_s)
                ) -> httpx.Response:
                    await asyncio.sleep(delay_s)
                    return await deleter.delete(
                        f"/api/threads/{thread_id}", headers=srv.headers("alice")
                    )

                async def start(
                    thread_id: str = thread_id, delay_s: float = max(0.0, offset_s)
                ) -> tuple[int, list[dict[str, Any]]]:
                    await asyncio.sleep(delay_s)
                    body = {"message": "chunks=20 delay_ms=10", "agent": "load"}
                    return await sse_run(starter, srv, "alice", {**body, "thread_id": thread_id})

                async def claim(
                    deleting: asyncio.Task[httpx.Response], thread_id: str = thread_id
                ) -> tuple[int, list[dict[str, Any]]]:
                    await deleting
                    body = {"message": "chunks=1", "agent": "load", "thread_id": thread_id}
                    return await sse_run(bob, srv, "bob", body)

                deleting = asyncio.create_task(delete())
                (a_status, a_events), (b_status, b_events) = await asyncio.gather(
                    start(), claim(deleting)
                )
                deleted = (await deleting).json()
                assert deleted == {"ok": True, "thread_id": thread_id, "deleted": True}

                url = f"/api/threads/{thread_id}/messages"
                bobs = await bob.get(url, headers=srv.headers("bob"))
                alices = await bob.get(url, headers=srv.headers("alice"))
                alice_runs = {e["run_id"] for e in seed + a_events}
                if bobs.status_code == 200:  # Bob owns the id now: nothing of Alice's in it
                    held = bobs.json()["messages"]
                    assert b_status == 200 and {m["run_id"] for m in held} == {
                        b_events[0]["run_id"]
                    }, (i, held)
                    assert not alice_runs & {m["run_id"] for m in held}, (i, held)
                    assert alices.status_code == 404
                if a_status != 200:
                    assert a_status == 404, a_status
                    outcomes["alice refused"] += 1
                    continue
                check_run_invariants(a_events)
                end = a_events[-1]["data"]
                if end["status"] == "cancelled":
                    assert end["error"] == {
                        "code": "cancelled",
                        "message": "the thread was deleted",
                    }
                    outcomes["alice cancelled"] += 1
                    continue
                # Completed: only as the first run of a thread of her own, made after the
                # delete (whoever names a free id first owns it); Bob was refused.
                assert end["status"] == "completed", (i, end)
                assert b_status == 404 and bobs.status_code == 404, (i, b_status)
                held = alices.json()["messages"]
                assert [m["run_id"] for m in held] == [a_events[0]["run_id"]] * 2, (i, held)
                outcomes["alice ran in a new thread"] += 1
        finally:
            for client in clients:
                await client.aclose()
        log = srv.log()
        assert "Traceback" not in log
        # How many of the cancels were of a run whose first record the store refused.
        outcomes["of which refused by the store"] = log.count("was deleted; cancelled")
    record_figures(f"thread_delete_race_{db_url.split(':', 1)[0]}", {"tries": tries, **outcomes})


async def test_runs_started_just_before_a_kill_answer_server_restart(tmp_path: Path) -> None:
    """``kill -9`` right as the ``user_message`` of 5 new runs arrives: after a restart on
    the same database, every run the client saw answers failed / server_restart."""
    db_url = f"sqlite:///{tmp_path}/chat.db"
    rounds = 3
    seen: list[list[str]] = []
    statuses: list[dict[str, Any]] = []
    for round_ in range(rounds + 1):
        with spawn_server(tmp_path, CHAT_DB_URL=db_url) as srv:
            if seen:
                for run_id in seen[-1]:
                    resp = await api(srv, "GET", f"/api/chat/agents/{run_id}/status")
                    statuses.append({"run_id": run_id, "http": resp.status_code, **resp.json()})
            if round_ == rounds:
                break
            async with ws_client(srv, "alice") as client:
                for i in range(5):
                    await client.send(
                        type="user_message", agent="load", content="chunks=500 delay_ms=20", id=i
                    )
                run_ids: list[str] = []
                while len(run_ids) < 5:
                    message = await client.recv()
                    if message["type"] == "user_message":
                        run_ids.append(message["run_id"])
                assert srv.proc is not None
                os.kill(srv.proc.pid, signal.SIGKILL)
                srv.proc.wait(timeout=10)
                seen.append(run_ids)
    wrong = [
        s
        for s in statuses
        if (s.get("status"), s.get("error_code")) != ("failed", "server_restart")
    ]
    record_figures(
        "crash_after_start",
        {"runs_seen": len(statuses), "not_failed_server_restart": len(wrong)},
    )
    assert not wrong, wrong


def first_record(db: Path, run_id: str) -> tuple[Any, ...] | None:
    """The run's status, its thread's owner and its user message (None if not stored),
    read by a connection of this process (the gateway's is another process's)."""
    conn = sqlite3.connect(db, timeout=5)
    try:
        row: tuple[Any, ...] | None = conn.execute(
            "SELECT r.status, t.owner, m.content FROM runs r JOIN threads t ON t.id = r.thread_id "
            "LEFT JOIN messages m ON m.run_id = r.id AND m.role = 'user' WHERE r.id = ?",
            (run_id,),
        ).fetchone()
        return row
    finally:
        conn.close()


async def test_a_runs_first_record_is_in_the_database_when_its_first_event_arrives(
    tmp_path: Path,
) -> None:
    """Runs one at a time, on new threads and on one named thread: as each run's first
    event arrives, its run and thread are in the database file, and the message of a
    run on a new thread.  Then the file
    is write-locked by another process's transaction: the gateway's first record cannot
    be committed at once, so the run's first event waits for the lock, and the record is
    there when it arrives."""
    db = tmp_path / "chat.db"
    with spawn_server(
        tmp_path, CHAT_DB_URL=f"sqlite:///{db}", CHAT_RATE_LIMIT_PER_MINUTE="1000"
    ) as srv:
        async with ws_client(srv, "alice") as client:
            ttfe: list[float] = []
            thread_id = None
            for i in range(40):
                named = {"thread_id": thread_id} if i >= 20 and thread_id else {}
                sent = time.perf_counter()
                await client.send(
                    type="user_message", agent="load", content=f"chunks=1 #{i}", **named
                )
                first = await client.recv()
                ttfe.append((time.perf_counter() - sent) * 1000)
                assert first["type"] == "user_message", first
                row = first_record(db, first["run_id"])
                # Its status may have moved on since (the writer goes on behind the stream).
                # A run of a named thread is queued behind the thread's runs: its message
                # joins the thread when it begins.
                message = None if named else f"chunks=1 #{i}"
                assert row is not None and row[1] == "alice", (i, row)
                assert named or row[2] == message, (i, row)
                rest = await client.recv_until("agent_completed", run_id=first["run_id"])
                check_run_invariants([first, *rest])
                thread_id = first["thread_id"]

            locker = sqlite3.connect(db, timeout=5, isolation_level=None)
            try:
                locker.execute("BEGIN IMMEDIATE")  # the write lock, held
                sent = time.perf_counter()
                await client.send(type="user_message", agent="load", content="chunks=1 locked")
                with pytest.raises(TimeoutError):
                    await client.recv(timeout=0.5)
            finally:
                locker.execute("ROLLBACK")
                locker.close()
            first = await client.recv()
            waited_ms = (time.perf_counter() - sent) * 1000
            assert first["type"] == "user_message", (first, srv.log()[-3000:])
            row = first_record(db, first["run_id"])
            assert row is not None and row[1:] == ("alice", "chunks=1 locked"), row
            check_run_invariants([first, *await client.recv_until("agent_completed")])
    ttfe.sort()
    record_figures(
        "first_record_before_first_event",
        {
            "runs": len(ttfe),
            "first_event_ms_p50": round(ttfe[len(ttfe) // 2], 3),
            "first_event_ms_max": round(ttfe[-1], 3),
            "locked_for_ms": 500,
            "first_event_after_lock_ms": round(waited_ms, 1),
        },
    )


def file_bytes(path: Path) -> int:
    return path.stat().st_size


async def test_commits_on_the_event_loops_thread_leave_the_wal_checkpointed(
    tmp_path: Path,
) -> None:
    """``write_now`` commits never checkpoint (a checkpoint syncs the file): the store's
    thread does, every ``CHECKPOINT_EVERY`` of them, so the WAL stays as small as
    SQLite's own checkpoints would keep it, however many runs start that way."""
    from server.store.sql import CHECKPOINT_EVERY

    path = tmp_path / "chat.db"
    store = open_store(f"sqlite:///{path}")
    await store.open()
    wal = Path(f"{path}-wal")

    async def commit(i: int) -> None:
        now = time.time()
        steps = store.thread_steps(ThreadRow(f"t_{i}", "alice", "x", now, now))
        steps += store.message_steps(
            MessageRow(f"m_{i}", f"t_{i}", "user", "x" * 200, f"r_{i}", False, now), "alice"
        )
        steps += store.run_steps(run_row(f"r_{i}", f"t_{i}", "alice", "queued", 0), first=True)
        if store.write_now(steps) is None:
            # The thread is checkpointing, or the commit after its checkpoint (which
            # starts the WAL over and syncs it) is due: the thread's, as Persistence does.
            on_thread.append(i)
            await store.write(steps)

    on_thread: list[int] = []
    try:
        for i in range(CHECKPOINT_EVERY - 1):
            await commit(i)
        before = file_bytes(wal)  # no checkpoint yet
        for i in range(CHECKPOINT_EVERY - 1, 6 * CHECKPOINT_EVERY):
            await commit(i)
        after = file_bytes(wal)
        assert len(await store.list_threads("alice", 10_000, None)) == 6 * CHECKPOINT_EVERY
    finally:
        await store.close()
    # The loop's commits are the rule; one after each checkpoint (and those that came
    # while it ran) went to the thread.
    assert 5 <= len(on_thread) < 3 * 6, on_thread
    record_figures(
        "wal_after_commits_now",
        {"commits": 6 * CHECKPOINT_EVERY, "wal_bytes_first": before, "wal_bytes_after": after},
    )
    # Never checkpointed, it would have grown six times.
    assert after < 2 * before, (before, after)


async def test_the_commit_that_starts_the_wal_over_is_the_store_threads(tmp_path: Path) -> None:
    """After a checkpoint that copied the whole WAL, the next commit starts the WAL over
    and syncs it to disk: that one is left to the store's thread, not the event loop's,
    even once the checkpoint is long done."""
    from server.store.sql import CHECKPOINT_EVERY

    store = open_store(f"sqlite:///{tmp_path / 'chat.db'}")
    await store.open()

    def steps(i: int) -> list[Any]:
        now = time.time()
        return store.thread_steps(ThreadRow(f"t_{i}", "alice", "x", now, now))

    try:
        for i in range(CHECKPOINT_EVERY):
            assert store.write_now(steps(i)) is not None
        await asyncio.sleep(0.5)  # the checkpoint, on the thread, is done
        assert not store.can_write_now() and store.write_now(steps(-1)) is None
        await store.write(steps(CHECKPOINT_EVERY))  # on the thread: the WAL starts over
        assert store.can_write_now() and store.write_now(steps(-2)) is not None
    finally:
        await store.close()

"""Every run is bounded by settings: its answer, what it keeps, what it stores; and
whatever the store or memory does, it ends with ``agent_completed``.

Against real gateways on loopback (a ``python -m server`` process for the memory
figures, which are written to ``var/figures/run_bounds.json`` and never asserted as
times).
"""

from __future__ import annotations

import asyncio
import sqlite3
import tracemalloc
from pathlib import Path
from typing import Any

import httpx
import pytest

import bridge.bridge
from agents.supervisor import APOLOGY
from bridge.bridge import RunBridge
from bridge.broker import RunRecord
from bridge.errors import AnswerTooLarge
from bridge.memory import InMemoryBroker
from server.persistence import Persistence
from server.settings import Settings
from server.store.sql import SqlStore
from tests.support import (
    check_run_invariants,
    http_client,
    parse_sse,
    run_server,
    spawn_server,
    wait_for,
    ws_client,
)
from tests.test_faults import record_figures

KiB = 1024
MiB = 1024 * KiB
APOLOGY_BYTES = len("\n\n" + "".join(APOLOGY))


def db_bytes(path: Path) -> int:
    """The SQLite database's size on disk: the file and its write-ahead log."""
    wal = path.with_name(path.name + "-wal")
    return sum(p.stat().st_size for p in (path, wal) if p.exists())


async def stream(srv: Any, body: dict[str, Any], user: str = "alice") -> list[dict[str, Any]]:
    """``POST /api/chat/stream`` read to its end; the run's events."""
    async with httpx.AsyncClient(base_url=srv.http, timeout=120) as client:
        response = await client.post("/api/chat/stream", json=body, headers=srv.headers(user))
        assert response.status_code == 200, response.text
    messages = parse_sse(response.text)
    assert messages[0]["event"] == "stream_start" and messages[-1]["event"] == "stream_end"
    return [m["data"] for m in messages[1:-1]]


async def test_a_huge_load_answer_ends_answer_too_large_with_memory_and_store_bounded(
    tmp_path: Path,
) -> None:
    # The finding: 29 bytes asking for a 256 MiB answer took RSS from 54 MB to 1,164 MB
    # and the database up by 514 MiB.  With the default bound (1 MiB), 16 chunks of
    # 64 KiB fit; the 17th ends the run.
    db = tmp_path / "chat.db"
    with spawn_server(tmp_path, CHAT_DB_URL=f"sqlite:///{db}") as srv:
        assert srv.settings.max_answer_bytes == 1 * MiB
        async with http_client(srv) as http:  # the database exists before the run
            assert (await http.get("/api/threads", headers=srv.headers())).status_code == 200
        rss_before = srv.rss_kib()
        db_before = db_bytes(db)
        message = "chunks=4096 chunk_chars=65536 thinking=0"
        events = await stream(srv, {"agent": "load", "message": message})
        check_run_invariants(events)
        completed = events[-1]["data"]
        assert completed["status"] == "failed", completed
        assert completed["error"]["code"] == "answer_too_large", completed
        chunks = [e["data"]["text"] for e in events if e["type"] == "response_chunk"]
        agent_chunks = [c for c in chunks if set(c) <= set("abcdefghijklmnopqrstuvwxyz")]
        assert len(agent_chunks) == 16 and all(len(c) == 65536 for c in agent_chunks)
        content = events[-2]["data"]["content"]
        assert content == "".join(chunks) and content.endswith(APOLOGY[-1])
        assert len(content.encode()) <= srv.settings.max_answer_bytes + APOLOGY_BYTES
        assert events[-2]["data"]["stored"] is True and events[-2]["data"]["fallback"] is True

        run_id, thread_id = events[0]["run_id"], events[0]["thread_id"]
        async with http_client(srv) as http:
            status = (
                await http.get(f"/api/chat/agents/{run_id}/status", headers=srv.headers())
            ).json()
            stored = (
                await http.get(f"/api/threads/{thread_id}/messages", headers=srv.headers())
            ).json()
        assert status["status"] == "failed" and status["error_code"] == "answer_too_large"
        answer = [m for m in stored["messages"] if m["role"] == "assistant"]
        assert [m["content"] for m in answer] == [content]
        peak_kib = srv.peak_rss_kib()
        await asyncio.sleep(1)
        rss_after = srv.rss_kib()
        db_after = db_bytes(db)
    figures = {
        "message": message,
        "max_answer_bytes": 1 * MiB,
        "answer_bytes": len(content.encode()),
        "agent_chunks_sent": len(agent_chunks),
        "rss_before_kib": rss_before,
        "peak_rss_kib": peak_kib,
        "rss_after_kib": rss_after,
        "db_and_wal_before_bytes": db_before,
        "db_and_wal_after_bytes": db_after,
    }
    record_figures("run_bounds", figures)
    # Bounded by the answer's bound (1 MiB, held a few times over: the buffer, the
    # joined text, the encoded events, the row), not by what was asked (256 MiB).
    assert peak_kib - rss_before < 64 * KiB, figures
    assert db_after - db_before < 16 * MiB, figures


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_every_agent_is_held_to_the_answer_bound_with_its_invariants(
    user: str, transport: str
) -> None:
    with run_server(max_answer_bytes=100) as srv:
        # The demo agent's reply is longer than 100 bytes; the load agent's 3 chunks of
        # 30 fit, the 4th does not.
        for agent, message, fits in (
            ("demo", "hello", None),
            ("load", "chunks=5 chunk_chars=30", "a" * 30 + "b" * 30 + "c" * 30),
        ):
            if transport == "ws":
                async with ws_client(srv, user) as client:
                    events = await client.run(message, agent=agent)
            else:
                events = await stream(srv, {"agent": agent, "message": message}, user)
            check_run_invariants(events)
            assert events[-1]["data"]["status"] == "failed"
            assert events[-1]["data"]["error"]["code"] == "answer_too_large"
            assert "100 bytes" in events[-1]["data"]["error"]["message"]
            content = events[-2]["data"]["content"]
            answer = content.removesuffix("".join(APOLOGY)).rstrip("\n")
            assert 0 < len(answer.encode()) <= 100
            assert content.endswith("".join(APOLOGY))
            if fits is not None:
                assert answer == fits
            status = await wait_for_status(srv, user, events[0]["run_id"])
            assert status == ("failed", "answer_too_large")


async def wait_for_status(srv: Any, user: str, run_id: str) -> tuple[str, str | None]:
    """The run's status from the status route once it is terminal."""
    body: dict[str, Any] = {}

    async def ended() -> bool:
        nonlocal body
        async with http_client(srv) as http:
            response = await http.get(
                f"/api/chat/agents/{run_id}/status", headers=srv.headers(user)
            )
        body = response.json()
        return body["status"] in ("completed", "failed", "cancelled")

    await wait_for(ended, timeout=15)
    return body["status"], body["error_code"]


async def test_the_answer_bound_can_be_set_and_the_load_agent_turned_off(user: str) -> None:
    settings = Settings.from_env({"CHAT_MAX_ANSWER_BYTES": "2048", "CHAT_LOAD_AGENT": "off"})
    assert settings.max_answer_bytes == 2048 and settings.load_agent == "off"
    for bad in ({"CHAT_MAX_ANSWER_BYTES": "0"}, {"CHAT_LOAD_AGENT": "maybe"}):
        with pytest.raises(ValueError, match="CHAT_"):
            Settings.from_env(bad)
    with pytest.raises(ValueError, match="at most"):
        Settings.from_env({"CHAT_MAX_ANSWER_BYTES": str(2**40)})
    with run_server(load_agent="off") as srv:
        async with ws_client(srv, user) as client:
            await client.send(type="user_message", agent="load", content="chunks=1", id="x")
            error = await client.recv()
            assert error["type"] == "error" and error["data"]["code"] == "bad_message"
            assert "unknown agent 'load'" in error["data"]["message"]
            events = await client.run("What is 12 * 7?")  # the demo agent still answers
            assert events[-1]["data"]["status"] == "completed"
        async with http_client(srv) as http:
            response = await http.post(
                "/api/chat/stream",
                json={"agent": "load", "message": "chunks=1"},
                headers=srv.headers(user),
            )
        assert response.status_code == 400, response.text


async def test_load_agent_parameters_past_their_bounds_are_refused(user: str) -> None:
    with run_server() as srv:
        async with ws_client(srv, user) as client:
            for message, key in (
                ("chunks=10000000", "chunks"),
                ("thinking=100000", "thinking"),
                ("tools=10000", "tools"),
                ("chunk_chars=65537", "chunk_chars"),
            ):
                events = await client.run(message, agent="load")
                check_run_invariants(events)
                error = events[-1]["data"]["error"]
                assert error["code"] == "bad_input" and f"{key} must be in" in error["message"]


# Whatever the store or memory says, the run ends -------------------------------------


FAULTS = ("blob_too_big", "answer_memory_error", "encode_memory_error", "status_memory_error")


@pytest.mark.parametrize("fault", FAULTS)
async def test_a_store_or_memory_failure_still_ends_the_run(
    fault: str, user: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raised: list[str] = []
    if fault == "blob_too_big":  # what SQLite said of the 1 GiB answer
        write = SqlStore.write

        async def refusing_write(self: SqlStore, steps: list[Any]) -> list[int]:
            if any("assistant" in params for _, params in steps):
                raised.append(fault)
                raise sqlite3.DataError("string or blob too big")
            return await write(self, steps)

        write_now = SqlStore.write_now

        def refusing_write_now(self: SqlStore, steps: list[Any]) -> list[int] | None:
            if any("assistant" in params for _, params in steps):
                raised.append(fault)
                raise sqlite3.DataError("string or blob too big")
            return write_now(self, steps)

        monkeypatch.setattr(SqlStore, "write", refusing_write)
        monkeypatch.setattr(SqlStore, "write_now", refusing_write_now)
    elif fault == "answer_memory_error":

        async def answer(self: Persistence, *args: Any) -> bool:
            raised.append(fault)
            raise MemoryError

        monkeypatch.setattr(Persistence, "answer", answer)
    elif fault == "encode_memory_error":
        make_event = bridge.bridge.make_event

        def failing_make_event(type: Any, data: Any, **kw: Any) -> Any:
            if type == "response_complete" and not raised:
                raised.append(fault)
                raise MemoryError
            return make_event(type, data, **kw)

        monkeypatch.setattr(bridge.bridge, "make_event", failing_make_event)
    else:
        run_changed = Persistence.run_changed

        async def failing_run_changed(self: Persistence, run: RunRecord) -> None:
            if run.status == "completed" and not raised:
                raised.append(fault)
                raise MemoryError
            await run_changed(self, run)

        monkeypatch.setattr(Persistence, "run_changed", failing_run_changed)

    # A short resume window, so that the status route soon answers from the database.
    with run_server(db_url=f"sqlite:///{tmp_path}/chat.db", resume_window_s=0.3) as srv:
        async with ws_client(srv, user) as client:
            events = await client.run("chunks=3", agent="load")
            check_run_invariants(events)
            assert raised and set(raised) == {fault}
            completed = events[-1]["data"]
            if fault == "encode_memory_error":
                # The ending could not be made as usual: the run ends failed, internal.
                assert completed["status"] == "failed", completed
                assert completed["error"]["code"] == "internal"
                assert "MemoryError" in completed["error"]["message"]
            else:
                assert completed["status"] == "completed", completed
            stored = events[-2]["data"]["stored"]
            assert stored is (fault in ("encode_memory_error", "status_memory_error"))
            assert events[-2]["data"]["content"] == "a" * 8 + "b" * 8 + "c" * 8
            # The stored run is not left running (read once the broker forgot the run).
            await asyncio.sleep(0.6)
            status = await wait_for_status(srv, user, events[0]["run_id"])
            assert status[0] == completed["status"]
            # And the gateway goes on serving runs.
            again = await client.run("What is 12 * 7?")
            assert again[-1]["data"]["status"] == "completed"
            assert "84" in again[-2]["data"]["content"]


# The bridge on its own --------------------------------------------------------------


class _Controller:
    async def apply(self, action: str) -> str:
        return "running"

    def watchers_changed(self, count: int) -> None:
        return None


async def started_bridge(max_answer_bytes: int | None, log_bytes: int = 64 * KiB) -> RunBridge:
    """A bridge of a run registered with an in-memory broker."""
    broker = InMemoryBroker(run_log_max_bytes=log_bytes, resume_window_s=60)
    await broker.create_run(RunRecord("r_b", "t_b", "u", "x", "running", 0.0, 0.0), _Controller())
    return RunBridge(broker, "r_b", "t_b", max_answer_bytes=max_answer_bytes)


async def test_the_bridge_refuses_the_chunk_past_the_bound_and_every_emit_after() -> None:
    bridge_ = await started_bridge(max_answer_bytes=10)
    await bridge_.chunk("é" * 4)  # 8 bytes in UTF-8, 4 characters
    with pytest.raises(AnswerTooLarge):
        await bridge_.chunk("abc")  # 11 bytes: not published
    assert bridge_.content == "é" * 4 and bridge_.chunk_count == 1 and bridge_.seq == 1
    assert bridge_.answer_bytes == 8
    assert isinstance(bridge_.agent_error, AnswerTooLarge)
    assert isinstance(bridge_.limit_error, AnswerTooLarge)
    # The supervisor's own chunks (the apology) are not the agent's: they still go out.
    await bridge_.emit("response_chunk", {"text": "sorry"})
    assert bridge_.content == "é" * 4 + "sorry" and bridge_.chunk_count == 2


async def test_the_answer_costs_its_bytes_not_a_record_per_chunk() -> None:
    # 200,000 chunks of 2 characters: kept as a list, each chunk would cost a string
    # object and a slot (about 60 bytes, 12 MB in all); as one buffer, the 400 KB answer.
    chunks = 200_000
    bridge_ = await started_bridge(max_answer_bytes=None, log_bytes=64 * KiB)
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for i in range(chunks):
            await bridge_.chunk("ab" if i % 2 else "cd")
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert bridge_.chunk_count == chunks and len(bridge_.content) == 2 * chunks
    assert bridge_.content.startswith("cdabcd")
    held = after - before
    print(f"\nbridge memory for {chunks} chunks of 2 characters: {held} bytes")
    assert held < 3 * MiB, held

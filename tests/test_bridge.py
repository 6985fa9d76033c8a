"""The bridge and the supervisor, in process: no socket, a real broker and real agents."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agents.base import AgentRegistry, RunContext
from agents.demo import DemoAgent
from agents.errors import LifecycleConflict
from agents.load import LoadAgent
from agents.supervisor import Supervisor, SupervisorConfig
from agents.tools import builtin_tools
from bridge.bridge import EventAdapter, RunBridge
from bridge.errors import BridgeNotAttached, RunClosed, RunGone
from bridge.events import Event
from bridge.memory import InMemoryBroker
from tests.support import check_run_invariants


def make_supervisor(**config: Any) -> tuple[Supervisor, InMemoryBroker]:
    broker = InMemoryBroker(run_log_max_bytes=1 << 20, resume_window_s=60)
    agents = AgentRegistry([DemoAgent(), LoadAgent(), *config.pop("agents", [])], "demo")
    return Supervisor(broker, agents, builtin_tools(), SupervisorConfig(**config)), broker


async def collect(broker: InMemoryBroker, run_id: str, timeout: float = 10) -> list[dict[str, Any]]:
    """Read a run from seq 0 until agent_completed, as the wire would carry it."""
    woken = asyncio.Event()
    watch = await broker.watch(run_id, 0, woken.set)
    got: list[Event] = []
    async with asyncio.timeout(timeout):
        while not watch.finished:
            woken.clear()
            batch = await watch.read(1000)
            got.extend(batch)
            if not batch:
                await woken.wait()
    watch.close()
    return [{"type": e.type, "run_id": e.run_id, "seq": e.seq, "data": e.data} for e in got]


async def test_unbound_adapter_raises() -> None:
    adapter = EventAdapter()
    with pytest.raises(BridgeNotAttached):
        await adapter.thinking("hello")
    with pytest.raises(BridgeNotAttached):
        await adapter.agent_completed("completed", 1.0)


async def test_bridge_numbers_events_and_refuses_anything_after_the_end() -> None:
    broker = InMemoryBroker(run_log_max_bytes=1 << 20, resume_window_s=60)
    sup, _ = make_supervisor()
    record = await sup.start_run(owner="u", content="chunks=1", agent="load")
    events = await collect(sup.broker, record.run_id)  # type: ignore[arg-type]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    del broker
    bridge = RunBridge(sup.broker, "r_x", "t_x")
    with pytest.raises(ValueError, match="never announced"):
        bridge.state.check("tool_completed", {"call_id": "c1", "tool": "x"})
    bridge.state.completed = True
    with pytest.raises(RunClosed):
        await bridge.emit("agent_thinking", {"text": "late"})


async def test_demo_run_has_every_event_in_order() -> None:
    sup, broker = make_supervisor()
    record = await sup.start_run(owner="u", content="What is 12 * 7?", ref="c1")
    events = await collect(broker, record.run_id)
    types = [e["type"] for e in events]
    assert types[:5] == [
        "user_message",
        "agent_started",
        "agent_thinking",
        "tool_executing",
        "tool_completed",
    ]
    assert events[0]["data"]["ref"] == "c1"
    assert events[3]["data"] == {
        "call_id": "call_1",
        "tool": "calculator",
        "args": {"expression": "12 * 7"},
    }
    assert events[4]["data"]["result"] == 84 and events[4]["data"]["ok"] is True
    assert "84" in events[-2]["data"]["content"]
    assert events[-1]["data"]["status"] == "completed"
    check_run_invariants(events)


async def test_failure_streams_an_apology_and_ends_failed() -> None:
    sup, broker = make_supervisor()
    record = await sup.start_run(owner="u", content="chunks=2 fail=1", agent="load")
    events = await collect(broker, record.run_id)
    check_run_invariants(events)
    complete, completed = events[-2]["data"], events[-1]["data"]
    assert complete["fallback"] is True
    assert complete["content"].startswith("aaaaaaaabbbbbbbb")
    assert "Sorry" in complete["content"]
    assert completed["status"] == "failed" and completed["error"]["code"] == "agent_error"
    assert (await broker.get_run(record.run_id)).status == "failed"  # type: ignore[union-attr]


async def test_bad_load_input_fails_with_bad_input() -> None:
    sup, broker = make_supervisor()
    record = await sup.start_run(owner="u", content="chunks=lots", agent="load")
    events = await collect(broker, record.run_id)
    check_run_invariants(events)
    assert events[-1]["data"]["error"]["code"] == "bad_input"
    assert "chunks must be an integer" in events[-1]["data"]["error"]["message"]


async def test_cancel_reaches_through_an_awaiting_tool() -> None:
    sup, broker = make_supervisor()
    record = await sup.start_run(owner="u", content="tools=1 tool_ms=60000", agent="load")
    while (await broker.get_run(record.run_id)).last_seq < 4:  # type: ignore[union-attr]
        await asyncio.sleep(0.005)
    assert await broker.command(record.run_id, "cancel") == "cancelled"
    events = await collect(broker, record.run_id, timeout=5)
    check_run_invariants(events)
    completed_tool = next(e for e in events if e["type"] == "tool_completed")["data"]
    assert completed_tool["ok"] is False and completed_tool["error"] == "cancelled"
    assert events[-1]["data"]["status"] == "cancelled"
    assert events[-1]["data"]["error"]["code"] == "cancelled"
    assert await broker.command(record.run_id, "cancel") == "cancelled"  # no-op
    with pytest.raises(LifecycleConflict):
        await broker.command(record.run_id, "start")


async def test_pause_holds_every_event_until_start() -> None:
    sup, broker = make_supervisor()
    record = await sup.start_run(owner="u", content="chunks=50 delay_ms=5", agent="load")
    while (await broker.get_run(record.run_id)).last_seq < 6:  # type: ignore[union-attr]
        await asyncio.sleep(0.002)
    assert await broker.command(record.run_id, "stop") == "paused"
    held = (await broker.get_run(record.run_id)).last_seq  # type: ignore[union-attr]
    await asyncio.sleep(0.2)
    assert (await broker.get_run(record.run_id)).last_seq == held  # type: ignore[union-attr]
    assert await broker.command(record.run_id, "stop") == "paused"  # no-op
    assert await broker.command(record.run_id, "start") == "running"
    events = await collect(broker, record.run_id)
    check_run_invariants(events)
    statuses = [e["data"]["status"] for e in events if e["type"] == "run_status"]
    assert statuses == ["paused", "running"]
    assert events[held - 1]["type"] == "run_status"
    assert len([e for e in events if e["type"] == "response_chunk"]) == 50


async def test_cancel_while_paused_ends_the_run() -> None:
    sup, broker = make_supervisor()
    record = await sup.start_run(owner="u", content="chunks=100 delay_ms=5", agent="load")
    while (await broker.get_run(record.run_id)).last_seq < 5:  # type: ignore[union-attr]
        await asyncio.sleep(0.002)
    await broker.command(record.run_id, "stop")
    await broker.command(record.run_id, "cancel")
    events = await collect(broker, record.run_id)
    check_run_invariants(events)
    assert events[-1]["data"]["status"] == "cancelled"


class StubbornAgent:
    """Catches its cancellation and tries to go on emitting: the bridge must refuse."""

    name = "stubborn"
    description = "test agent"

    def __init__(self) -> None:
        self.raised: list[BaseException] = []

    async def run(self, ctx: RunContext) -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            try:
                await ctx.emit.thinking("still here")
            except Exception as exc:
                self.raised.append(exc)
                raise


async def test_emitting_after_the_clients_are_gone_raises_run_gone() -> None:
    stubborn = StubbornAgent()
    sup, broker = make_supervisor(detach_grace_s=0.05, agents=[stubborn])
    record = await sup.start_run(owner="u", content="hi", agent="stubborn")
    woken = asyncio.Event()
    watch = await broker.watch(record.run_id, 0, woken.set)
    watch.close()  # the only client leaves and never comes back
    async with asyncio.timeout(5):
        while not (await broker.get_run(record.run_id)).ended:  # type: ignore[union-attr]
            await asyncio.sleep(0.01)
        while len(sup):
            await asyncio.sleep(0.01)
    assert len(stubborn.raised) == 1 and isinstance(stubborn.raised[0], RunGone)
    events = await collect(broker, record.run_id)
    check_run_invariants(events)
    assert events[-1]["data"]["status"] == "cancelled"
    assert events[-1]["data"]["error"]["code"] == "client_gone"
    assert "still here" not in str(events)


async def test_a_watched_run_is_not_cancelled_for_detach() -> None:
    sup, broker = make_supervisor(detach_grace_s=0.05)
    record = await sup.start_run(owner="u", content="chunks=10 delay_ms=20", agent="load")
    events = await collect(broker, record.run_id)
    assert events[-1]["data"]["status"] == "completed"


async def test_shutdown_cancels_runs_with_shutdown() -> None:
    sup, broker = make_supervisor()
    record = await sup.start_run(owner="u", content="tools=1 tool_ms=60000", agent="load")
    await asyncio.sleep(0.05)
    await sup.shutdown(grace_s=0.05)
    events = await collect(broker, record.run_id)
    check_run_invariants(events)
    assert events[-1]["data"]["error"]["code"] == "shutdown"
    assert (await broker.get_run(record.run_id)).status == "cancelled"  # type: ignore[union-attr]


async def test_threads_belong_to_their_owner() -> None:
    sup, broker = make_supervisor()
    first = await sup.start_run(owner="alice", content="chunks=1", agent="load")
    await collect(broker, first.run_id)
    again = await sup.start_run(
        owner="alice", content="chunks=1", agent="load", thread_id=first.thread_id
    )
    assert again.thread_id == first.thread_id
    await collect(broker, again.run_id)
    from bridge.errors import RunNotFound

    with pytest.raises(RunNotFound):
        await sup.start_run(owner="bob", content="hi", thread_id=first.thread_id)


class ThinkThenAnswer:
    """Thinks 28 times (so that a yield of the bridge falls inside a command), then waits."""

    name = "think"
    description = "test agent"

    def __init__(self) -> None:
        self.go = asyncio.Event()

    async def run(self, ctx: RunContext) -> None:
        for i in range(28):
            await ctx.emit.thinking(f"t{i}")
        await self.go.wait()
        await ctx.emit.chunk("hello")


async def test_concurrent_start_and_stop_keep_the_gate_and_the_status_together() -> None:
    agent = ThinkThenAnswer()
    sup, broker = make_supervisor(agents=[agent])
    record = await sup.start_run(owner="u", content="x", agent="think")
    while (await broker.get_run(record.run_id)).last_seq < 30:  # type: ignore[union-attr]
        await asyncio.sleep(0.005)
    assert await broker.command(record.run_id, "stop") == "paused"
    start, stop = await asyncio.gather(
        broker.command(record.run_id, "start"), broker.command(record.run_id, "stop")
    )
    assert (start, stop) == ("running", "paused")
    agent.go.set()
    await asyncio.sleep(0.1)
    held = (await broker.get_run(record.run_id)).last_seq  # type: ignore[union-attr]
    # Paused: nothing after the last run_status, whatever the agent does meanwhile.
    assert (await broker.get_run(record.run_id)).status == "paused"  # type: ignore[union-attr]
    await broker.command(record.run_id, "start")
    events = await collect(broker, record.run_id)
    check_run_invariants(events)
    assert events[held - 1]["type"] == "run_status"
    assert events[-1]["data"]["status"] == "completed"


class Chunks:
    name = "chunks"
    description = "test agent"

    async def run(self, ctx: RunContext) -> None:
        for i in range(29):
            await ctx.emit.chunk(f"c{i} ")


async def test_a_cancel_right_after_response_complete_does_not_repeat_it() -> None:
    sup, broker = make_supervisor(agents=[Chunks()])
    record = await sup.start_run(owner="u", content="x", agent="chunks")
    cancels: list[asyncio.Task[str]] = []

    def wake() -> None:  # cancel in the very tick response_complete is published
        events = broker._runs[record.run_id].log.read(0)
        if events[-1].type == "response_complete" and not cancels:
            cancels.append(asyncio.ensure_future(broker.command(record.run_id, "cancel")))

    watch = await broker.watch(record.run_id, 0, wake)
    events = await collect(broker, record.run_id)
    watch.close()
    assert cancels, "the cancel was not sent"
    assert [e["type"] for e in events].count("response_complete") == 1
    check_run_invariants(events)


def test_a_run_records_copy_has_every_field_as_dataclasses_replace_makes_it() -> None:
    """RunRecord.copy (cheaper than dataclasses.replace) must follow the record's fields."""
    import dataclasses

    from bridge.broker import RunRecord

    fields = dataclasses.fields(RunRecord)
    record = RunRecord("r_1", "t_1", "u", "load", "running", 1.0, 2.0, 7, "oops", {"first_seq": 3})
    assert all(getattr(record, f.name) != f.default for f in fields)  # none left default
    copy = record.copy()
    assert copy is not record and copy == dataclasses.replace(record)
    assert [getattr(copy, f.name) for f in fields] == [getattr(record, f.name) for f in fields]

"""Human in the loop (protocol 6.4): approvals of tool calls and questions to the user,
over a real gateway on loopback, on the in-memory broker and on Redis."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from agents.errors import LifecycleConflict
from agents.inputs import InputDesk, parse_response
from agents.lifecycle import Action, Lifecycle, RunStatus
from bridge.errors import InvariantBroken
from bridge.runstate import RunState
from tests import openai_stub as oa
from tests.openai_stub import OpenAIStub, run_stub
from tests.support import (
    Client,
    LiveServer,
    check_run_invariants,
    http_client,
    of_run,
    parse_sse,
    run_server,
    spawn_server,
    wait_for,
    ws_client,
)
from tests.test_faults import record_figures

ASKER = ("asker=tests.plugin_agents:Asker",)


@pytest.fixture(scope="module", params=["memory", "redis"])
def approving(request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    """A gateway whose calculator calls wait for approval, with the asking test agent."""
    overrides: dict[str, Any] = {"approval_tools": ("calculator",), "agents": ASKER}
    if request.param == "redis":
        overrides["broker_url"] = request.getfixturevalue("redis_url")
    with run_server(**overrides) as live:
        yield live


def of_type(events: list[dict[str, Any]], type: str) -> list[dict[str, Any]]:
    return [e["data"] for e in events if e["type"] == type]


def check_inputs(events: list[dict[str, Any]]) -> None:
    """The run's invariants, and 6.4's order: each request is announced after its
    call's ``tool_executing``, followed by ``run_status{waiting}`` unless the run was
    paused, and resolved exactly once before ``agent_completed``."""
    check_run_invariants(events)
    types = [e["type"] for e in events]
    requested = [e["data"]["request_id"] for e in events if e["type"] == "input_requested"]
    resolved = [e["data"]["request_id"] for e in events if e["type"] == "input_resolved"]
    assert sorted(requested) == sorted(resolved) and len(set(resolved)) == len(resolved)
    for i, event in enumerate(events):
        data = event["data"]
        if event["type"] == "input_requested" and data.get("call_id") is not None:
            call_id = event["data"]["call_id"]
            announced = [
                j
                for j, e in enumerate(events[:i])
                if e["type"] == "tool_executing" and e["data"]["call_id"] == call_id
            ]
            assert announced, (call_id, types)
    assert types.index("agent_completed") > max(
        (i for i, t in enumerate(types) if t == "input_resolved"), default=-1
    )


async def until_request(client: Client) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Events up to the run's ``run_status{waiting}``, and its ``input_requested``."""
    got = await client.recv_until("input_requested")
    got += await client.recv_until("run_status")
    assert got[-1]["data"]["status"] == "waiting", got[-1]
    return got, got[-2]


async def status_of(server: LiveServer, run_id: str, user: str) -> str:
    async with http_client(server, headers=server.headers(user)) as rest:
        reply = await rest.get(f"/api/chat/agents/{run_id}/status")
    assert reply.status_code == 200, reply.text
    status: str = reply.json()["status"]
    return status


async def test_an_approved_call_runs_with_the_edited_arguments(
    approving: LiveServer, user: str
) -> None:
    server = approving
    async with ws_client(server, user) as client:
        await client.send(type="user_message", content="What is 12 * 7?", agent="demo")
        got, request = await until_request(client)
        run_id = request["run_id"]
        data = request["data"]
        executing = of_type(got, "tool_executing")[0]
        assert data["kind"] == "tool_approval" and data["tool"] == "calculator"
        assert data["call_id"] == executing["call_id"]
        assert data["args"] == {"expression": "12 * 7"}
        assert data["expires_at"] > time.time() + 500  # the default timeout, 600 s
        assert await status_of(server, run_id, user) == "waiting"

        # Another user's answer, an unknown request, an answer of the wrong kind.
        async with ws_client(server, "mallory") as other:
            await other.send(
                type="respond", run_id=run_id, request_id=data["request_id"], approved=True, id=1
            )
            assert (await other.recv())["data"]["code"] == "not_found"
        await client.send(type="respond", run_id=run_id, request_id="in_nope", approved=True, id=2)
        assert (await client.recv())["data"]["code"] == "not_found"
        await client.send(type="respond", run_id=run_id, request_id=data["request_id"], answer="x")
        assert (await client.recv())["data"]["code"] == "bad_message"

        began = time.perf_counter()
        await client.send(
            type="respond",
            run_id=run_id,
            request_id=data["request_id"],
            approved=True,
            args={"expression": "6 * 7"},
            id="yes",
        )
        ack = await client.recv()
        ack_ms = (time.perf_counter() - began) * 1000
        assert ack["type"] == "ack" and ack["data"]["action"] == "respond", ack
        assert ack["data"]["status"] == "running" and ack["data"]["ref"] == "yes"
        rest_events = await client.recv_until("input_resolved")
        resolved_ms = (time.perf_counter() - began) * 1000
        rest_events += await client.recv_until("agent_completed")
        # A second answer: the request is resolved.
        await client.send(
            type="respond", run_id=run_id, request_id=data["request_id"], approved=False
        )
        assert (await client.recv())["data"]["code"] == "conflict"
    events = got + rest_events
    check_inputs(events)
    types = [e["type"] for e in events]
    at = types.index("input_resolved")
    assert types[at : at + 3] == ["input_resolved", "run_status", "tool_completed"]
    assert events[at + 1]["data"]["status"] == "running"
    (resolved,) = of_type(events, "input_resolved")
    assert resolved["approved"] is True and resolved["by"] == "user"
    assert resolved["args"] == {"expression": "6 * 7"}
    (done,) = of_type(events, "tool_completed")
    assert done["ok"] and done["result"] == 42
    assert "42" in events[-2]["data"]["content"]
    assert events[-1]["data"]["status"] == "completed"
    assert await status_of(server, run_id, user) == "completed"

    # The requests and their answers are the thread's history in the store.
    thread_id = events[0]["thread_id"]
    async with http_client(server, headers=server.headers(user)) as rest:
        rows = (await rest.get(f"/api/threads/{thread_id}/messages")).json()["messages"]
        metrics = (await rest.get("/metrics")).text
    roles = [row["role"] for row in rows]
    assert roles == ["user", "input_requested", "input_resolved", "assistant"], roles
    assert json.loads(rows[1]["content"])["request_id"] == data["request_id"]
    assert json.loads(rows[2]["content"])["args"] == {"expression": "6 * 7"}
    assert "chat_input_requests_total" in metrics or "chat_input_requests " in metrics
    assert 'chat_input_resolved_total{by="user"}' in metrics
    broker = "redis" if server.settings.broker_url else "memory"
    record_figures(
        f"approvals_answer_{broker}",
        {
            "respond_to_ack_ms": round(ack_ms, 2),
            "respond_to_input_resolved_ms": round(resolved_ms, 2),
        },
    )


async def test_a_denied_call_fails_with_the_reason_over_rest(
    approving: LiveServer, user: str
) -> None:
    server = approving
    async with ws_client(server, user) as client:
        await client.send(type="user_message", content="What is 2 + 2?", agent="demo")
        got, request = await until_request(client)
        run_id, request_id = request["run_id"], request["data"]["request_id"]
        async with http_client(server, headers=server.headers(user)) as rest:
            url = f"/api/chat/agents/{run_id}/respond"
            no = {"request_id": request_id, "approved": False, "reason": "not today"}
            other = await rest.post(url, json=no, headers=server.headers("mallory"))
            assert other.status_code == 404
            bad = await rest.post(url, json={"request_id": request_id})
            assert bad.status_code == 400
            reply = await rest.post(url, json=no)
            assert reply.status_code == 200, reply.text
            assert reply.json() == {
                "ok": True,
                "run_id": run_id,
                "request_id": request_id,
                "status": "running",
            }
            again = await rest.post(url, json=no)
            assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"
        events = got + await client.recv_until("agent_completed")
    check_inputs(events)
    (resolved,) = of_type(events, "input_resolved")
    assert resolved == {
        "request_id": request_id,
        "by": "user",
        "approved": False,
        "reason": "not today",
    }
    (done,) = of_type(events, "tool_completed")
    assert not done["ok"] and "denied" in done["error"] and "not today" in done["error"]
    assert events[-1]["data"]["status"] == "completed"


async def test_a_question_is_answered_over_sse(approving: LiveServer, user: str) -> None:
    server = approving
    async with (
        http_client(server, headers=server.headers(user)) as rest,
        rest.stream(
            "POST", "/api/chat/stream", json={"message": "choices", "agent": "asker"}
        ) as stream,
    ):
        text = ""
        answered = False
        async for piece in stream.aiter_text():
            text += piece
            if not answered and "event: run_status" in text:
                requests = [
                    m["data"] for m in parse_sse(text) if m.get("event") == "input_requested"
                ]
                (request,) = requests
                assert request["data"]["kind"] == "question"
                assert request["data"]["question"] == "Which colour?"
                assert request["data"]["choices"] == ["red", "blue"]
                assert await status_of(server, request["run_id"], user) == "waiting"
                reply = await rest.post(
                    f"/api/chat/agents/{request['run_id']}/respond",
                    json={"request_id": request["data"]["request_id"], "answer": "blue"},
                )
                assert reply.status_code == 200, reply.text
                answered = True
    messages = parse_sse(text)
    events = [m["data"] for m in messages if "id" in m]
    check_inputs(events)
    (resolved,) = of_type(events, "input_resolved")
    assert resolved["answer"] == "blue" and resolved["by"] == "user"
    assert "You said 'blue'" in events[-2]["data"]["content"]
    assert messages[-1]["event"] == "stream_end"


async def test_an_agent_asks_for_approval_and_a_question_in_one_run(
    approving: LiveServer, user: str
) -> None:
    server = approving
    async with ws_client(server, user) as client:
        await client.send(type="user_message", content="approve", agent="asker")
        got, question = await until_request(client)
        await client.send(
            type="respond",
            run_id=question["run_id"],
            request_id=question["data"]["request_id"],
            answer="red",
        )
        more, approval = await until_request(client)
        assert approval["data"]["kind"] == "tool_approval"
        assert approval["data"]["tool"] == "launch" and approval["data"]["call_id"] is None
        await client.send(
            type="respond",
            run_id=approval["run_id"],
            request_id=approval["data"]["request_id"],
            approved=True,
        )
        events = got + more + await client.recv_until("agent_completed")
    events = of_run(events, question["run_id"])
    check_inputs(events)
    assert events[-2]["data"]["content"] == "You said 'red'. Launch approved (user)."


@pytest.fixture(scope="module", params=["memory", "redis"])
def hurried(request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    """Requests expire after half a second; clients are given up after a second."""
    overrides: dict[str, Any] = {
        "approval_tools": ("*",),
        "agents": ASKER,
        "input_timeout_s": 0.5,
        "detach_grace_s": 0.3,
    }
    if request.param == "redis":
        overrides["broker_url"] = request.getfixturevalue("redis_url")
    with run_server(**overrides) as live:
        yield live


async def test_an_unanswered_request_times_out(hurried: LiveServer, user: str) -> None:
    server = hurried
    async with ws_client(server, user) as client:
        began = time.monotonic()
        events = await client.run("What is 3 * 3?", agent="demo")
        took = time.monotonic() - began
        question = await client.run("plain", agent="asker")
    for run in (events, question):
        check_inputs(run)
        assert run[-1]["data"]["status"] == "completed"
    (resolved,) = of_type(events, "input_resolved")
    assert resolved["by"] == "timeout" and resolved["approved"] is False
    (done,) = of_type(events, "tool_completed")
    assert not done["ok"] and "denied" in done["error"] and "in time" in done["error"]
    (answered,) = of_type(question, "input_resolved")
    assert answered == {"request_id": answered["request_id"], "by": "timeout", "answer": ""}
    assert "You said ''" in question[-2]["data"]["content"]
    record_figures("approvals_timeout", {"input_timeout_s": 0.5, "run_s": round(took, 3)})


async def test_cancel_while_waiting_resolves_the_request(approving: LiveServer, user: str) -> None:
    server = approving
    async with ws_client(server, user) as client:
        await client.send(type="user_message", content="What is 5 * 5?", agent="demo")
        got, request = await until_request(client)
        run_id = request["run_id"]
        await client.send(type="cancel", run_id=run_id, id="c")
        ack = await client.recv()
        assert ack["data"]["status"] == "cancelled"
        events = got + await client.recv_until("agent_completed")
        await client.send(
            type="respond", run_id=run_id, request_id=request["data"]["request_id"], approved=True
        )
        late = await client.recv()
    assert late["type"] == "error" and late["data"]["code"] == "conflict", late
    check_inputs(events)
    types = [e["type"] for e in events]
    assert types[-4:] == [
        "input_resolved",
        "tool_completed",
        "response_complete",
        "agent_completed",
    ]
    resolved = events[-4]["data"]
    assert resolved["by"] == "cancel" and resolved["approved"] is False
    assert events[-3]["data"]["error"] == "cancelled"
    assert events[-1]["data"]["status"] == "cancelled"


async def test_stop_while_waiting_keeps_the_request_open(approving: LiveServer, user: str) -> None:
    server = approving
    async with ws_client(server, user) as client:
        # Stopped and started again unanswered: waiting again.
        await client.send(type="user_message", content="What is 8 * 8?", agent="demo")
        got, first = await until_request(client)
        run_id = first["run_id"]
        await client.send(type="stop", run_id=run_id)
        assert (await client.recv())["data"]["status"] == "paused"
        got += await client.recv_until("run_status")
        assert got[-1]["data"]["status"] == "paused"
        assert await status_of(server, run_id, user) == "paused"
        await client.send(type="start", run_id=run_id)
        assert (await client.recv())["data"]["status"] == "waiting"
        got += await client.recv_until("run_status")
        assert got[-1]["data"]["status"] == "waiting"
        assert await status_of(server, run_id, user) == "waiting"

        # Stopped, answered while paused: nothing until start, then it runs.
        await client.send(type="stop", run_id=run_id)
        assert (await client.recv())["data"]["status"] == "paused"
        got += await client.recv_until("run_status")
        await client.send(
            type="respond",
            run_id=run_id,
            request_id=first["data"]["request_id"],
            approved=True,
            id="while-paused",
        )
        ack = await client.recv()
        assert ack["type"] == "ack" and ack["data"]["status"] == "paused", ack
        with pytest.raises(TimeoutError):
            await client.recv(timeout=0.5)  # the answer takes effect on start
        await client.send(type="start", run_id=run_id)
        assert (await client.recv())["data"]["status"] == "running"
        events = got + await client.recv_until("agent_completed")
    check_inputs(events)
    statuses = [e["data"]["status"] for e in events if e["type"] == "run_status"]
    assert statuses == ["waiting", "paused", "waiting", "paused", "running"]
    types = [e["type"] for e in events]
    last_status = max(i for i, t in enumerate(types) if t == "run_status")
    assert types[last_status + 1] == "input_resolved"
    assert events[-1]["data"]["status"] == "completed"
    assert "64" in events[-2]["data"]["content"]


async def test_a_client_that_leaves_while_waiting_resumes_the_open_request(
    hurried: LiveServer, user: str
) -> None:
    """The detach grace (0.3 s) is shorter than the request's timeout (0.5 s): the run
    is not given up while it waits, and a resuming client sees the open request."""
    server = hurried
    async with ws_client(server, user) as client:
        await client.send(type="user_message", content="plain", agent="asker")
        _, request = await until_request(client)
    run_id = request["run_id"]
    await asyncio.sleep(0.35)  # past the detach grace
    assert await status_of(server, run_id, user) == "waiting"
    async with ws_client(server, user) as again:
        await again.send(type="resume", run_id=run_id, after_seq=0, id="back")
        ack = await again.recv()
        assert ack["data"]["status"] == "waiting"
        replay, seen = await until_request(again)
        assert seen["data"] == request["data"]
        await again.send(
            type="respond", run_id=run_id, request_id=request["data"]["request_id"], answer="hi"
        )
        assert (await again.recv())["type"] == "ack"
        events = replay + await again.recv_until("agent_completed")
    events = of_run(events, run_id)
    check_inputs(events)
    assert events[-1]["data"]["status"] == "completed"
    assert "You said 'hi'" in events[-2]["data"]["content"]


async def test_a_waiting_run_is_given_up_after_its_request_expires(
    hurried: LiveServer, user: str
) -> None:
    server = hurried
    async with ws_client(server, user) as client:
        await client.send(type="user_message", content="What is 1 + 1?", agent="demo")
        _, request = await until_request(client)
    run_id = request["run_id"]

    async def ended() -> bool:
        return await status_of(server, run_id, user) in ("completed", "cancelled")

    await wait_for(ended, timeout=10)
    async with ws_client(server, user) as again:
        await again.send(type="resume", run_id=run_id, after_seq=0)
        await again.recv()
        events = of_run(await again.recv_until("agent_completed"), run_id)
    check_inputs(events)
    (resolved,) = of_type(events, "input_resolved")
    assert resolved["by"] == "timeout"


async def test_answered_through_the_other_process(redis_url: str, tmp_path: Path) -> None:
    env = {
        "CHAT_BROKER_URL": redis_url,
        "CHAT_DB_URL": f"sqlite:///{tmp_path}/chat.db",
        "CHAT_APPROVAL_TOOLS": "calculator",
    }
    with spawn_server(tmp_path, **env) as a, spawn_server(tmp_path, **env) as b:
        async with ws_client(a, "alice") as on_a, ws_client(b, "alice") as on_b:
            await on_a.send(type="user_message", content="What is 9 * 9?", agent="demo")
            got, request = await until_request(on_a)
            run_id, request_id = request["run_id"], request["data"]["request_id"]
            assert await status_of(b, run_id, "alice") == "waiting"
            async with http_client(b, headers=b.headers("alice")) as rest:
                url = f"/api/chat/agents/{run_id}/respond"
                began = time.perf_counter()
                mallory = await rest.post(
                    url,
                    json={"request_id": request_id, "approved": True},
                    headers=b.headers("mallory"),
                )
                assert mallory.status_code == 404
                unknown = await rest.post(url, json={"request_id": "in_x", "approved": True})
                assert unknown.status_code == 404, unknown.text
                reply = await rest.post(
                    url,
                    json={"request_id": request_id, "approved": True, "args": {"expression": "9"}},
                )
                took_ms = (time.perf_counter() - began) * 1000
                assert reply.status_code == 200 and reply.json()["status"] == "running"
            events = got + await on_a.recv_until("agent_completed")
            # The other process's client answers the second time: conflict, over the bus.
            await on_b.send(type="respond", run_id=run_id, request_id=request_id, approved=True)
            assert (await on_b.recv())["data"]["code"] == "conflict"
            await on_b.send(type="resume", run_id=run_id, after_seq=0)
            await on_b.recv()
            replay = of_run(await on_b.recv_until("agent_completed"), run_id)
    check_inputs(events)
    assert replay == events
    (done,) = of_type(events, "tool_completed")
    assert done["ok"] and done["result"] == 9
    record_figures("approvals_cross_process", {"three_rest_answers_ms": round(took_ms, 1)})


async def test_cancel_and_stop_through_the_other_process(redis_url: str, tmp_path: Path) -> None:
    env = {
        "CHAT_BROKER_URL": redis_url,
        "CHAT_DB_URL": f"sqlite:///{tmp_path}/chat.db",
        "CHAT_APPROVAL_TOOLS": "*",
    }
    with spawn_server(tmp_path, **env) as a, spawn_server(tmp_path, **env) as b:
        async with ws_client(a, "alice") as on_a, ws_client(b, "alice") as on_b:
            await on_a.send(type="user_message", content="What is 4 * 4?", agent="demo")
            got, request = await until_request(on_a)
            run_id = request["run_id"]
            await on_b.send(type="stop", run_id=run_id)
            assert (await on_b.recv())["data"]["status"] == "paused"
            await on_b.send(
                type="respond",
                run_id=run_id,
                request_id=request["data"]["request_id"],
                answer="wrong kind",
            )
            assert (await on_b.recv())["data"]["code"] == "bad_message"
            await on_b.send(type="start", run_id=run_id)
            assert (await on_b.recv())["data"]["status"] == "waiting"
            await on_b.send(type="cancel", run_id=run_id)
            assert (await on_b.recv())["data"]["status"] == "cancelled"
            events = got + await on_a.recv_until("agent_completed")
    check_inputs(events)
    statuses = [e["data"]["status"] for e in events if e["type"] == "run_status"]
    assert statuses == ["waiting", "paused", "waiting"]
    assert of_type(events, "input_resolved")[0]["by"] == "cancel"
    assert events[-1]["data"]["status"] == "cancelled"


async def test_a_waiting_run_whose_process_dies_resolves_its_request(
    redis_url: str, tmp_path: Path
) -> None:
    """The other process ends the run ``node_lost`` from what its appends recorded: the
    open request is resolved ``by: cancel`` before the open call fails."""
    env = {
        "CHAT_BROKER_URL": redis_url,
        "CHAT_DB_URL": f"sqlite:///{tmp_path}/chat.db",
        "CHAT_APPROVAL_TOOLS": "calculator",
        "CHAT_RUN_LEASE_S": "2",
    }
    with spawn_server(tmp_path, **env) as a, spawn_server(tmp_path, **env) as b:
        async with ws_client(a, "erin") as on_a, ws_client(b, "erin") as on_b:
            await on_a.send(type="user_message", content="What is 7 * 7?", agent="demo")
            _, request = await until_request(on_a)
            run_id = request["run_id"]
            await on_b.send(type="resume", run_id=run_id, after_seq=0)
            await on_b.recv()
            seen, _ = await until_request(on_b)
            assert a.proc is not None
            os.kill(a.proc.pid, signal.SIGKILL)
            events = of_run(seen + await on_b.recv_until("agent_completed", timeout=30), run_id)
    check_inputs(events)
    types = [e["type"] for e in events]
    assert types[-5:] == [
        "input_resolved",
        "tool_completed",
        "response_chunk",
        "response_complete",
        "agent_completed",
    ]
    assert events[-5]["data"]["by"] == "cancel"
    assert events[-1]["data"]["error"]["code"] == "node_lost"


# The llm agent --------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm_server() -> Iterator[tuple[LiveServer, OpenAIStub]]:
    with (
        run_stub() as stub,
        run_server(
            llm_base_url=stub.url,
            llm_model=oa.MODEL,
            llm_retry_backoff_s=0.01,
            llm_timeout_s=5.0,
            approval_tools=("calculator",),
        ) as server,
    ):
        yield server, stub


async def test_a_denial_and_its_reason_reach_the_model(
    llm_server: tuple[LiveServer, OpenAIStub], user: str
) -> None:
    server, stub = llm_server
    stub.reset()
    stub.queue(
        oa.tool_turn(("call_x", "calculator", ['{"expression": "2 ** 99"}'])),
        oa.stream(oa.content("Understood.")),
    )
    async with ws_client(server, user) as client:
        await client.send(type="user_message", content="Big number please")
        got, request = await until_request(client)
        await client.send(
            type="respond",
            run_id=request["run_id"],
            request_id=request["data"]["request_id"],
            approved=False,
            reason="too big for me",
        )
        events = of_run(got + await client.recv_until("agent_completed"), request["run_id"])
    check_inputs(events)
    _, second = stub.requests
    tool_message = second.messages[-1]
    assert tool_message["role"] == "tool" and tool_message["tool_call_id"] == "call_x"
    error = json.loads(tool_message["content"])["error"]
    assert "denied" in error and "too big for me" in error, error
    assert events[-2]["data"]["content"] == "Understood."


async def test_the_model_asks_the_user(
    llm_server: tuple[LiveServer, OpenAIStub], user: str
) -> None:
    server, stub = llm_server
    stub.reset()
    stub.queue(
        oa.tool_turn(
            ("call_q", "ask_user", ['{"question": "Which city?", "choices": ["Oslo", "Rome"]}'])
        ),
        oa.stream(oa.content("Rome it is.")),
    )
    async with ws_client(server, user) as client:
        await client.send(type="user_message", content="Plan a trip")
        got, request = await until_request(client)
        assert request["data"]["kind"] == "question"
        assert request["data"]["question"] == "Which city?"
        assert request["data"]["choices"] == ["Oslo", "Rome"]
        (executing,) = of_type(got, "tool_executing")
        assert executing["tool"] == "ask_user"
        await client.send(
            type="respond",
            run_id=request["run_id"],
            request_id=request["data"]["request_id"],
            answer="Rome",
        )
        events = of_run(got + await client.recv_until("agent_completed"), request["run_id"])
    check_inputs(events)
    (done,) = of_type(events, "tool_completed")
    assert done["ok"] and done["result"] == {"answer": "Rome"}
    first, second = stub.requests
    assert any(t["function"]["name"] == "ask_user" for t in first.body["tools"])
    assert second.messages[-1] == {
        "role": "tool",
        "tool_call_id": "call_q",
        "content": json.dumps({"answer": "Rome"}),
    }


# The pure parts -------------------------------------------------------------------


def _feed(state: RunState, seq: int, type: str, **data: Any) -> None:
    state.feed(type, data, seq)


def test_run_state_resolves_each_request_once() -> None:
    state = RunState()
    _feed(state, 1, "user_message", message_id="m", content="x", ref=None)
    _feed(state, 2, "input_requested", request_id="in_1", kind="question", expires_at=1.0)
    with pytest.raises(InvariantBroken):
        _feed(state, 3, "input_requested", request_id="in_1", kind="question", expires_at=1.0)
    with pytest.raises(InvariantBroken):
        _feed(state, 3, "input_resolved", request_id="in_2", by="user", answer="")
    with pytest.raises(InvariantBroken, match="input requests still open"):
        _feed(state, 3, "agent_completed", status="completed", duration_ms=1.0)
    assert [c.data() for c in state.cancelled_requests()] == [
        {"request_id": "in_1", "by": "cancel", "answer": "", "reason": "the run ended"}
    ]
    _feed(state, 3, "input_resolved", request_id="in_1", by="user", answer="a")
    with pytest.raises(InvariantBroken):
        _feed(state, 4, "input_resolved", request_id="in_1", by="user", answer="a")
    with pytest.raises(InvariantBroken):
        _feed(state, 4, "input_requested", request_id="in_1", kind="question", expires_at=1.0)
    lost = state.lost(
        code="node_lost", message="m", apology="sorry", message_id="m2", duration_ms=0
    )
    assert [c.type for c in lost] == ["response_chunk", "response_complete", "agent_completed"]


def test_the_lifecycle_waits_and_resumes() -> None:
    life = Lifecycle("r")
    life.begin()
    assert life.wait().after is RunStatus.WAITING
    life.awaiting = 1
    assert life.apply(Action.START).after is RunStatus.WAITING  # a no-op: not paused
    assert not life.apply(Action.START).changed
    assert life.apply(Action.STOP).after is RunStatus.PAUSED
    assert life.apply(Action.START).after is RunStatus.WAITING  # still open: waits again
    life.apply(Action.STOP)
    life.awaiting = 0  # answered while paused
    assert life.apply(Action.START).after is RunStatus.RUNNING
    assert not life.resolved().changed  # already running: no second run_status
    life.wait()
    assert life.resolved().after is RunStatus.RUNNING
    life.wait()
    assert life.apply(Action.CANCEL).after is RunStatus.CANCELLED
    with pytest.raises(LifecycleConflict):
        life.apply(Action.STOP)


def test_answers_are_checked_against_their_request() -> None:
    approval = parse_response("tool_approval", {"approved": True, "args": {"a": 1}})
    assert approval.approved and approval.args == {"a": 1}
    denied = parse_response("tool_approval", {"approved": False, "args": {"a": 1}})
    assert denied.args is None  # edited arguments only count for an approval
    assert "no reason given" in denied.denial("t")
    for kind, payload in (
        ("tool_approval", {"answer": "yes"}),
        ("tool_approval", {"approved": "yes"}),
        ("tool_approval", {"approved": True, "args": [1]}),
        ("question", {"approved": True}),
        ("question", {"answer": 3}),
        ("question", {"answer": "a", "reason": 5}),
    ):
        with pytest.raises(Exception) as caught:
            parse_response(kind, payload)  # type: ignore[arg-type]
        assert getattr(caught.value, "code", None) == "bad_message", (kind, payload)


async def test_a_desk_resolves_once_and_expires() -> None:
    desk = InputDesk(timeout_s=0.05)
    request = desk.make("question", {"question": "?"})
    assert desk.pending() == 1 and desk.earliest_expiry() is not None
    desk.respond(request.request_id, {"answer": "a"})
    with pytest.raises(Exception) as caught:
        desk.respond(request.request_id, {"answer": "b"})
    assert getattr(caught.value, "code", None) == "conflict"
    assert (await request.future).answer == "a" and desk.pending() == 0
    later = desk.make("tool_approval", {"tool": "t", "args": {}, "call_id": "c"})
    resolution = await asyncio.wait_for(later.future, 5)
    assert resolution.by == "timeout" and resolution.approved is False
    desk.close_all()
    with pytest.raises(Exception) as caught:
        desk.respond(later.request_id, {"approved": True})
    assert getattr(caught.value, "code", None) == "conflict"
    with pytest.raises(Exception) as caught:
        desk.respond("in_unknown", {"approved": True})
    assert getattr(caught.value, "code", None) == "not_found"


def test_respond_frames_are_parsed() -> None:
    from server.commands import Respond, parse_command
    from server.errors import ProtocolError

    frame = {"type": "respond", "run_id": "r_1", "request_id": "in_1", "approved": True, "id": 7}
    parsed = parse_command(orjson.dumps({**frame, "args": {"x": 1}, "extra": 1}))
    assert parsed == Respond("r_1", "in_1", {"approved": True, "args": {"x": 1}}, 7)
    for broken in ({**frame, "request_id": None}, {"type": "respond", "run_id": "r", "id": 1}):
        with pytest.raises(ProtocolError) as caught:
            parse_command(orjson.dumps(broken))
        assert caught.value.code == "bad_message"


async def test_metrics_list_the_waiting_status_and_the_input_gauges(
    approving: LiveServer,
) -> None:
    async with httpx.AsyncClient(base_url=approving.http, headers=approving.headers()) as rest:
        metrics = (await rest.get("/metrics")).text
    assert 'chat_runs{status="waiting"}' in metrics
    assert "chat_input_requests_open" in metrics

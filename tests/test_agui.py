"""AG-UI agents behind the gateway: Pydantic AI's AG-UI app on loopback (driven offline
by ``FunctionModel``), hand-written endpoints that break the protocol, and the same
framework's adapter in process, all through a real gateway."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest

from agents.agui import AGUIMapper, parse_event, validate_event
from agents.agui_http import SSEMessage, SSEParser
from agents.errors import RemoteAgentError
from tests import agui_servers as ag
from tests.support import (
    ROOT,
    LiveServer,
    check_run_invariants,
    free_port,
    http_client,
    of_run,
    parse_sse,
    run_server,
    ws_client,
)

TIMEOUT_S = 1.5


@pytest.fixture(scope="module")
def gateway() -> Iterator[LiveServer]:
    with ag.agent_server() as base:
        pai, raw = f"{base}/pai", f"{base}/raw"
        agents = [
            *(
                f"{name.replace('-', '_')}={pai}/{name}"
                for name in (
                    "answer",
                    "reasoning",
                    "server-tool",
                    "client-tool",
                    "state",
                    "slow",
                    "pausable",
                    "secured",
                )
            ),
            f"badly_secured={pai}/secured",
            f"refused=http://127.0.0.1:{free_port()}/agent",
            *(
                f"{kind.replace('-', '_')}={raw}/{kind}"
                for kind in (
                    "http500",
                    "html",
                    "badjson",
                    "schema",
                    "unstarted",
                    "silent",
                    "run-error",
                    "no-finish",
                    "interrupt",
                    "cancelled",
                    "forms",
                )
            ),
            "inprocess=tests.agui_servers:inprocess",
            "inprocess_tool=tests.agui_servers:inprocess_tool",
            "inprocess_state=tests.agui_servers:inprocess_state",
            "looping=tests.agui_servers:looping",
            "front_tool=tests.agui_servers:front_tool",
        ]
        headers = (
            f"secured.Authorization=Bearer {ag.TOKEN}",
            "badly_secured.Authorization=Bearer wrong-secret-0123456789",
        )
        with run_server(
            agents=tuple(agents), agent_headers=headers, agent_timeout_s=TIMEOUT_S
        ) as server:
            yield server


@pytest.fixture(autouse=True)
def _fresh() -> None:
    ag.SEEN.reset()


def of_type(events: list[dict[str, Any]], type: str) -> list[dict[str, Any]]:
    return [e["data"] for e in events if e["type"] == type]


def chunks(events: list[dict[str, Any]]) -> list[str]:
    return [d["text"] for d in of_type(events, "response_chunk")]


def ended(events: list[dict[str, Any]]) -> dict[str, Any]:
    check_run_invariants(events)
    data: dict[str, Any] = events[-1]["data"]
    return data


def record_figures(name: str, figures: dict[str, Any]) -> None:
    out = ROOT / "var" / "figures"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\n{name}: {figures}")


async def run(server: LiveServer, user: str, agent: str, content: str = "hi") -> list[Any]:
    async with ws_client(server, user) as client:
        return await client.run(content, agent=agent)


# Pydantic AI over HTTP -------------------------------------------------------------------


async def test_a_streamed_answer_and_what_the_agent_is_sent(gateway: LiveServer, user: str) -> None:
    async with ws_client(gateway, user) as client:
        first = await client.run("hi", agent="answer")
        thread = first[0]["thread_id"]
        second = await client.run("and again", agent="answer", thread_id=thread)
    assert ended(first)["status"] == "completed" and ended(second)["status"] == "completed"
    assert [e["type"] for e in first][:3] == ["user_message", "agent_started", "agent_thinking"]
    assert of_type(first, "agent_thinking") == [{"text": "Asking agent answer.", "kind": "status"}]
    assert chunks(first) == ["Hello", " from", " Pydantic AI."]
    assert first[-2]["data"]["content"] == "Hello from Pydantic AI."
    sent_first, sent_second = ag.SEEN.inputs["answer"]
    assert sent_first["threadId"] == thread and sent_first["runId"] == first[0]["run_id"]
    assert sent_first["protocolVersion"] == "1.0"
    assert [(m["role"], m["content"]) for m in sent_first["messages"]] == [("user", "hi")]
    assert {t["name"] for t in sent_first["tools"]} >= {"calculator", "clock", "sleep"}
    # The thread's history goes with the next message.
    assert [(m["role"], m["content"]) for m in sent_second["messages"]] == [
        ("user", "hi"),
        ("assistant", "Hello from Pydantic AI."),
        ("user", "and again"),
    ]


async def test_reasoning_is_shown_as_thinking(gateway: LiveServer, user: str) -> None:
    events = await run(gateway, user, "reasoning")
    assert ended(events)["status"] == "completed"
    assert of_type(events, "agent_thinking") == [
        {"text": "The user wants a greeting.", "kind": "reasoning"},
        {"text": "I will say hi.", "kind": "reasoning"},
    ]
    assert events[-2]["data"]["content"] == "Hi!"


async def test_a_server_side_tool_call_with_its_result(gateway: LiveServer, user: str) -> None:
    events = await run(gateway, user, "server_tool", "How many people live in Paris?")
    assert ended(events)["status"] == "completed"
    types = [e["type"] for e in events]
    assert types.index("agent_thinking") < types.index("tool_executing")
    (executing,) = of_type(events, "tool_executing")
    (done,) = of_type(events, "tool_completed")
    assert executing == {"call_id": "call_1", "tool": "population", "args": {"city": "Paris"}}
    assert done["call_id"] == "call_1" and done["ok"]
    assert done["result"] == {"city": "Paris", "people": 2_100_000}
    assert events[-2]["data"]["content"] == "Paris has 2100000 people."
    assert len(ag.SEEN.inputs["server-tool"]) == 1  # the agent ran its own tool


async def test_a_client_side_gateway_tool_is_run_and_fed_back(
    gateway: LiveServer, user: str
) -> None:
    events = await run(gateway, user, "client_tool", "6 * 7?")
    assert ended(events)["status"] == "completed"
    (executing,) = of_type(events, "tool_executing")
    (done,) = of_type(events, "tool_completed")
    assert executing == {"call_id": "call_1", "tool": "calculator", "args": {"expression": "6 * 7"}}
    assert done["ok"] and done["result"] == 42
    assert of_type(events, "agent_thinking") == [
        {"text": "Asking agent client_tool.", "kind": "status"},
        {
            "text": "Asking agent client_tool again, with the result of calculator.",
            "kind": "status",
        },
    ]
    assert events[-2]["data"]["content"] == "6 * 7 = 42."
    first, second = ag.SEEN.inputs["client-tool"]
    assert second["runId"] == f"{first['runId']}.2"
    assistant, tool = second["messages"][-2:]
    assert assistant["role"] == "assistant"
    assert assistant["toolCalls"][0]["id"] == "calc_1"
    assert json.loads(assistant["toolCalls"][0]["function"]["arguments"]) == {"expression": "6 * 7"}
    assert tool == {"id": tool["id"], "role": "tool", "toolCallId": "calc_1", "content": "42"}


async def test_a_client_tool_goes_to_the_agent_and_its_call_is_left_to_the_client(
    gateway: LiveServer, user: str
) -> None:
    weather = {"name": "get_weather", "description": "The device's weather.", "parameters": {}}
    body: dict[str, Any] = {
        "threadId": f"t-{user}",
        "runId": "front-1",
        "messages": [{"id": "u1", "role": "user", "content": "Weather?"}],
        "tools": [weather],
        "context": [],
        "state": None,
        "forwardedProps": {},
    }
    async with http_client(gateway) as client:
        first = await client.post("/api/ag-ui/front_tool", json=body, headers=gateway.headers(user))
        types = [m["data"]["type"] for m in parse_sse(first.text)]
        assert types[-4:] == ["TOOL_CALL_START", "TOOL_CALL_ARGS", "TOOL_CALL_END", "RUN_FINISHED"]
        sent = ag.SEEN.inputs["front_tool"][0]
        assert [t["name"] for t in sent["tools"]][-1] == "get_weather"  # beside the gateway's
        assert "calculator" in [t["name"] for t in sent["tools"]]
        start = next(
            m["data"] for m in parse_sse(first.text) if m["data"]["type"] == "TOOL_CALL_START"
        )
        call = {"id": start["toolCallId"], "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}  # fmt: skip
        body["runId"] = "front-2"
        body["messages"] = [
            *body["messages"],
            {"id": "a1", "role": "assistant", "toolCalls": [call]},
            {"id": "t1", "role": "tool", "toolCallId": call["id"], "content": "sunny"},
        ]
        second = await client.post(
            "/api/ag-ui/front_tool", json=body, headers=gateway.headers(user)
        )
    data = [m["data"] for m in parse_sse(second.text)]
    assert (
        "".join(d["delta"] for d in data if d["type"] == "TEXT_MESSAGE_CONTENT") == "It is sunny."
    )
    again = ag.SEEN.inputs["front_tool"][1]
    assert [m["role"] for m in again["messages"]] == ["user", "assistant", "tool"]
    assert again["messages"][1]["toolCalls"][0]["function"]["name"] == "get_weather"
    assert again["messages"][2]["toolCallId"] == call["id"]


async def test_state_reaches_a_resuming_client_as_the_current_state(
    gateway: LiveServer, user: str
) -> None:
    await check_state_resume(gateway, user)


async def test_state_reaches_a_resuming_client_through_redis(redis_url: str, user: str) -> None:
    with (
        ag.agent_server() as base,
        run_server(agents=(f"state={base}/pai/state",), broker_url=redis_url) as server,
    ):
        await check_state_resume(server, user)


async def check_state_resume(gateway: LiveServer, user: str) -> None:
    events = await run(gateway, user, "state", "plan a trip")
    assert ended(events)["status"] == "completed"
    final = {"goal": "trip to Rome", "steps": ["book", "pack"]}
    assert [d["state"] for d in of_type(events, "agent_state")] == [
        {"goal": "trip", "steps": ["book"]},
        final,
    ]
    run_id = events[0]["run_id"]
    first_state = next(e["seq"] for e in events if e["type"] == "agent_state")
    async with ws_client(gateway, user) as again:
        await again.send(type="resume", run_id=run_id, after_seq=first_state)
        resumed = of_run(await again.recv_until("agent_completed"), run_id)
    assert resumed[0]["seq"] == first_state + 1
    check_run_invariants(resumed)
    assert of_type(resumed, "agent_state")[-1]["state"] == final


async def test_cancel_closes_the_agent_connection_at_once(gateway: LiveServer, user: str) -> None:
    async with ws_client(gateway, user) as client:
        await client.send(type="user_message", content="talk", agent="slow")
        got = await client.recv_until("response_chunk")
        got += await client.recv_until("response_chunk")
        run_id = got[0]["run_id"]
        cancelled_at = time.monotonic()
        await client.send(type="cancel", run_id=run_id)
        got += await client.recv_until("agent_completed", run_id=run_id)
    deadline = time.monotonic() + 5
    while ag.SEEN.slow_closed_at is None and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert ag.SEEN.slow_closed_at is not None, "the agent server never saw the close"
    seen_after_s = ag.SEEN.slow_closed_at - cancelled_at
    assert seen_after_s < 1.0
    words = ag.SEEN.slow_words
    await asyncio.sleep(0.3)
    assert ag.SEEN.slow_words == words < ag.SLOW_WORDS  # it stopped generating
    events = of_run(got, run_id)
    assert ended(events)["status"] == "cancelled"
    record_figures(
        "agui_cancel",
        {"agent_saw_close_after_cancel_s": round(seen_after_s, 4), "words_generated": words},
    )


async def test_stop_holds_the_stream_and_start_continues_with_nothing_lost(
    gateway: LiveServer, user: str
) -> None:
    async with ws_client(gateway, user) as client:
        await client.send(type="user_message", content="count", agent="pausable")
        got = await client.recv_until("response_chunk")
        run_id = got[0]["run_id"]
        await client.send(type="stop", run_id=run_id)
        got += await client.recv_until("run_status")
        # Longer than the agent timeout: a paused run does not read, and is not silent.
        with pytest.raises(TimeoutError):
            await client.recv(timeout=TIMEOUT_S + 0.5)
        await client.send(type="start", run_id=run_id)
        got += await client.recv_until("agent_completed", run_id=run_id)
    events = of_run(got, run_id)
    assert [d["status"] for d in of_type(events, "run_status")] == ["paused", "running"]
    assert ended(events)["status"] == "completed"
    assert events[-2]["data"]["content"] == ag.pause_answer()


async def test_headers_go_to_the_agent_and_never_into_logs_or_events(
    gateway: LiveServer, user: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    good = await run(gateway, user, "secured")
    bad = await run(gateway, user, "badly_secured")
    assert ended(good)["status"] == "completed"
    assert good[-2]["data"]["content"] == "Hello from Pydantic AI."
    assert ag.SEEN.secured_headers[0]["authorization"] == f"Bearer {ag.TOKEN}"
    failed = ended(bad)
    assert failed["status"] == "failed" and failed["error"]["code"] == "agent_error"
    assert "answered HTTP 401" in failed["error"]["message"]
    everything = caplog.text + json.dumps(good) + json.dumps(bad)
    assert ag.TOKEN not in everything and "wrong-secret-0123456789" not in everything


@pytest.mark.parametrize(
    ("agent", "message"),
    [
        ("refused", "the agent could not be reached"),
        ("http500", "the agent answered HTTP 500"),
        ("html", "the agent answered text/html; charset=utf-8, not text/event-stream"),
        ("badjson", "the agent sent an event that is not valid JSON"),
        ("schema", "TEXT_MESSAGE_CONTENT event that does not fit the AG-UI schema"),
        ("unstarted", "content for message 'm9', which it never started"),
        ("silent", f"the agent sent nothing for {TIMEOUT_S:g} s"),
        ("run_error", "the agent reported an error: the model's quota is used up"),
        ("no_finish", "the agent's stream ended without RUN_FINISHED"),
        ("interrupt", "the agent asked for input (approval); interrupts are not supported"),
    ],
)
async def test_each_upstream_failure_ends_the_run_cleanly(
    gateway: LiveServer, user: str, agent: str, message: str
) -> None:
    began = time.monotonic()
    events = await run(gateway, user, agent)
    took = time.monotonic() - began
    data = ended(events)
    assert data["status"] == "failed", data
    assert data["error"]["code"] == "agent_error"
    assert message in data["error"]["message"], data["error"]
    assert events[-2]["data"]["fallback"] is True
    assert "Please try again." in events[-2]["data"]["content"]
    if agent == "silent":
        record_figures(
            "agui_silence", {"timeout_s": TIMEOUT_S, "run_failed_after_s": round(took, 3)}
        )


async def test_an_agent_that_cancels_its_run_ends_it_cancelled(
    gateway: LiveServer, user: str
) -> None:
    events = await run(gateway, user, "cancelled")
    data = ended(events)
    assert data["status"] == "cancelled" and events[-2]["data"]["content"] == "Stopping"


async def test_chunk_forms_deprecated_thinking_steps_and_pass_through_events(
    gateway: LiveServer, user: str
) -> None:
    events = await run(gateway, user, "forms")
    assert ended(events)["status"] == "completed"
    assert of_type(events, "agent_thinking") == [
        {"text": "Step: search", "kind": "status"},
        {"text": "Old-style thought.", "kind": "reasoning"},
    ]
    assert events[-2]["data"]["content"] == "Found it."
    (executing,) = of_type(events, "tool_executing")
    (done,) = of_type(events, "tool_completed")
    assert executing["tool"] == "lookup" and executing["args"] == {"q": "x"}
    assert done["ok"] and done["result"] == {"hits": 3}
    passed = of_type(events, "agent_event")
    assert [p["type"] for p in passed] == ["CUSTOM", "ACTIVITY_SNAPSHOT"]
    assert passed[0]["event"]["value"] == {"done": 1}
    assert [d["state"] for d in of_type(events, "agent_state")] == [{"n": 1}, {"n": 2}]


# In process ---------------------------------------------------------------------------------


async def test_in_process_adapter_of_the_same_framework(gateway: LiveServer, user: str) -> None:
    answer = await run(gateway, user, "inprocess")
    tool = await run(gateway, user, "inprocess_tool", "6 * 7?")
    state = await run(gateway, user, "inprocess_state", "plan")
    assert ended(answer)["status"] == "completed"
    assert answer[-2]["data"]["content"] == "Hello from Pydantic AI."
    assert ended(tool)["status"] == "completed"
    assert of_type(tool, "tool_completed")[0]["result"] == 42
    assert tool[-2]["data"]["content"] == "6 * 7 = 42."
    assert ended(state)["status"] == "completed"
    assert of_type(state, "agent_state")[-1]["state"]["steps"] == ["book", "pack"]


async def test_client_side_rounds_stop_at_max_steps(gateway: LiveServer, user: str) -> None:
    events = await run(gateway, user, "looping")
    assert ended(events)["status"] == "completed"
    done = {d["call_id"]: d for d in of_type(events, "tool_completed")}
    calls = [(e["call_id"], e["tool"]) for e in of_type(events, "tool_executing")]
    assert [tool for _, tool in calls] == ["teleport", "calculator"] * 2
    assert [done[c]["ok"] for c, _ in calls] == [False, True, False, False]
    assert "it is no gateway tool" in done[calls[0][0]]["error"]
    assert "the most allowed" in done[calls[3][0]]["error"]
    assert chunks(events)[-1] == "I could not finish within 2 steps."
    # The second call of the agent has an answer for each of its first calls.
    second = ag.SEEN.inputs["looping"][1]["messages"]
    answers = {m["toolCallId"]: m["content"] for m in second if m["role"] == "tool"}
    assert json.loads(answers["c1"]) == 2 and "no gateway tool" in answers["t1"]


# The pure parts ------------------------------------------------------------------------------


def test_sse_parser_wherever_the_stream_is_cut() -> None:
    text = '\ufeff: hi\r\nevent: x\r\ndata: {"a":\r\ndata: 1}\r\n\r\ndata: two\n\nid: 7\rdata:3\r\r'
    want = [
        SSEMessage("x", '{"a":\n1}'),
        SSEMessage("message", "two"),
        SSEMessage("message", "3", "7"),
    ]
    for i, j in itertools.combinations(range(len(text) + 1), 2):
        parser = SSEParser()
        got = parser.feed(text[:i]) + parser.feed(text[i:j]) + parser.feed(text[j:])
        assert got == want, (i, j)


def test_the_mapper_refuses_what_breaks_the_protocol() -> None:
    def mapper() -> AGUIMapper:
        return AGUIMapper(iter(f"call_{i}" for i in range(1, 99)).__next__)

    start = {"type": "TOOL_CALL_START", "toolCallId": "a", "toolCallName": "t"}
    cases = [
        ([{"type": "TOOL_CALL_ARGS", "toolCallId": "a", "delta": "{}"}], "never started"),
        ([start, start], "started tool call 'a' twice"),
        (
            [
                start,
                {"type": "TOOL_CALL_ARGS", "toolCallId": "a", "delta": "{"},
                {"type": "TOOL_CALL_END", "toolCallId": "a"},
            ],
            "arguments for t are not valid JSON",
        ),
        ([{"type": "STATE_DELTA", "delta": [{"op": "remove", "path": "/x"}]}], "does not apply"),
        ([{"type": "TEXT_MESSAGE_END", "messageId": "m"}], "never started"),
    ]
    for events, message in cases:
        m = mapper()
        with pytest.raises(RemoteAgentError, match=message):
            for event in events:
                m.feed(validate_event(event))
    with pytest.raises(RemoteAgentError, match="does not fit the AG-UI schema"):
        parse_event('{"type": "NO_SUCH_EVENT"}')


def test_the_mapper_streams_only_the_assistant_and_knows_earlier_calls() -> None:
    m = AGUIMapper(iter(f"call_{i}" for i in range(1, 99)).__next__, "Asking agent x.")
    feed = [
        {"type": "TEXT_MESSAGE_START", "messageId": "s", "role": "system"},
        {"type": "TEXT_MESSAGE_CONTENT", "messageId": "s", "delta": "hidden"},
        {"type": "TEXT_MESSAGE_END", "messageId": "s"},
        {"type": "TOOL_CALL_START", "toolCallId": "a", "toolCallName": "calculator"},
        {"type": "TOOL_CALL_END", "toolCallId": "a"},
        {"type": "RUN_FINISHED", "threadId": "t", "runId": "r"},
    ]
    outputs = [o for event in feed for o in m.feed(validate_event(event))]
    assert [type(o).__name__ for o in outputs] == ["Thinking", "ToolStarted"]
    assert [c.agent_id for c in m.unanswered()] == ["a"]
    m.begin_round("Asking agent x again.")
    # The next call may echo the result it was given: it is not a new call.
    again = [
        {"type": "TOOL_CALL_RESULT", "messageId": "r", "toolCallId": "a", "content": "2"},
        {"type": "TEXT_MESSAGE_CHUNK", "messageId": "m", "role": "assistant", "delta": "Two."},
    ]
    outputs = [o for event in again for o in m.feed(validate_event(event))]
    assert [type(o).__name__ for o in outputs] == ["Thinking", "Chunk"]
    assert m.answer == "Two."

"""AG-UI and the AI SDK's UI message stream, against a real gateway.

Two layers: the framings checked in Python (every AG-UI event validated by
``ag_ui.core``'s models, a rejoin at every cut point of a run), and each protocol
driven by its ecosystem's own client library, unmodified, in Node.js
(``tests/js``: ``@ag-ui/client``'s ``HttpAgent`` with its event verification,
the ``ai`` package's ``DefaultChatTransport`` and ``readUIMessageStream``),
installed from the committed lockfile by ``npm ci``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from ag_ui.core import Event as AguiEvent
from ag_ui.core import EventType
from pydantic import TypeAdapter

from bridge import events
from server.agui_stream import AguiFramer
from server.aisdk_stream import AiSdkFramer
from tests import openai_stub as oa
from tests.openai_stub import OpenAIStub, run_stub
from tests.support import (
    ROOT,
    LiveServer,
    check_run_invariants,
    http_client,
    parse_sse,
    run_server,
    wait_for,
    ws_client,
)

JS_DIR = ROOT / "tests" / "js"
AGUI_EVENT: TypeAdapter[Any] = TypeAdapter(AguiEvent)
FIGURES = ROOT / "var" / "figures"


def run_input(thread_id: str, run_id: str, message: str, **extra: Any) -> dict[str, Any]:
    return {
        "threadId": thread_id,
        "runId": run_id,
        "state": None,
        "messages": [{"id": f"m-{run_id}", "role": "user", "content": message}],
        "tools": [],
        "context": [],
        "forwardedProps": {},
        **extra,
    }


def chunks(count: int, chars: int = 8) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return "".join(letters[i % 26] * chars for i in range(count))


async def agui_post(
    server: LiveServer, user: str, body: dict[str, Any], agent: str = "load"
) -> tuple[httpx.Response, list[dict[str, Any]]]:
    async with http_client(server) as client:
        resp = await client.post(f"/api/ag-ui/{agent}", json=body, headers=server.headers(user))
    return resp, parse_sse(resp.text) if resp.status_code == 200 else []


def validated(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every message's data checked against ``ag_ui.core``'s event models."""
    for message in messages:
        AGUI_EVENT.validate_python(message["data"])
    return [m["data"] for m in messages]


# AG-UI in Python ---------------------------------------------------------------------------


async def test_agui_stream_is_valid_ag_ui_with_seq_ids(server: LiveServer, user: str) -> None:
    body = run_input(f"t-{user}", "client-run-1", "thinking=2 tools=1 chunks=3")
    resp, messages = await agui_post(server, user, body)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    data = validated(messages)
    types = [d["type"] for d in data]
    assert types == [
        "RUN_STARTED",
        "REASONING_START",
        "REASONING_MESSAGE_START",
        "REASONING_MESSAGE_CONTENT",
        "REASONING_MESSAGE_CONTENT",
        "REASONING_MESSAGE_END",
        "REASONING_END",
        "TOOL_CALL_START",
        "TOOL_CALL_ARGS",
        "TOOL_CALL_END",
        "TOOL_CALL_RESULT",
        "TEXT_MESSAGE_START",
        "TEXT_MESSAGE_CONTENT",
        "TEXT_MESSAGE_CONTENT",
        "TEXT_MESSAGE_CONTENT",
        "TEXT_MESSAGE_END",
        "RUN_FINISHED",
    ]
    assert data[0]["runId"] == "client-run-1" and data[0]["threadId"] == f"t-{user}"
    assert data[-1] == {"type": "RUN_FINISHED", "threadId": f"t-{user}", "runId": "client-run-1"}
    ids = [int(m["id"]) for m in messages]
    assert ids == sorted(ids) and ids[0] == 1
    assert "".join(d["delta"] for d in data if d["type"] == "TEXT_MESSAGE_CONTENT") == chunks(3)
    assert json.loads(data[8]["delta"]) == {"ms": 0}
    assert json.loads(data[10]["content"]) == {"slept_ms": 0}
    # The gateway's ids, for the rejoin and lifecycle routes.
    status = await _status(server, user, resp.headers["x-chat-run-id"])
    assert status["status"] == "completed" and status["thread_id"] == f"t-{user}"


async def _status(server: LiveServer, user: str, run_id: str) -> dict[str, Any]:
    async with http_client(server) as client:
        resp = await client.get(f"/api/chat/agents/{run_id}/status", headers=server.headers(user))
    assert resp.status_code == 200, resp.text
    result: dict[str, Any] = resp.json()
    return result


async def test_agui_failed_run_is_run_error_with_code(server: LiveServer, user: str) -> None:
    _, messages = await agui_post(server, user, run_input(f"t-{user}", "r", "chunks=1 fail=1"))
    data = validated(messages)
    assert data[-1]["type"] == "RUN_ERROR" and data[-1]["code"] == "agent_error"
    assert "RUN_FINISHED" not in [d["type"] for d in data]


async def test_agui_rejects_bad_bodies_and_other_users_threads(
    server: LiveServer, user: str
) -> None:
    async with http_client(server) as client:
        bad = await client.post(
            "/api/ag-ui/load", json={"threadId": 3}, headers=server.headers(user)
        )
        assert bad.status_code == 400
        assert bad.json()["error"]["code"] == "bad_message"
        assert "runId" in bad.json()["error"]["message"]
        no_user = run_input(f"t-{user}", "r", "x")
        no_user["messages"] = [{"id": "a", "role": "assistant", "content": "hi"}]
        resp = await client.post("/api/ag-ui/load", json=no_user, headers=server.headers(user))
        assert resp.status_code == 400
        unauthenticated = await client.post("/api/ag-ui/load", json=run_input("t", "r", "x"))
        assert unauthenticated.status_code == 401
    thread = f"t-{user}-mine"
    resp, _ = await agui_post(server, user, run_input(thread, "r", "chunks=1"))
    assert resp.status_code == 200
    resp, _ = await agui_post(server, f"{user}-other", run_input(thread, "r", "chunks=1"))
    assert resp.status_code == 404


async def test_agui_rejoin_at_every_cut_misses_and_repeats_nothing(
    server: LiveServer, user: str
) -> None:
    resp, full = await agui_post(
        server, user, run_input(f"t-{user}", "cr", "thinking=2 tools=2 chunks=4")
    )
    run_id = resp.headers["x-chat-run-id"]
    ids = sorted({int(m["id"]) for m in full})
    started = time.perf_counter()
    async with http_client(server) as client:
        for cut in [0, *ids]:
            headers = {**server.headers(user)}
            if cut:
                headers["Last-Event-ID"] = str(cut)
            got = await client.get(f"/api/ag-ui/runs/{run_id}/events", headers=headers)
            messages = parse_sse(got.text)
            validated(messages)
            after = [m for m in messages if int(m["id"]) > cut]
            prelude = [m for m in messages if int(m["id"]) <= cut]
            assert after == [m for m in full if int(m["id"]) > cut], cut
            if cut and after:
                # What was open at the cut, re-opened: the run, then a message.
                kinds = [m["data"]["type"] for m in prelude]
                assert kinds[0] == "RUN_STARTED" and prelude[0]["data"]["runId"] == "cr"
                before = [m["data"]["type"] for m in full if int(m["id"]) <= cut]
                if before.count("TEXT_MESSAGE_START") > before.count("TEXT_MESSAGE_END"):
                    assert kinds[1:] == ["TEXT_MESSAGE_START"]
                elif before.count("REASONING_START") > before.count("REASONING_END"):
                    assert kinds[1:] == ["REASONING_START", "REASONING_MESSAGE_START"]
                else:
                    assert kinds[1:] == []
            elif cut == ids[-1]:
                # At the end: the run re-opened and its end repeated, not an empty body.
                assert [m["data"] for m in prelude] == [full[0]["data"], full[-1]["data"]]
            else:
                assert prelude == []
    _figure(
        "frontends_agui_rejoin",
        {"rejoins": len(ids) + 1, "events": len(full), "seconds": time.perf_counter() - started},
    )


async def test_agui_rejoin_after_a_finished_runs_end_repeats_its_end(
    server: LiveServer, user: str
) -> None:
    async with http_client(server) as client:
        for message, last in [("chunks=2", "RUN_FINISHED"), ("chunks=1 fail=1", "RUN_ERROR")]:
            resp, full = await agui_post(server, user, run_input(f"t-{user}", "e", message))
            run_id, end = resp.headers["x-chat-run-id"], int(full[-1]["id"])
            for cut in (end, end + 5):
                got = await client.get(
                    f"/api/ag-ui/runs/{run_id}/events",
                    headers={**server.headers(user), "Last-Event-ID": str(cut)},
                )
                assert got.status_code == 200, got.text
                data = validated(parse_sse(got.text))
                assert [d["type"] for d in data] == ["RUN_STARTED", last], (message, cut)
                assert data == [full[0]["data"], full[-1]["data"]]


# AG-UI client-side tools, against the llm agent over a scripted model ----------------------

WEATHER: dict[str, Any] = {
    "name": "get_weather",
    "description": "The weather in a city, as the user's device knows it.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


@pytest.fixture(scope="module")
def llm_gateway() -> Iterator[tuple[LiveServer, OpenAIStub]]:
    """A gateway whose ``llm`` agent asks the scripted OpenAI stub."""
    with (
        run_stub() as stub,
        run_server(llm_base_url=stub.url, llm_model=oa.MODEL, llm_timeout_s=5.0) as server,
    ):
        yield server, stub


@pytest.fixture
def llm(llm_gateway: tuple[LiveServer, OpenAIStub]) -> Iterator[tuple[LiveServer, OpenAIStub]]:
    server, stub = llm_gateway
    stub.reset()
    yield server, stub
    stub.release_all()


def script_client_tool_call(stub: OpenAIStub, answer: str) -> None:
    """The model calls the client's ``get_weather``, then, given its result, answers."""
    stub.queue(
        oa.tool_turn(("model-call-1", "get_weather", ['{"city":', ' "Paris"}'])),
        oa.stream(oa.content(answer)),
    )


async def chat_v1_events(server: LiveServer, user: str, run_id: str) -> list[dict[str, Any]]:
    async with http_client(server) as client:
        resp = await client.get(f"/api/chat/runs/{run_id}/events", headers=server.headers(user))
    return [
        m["data"] for m in parse_sse(resp.text) if m["event"] not in ("stream_start", "stream_end")
    ]


async def test_agui_client_tool_call_is_left_open_and_its_result_continues_the_thread(
    llm: tuple[LiveServer, OpenAIStub], user: str
) -> None:
    server, stub = llm
    thread = f"t-{user}-tools"
    script_client_tool_call(stub, "It is 21 degrees in Paris.")
    question = {"id": "u1", "role": "user", "content": "What is the weather in Paris?"}
    first_input = run_input(thread, "ct-1", "", tools=[WEATHER], messages=[question])
    resp, messages = await agui_post(server, user, first_input, agent="llm")
    assert resp.status_code == 200, resp.text
    data = validated(messages)
    types = [d["type"] for d in data]
    assert types[0] == "RUN_STARTED" and types[-1] == "RUN_FINISHED"
    assert "outcome" not in data[-1]  # a plain end: the call is the client's to answer
    assert types[-4:-1] == ["TOOL_CALL_START", "TOOL_CALL_ARGS", "TOOL_CALL_END"]
    assert "TOOL_CALL_RESULT" not in types and "TEXT_MESSAGE_START" not in types
    start = next(d for d in data if d["type"] == "TOOL_CALL_START")
    assert start["toolCallName"] == "get_weather"
    args = next(d for d in data if d["type"] == "TOOL_CALL_ARGS")["delta"]
    assert json.loads(args) == {"city": "Paris"}
    # The model was offered the client's tool beside the gateway's, with its schema.
    offered = {t["function"]["name"]: t["function"] for t in stub.requests[0].body["tools"]}
    assert offered["get_weather"]["parameters"] == WEATHER["parameters"]
    assert "calculator" in offered
    # In chat.v1 the call is answered as pending, so the run's invariants hold.
    run1 = resp.headers["x-chat-run-id"]
    run1_events = await chat_v1_events(server, user, run1)
    check_run_invariants(run1_events)
    completed = next(e for e in run1_events if e["type"] == "tool_completed")["data"]
    assert completed["ok"] is False and completed["pending"] is True
    assert completed["error"] == "left to the client"
    # The client answers the call in its next input: a new run of the same thread.
    call_id = start["toolCallId"]
    asked = {
        "id": start["parentMessageId"],
        "role": "assistant",
        "toolCalls": [
            {
                "id": call_id,
                "type": "function",
                "function": {"name": "get_weather", "arguments": args},
            }
        ],
    }
    answer = {"id": "tm1", "role": "tool", "toolCallId": call_id, "content": '{"celsius": 21}'}
    second_input = run_input(
        thread, "ct-2", "", tools=[WEATHER], messages=[question, asked, answer]
    )
    resp2, messages2 = await agui_post(server, user, second_input, agent="llm")
    assert resp2.status_code == 200, resp2.text
    data2 = validated(messages2)
    assert data2[0] == {"type": "RUN_STARTED", "threadId": thread, "runId": "ct-2"}
    assert text_of(data2) == "It is 21 degrees in Paris."
    assert data2[-1]["type"] == "RUN_FINISHED"
    assert resp2.headers["x-chat-thread-id"] == thread
    # The model saw the question once, its call and the client's result, in order.
    sent = stub.requests[1].messages
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
    assert sent[0]["content"] == question["content"]
    assert sent[1]["tool_calls"][0]["id"] == call_id
    assert sent[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert sent[2] == {"role": "tool", "tool_call_id": call_id, "content": '{"celsius": 21}'}
    history = await _history(server, user, thread, 4)
    assert [(m["role"], m["run_id"]) for m in history] == [
        ("user", run1), ("assistant", run1),
        ("user", resp2.headers["x-chat-run-id"]), ("assistant", resp2.headers["x-chat-run-id"]),
    ]  # fmt: skip
    assert history[2]["content"] == f'Result of get_weather ({call_id}): {{"celsius": 21}}'
    assert history[3]["content"] == "It is 21 degrees in Paris."


async def test_agui_tool_messages_must_answer_the_calls_before_them(
    llm: tuple[LiveServer, OpenAIStub], user: str
) -> None:
    server, _ = llm
    question = {"id": "u1", "role": "user", "content": "hi"}
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": "{}"},
    }
    asked = {"id": "a1", "role": "assistant", "toolCalls": [call]}
    cases = {
        "no call before it": [
            question,
            {"id": "t", "role": "tool", "toolCallId": "x", "content": "1"},
        ],
        "another call's id": [
            question,
            asked,
            {"id": "t", "role": "tool", "toolCallId": "x", "content": "1"},
        ],
        "a call unanswered": [
            question,
            {**asked, "toolCalls": [call, {**call, "id": "call_2"}]},
            {"id": "t", "role": "tool", "toolCallId": "call_1", "content": "1"},
        ],
    }
    for case, messages in cases.items():
        body = run_input(f"t-{user}", "r", "", tools=[WEATHER], messages=messages)
        resp, _ = await agui_post(server, user, body, agent="llm")
        assert resp.status_code == 400, (case, resp.text)
        assert resp.json()["error"]["code"] == "bad_message"


def _figure(name: str, values: dict[str, Any]) -> None:
    FIGURES.mkdir(parents=True, exist_ok=True)
    (FIGURES / f"{name}.json").write_bytes(orjson.dumps(values, option=orjson.OPT_INDENT_2))
    print(name, values)


def test_agui_framer_maps_every_ending_to_valid_events() -> None:
    """The pure framer: cancelled, failed, a connection error and the approval seam."""

    def run(*evs: tuple[str, dict[str, Any]]) -> list[dict[str, Any]]:
        framer = AguiFramer(client_run_id="cr")
        out: list[dict[str, Any]] = []
        for seq, (kind, data) in enumerate(evs, 1):
            event = events.make_event(kind, data, run_id="r_1", thread_id="t_1", seq=seq)  # type: ignore[arg-type]
            for message in parse_sse(framer.frame(event).decode()):
                AGUI_EVENT.validate_python(message["data"])
                out.append(message["data"])
        return out

    opening = [("user_message", {"ref": "cr", "content": "hi"}), ("agent_started", {})]
    answer = [("response_chunk", {"text": "par", "index": 0})]
    cancelled = run(
        *opening,
        *answer,
        ("response_complete", {"content": "par", "fallback": False}),
        ("agent_completed", {"status": "cancelled", "error": {"code": "cancelled"}}),
    )
    assert [e["type"] for e in cancelled][-2:] == ["TEXT_MESSAGE_END", "RUN_FINISHED"]
    assert cancelled[-1]["outcome"] == {"type": "cancelled"}
    failed = run(*opening, ("agent_completed", {"status": "failed", "error": {"code": "x"}}))
    assert failed[-1]["type"] == "RUN_ERROR" and failed[-1]["code"] == "x"
    approval = run(
        *opening,
        ("tool_executing", {"call_id": "c1", "tool": "calculator", "args": {"expression": "1"}}),
        (
            "input_requested",
            {"request_id": "q1", "kind": "tool_approval", "call_id": "c1", "tool": "calculator"},
        ),
    )
    assert approval[-1]["type"] == "RUN_FINISHED"
    assert approval[-1]["outcome"]["type"] == "interrupt"
    assert approval[-1]["outcome"]["interrupts"][0]["id"] == "r_1:q1"
    framer = AguiFramer()
    gone = framer.frame(events.error("resume_unavailable", "dropped", run_id="r_1"))
    (message,) = parse_sse(gone.decode())
    assert message["data"]["type"] == EventType.RUN_ERROR.value
    assert "id" not in message


def test_aisdk_framer_cancelled_is_abort_and_approval_seam() -> None:
    framer = AiSdkFramer()
    seq = iter(range(1, 100))

    def parts(kind: str, data: dict[str, Any]) -> list[dict[str, Any]]:
        event = events.make_event(kind, data, run_id="r_1", thread_id="t_1", seq=next(seq))  # type: ignore[arg-type]
        return framer.parts(event)

    assert [p["type"] for p in parts("user_message", {"content": "x"})] == ["start"]
    asked = parts("input_requested", {"kind": "tool_approval", "request_id": "q", "call_id": "c"})
    assert {"type": "tool-approval-request", "approvalId": "r_1:q", "toolCallId": "c"} in asked
    assert asked[-1] == {"type": "finish", "finishReason": "tool-calls"}  # the response ends
    framer = AiSdkFramer()
    parts("user_message", {"content": "x"})
    assert parts("agent_completed", {"status": "cancelled", "error": {"code": "cancelled"}})[
        -1
    ] == {"type": "abort", "reason": "cancelled"}


async def test_frontend_bodies_carry_history_within_their_own_limit(user: str) -> None:
    """A chat's history may pass ``CHAT_MAX_MESSAGE_BYTES`` (every AG-UI and AI SDK request
    carries it); the body is held to ``CHAT_MAX_FRONTEND_BODY_BYTES``, the new message to
    ``CHAT_MAX_MESSAGE_BYTES``."""
    from tests.support import run_server

    with run_server(max_message_bytes=1024, max_frontend_body_bytes=16 * 1024) as live:
        old = [{"id": f"h{i}", "role": "assistant", "content": "x" * 1000} for i in range(4)]
        body = run_input(f"t-{user}", "r", "chunks=1")
        body["messages"] = [*old, *body["messages"]]
        resp, messages = await agui_post(live, user, body)
        assert resp.status_code == 200 and validated(messages)[-1]["type"] == "RUN_FINISHED"
        long_message = run_input(f"t-{user}", "r", "chunks=1 " + " " * 2000)
        resp, _ = await agui_post(live, user, long_message)
        assert resp.status_code == 413
        body["messages"] = [*old * 5, *body["messages"]]
        resp, _ = await agui_post(live, user, body)
        assert resp.status_code == 413 and resp.json()["error"]["code"] == "too_large"
        filler = "x" * 1000
        ui = {
            "id": f"c-{user}",
            "trigger": "submit-message",
            "agent": "load",
            "messages": [
                *(
                    {
                        "id": f"h{i}",
                        "role": "assistant",
                        "parts": [{"type": "text", "text": filler}],
                    }
                    for i in range(4)
                ),
                {"id": "u", "role": "user", "parts": [{"type": "text", "text": "chunks=1"}]},
            ],
        }
        async with http_client(live) as client:
            ok = await client.post("/api/ai-sdk/chat", json=ui, headers=live.headers(user))
            assert ok.status_code == 200 and ok.text.endswith("data: [DONE]\n\n")
            ui["messages"] = ui["messages"] * 5
            big = await client.post("/api/ai-sdk/chat", json=ui, headers=live.headers(user))
            assert big.status_code == 413


async def test_a_page_may_read_the_run_id_header(user: str) -> None:
    from tests.support import run_server

    origin = "https://app.example"
    with run_server(allowed_origins=(origin,)) as live:
        headers = {**live.headers(user), "Origin": origin}
        async with http_client(live) as client:
            resp = await client.post(
                "/api/ag-ui/load", json=run_input(f"t-{user}", "r", "chunks=1"), headers=headers
            )
    assert resp.status_code == 200
    exposed = resp.headers["access-control-expose-headers"].lower()
    assert "x-chat-run-id" in exposed and "x-chat-thread-id" in exposed


def test_framing_cost_per_event_is_measured() -> None:
    """chat.v1 events are encoded once for every watcher; the AG-UI and AI SDK framings
    are made per stream.  What that costs per answer chunk is recorded, not asserted."""
    from server.sse import frame_event

    count = 20_000
    made = [
        events.make_event("user_message", {"content": "x"}, run_id="r_1", thread_id="t", seq=1),
        *(
            events.make_event(
                "response_chunk", {"text": "abcdefgh", "index": i}, run_id="r_1", thread_id="t",
                seq=i + 2,
            )
            for i in range(count)
        ),
    ]  # fmt: skip
    figures: dict[str, Any] = {"events": count}
    for name, frame in (
        ("chat_v1", frame_event),
        ("ag_ui", AguiFramer().frame),
        ("ai_sdk", AiSdkFramer().frame),
    ):
        started = time.perf_counter()
        size = sum(len(frame(event)) for event in made)
        seconds = time.perf_counter() - started
        assert size > 0
        figures[f"{name}_us_per_event"] = round(seconds / len(made) * 1e6, 2)
        figures[f"{name}_bytes_per_event"] = round(size / len(made), 1)
    _figure("frontends_framing", figures)


# AI SDK in Python --------------------------------------------------------------------------


async def test_aisdk_stream_headers_parts_and_done(server: LiveServer, user: str) -> None:
    body = {
        "id": f"c-{user}",
        "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "chunks=2"}]}],
        "trigger": "submit-message",
        "agent": "load",
    }
    async with http_client(server) as client:
        resp = await client.post("/api/ai-sdk/chat", json=body, headers=server.headers(user))
        assert resp.status_code == 200
        assert resp.headers["x-vercel-ai-ui-message-stream"] == "v1"
        lines = [line for line in resp.text.split("\n\n") if line]
        assert lines[-1] == "data: [DONE]"
        parts = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
        assert parts[0]["type"] == "start" and parts[-1] == {
            "type": "finish",
            "finishReason": "stop",
        }
        bad = await client.post(
            "/api/ai-sdk/chat", json={"id": "x", "messages": []}, headers=server.headers(user)
        )
        assert bad.status_code == 400
        # Wrong types are the client's mistake (400), never a 500.
        text_part = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}
        for wrong in (
            {"trigger": ["x"]},
            {"trigger": {"a": 1}},
            {"messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": 5}]}]},
            {"messages": [{"role": "user", "parts": [{"type": "text", "text": {"no": 1}}]}]},
        ):
            resp = await client.post(
                "/api/ai-sdk/chat",
                json={"id": f"w-{user}", "messages": [text_part], **wrong},
                headers=server.headers(user),
            )
            assert resp.status_code == 400, (wrong, resp.text)
            assert resp.json()["error"]["code"] == "bad_message"
        none = await client.get(f"/api/ai-sdk/chat/c-{user}/stream", headers=server.headers(user))
        assert none.status_code == 204


# The ecosystems' own client libraries, in Node.js ------------------------------------------


@pytest.fixture(scope="session")
def js_deps() -> Iterator[Path]:
    """``npm ci`` from the committed lockfile, once; a skip where Node.js or npm is missing."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("Node.js and npm are needed for the front-end library tests (node >= 20)")
    major = int(
        subprocess.run([node, "--version"], capture_output=True, text=True).stdout[1:].split(".")[0]
    )
    if major < 20:
        pytest.skip(f"Node.js {major} is older than the 20 the pinned packages need")
    done = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=JS_DIR,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        pytest.fail(f"npm ci failed in {JS_DIR}:\n{done.stderr[-2000:]}")
    yield JS_DIR


class Js:
    """One Node.js script run: its progress lines as they come, its result at the end."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.progress: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.result: dict[str, Any] | None = None
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            message = json.loads(line)
            if "result" in message:
                self.result = message["result"]
            else:
                await self.progress.put(message)

    async def next_progress(self, timeout: float = 20) -> dict[str, Any]:
        return await asyncio.wait_for(self.progress.get(), timeout)

    async def finish(self, timeout: float = 60) -> dict[str, Any]:
        await asyncio.wait_for(self._reader, timeout)
        assert self.proc.stderr is not None
        stderr = (await self.proc.stderr.read()).decode()
        await self.proc.wait()
        assert self.result is not None, f"no result (exit {self.proc.returncode}): {stderr}"
        return self.result


async def js(deps: Path, server: LiveServer, user: str, script: str, **scenario: Any) -> Js:
    env = {**os.environ, "GATEWAY_URL": server.http, "GATEWAY_TOKEN": server.token(user)}
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(deps / script),
        json.dumps(scenario),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    return Js(proc)


async def control(server: LiveServer, user: str, run_id: str, action: str) -> str:
    async with http_client(server) as client:
        resp = await client.post(
            f"/api/chat/agents/{run_id}/{action}", headers=server.headers(user)
        )
    assert resp.status_code == 200, resp.text
    status: str = resp.json()["status"]
    return status


def text_of(agui_events: list[dict[str, Any]]) -> str:
    return "".join(e["delta"] for e in agui_events if e["type"] == "TEXT_MESSAGE_CONTENT")


async def test_agui_client_streams_reasoning_tool_and_answer(
    js_deps: Path, server: LiveServer, user: str
) -> None:
    run = await js(
        js_deps, server, user, "agui.mjs", kind="run", threadId=f"t-{user}", runId="cr-1",
        message="thinking=2 tools=1 chunks=3",
    )  # fmt: skip
    result = await run.finish()
    assert result["error"] is None
    types = [e["type"] for e in result["events"]]
    assert types[0] == "RUN_STARTED" and types[-1] == "RUN_FINISHED"
    assert result["events"][0]["runId"] == "cr-1"
    roles = {m["role"]: m for m in result["newMessages"]}
    assert roles["reasoning"]["content"] == "thinking 1 of 2thinking 2 of 2"
    assert roles["assistant"]["content"] == chunks(3)
    assert roles["assistant"]["toolCalls"][0]["function"]["name"] == "sleep"
    assert json.loads(roles["tool"]["content"]) == {"slept_ms": 0}


async def test_agui_client_reports_failed_and_cancelled_runs(
    js_deps: Path, server: LiveServer, user: str
) -> None:
    failed = await js(
        js_deps, server, user, "agui.mjs", kind="run", threadId=f"t-{user}-f", runId="f",
        message="chunks=1 fail=1",
    )  # fmt: skip
    result = await failed.finish()
    assert result["events"][-1]["type"] == "RUN_ERROR"
    assert result["events"][-1]["code"] == "agent_error"
    cancelled = await js(
        js_deps, server, user, "agui.mjs", kind="run", threadId=f"t-{user}-c", runId="c",
        message="chunks=200 delay_ms=20",
    )  # fmt: skip
    headers = await cancelled.next_progress()
    assert await control(server, user, headers["runId"], "cancel") == "cancelled"
    result = await cancelled.finish()
    last = result["events"][-1]
    assert last["type"] == "RUN_FINISHED" and last["outcome"] == {"type": "cancelled"}
    assert result["error"] is None  # the client's verification took it


async def test_agui_client_rejoins_a_dropped_stream(
    js_deps: Path, server: LiveServer, user: str
) -> None:
    run = await js(
        js_deps, server, user, "agui.mjs", kind="drop", threadId=f"t-{user}", runId="d",
        message="thinking=1 chunks=12 delay_ms=20", dropAfter=3,
    )  # fmt: skip
    result = await run.finish()
    assert result["error"] == "connection dropped by the test"
    assert result["rejoinError"] is None  # verifyEvents passed the prelude and the rest
    before, after = result["events"], result["after"]
    assert after[0] == {"type": "RUN_STARTED", "threadId": f"t-{user}", "runId": "d"}
    assert after[1]["type"] == "TEXT_MESSAGE_START"
    assert after[-1]["type"] == "RUN_FINISHED"
    assert text_of(before) == chunks(3)
    assert text_of(before) + text_of(after) == chunks(12)


async def test_agui_client_verifies_a_rejoin_after_the_runs_end(
    js_deps: Path, server: LiveServer, user: str
) -> None:
    for message, last in [("chunks=2", "RUN_FINISHED"), ("chunks=1 fail=1", "RUN_ERROR")]:
        resp, full = await agui_post(server, user, run_input(f"t-{user}", "late", message))
        rejoin = await js(
            js_deps, server, user, "agui.mjs", kind="rejoin",
            runId=resp.headers["x-chat-run-id"], lastEventId=full[-1]["id"],
        )  # fmt: skip
        result = await rejoin.finish()
        assert result["rejoinError"] is None, result  # verifyEvents took the stream
        assert [e["type"] for e in result["after"]] == ["RUN_STARTED", last]
        assert result["after"] == [full[0]["data"], full[-1]["data"]]


async def test_agui_client_answers_its_own_tool_with_http_agent(
    js_deps: Path, llm: tuple[LiveServer, OpenAIStub], user: str
) -> None:
    server, stub = llm
    script_client_tool_call(stub, "Sunny, 21 degrees.")
    run = await js(
        js_deps, server, user, "agui.mjs", kind="client-tool", agent="llm",
        threadId=f"t-{user}-js-tools", runId="jt", message="Weather in Paris?", tools=[WEATHER],
    )  # fmt: skip
    result = await run.finish()
    assert result["error"] is None, result  # both runs passed the client's verification
    first, second = result["runs"]
    types = [e["type"] for e in first["events"]]
    assert types[-4:] == ["TOOL_CALL_START", "TOOL_CALL_ARGS", "TOOL_CALL_END", "RUN_FINISHED"]
    assert "TOOL_CALL_RESULT" not in types
    assert text_of(second["events"]) == "Sunny, 21 degrees."
    # The client's own message list: the call, its answer, then the agent's answer.
    roles = [m["role"] for m in result["messages"] if m["role"] != "reasoning"]
    assert roles == ["user", "assistant", "tool", "assistant"]
    call = result["messages"][[m["role"] for m in result["messages"]].index("tool")]
    sent = stub.requests[1].messages
    assert sent[-1] == {
        "role": "tool",
        "tool_call_id": call["toolCallId"],
        "content": call["content"],
    }
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]


async def test_agui_run_stopped_and_resumed_over_rest_watched_over_ws(
    js_deps: Path, server: LiveServer, user: str
) -> None:
    thread = f"t-{user}"
    run = await js(
        js_deps, server, user, "agui.mjs", kind="run", threadId=thread, runId="w",
        message="chunks=30 delay_ms=20",
    )  # fmt: skip
    run_id = (await run.next_progress())["runId"]
    async with ws_client(server, user) as ws:
        await ws.send(type="resume", run_id=run_id, after_seq=0)
        assert await control(server, user, run_id, "stop") == "paused"
        await asyncio.sleep(0.3)
        assert (await _status(server, user, run_id))["status"] == "paused"
        assert await control(server, user, run_id, "start") == "running"
        seen = await ws.recv_until("agent_completed", timeout=30, run_id=run_id)
    result = await run.finish()
    assert result["error"] is None
    assert text_of(result["events"]) == chunks(30)
    assert result["events"][-1]["type"] == "RUN_FINISHED"
    statuses = [e["data"]["status"] for e in seen if e["type"] == "run_status"]
    assert statuses == ["paused", "running"]
    ws_text = "".join(e["data"]["text"] for e in seen if e["type"] == "response_chunk")
    assert ws_text == chunks(30)
    # The same run in the thread's history.
    history = await _history(server, user, thread, 2)
    assert [(m["role"], m["run_id"]) for m in history] == [("user", run_id), ("assistant", run_id)]
    assert history[1]["content"] == chunks(30)


async def _history(server: LiveServer, user: str, thread: str, count: int) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []

    async def enough() -> bool:
        async with http_client(server) as client:
            resp = await client.get(f"/api/threads/{thread}/messages", headers=server.headers(user))
        got[:] = resp.json().get("messages", []) if resp.status_code == 200 else []
        return len(got) >= count

    await wait_for(enough)
    return got


def answer_text(message: dict[str, Any]) -> str:
    return "".join(p["text"] for p in message["parts"] if p["type"] == "text")


async def test_aisdk_client_streams_reasoning_tool_and_answer(
    js_deps: Path, server: LiveServer, user: str
) -> None:
    chat = f"c-{user}"
    run = await js(
        js_deps, server, user, "aisdk.mjs", kind="run", chatId=chat, agent="load",
        message="thinking=1 tools=1 chunks=3",
    )  # fmt: skip
    result = await run.finish()
    assert result["errors"] == [] and result["protocolHeader"] == "v1"
    parts = result["message"]["parts"]
    assert [p["type"] for p in parts] == [
        "step-start", "reasoning", "dynamic-tool", "step-start", "text"
    ]  # fmt: skip
    assert parts[1]["text"] == "thinking 1 of 1" and parts[1]["state"] == "done"
    assert parts[2]["state"] == "output-available" and parts[2]["output"] == {"slept_ms": 0}
    assert parts[4] == {"type": "text", "text": chunks(3), "state": "done"}
    assert result["chunks"][-1] == {"type": "finish", "finishReason": "stop"}
    history = await _history(server, user, chat, 2)
    assert [(m["role"], m["run_id"]) for m in history] == [
        ("user", result["runId"]), ("assistant", result["runId"])
    ]  # fmt: skip


async def test_aisdk_client_reports_failed_and_cancelled_runs(
    js_deps: Path, server: LiveServer, user: str
) -> None:
    failed = await js(
        js_deps, server, user, "aisdk.mjs", kind="run", chatId=f"c-{user}-f", agent="load",
        message="chunks=1 fail=1",
    )  # fmt: skip
    result = await failed.finish()
    assert result["errors"] == ["agent_error: the agent failed (RuntimeError)"]
    assert result["chunks"][-1] == {"type": "finish", "finishReason": "error"}
    cancelled = await js(
        js_deps, server, user, "aisdk.mjs", kind="run", chatId=f"c-{user}-c", agent="load",
        message="chunks=200 delay_ms=20",
    )  # fmt: skip
    headers = await cancelled.next_progress()
    assert await control(server, user, headers["runId"], "cancel") == "cancelled"
    result = await cancelled.finish()
    assert result["chunks"][-1]["type"] == "abort"
    assert "finish" not in [c["type"] for c in result["chunks"]]


async def test_aisdk_client_resumes_a_dropped_stream(
    js_deps: Path, server: LiveServer, user: str
) -> None:
    chat = f"c-{user}"
    none = await js(js_deps, server, user, "aisdk.mjs", kind="reconnect", chatId=chat)
    result = await none.finish()
    assert result["after"] is None and result["status"] == 204
    run = await js(
        js_deps, server, user, "aisdk.mjs", kind="drop", chatId=chat, agent="load",
        message="chunks=12 delay_ms=20", dropAfter=3,
    )  # fmt: skip
    result = await run.finish()
    assert answer_text(result["before"]["message"]) == chunks(3)
    after = result["after"]
    assert after is not None and after["errors"] == []
    assert answer_text(after["message"]) == chunks(12)  # from its start, once
    assert after["message"]["id"] == result["before"]["message"]["id"]
    assert after["chunks"][-1] == {"type": "finish", "finishReason": "stop"}


async def test_aisdk_client_regenerate_runs_the_last_message_again(
    js_deps: Path, server: LiveServer, user: str
) -> None:
    chat = f"c-{user}"
    run = await js(
        js_deps, server, user, "aisdk.mjs", kind="regenerate", chatId=chat, agent="load",
        message="chunks=2",
    )  # fmt: skip
    result = await run.finish()
    assert answer_text(result["first"]["message"]) == chunks(2)
    assert answer_text(result["again"]["message"]) == chunks(2)
    assert result["first"]["message"]["id"] != result["again"]["message"]["id"]
    # The answer replaced, the user's message stored once.
    history = await _history(server, user, chat, 2)
    assert [(m["role"], m["run_id"]) for m in history] == [
        ("user", result["first"]["message"]["id"].removesuffix(":answer")),
        ("assistant", result["again"]["message"]["id"].removesuffix(":answer")),
    ]
    assert history[1]["content"] == chunks(2)


async def test_aisdk_regenerate_replaces_the_answer_or_is_a_conflict(
    server: LiveServer, user: str
) -> None:
    chat = f"c-{user}-regen"

    async def post(trigger: str, message_id: str | None = None) -> httpx.Response:
        body = {**body_of(chat, trigger), "messageId": message_id}
        async with http_client(server) as client:
            return await client.post("/api/ai-sdk/chat", json=body, headers=server.headers(user))

    nothing = await post("regenerate-message")  # a chat with no answer yet
    assert nothing.status_code == 409, nothing.text
    assert nothing.json()["error"] == {
        "code": "conflict", "message": "this chat has no answer to regenerate"
    }  # fmt: skip
    first = await post("submit-message")
    run1 = first.headers["x-chat-run-id"]
    before = await _history(server, user, chat, 2)
    other = await post("regenerate-message", "r_someother:answer")
    assert other.status_code == 409 and "last answer" in other.json()["error"]["message"]
    again = await post("regenerate-message", f"{run1}:answer")
    assert again.status_code == 200, again.text
    parts = [json.loads(m) for m in _data_lines(again.text)]
    assert parts[-1] == {"type": "finish", "finishReason": "stop"}
    run2 = again.headers["x-chat-run-id"]
    await wait_for(lambda: _run_done(server, user, run2))
    after = await _history(server, user, chat, 2)
    assert [(m["message_id"], m["role"], m["run_id"]) for m in after] == [
        (before[0]["message_id"], "user", run1), (after[1]["message_id"], "assistant", run2)
    ]  # fmt: skip
    assert after[1]["message_id"] != before[1]["message_id"]
    # Its answer is gone: the same answer id cannot be regenerated twice.
    stale = await post("regenerate-message", f"{run1}:answer")
    assert stale.status_code == 409
    # Another user's chat is not found, as on every route.
    async with http_client(server) as client:
        theirs = await client.post(
            "/api/ai-sdk/chat",
            json={**body_of(chat, "regenerate-message"), "messageId": None},
            headers=server.headers(f"{user}-other"),
        )
    assert theirs.status_code == 404, theirs.text


def body_of(chat: str, trigger: str) -> dict[str, Any]:
    text = [{"type": "text", "text": "chunks=2"}]
    return {
        "id": chat,
        "agent": "load",
        "trigger": trigger,
        "messages": [{"id": "u1", "role": "user", "parts": text}],
    }


def _data_lines(text: str) -> list[str]:
    lines = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return lines[:-1]


async def _run_done(server: LiveServer, user: str, run_id: str) -> bool:
    return (await _status(server, user, run_id))["status"] == "completed"

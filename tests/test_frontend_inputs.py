"""Approvals and questions over the front ends' protocols, against a real gateway.

AG-UI: an input request ends the response with ``RUN_FINISHED`` whose outcome is an
interrupt (validated by ``ag_ui.core``'s models); a ``RunAgentInput`` with ``resume``
answers it and streams the rest of the same run.  The AI SDK: a tool approval is the
SDK's ``tool-approval-request``, a question an ``ask_user`` call; the next request's
assistant message (``approval-responded``, or the call's output) answers it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ag_ui.core import RunAgentInput, RunFinishedEvent

from bridge import events
from bridge.events import Event
from server.agui_stream import AguiFramer
from tests.support import LiveServer, http_client, parse_sse, run_server
from tests.test_faults import record_figures
from tests.test_frontends import chunks, js, js_deps, run_input, text_of, validated

__all__ = ["js_deps"]

ASKER = ("asker=tests.plugin_agents:Asker",)
#: The answer's request to the end of the rest of the run, per test (figures, not asserts).
RESUME_MS: dict[str, list[float]] = {}


@pytest.fixture(scope="module", params=["memory", "redis"])
def asking(request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    """A gateway whose ``sleep`` tool calls wait for approval, with the asking agent."""
    overrides: dict[str, Any] = {"approval_tools": ("sleep",), "agents": ASKER}
    if request.param == "redis":
        overrides["broker_url"] = request.getfixturevalue("redis_url")
    with run_server(**overrides) as live:
        yield live
    if RESUME_MS:
        record_figures(f"frontend_inputs_{request.param}", dict(RESUME_MS))
        RESUME_MS.clear()


async def post(
    server: LiveServer, user: str, path: str, body: dict[str, Any]
) -> tuple[httpx.Response, list[dict[str, Any]]]:
    async with http_client(server) as client:
        resp = await client.post(path, json=body, headers=server.headers(user))
    return resp, parse_sse(resp.text) if resp.status_code == 200 else []


def interrupt_of(data: list[dict[str, Any]]) -> dict[str, Any]:
    last = RunFinishedEvent.model_validate(data[-1])
    assert last.outcome is not None and last.outcome.type == "interrupt"  # type: ignore[union-attr]
    (interrupt,) = data[-1]["outcome"]["interrupts"]
    return dict(interrupt)


def resume_input(thread_id: str, run_id: str, interrupt_id: str, payload: Any) -> dict[str, Any]:
    body = run_input(thread_id, run_id, "go on")
    body["resume"] = [{"interruptId": interrupt_id, "status": "resolved", "payload": payload}]
    RunAgentInput.model_validate(body)
    return body


async def agui_approval(server: LiveServer, user: str, payload: Any) -> list[dict[str, Any]]:
    """A load run whose sleep call waits; its interrupt; the resumed rest of the run."""
    thread = f"t-{user}"
    resp, messages = await post(
        server, user, "/api/ag-ui/load", run_input(thread, "r1", "thinking=0 tools=1 chunks=2")
    )
    assert resp.status_code == 200
    first = validated(messages)
    types = [d["type"] for d in first]
    assert types == [
        "RUN_STARTED",
        "TOOL_CALL_START",
        "TOOL_CALL_ARGS",
        "TOOL_CALL_END",
        "RUN_FINISHED",
    ]
    interrupt = interrupt_of(first)
    assert interrupt["reason"] == "tool_approval"
    assert interrupt["toolCallId"] == first[1]["toolCallId"]
    meta = interrupt["metadata"]
    assert meta["tool"] == "sleep" and meta["args"] == {"ms": 0}
    assert meta["run_id"] == resp.headers["x-chat-run-id"]
    assert interrupt["id"] == f"{meta['run_id']}:{meta['request_id']}"
    assert interrupt["expiresAt"].endswith("Z") and isinstance(meta["expires_at"], int | float)
    async with http_client(server) as client:
        path = f"/api/ag-ui/runs/{meta['run_id']}/events"
        rejoin = await client.get(path, headers=server.headers(user))
    rejoined = validated(parse_sse(rejoin.text))  # ends at the open request, not held open
    assert rejoined[-1]["outcome"]["interrupts"][0]["id"] == interrupt["id"]
    elsewhere = resume_input(f"{thread}-other", "r2", interrupt["id"], payload)
    wrong, _ = await post(server, user, "/api/ag-ui/load", elsewhere)
    assert wrong.status_code == 400, wrong.text  # the interrupt's run is of another thread
    body = resume_input(thread, "r2", interrupt["id"], payload)
    started = time.perf_counter()
    again, messages = await post(server, user, "/api/ag-ui/load", body)
    RESUME_MS.setdefault("agui_resume_to_end_ms", []).append(
        round((time.perf_counter() - started) * 1000, 2)
    )
    assert again.status_code == 200, again.text
    assert again.headers["x-chat-run-id"] == meta["run_id"]  # the same run, not a new one
    rest = validated(messages)
    assert rest[0] == {"type": "RUN_STARTED", "threadId": thread, "runId": "r2"}
    assert not [d for d in rest if d["type"] == "TOOL_CALL_START"]  # not restarted
    # The same interrupt answered again: 409.
    twice, _ = await post(server, user, "/api/ag-ui/load", body)
    assert twice.status_code == 409, twice.text
    # Another user's run: 404.
    other, _ = await post(server, f"{user}-other", "/api/ag-ui/load", body)
    assert other.status_code == 404, other.text
    return rest


async def test_agui_approval_resumes_the_same_run(asking: LiveServer, user: str) -> None:
    rest = await agui_approval(asking, user, {"approved": True})
    types = [d["type"] for d in rest]
    assert types == [
        "RUN_STARTED",
        "TOOL_CALL_RESULT",
        "TEXT_MESSAGE_START",
        "TEXT_MESSAGE_CONTENT",
        "TEXT_MESSAGE_CONTENT",
        "TEXT_MESSAGE_END",
        "RUN_FINISHED",
    ]
    assert json.loads(rest[1]["content"]) == {"slept_ms": 0}
    assert "outcome" not in rest[-1]


async def test_agui_denial_reaches_the_tool_result(asking: LiveServer, user: str) -> None:
    rest = await agui_approval(asking, user, {"approved": False, "reason": "not now"})
    result = next(d for d in rest if d["type"] == "TOOL_CALL_RESULT")
    error = json.loads(result["content"])["error"]
    assert "denied" in error and "not now" in error
    assert rest[-1]["type"] == "RUN_FINISHED"


async def test_agui_questions_then_an_approval(asking: LiveServer, user: str) -> None:
    thread = f"t-{user}"
    resp, messages = await post(
        asking, user, "/api/ag-ui/asker", run_input(thread, "q1", "approve")
    )
    first = validated(messages)
    assert [d["type"] for d in first] == ["RUN_STARTED", "RUN_FINISHED"]
    question = interrupt_of(first)
    assert question["reason"] == "question" and question["message"] == "Which colour?"
    resp, messages = await post(
        asking, user, "/api/ag-ui/asker", resume_input(thread, "q2", question["id"], "green")
    )
    assert resp.status_code == 200, resp.text
    second = validated(messages)
    said = "".join(d["delta"] for d in second if d["type"] == "TEXT_MESSAGE_CONTENT")
    assert said == "You said 'green'. "
    approval = interrupt_of(second)  # the run's next request ends this response too
    assert approval["reason"] == "tool_approval" and approval["metadata"]["tool"] == "launch"
    resp, messages = await post(
        asking,
        user,
        "/api/ag-ui/asker",
        resume_input(thread, "q3", approval["id"], {"approved": True}),
    )
    third = validated(messages)
    said = "".join(d["delta"] for d in third if d["type"] == "TEXT_MESSAGE_CONTENT")
    assert said == "Launch approved (user)."
    assert third[0]["runId"] == "q3" and third[-1]["type"] == "RUN_FINISHED"
    assert "outcome" not in third[-1]
    # The thread's history holds the one run, answered.
    async with http_client(asking) as client:
        runs = await client.get(f"/api/threads/{thread}/messages", headers=asking.headers(user))
    assert runs.status_code == 200
    assert resp.headers["x-chat-run-id"] in runs.text


# AI SDK ------------------------------------------------------------------------------------


def ui_parts(text: str) -> list[dict[str, Any]]:
    """The UI message stream's parts; ``[DONE]`` last."""
    lines = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]", lines[-3:]
    return [json.loads(line) for line in lines[:-1]]


async def sdk_post(
    server: LiveServer, user: str, body: dict[str, Any]
) -> tuple[httpx.Response, list[dict[str, Any]]]:
    async with http_client(server) as client:
        resp = await client.post("/api/ai-sdk/chat", json=body, headers=server.headers(user))
    return resp, ui_parts(resp.text) if resp.status_code == 200 else []


def user_message(text: str) -> dict[str, Any]:
    return {"id": "u1", "role": "user", "parts": [{"type": "text", "text": text}]}


async def test_aisdk_tool_approval_continues_the_run(asking: LiveServer, user: str) -> None:
    chat = f"c-{user}"
    body = {"id": chat, "agent": "load", "messages": [user_message("thinking=0 tools=1 chunks=2")]}
    resp, parts = await sdk_post(asking, user, body)
    assert resp.status_code == 200
    types = [p["type"] for p in parts]
    assert types == [
        "start",
        "start-step",
        "tool-input-start",
        "tool-input-delta",
        "tool-input-available",
        "tool-approval-request",
        "finish-step",
        "finish",
    ]
    request = parts[5]
    assert request["toolCallId"] == parts[4]["toolCallId"]
    run_id = resp.headers["x-chat-run-id"]
    assert request["approvalId"].startswith(f"{run_id}:")
    tool_part = {
        "type": "dynamic-tool",
        "toolName": "sleep",
        "toolCallId": request["toolCallId"],
        "state": "approval-responded",
        "input": {"ms": 0},
        "approval": {"id": request["approvalId"], "approved": True},
    }
    answer = {"id": parts[0]["messageId"], "role": "assistant", "parts": [tool_part]}
    body = {**body, "messages": [user_message("thinking=0 tools=1 chunks=2"), answer]}
    async with http_client(asking) as client:
        waiting = await client.get(f"/api/ai-sdk/chat/{chat}/stream", headers=asking.headers(user))
    assert ui_parts(waiting.text)[-2:] == parts[-2:]  # a resume ends at the open request
    started = time.perf_counter()
    again, rest = await sdk_post(asking, user, body)
    RESUME_MS.setdefault("aisdk_approval_to_end_ms", []).append(
        round((time.perf_counter() - started) * 1000, 2)
    )
    assert again.status_code == 200, again.text
    assert again.headers["x-chat-run-id"] == run_id
    assert [p["type"] for p in rest] == [
        "start",
        "start-step",
        "tool-output-available",
        "finish-step",
        "start-step",
        "text-start",
        "text-delta",
        "text-delta",
        "text-end",
        "finish-step",
        "finish",
    ]
    assert rest[2]["toolCallId"] == request["toolCallId"]
    assert rest[2]["output"] == {"slept_ms": 0}
    twice, _ = await sdk_post(asking, user, body)
    assert twice.status_code == 409
    other, _ = await sdk_post(asking, f"{user}-other", body)
    assert other.status_code == 404


async def test_aisdk_question_is_an_ask_user_call(asking: LiveServer, user: str) -> None:
    chat = f"c-{user}"
    body = {"id": chat, "agent": "asker", "messages": [user_message("choices")]}
    resp, parts = await sdk_post(asking, user, body)
    assert resp.status_code == 200
    assert [p["type"] for p in parts] == [
        "start",
        "start-step",
        "tool-input-start",
        "tool-input-available",
        "finish-step",
        "finish",
    ]
    ask = parts[3]
    assert ask["toolName"] == "ask_user"
    assert ask["input"] == {"question": "Which colour?", "choices": ["red", "blue"]}
    tool_part = {
        "type": "dynamic-tool",
        "toolName": "ask_user",
        "toolCallId": ask["toolCallId"],
        "state": "output-available",
        "input": ask["input"],
        "output": "blue",
    }
    answer = {"id": parts[0]["messageId"], "role": "assistant", "parts": [tool_part]}
    body = {**body, "messages": [user_message("choices"), answer]}
    again, rest = await sdk_post(asking, user, body)
    assert again.status_code == 200, again.text
    said = "".join(p["delta"] for p in rest if p["type"] == "text-delta")
    assert said == "You said 'blue'. "
    assert rest[-1] == {"type": "finish", "finishReason": "stop"}


# The front ends' own libraries, in Node.js ---------------------------------------------------


def agui_types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


async def test_agui_http_agent_resumes_an_interrupt(
    js_deps: Path, asking: LiveServer, user: str
) -> None:
    """HttpAgent (verification on): the run ends at the interrupt, the client's
    ``pendingInterrupts`` hold it, and ``runAgent({resume})`` gets the rest of the run."""
    run = await js(
        js_deps, asking, user, "inputs.mjs", kind="agui", agent="asker",
        threadId=f"t-{user}", message="approve", answers=["green", {"approved": False}],
    )  # fmt: skip
    out = await run.finish()
    first, second, third = out["rounds"]
    assert agui_types(first["events"]) == ["RUN_STARTED", "RUN_FINISHED"]
    (question,) = first["pending"]
    assert question["reason"] == "question" and question["message"] == "Which colour?"
    assert agui_types(second["events"])[0] == "RUN_STARTED"
    assert text_of(second["events"]) == "You said 'green'. "
    (approval,) = second["pending"]
    assert approval["reason"] == "tool_approval" and approval["metadata"]["args"] == {
        "target": "moon"
    }
    assert text_of(third["events"]) == "Launch denied (user)."
    assert third["events"][-1]["type"] == "RUN_FINISHED" and third["pending"] == []
    assert len(set(out["runIds"])) == 1  # one gateway run, resumed twice


async def test_aisdk_chat_answers_an_approval_and_a_question(
    js_deps: Path, asking: LiveServer, user: str
) -> None:
    """The SDK's Chat: addToolApprovalResponse on the tool-approval-request, sent on by
    sendAutomaticallyWhen; the rest of the run continues the same assistant message."""
    run = await js(
        js_deps, asking, user, "inputs.mjs", kind="aisdk", agent="load", chatId=f"c-{user}",
        message="thinking=0 tools=1 chunks=2", approval={"approved": True},
    )  # fmt: skip
    out = await run.finish()
    assert "error" not in out, out
    assert len(out["runIds"]) == 2 and len(set(out["runIds"])) == 1
    sent = out["requests"][1]["messages"][-1]["parts"]
    assert any(p.get("state") == "approval-responded" for p in sent)
    assistant = out["messages"][-1]
    assert assistant["role"] == "assistant" and len(out["messages"]) == 2
    tool = next(p for p in assistant["parts"] if p.get("toolName") == "sleep")
    assert tool["state"] == "output-available" and tool["output"] == {"slept_ms": 0}
    text = "".join(p["text"] for p in assistant["parts"] if p["type"] == "text")
    assert text == chunks(2)
    # A question: the ask_user call answered with the client's tool output.
    run = await js(
        js_deps, asking, user, "inputs.mjs", kind="aisdk", agent="asker", chatId=f"q-{user}",
        message="choices", answer="red",
    )  # fmt: skip
    out = await run.finish()
    assert "error" not in out, out
    assistant = out["messages"][-1]
    ask = next(p for p in assistant["parts"] if p.get("toolName") == "ask_user")
    assert ask["input"] == {"question": "Which colour?", "choices": ["red", "blue"]}
    text = "".join(p["text"] for p in assistant["parts"] if p["type"] == "text")
    assert text == "You said 'red'. "


# The pure framer -----------------------------------------------------------------------------


def waiting_run() -> list[Event]:
    """A run that asks, waits, is answered and goes on: seq 1..9."""
    evs: list[tuple[str, dict[str, Any]]] = [
        ("user_message", {"ref": "cr", "content": "hi"}),
        ("agent_started", {}),
        ("tool_executing", {"call_id": "c1", "tool": "sleep", "args": {"ms": 0}}),
        (
            "input_requested",
            {"request_id": "q1", "kind": "tool_approval", "call_id": "c1", "tool": "sleep"},
        ),
        ("run_status", {"status": "waiting"}),
        ("input_resolved", {"request_id": "q1", "approved": True, "by": "user"}),
        ("tool_completed", {"call_id": "c1", "ok": True, "result": {"slept_ms": 0}}),
        ("response_chunk", {"text": "done", "index": 0}),
        ("response_complete", {"content": "done", "fallback": False}),
    ]
    out = [
        events.make_event(kind, data, run_id="r_1", thread_id="t_1", seq=seq)  # type: ignore[arg-type]
        for seq, (kind, data) in enumerate(evs, 1)
    ]
    end = {"status": "completed", "usage": {}}
    out.append(events.make_event("agent_completed", end, run_id="r_1", thread_id="t_1", seq=10))
    return out


def framed(framer: AguiFramer, evs: list[Event]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for event in evs:
        for message in parse_sse(framer.frame(event).decode()):
            out.append(message)
    return out


def test_agui_framer_ends_at_an_interrupt_and_resumes_after_it() -> None:
    live = AguiFramer(client_run_id="cr")
    first = framed(live, waiting_run())
    data = validated(first)
    assert [d["type"] for d in data][-1] == "RUN_FINISHED" and live.done
    assert data[-1]["outcome"]["interrupts"][0]["id"] == "r_1:q1"
    assert [int(m["id"]) for m in first][-1] == 4  # nothing after the interrupt
    resumed = AguiFramer(client_run_id="cr2", resume_of="q1")
    rest = validated(framed(resumed, waiting_run()))
    assert [d["type"] for d in rest] == [
        "RUN_STARTED",
        "TOOL_CALL_RESULT",
        "TEXT_MESSAGE_START",
        "TEXT_MESSAGE_CONTENT",
        "TEXT_MESSAGE_END",
        "RUN_FINISHED",
    ]
    assert rest[0]["runId"] == "cr2" and "outcome" not in rest[-1]
    # A rejoin from a point after the interrupt re-opens the run there.
    rejoined = validated(framed(AguiFramer(after_seq=5), waiting_run()))
    assert [d["type"] for d in rejoined][:2] == ["RUN_STARTED", "TOOL_CALL_RESULT"]
    assert sum(d["type"] == "RUN_STARTED" for d in rejoined) == 1


async def test_agui_a_cancelled_resume_entry_gives_up_the_question(
    asking: LiveServer, user: str
) -> None:
    thread = f"t-{user}"
    _, messages = await post(asking, user, "/api/ag-ui/asker", run_input(thread, "x1", "plain"))
    question = interrupt_of(validated(messages))
    body = run_input(thread, "x2", "never mind")
    body["resume"] = [{"interruptId": question["id"], "status": "cancelled"}]
    resp, messages = await post(asking, user, "/api/ag-ui/asker", body)
    assert resp.status_code == 200, resp.text
    rest = validated(messages)
    assert text_of(rest) == "You said ''. " and rest[-1]["type"] == "RUN_FINISHED"


async def test_aisdk_denied_approval_is_the_sdks_denied_output(
    js_deps: Path, asking: LiveServer, user: str
) -> None:
    """A denial through addToolApprovalResponse: the call's part ends ``output-denied``
    (``tool-output-denied``), the run goes on to its answer."""
    run = await js(
        js_deps, asking, user, "inputs.mjs", kind="aisdk", agent="load", chatId=f"d-{user}",
        message="thinking=0 tools=1 chunks=2", approval={"approved": False, "reason": "no"},
    )  # fmt: skip
    out = await run.finish()
    assert "error" not in out, out
    assert len(out["runIds"]) == 2 and len(set(out["runIds"])) == 1
    assistant = out["messages"][-1]
    tool = next(p for p in assistant["parts"] if p.get("toolName") == "sleep")
    assert tool["state"] == "output-denied"
    assert tool["approval"]["approved"] is False and tool["approval"]["reason"] == "no"
    text = "".join(p["text"] for p in assistant["parts"] if p["type"] == "text")
    assert text == chunks(2)
    async with http_client(asking) as client:
        history = await client.get(f"/api/threads/d-{user}/messages", headers=asking.headers(user))
    assert history.status_code == 200 and out["runIds"][0] in history.text

"""AG-UI agents for the tests: Pydantic AI's AG-UI app driven offline by its
``FunctionModel``, and hand-written endpoints that break the protocol in each way
an upstream can, all served by a real uvicorn on loopback.

The servers run in a thread of their own; what they observe (a closed connection, the
headers they were sent) is kept in :data:`SEEN` for the tests to read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from ag_ui.core import RunAgentInput, StateDeltaEvent, StateSnapshotEvent
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelRequest, ToolReturn, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, DeltaThinkingPart, DeltaToolCall, FunctionModel
from pydantic_ai.ui.ag_ui import AGUIAdapter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from agents.agui import agui_agent
from tests.support import free_port

TOKEN = "agent-service-token-0123456789"
SLOW_WORDS = 200
SLOW_DELAY_S = 0.05
PAUSE_WORDS = 30
PAUSE_DELAY_S = 0.02


@dataclass
class Seen:
    """What the agent servers observed, across threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    #: The slow agent: words yielded, and when its stream was closed under it.
    slow_words: int = 0
    slow_closed_at: float | None = None
    slow_started: threading.Event = field(default_factory=threading.Event)
    #: Headers of the requests to /pai/secured, and the bodies of every request.
    secured_headers: list[dict[str, str]] = field(default_factory=list)
    inputs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def reset(self) -> None:
        with self.lock:
            self.slow_words = 0
            self.slow_closed_at = None
            self.slow_started.clear()
            self.secured_headers.clear()
            self.inputs.clear()


SEEN = Seen()


def _tool_return(messages: list[ModelMessage]) -> ToolReturnPart | None:
    """The tool result the model is being asked after, if any."""
    last = messages[-1] if messages else None
    if isinstance(last, ModelRequest):
        for part in last.parts:
            if isinstance(part, ToolReturnPart):
                return part
    return None


# Pydantic AI agents -----------------------------------------------------------------------


async def _answer(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
    for piece in ("Hello", " from", " Pydantic AI."):
        yield piece


async def _reasoning(
    messages: list[ModelMessage], info: AgentInfo
) -> AsyncIterator[str | dict[int, DeltaThinkingPart]]:
    yield {0: DeltaThinkingPart(content="The user wants a greeting.")}
    yield {0: DeltaThinkingPart(content="\n\nI will say hi.")}
    yield "Hi!"


async def _server_tool(
    messages: list[ModelMessage], info: AgentInfo
) -> AsyncIterator[str | dict[int, DeltaToolCall]]:
    done = _tool_return(messages)
    if done is None:
        yield {0: DeltaToolCall("population", '{"city": ', tool_call_id="pop_1")}
        yield {0: DeltaToolCall(None, '"Paris"}')}
        return
    yield f"Paris has {done.content['people']} people."


async def _client_tool(
    messages: list[ModelMessage], info: AgentInfo
) -> AsyncIterator[str | dict[int, DeltaToolCall]]:
    done = _tool_return(messages)
    if done is None:
        assert "calculator" in [t.name for t in info.function_tools], info.function_tools
        yield {0: DeltaToolCall("calculator", '{"expression": "6 * 7"}', tool_call_id="calc_1")}
        return
    yield f"6 * 7 = {done.content}."


async def _state(
    messages: list[ModelMessage], info: AgentInfo
) -> AsyncIterator[str | dict[int, DeltaToolCall]]:
    if _tool_return(messages) is None:
        yield {0: DeltaToolCall("plan", '{"goal": "trip"}', tool_call_id="plan_1")}
        return
    yield "Planned."


async def _slow(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
    SEEN.slow_started.set()
    try:
        for i in range(SLOW_WORDS):
            await asyncio.sleep(SLOW_DELAY_S)
            with SEEN.lock:
                SEEN.slow_words += 1
            yield f"w{i} "
    except BaseException:
        with SEEN.lock:
            SEEN.slow_closed_at = time.monotonic()
        raise


async def _pausable(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
    for i in range(PAUSE_WORDS):
        await asyncio.sleep(PAUSE_DELAY_S)
        yield f"p{i} "


def pause_answer() -> str:
    return "".join(f"p{i} " for i in range(PAUSE_WORDS))


def _agent(stream: Any, name: str) -> Agent[Any, str]:
    return Agent(FunctionModel(stream_function=stream), name=name)


ANSWER = _agent(_answer, "answer")
SERVER_TOOL = _agent(_server_tool, "server_tool")
CLIENT_TOOL = _agent(_client_tool, "client_tool")
STATE = _agent(_state, "state")
SLOW = _agent(_slow, "slow")
PAUSABLE = _agent(_pausable, "pausable")


REASONING = _agent(_reasoning, "reasoning")


@SERVER_TOOL.tool_plain
def population(city: str) -> dict[str, Any]:
    """The population of a city."""
    return {"city": city, "people": 2_100_000}


@STATE.tool_plain
def plan(goal: str) -> ToolReturn[str]:
    """Plan something, keeping the plan in the shared state."""
    return ToolReturn(
        return_value="planned",
        metadata=[
            StateSnapshotEvent(snapshot={"goal": goal, "steps": ["book"]}),
            StateDeltaEvent(
                delta=[
                    {"op": "add", "path": "/steps/-", "value": "pack"},
                    {"op": "replace", "path": "/goal", "value": f"{goal} to Rome"},
                ]
            ),
        ],
    )


def _pai_route(path: str, agent: Agent[Any, str]) -> Route:
    async def endpoint(request: Request) -> Response:
        body = json.loads(await request.body())
        with SEEN.lock:
            SEEN.inputs.setdefault(path, []).append(body)
        if path == "secured":
            with SEEN.lock:
                SEEN.secured_headers.append(dict(request.headers))
            if request.headers.get("authorization") != f"Bearer {TOKEN}":
                return Response("unauthorized", status_code=401)
        return await AGUIAdapter.dispatch_request(request, agent=agent)

    return Route(f"/pai/{path}", endpoint, methods=["POST"])


# In process: the same framework's adapter, as one line of a module --------------------------

inprocess = agui_agent(lambda run: AGUIAdapter(agent=ANSWER, run_input=run).run_stream())
inprocess_tool = agui_agent(lambda run: AGUIAdapter(agent=CLIENT_TOOL, run_input=run).run_stream())


def _recording(agent: Agent[Any, str]) -> Any:
    def stream(run: RunAgentInput) -> AsyncIterator[Any]:
        with SEEN.lock:
            SEEN.inputs.setdefault("inprocess_state", []).append(run.model_dump(by_alias=True))
        return AGUIAdapter(agent=agent, run_input=run).run_stream()

    return stream


inprocess_state = agui_agent(_recording(STATE))


# Hand-written endpoints that break the protocol ------------------------------------------------


def _sse(*events: dict[str, Any] | str) -> list[str]:
    return [e if isinstance(e, str) else f"data: {json.dumps(e)}\n\n" for e in events]


STARTED = {"type": "RUN_STARTED", "threadId": "t", "runId": "r"}
FINISHED = {"type": "RUN_FINISHED", "threadId": "t", "runId": "r"}


def _stream(parts: list[str], *, then_sleep_s: float = 0.0) -> Response:
    async def body() -> AsyncIterator[str]:
        for part in parts:
            yield part
        if then_sleep_s:
            await asyncio.sleep(then_sleep_s)
            yield ": still here\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


async def _raw(request: Request) -> Response:
    kind = request.path_params["kind"]
    text = {"type": "TEXT_MESSAGE_START", "messageId": "m1", "role": "assistant"}
    if kind == "http500":
        return Response("the agent service is down", status_code=500)
    if kind == "html":
        return Response("<html>a login page</html>", media_type="text/html")
    if kind == "badjson":
        return _stream(_sse(STARTED, "data: {not json\n\n"))
    if kind == "schema":
        return _stream(_sse(STARTED, {"type": "TEXT_MESSAGE_CONTENT", "messageId": "m1"}))
    if kind == "unstarted":
        return _stream(
            _sse(STARTED, {"type": "TEXT_MESSAGE_CONTENT", "messageId": "m9", "delta": "x"})
        )
    if kind == "silent":
        return _stream(_sse(STARTED), then_sleep_s=3.0)
    if kind == "run-error":
        return _stream(
            _sse(
                STARTED,
                text,
                {"type": "TEXT_MESSAGE_CONTENT", "messageId": "m1", "delta": "Partial"},
                {"type": "RUN_ERROR", "message": "the model's quota is used up"},
            )
        )
    if kind == "no-finish":
        return _stream(
            _sse(STARTED, text, {"type": "TEXT_MESSAGE_CONTENT", "messageId": "m1", "delta": "Hi"})
        )
    if kind == "interrupt":
        outcome = {"type": "interrupt", "interrupts": [{"id": "i1", "reason": "approval"}]}
        return _stream(_sse(STARTED, {**FINISHED, "outcome": outcome}))
    if kind == "cancelled":
        return _stream(
            _sse(
                STARTED,
                {"type": "TEXT_MESSAGE_CHUNK", "messageId": "m1", "delta": "Stopping"},
                {**FINISHED, "outcome": {"type": "cancelled"}},
            )
        )
    if kind == "forms":
        # The chunk forms, the deprecated THINKING_* events, steps and pass-through events,
        # split across SSE lines and with CR LF line ends.
        return _stream(
            [
                ": a comment\r\n\r\n",
                *_sse(
                    STARTED,
                    {"type": "STEP_STARTED", "stepName": "search"},
                    {"type": "THINKING_TEXT_MESSAGE_CONTENT", "delta": "Old-style thought."},
                    {"type": "THINKING_END"},
                    {"type": "TEXT_MESSAGE_CHUNK", "messageId": "m1", "delta": "Found "},
                    {"type": "TEXT_MESSAGE_CHUNK", "delta": "it"},
                    {"type": "TOOL_CALL_CHUNK", "toolCallId": "k1", "toolCallName": "lookup"},
                    {"type": "TOOL_CALL_CHUNK", "delta": '{"q": '},
                    {"type": "TOOL_CALL_CHUNK", "delta": '"x"}'},
                    {
                        "type": "TOOL_CALL_RESULT",
                        "messageId": "r1",
                        "toolCallId": "k1",
                        "content": '{"hits": 3}',
                    },
                    {"type": "CUSTOM", "name": "progress", "value": {"done": 1}},
                    {
                        "type": "ACTIVITY_SNAPSHOT",
                        "messageId": "a1",
                        "activityType": "search",
                        "content": {"query": "x"},
                    },
                    {"type": "STATE_SNAPSHOT", "snapshot": {"n": 1}},
                    {"type": "STATE_DELTA", "delta": [{"op": "replace", "path": "/n", "value": 2}]},
                    {"type": "TEXT_MESSAGE_START", "messageId": "m2", "role": "assistant"},
                ),
                'data: {"type": "TEXT_MESSAGE_CONTENT",\r\ndata:  "messageId": "m2", ',
                '"delta": "."}\r\n\r\n',
                *_sse({"type": "TEXT_MESSAGE_END", "messageId": "m2"}, FINISHED),
            ]
        )
    if kind == "usage":
        # Usage as AG-UI reports it: one entry per provider and model, in camelCase.
        usage = [
            {"provider": "openai", "model": "gpt-x", "inputTokens": 12, "outputTokens": 5},
            {"model": "small-y", "inputTokens": 3, "outputTokens": 2, "totalTokens": 5},
        ]
        return _stream(
            _sse(
                STARTED,
                {"type": "TEXT_MESSAGE_CHUNK", "messageId": "m1", "delta": "Counted."},
                {**FINISHED, "usage": usage},
            )
        )
    return Response("no such endpoint", status_code=404)


def app() -> Starlette:
    return Starlette(
        routes=[
            _pai_route("answer", ANSWER),
            _pai_route("reasoning", REASONING),
            _pai_route("server-tool", SERVER_TOOL),
            _pai_route("client-tool", CLIENT_TOOL),
            _pai_route("state", STATE),
            _pai_route("slow", SLOW),
            _pai_route("pausable", PAUSABLE),
            _pai_route("secured", ANSWER),
            Route("/raw/{kind}", _raw, methods=["POST"]),
        ]
    )


@contextlib.contextmanager
def agent_server() -> Iterator[str]:
    """Serve the agents on a free loopback port; yields the base URL."""
    port = free_port()
    config = uvicorn.Config(app(), host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"agui:{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the AG-UI test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


async def _always_a_tool(run: RunAgentInput) -> AsyncIterator[dict[str, Any]]:
    """An agent that asks for the calculator, and a tool nobody has, every time."""
    n = len(run.messages)
    with SEEN.lock:
        SEEN.inputs.setdefault("looping", []).append(run.model_dump(by_alias=True))
    yield {"type": "RUN_STARTED", "threadId": run.thread_id, "runId": run.run_id}
    yield {"type": "TOOL_CALL_START", "toolCallId": f"t{n}", "toolCallName": "teleport"}
    yield {"type": "TOOL_CALL_END", "toolCallId": f"t{n}"}
    yield {"type": "TOOL_CALL_START", "toolCallId": f"c{n}", "toolCallName": "calculator"}
    yield {"type": "TOOL_CALL_ARGS", "toolCallId": f"c{n}", "delta": '{"expression": "1 + 1"}'}
    yield {"type": "TOOL_CALL_END", "toolCallId": f"c{n}"}
    yield {"type": "RUN_FINISHED", "threadId": run.thread_id, "runId": run.run_id}


looping = agui_agent(_always_a_tool, max_steps=2)


async def _front_tool(run: RunAgentInput) -> AsyncIterator[dict[str, Any]]:
    """An agent that calls its client's ``get_weather`` when offered one, then answers
    with the result the client sent back."""
    with SEEN.lock:
        SEEN.inputs.setdefault("front_tool", []).append(run.model_dump(by_alias=True))
    yield {"type": "RUN_STARTED", "threadId": run.thread_id, "runId": run.run_id}
    last = run.messages[-1]
    if last.role == "tool":
        yield {"type": "TEXT_MESSAGE_START", "messageId": "w2", "role": "assistant"}
        yield {"type": "TEXT_MESSAGE_CONTENT", "messageId": "w2", "delta": f"It is {last.content}."}
        yield {"type": "TEXT_MESSAGE_END", "messageId": "w2"}
    elif any(tool.name == "get_weather" for tool in run.tools or ()):
        yield {"type": "TOOL_CALL_START", "toolCallId": "w1", "toolCallName": "get_weather"}
        yield {"type": "TOOL_CALL_ARGS", "toolCallId": "w1", "delta": '{"city": "Oslo"}'}
        yield {"type": "TOOL_CALL_END", "toolCallId": "w1"}
    yield {"type": "RUN_FINISHED", "threadId": run.thread_id, "runId": run.run_id}


front_tool = agui_agent(_front_tool, name="front_tool")

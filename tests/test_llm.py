"""The ``llm`` agent: its pure stream assembly, and end to end against an OpenAI-compatible
server on loopback (:mod:`tests.openai_stub`) through the real gateway."""

from __future__ import annotations

import asyncio
import itertools
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from agents.base import Message, RunContext
from agents.errors import LLMError
from agents.llm import (
    ASK_USER_SCHEMA,
    Delta,
    LLMAgent,
    LLMConfig,
    ThinkSplitter,
    ThoughtBuffer,
    ToolCallAssembler,
    ToolCallDelta,
    ToolCallRequest,
    TurnAssembler,
    assistant_message,
    backoff_s,
    build_messages,
    is_retryable,
    parse_arguments,
    parse_chunk,
)
from agents.tools import builtin_tools
from bridge.bridge import EventAdapter, RunBridge
from bridge.broker import RunRecord
from bridge.memory import InMemoryBroker
from server.auth import Authenticator
from server.gateway import Gateway, llm_agent
from server.settings import Settings
from tests import openai_stub as oa
from tests.openai_stub import Hold, OpenAIStub, StreamError, run_stub
from tests.support import (
    SECRET,
    LiveServer,
    check_run_invariants,
    free_port,
    health,
    http_client,
    parse_sse,
    run_server,
    ws_client,
)

API_KEY = "sk-test-0123456789-not-a-real-key"
SYSTEM_PROMPT = "You are the gateway's test assistant."


# The pure parts -----------------------------------------------------------------------


def test_parse_chunk_reads_content_reasoning_tool_calls_and_finish() -> None:
    assert parse_chunk(oa.chunk({"role": "assistant", "content": ""})) == Delta()
    assert parse_chunk(oa.chunk(oa.content("Hi"))) == Delta(content="Hi")
    assert parse_chunk(oa.chunk(oa.reasoning("hmm"))) == Delta(reasoning="hmm")
    assert parse_chunk(oa.chunk(oa.reasoning("hmm", "reasoning"))) == Delta(reasoning="hmm")
    both = {"reasoning_content": "once", "reasoning": "once"}  # servers that send both
    assert parse_chunk(oa.chunk(both)).reasoning == "once"
    first = parse_chunk(oa.chunk(oa.call_start(1, "call_x", "clock")))
    assert first.tool_calls == (ToolCallDelta(1, "call_x", "clock", None),)
    piece = parse_chunk(oa.chunk(oa.call_args(1, '{"a')))
    assert piece.tool_calls == (ToolCallDelta(1, None, None, '{"a'),)
    assert parse_chunk(oa.chunk({}, finish="tool_calls")).finish_reason == "tool_calls"
    for odd in ({}, {"choices": []}, {"choices": [None]}, {"choices": [{"delta": None}]}):
        assert parse_chunk(odd) == Delta()  # usage chunks, and garbage, add nothing


def _fragments(*deltas: dict[str, Any]) -> list[ToolCallDelta]:
    return [f for d in deltas for f in parse_chunk(oa.chunk(d)).tool_calls]


def test_tool_calls_are_assembled_from_fragments() -> None:
    calls = ToolCallAssembler()
    assert not calls
    # Two calls, their argument pieces interleaved, as some servers stream them.
    for fragment in _fragments(
        oa.call_start(0, "call_a", "calculator"),
        oa.call_args(0, '{"expr'),
        oa.call_start(1, "call_b", "clock"),
        oa.call_args(0, 'ession": "1 + 1"}'),
        oa.call_args(1, '{"timezone": "UTC"}'),
    ):
        calls.feed([fragment])
    assert calls.calls() == [
        ToolCallRequest("call_a", "calculator", '{"expression": "1 + 1"}'),
        ToolCallRequest("call_b", "clock", '{"timezone": "UTC"}'),
    ]
    # Servers that number every call 0, and servers that send no index or id.
    same_index = ToolCallAssembler()
    same_index.feed(_fragments(oa.call_start(0, "c1", "clock", "{}")))
    same_index.feed(_fragments(oa.call_start(0, "c2", "clock", "{}")))
    assert [c.id for c in same_index.calls()] == ["c1", "c2"]
    no_index = ToolCallAssembler()
    no_index.feed([ToolCallDelta(name="clock", arguments='{"time')])
    no_index.feed([ToolCallDelta(arguments='zone": "UTC"}')])
    assert no_index.calls("call_3") == [ToolCallRequest("call_3_1", "clock", '{"timezone": "UTC"}')]


def _split_everywhere(text: str) -> Iterator[list[str]]:
    """The text cut at every one and every two places."""
    yield [text]
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]
    for i, j in itertools.combinations(range(1, len(text)), 2):
        yield [text[:i], text[i:j], text[j:]]


def _split(pieces: Sequence[str]) -> tuple[str, str]:
    splitter = ThinkSplitter()
    got = [out for piece in pieces for out in splitter.feed(piece)] + splitter.flush()
    thinking = "".join(text for kind, text in got if kind == "thinking")
    answer = "".join(text for kind, text in got if kind == "answer")
    return thinking, answer


@pytest.mark.parametrize(
    ("content", "thinking", "answer"),
    [
        ("<think>Add them.</think>\n\nIt is 4.", "Add them.", "It is 4."),
        ("\n<think>a < b</think>ok", "a < b", "ok"),
        ("Just an answer.", "", "Just an answer."),
        ("An answer with <think>inside</think>.", "", "An answer with <think>inside</think>."),
        ("<thinking>not the tag", "", "<thinking>not the tag"),
        ("<think>never closed", "never closed", ""),
        ("<thi", "", "<thi"),
        ("<think></think>", "", ""),
    ],
)
def test_a_leading_think_block_is_split_off_wherever_the_chunks_break(
    content: str, thinking: str, answer: str
) -> None:
    for pieces in _split_everywhere(content):
        assert _split(pieces) == (thinking, answer), pieces


def test_the_answer_is_not_held_back_past_the_opening() -> None:
    splitter = ThinkSplitter()
    assert splitter.feed("<") == []  # could still be <think>
    assert splitter.feed("b>bold") == [("answer", "<b>bold")]
    assert splitter.feed(" text") == [("answer", " text")]
    inside = ThinkSplitter()
    assert inside.feed("<think>abc</th") == [("thinking", "abc")]  # only the tag's start held


def test_thoughts_are_paragraphs() -> None:
    buffer = ThoughtBuffer(max_chars=40)
    assert buffer.feed("First, the user") == []
    assert buffer.feed(" asks.\n") == []
    assert buffer.feed("\nSecond") == ["First, the user asks."]
    long = buffer.feed(" paragraph goes on and on and on without a break at all")
    assert long and all(len(t) <= 40 for t in long)
    rest = buffer.flush()
    assert " ".join(long + rest) == "Second paragraph goes on and on and on without a break at all"
    assert buffer.flush() == []


def test_turn_assembler_orders_thinking_before_the_answer_and_leads_once() -> None:
    turn = TurnAssembler(lead="\n\n")
    assert turn.feed(Delta()) == [] and not turn.started
    assert turn.feed(Delta(reasoning="I should greet.")) == []
    assert turn.started
    out = turn.feed(Delta(content="Hel"))
    assert out == [("thinking", "I should greet."), ("answer", "\n\nHel")]
    assert turn.feed(Delta(content="lo")) == [("answer", "lo")]
    assert turn.finish() == []
    assert turn.text == "Hello"  # without the lead: that goes to the client only
    think = TurnAssembler()
    assert think.feed(Delta(content="<think>Hmm.</think>Yes")) == [
        ("thinking", "Hmm."),
        ("answer", "Yes"),
    ]
    assert think.text == "Yes"


def test_build_messages() -> None:
    history = [
        Message("user", "q1"),
        Message("assistant", "a1"),
        Message("user", "q2"),
        Message("assistant", ""),
        Message("tool", "ignored"),
        Message("assistant", "a2"),
    ]
    assert build_messages(history, "q3", system_prompt="S", max_history=3) == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "q2"},  # the cap's first message, an assistant one, dropped
        {"role": "assistant", "content": "a2"},
        {"role": "user", "content": "q3"},
    ]
    assert build_messages(history, "q3", max_history=0) == [{"role": "user", "content": "q3"}]
    assert len(build_messages(history, "q3", max_history=100)) == 5


def test_arguments() -> None:
    assert parse_arguments("") == {} and parse_arguments(" ") == {}
    assert parse_arguments('{"a": 1}') == {"a": 1}
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_arguments('{"a": ')
    with pytest.raises(ValueError, match="must be a JSON object"):
        parse_arguments("[1]")
    message = assistant_message(
        "", [ToolCallRequest("c1", "clock", ""), ToolCallRequest("c2", "calculator", "{oops")]
    )
    assert message["content"] is None
    assert [c["function"]["arguments"] for c in message["tool_calls"]] == ["{}", "{}"]


class _StatusError(Exception):
    def __init__(self, status: int, code: str | None = None, retry_after: str | None = None):
        self.status_code = status
        self.code = code
        self.response = type("R", (), {"headers": {"retry-after": retry_after}})()


def test_what_is_retried_and_how_long_it_waits() -> None:
    assert all(is_retryable(_StatusError(s)) for s in (408, 429, 500, 502, 503))
    assert not any(is_retryable(_StatusError(s)) for s in (400, 401, 403, 404, 422))
    assert not is_retryable(_StatusError(429, code="insufficient_quota"))
    assert 0.4 <= backoff_s(1, 0.25) <= 0.6
    assert backoff_s(0, 0.01, _StatusError(429, retry_after="2")) == 2
    assert backoff_s(0, 0.01, _StatusError(429, retry_after="3600")) < 1  # too long: not waited


def test_secrets_stay_out_of_reprs() -> None:
    config = LLMConfig("http://127.0.0.1:1/v1", "m", api_key=API_KEY)
    assert API_KEY not in repr(config) and API_KEY not in str(config)
    settings = Settings(jwt_secret=SECRET, llm_api_key=API_KEY)
    assert API_KEY not in repr(settings) and SECRET not in repr(settings)


def test_settings_from_env_and_the_default_agent() -> None:
    settings = Settings.from_env(
        {
            "CHAT_LLM_BASE_URL": "http://127.0.0.1:11434/v1",
            "CHAT_LLM_MODEL": "qwen3",
            "CHAT_LLM_API_KEY": "",
            "CHAT_LLM_MAX_STEPS": "3",
            "CHAT_LLM_SYSTEM_PROMPT": "Be brief.",
        }
    )
    assert settings.llm_api_key is None and settings.llm_max_steps == 3
    assert settings.llm_retries == 2 and settings.llm_max_history == 20
    agent = llm_agent(settings)
    assert agent is not None and agent.config.system_prompt == "Be brief."
    assert llm_agent(Settings()) is None
    for env, message in [
        ({"CHAT_LLM_MODEL": "m"}, "set together"),
        ({"CHAT_LLM_MAX_STEPS": "0"}, "at least 1"),
        ({"CHAT_LLM_RETRIES": "-1"}, "must not be negative"),
        ({"CHAT_LLM_TIMEOUT_S": "0"}, "must be positive"),
    ]:
        with pytest.raises(ValueError, match=message):
            Settings.from_env(env)
    base = Settings(jwt_secret=SECRET, db_url="sqlite:///:memory:")
    llm = base.replace(llm_base_url="http://127.0.0.1:1/v1", llm_model="m")
    for settings, default in [
        (base, "demo"),
        (llm, "llm"),
        (llm.replace(default_agent="demo"), "demo"),
    ]:
        assert Gateway(settings, Authenticator(settings)).agents.default == default


def test_without_the_sdk_it_fails_at_startup_saying_how_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "openai", None)  # import openai now raises ImportError
    settings = Settings(jwt_secret=SECRET, llm_base_url="http://127.0.0.1:1/v1", llm_model="m")
    with pytest.raises(RuntimeError, match=r"pip install 'chat-gateway\[llm\]'"):
        Gateway(settings, Authenticator(settings))


# End to end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stub_server() -> Iterator[tuple[LiveServer, OpenAIStub]]:
    """One stub and one gateway whose default agent is ``llm`` on it, for the module."""
    with (
        run_stub() as stub,
        run_server(
            llm_base_url=stub.url,
            llm_model=oa.MODEL,
            llm_api_key=API_KEY,
            llm_system_prompt=SYSTEM_PROMPT,
            llm_retry_backoff_s=0.01,
            llm_timeout_s=5.0,
        ) as server,
    ):
        yield server, stub


@pytest.fixture
def live(stub_server: tuple[LiveServer, OpenAIStub]) -> Iterator[tuple[LiveServer, OpenAIStub]]:
    server, stub = stub_server
    stub.reset()
    yield server, stub
    stub.release_all()


def of_type(events: list[dict[str, Any]], type: str) -> list[dict[str, Any]]:
    return [e["data"] for e in events if e["type"] == type]


def chunks(events: list[dict[str, Any]]) -> list[str]:
    return [d["text"] for d in of_type(events, "response_chunk")]


def completed(events: list[dict[str, Any]]) -> dict[str, Any]:
    check_run_invariants(events)
    data: dict[str, Any] = events[-1]["data"]
    return data


async def until(predicate: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


async def test_health_names_llm_the_default(live: tuple[LiveServer, OpenAIStub]) -> None:
    server, _ = live
    body = await health(server)
    assert body["default_agent"] == "llm" and "llm" in body["agents"]


async def test_a_plain_answer_streams_chunk_by_chunk(
    live: tuple[LiveServer, OpenAIStub], user: str
) -> None:
    server, stub = live
    hold = Hold()
    stub.queue(oa.stream(oa.content("Hel"), oa.content("lo"), hold, oa.content(" world!")))
    async with ws_client(server, user) as client:
        await client.send(type="user_message", content="Say hello")
        got = await client.recv_until("response_chunk")
        got += await client.recv_until("response_chunk")
        # Two chunks are out while the server still holds the rest: nothing is buffered.
        assert chunks(got) == ["Hel", "lo"] and not hold.gate.is_set()
        hold.release()
        events = got + await client.recv_until("agent_completed")
    assert [e["type"] for e in events[:2]] == ["user_message", "agent_started"]
    assert chunks(events) == ["Hel", "lo", " world!"]
    assert completed(events)["status"] == "completed"
    assert events[-2]["data"]["content"] == "Hello world!"
    (request,) = stub.requests
    assert request.body["model"] == oa.MODEL and request.body["stream"] is True
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert request.messages == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "Say hello"},
    ]
    # The built-in tools, and the one the model asks the user with.
    assert request.body["tools"] == [*builtin_tools().schemas(), ASK_USER_SCHEMA]


async def test_a_tool_call_in_pieces_runs_and_its_result_goes_back(
    live: tuple[LiveServer, OpenAIStub], user: str
) -> None:
    server, stub = live
    stub.queue(
        oa.tool_turn(("call_abc", "calculator", ['{"expr', 'ession": "12', ' * 7"}'])),
        oa.stream(oa.content("12 * 7 = "), oa.content("84.")),
    )
    async with ws_client(server, user) as client:
        events = await client.run("What is 12 * 7?")
    types = [e["type"] for e in events]
    # The five critical events, though the model streams no reasoning: each turn is
    # announced by a status line.
    assert types == [
        "user_message",
        "agent_started",
        "agent_thinking",
        "tool_executing",
        "tool_completed",
        "agent_thinking",
        "response_chunk",
        "response_chunk",
        "response_complete",
        "agent_completed",
    ]
    assert of_type(events, "agent_thinking") == [
        {"text": f"Asking {oa.MODEL}.", "kind": "status"},
        {"text": f"Asking {oa.MODEL} again, with the result of calculator.", "kind": "status"},
    ]
    (executing,) = of_type(events, "tool_executing")
    (done,) = of_type(events, "tool_completed")
    assert executing["tool"] == "calculator" and executing["args"] == {"expression": "12 * 7"}
    assert done["call_id"] == executing["call_id"] and done["ok"] and done["result"] == 84
    assert events[-2]["data"]["content"] == "12 * 7 = 84."
    assert completed(events)["status"] == "completed"
    first, second = stub.requests
    assert second.messages[: len(first.messages)] == first.messages
    assert second.messages[-2:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_abc",
                    "type": "function",
                    "function": {"name": "calculator", "arguments": '{"expression": "12 * 7"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_abc", "content": "84"},
    ]


async def test_two_tool_calls_in_one_turn(live: tuple[LiveServer, OpenAIStub], user: str) -> None:
    server, stub = live
    stub.queue(
        oa.stream(
            oa.content("Let me check."),
            oa.call_start(0, "call_1", "calculator"),
            oa.call_args(0, '{"expression":'),
            oa.call_start(1, "call_2", "clock"),
            oa.call_args(0, ' "2 + 2"}'),
            oa.call_args(1, '{"timezone": "UTC"}'),
            finish="tool_calls",
        ),
        oa.stream(oa.content("4, and it is late.")),
    )
    async with ws_client(server, user) as client:
        events = await client.run("2 + 2, and the time?")
    executing = of_type(events, "tool_executing")
    done = of_type(events, "tool_completed")
    assert [(e["tool"], e["args"]) for e in executing] == [
        ("calculator", {"expression": "2 + 2"}),
        ("clock", {"timezone": "UTC"}),
    ]
    assert [d["call_id"] for d in done] == [e["call_id"] for e in executing]
    assert done[0]["result"] == 4 and done[1]["result"]["timezone"] == "UTC"
    # The second turn's answer is a new paragraph after the first turn's words.
    assert events[-2]["data"]["content"] == "Let me check.\n\n4, and it is late."
    assert completed(events)["status"] == "completed"
    tool_messages = [m for m in stub.requests[1].messages if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tool_messages] == ["call_1", "call_2"]
    assert tool_messages[0]["content"] == "4" and '"UTC"' in tool_messages[1]["content"]
    assert stub.requests[1].messages[-3]["content"] == "Let me check."


async def test_malformed_and_unknown_calls_are_failed_calls_the_model_sees(
    live: tuple[LiveServer, OpenAIStub], user: str
) -> None:
    server, stub = live
    stub.queue(
        oa.tool_turn(
            ("call_bad", "calculator", ['{"expression": "1 +']),
            ("call_nope", "teleport", ["{}"]),
        ),
        oa.stream(oa.content("Sorry, those failed.")),
    )
    async with ws_client(server, user) as client:
        events = await client.run("break things")
    assert completed(events)["status"] == "completed"
    done = of_type(events, "tool_completed")
    assert [d["ok"] for d in done] == [False, False]
    assert "not valid JSON" in done[0]["error"] and "no tool named 'teleport'" in done[1]["error"]
    assert of_type(events, "tool_executing")[0]["args"] == {}
    messages = stub.requests[1].messages
    sent_back = messages[-3]["tool_calls"]
    assert [c["function"]["arguments"] for c in sent_back] == ["{}", "{}"]
    tool_messages = [m for m in messages if m["role"] == "tool"]
    assert "not valid JSON" in tool_messages[0]["content"]
    assert "teleport" in tool_messages[1]["content"]


async def test_the_loop_stops_at_max_steps(live: tuple[LiveServer, OpenAIStub], user: str) -> None:
    server, stub = live
    stub.queue(
        *(oa.tool_turn((f"c{i}", "calculator", ['{"expression": "1 + 1"}'])) for i in range(6))
    )
    async with ws_client(server, user) as client:
        events = await client.run("loop forever")
    assert completed(events)["status"] == "completed"
    assert len(stub.requests) == 6 and stub.pending == 0
    assert len(of_type(events, "tool_executing")) == 5
    assert "after 6 steps" in of_type(events, "agent_thinking")[-1]["text"]
    assert chunks(events) == ["I could not finish within 6 steps."]


@pytest.mark.parametrize(
    "script",
    [
        [
            oa.reasoning("The user wants"),
            oa.reasoning(" a greeting.\n\nI will"),
            oa.reasoning(" say hello."),
        ],
        [
            oa.reasoning("The user wants a greeting.\n\n", "reasoning"),
            oa.reasoning("I will say hello.", "reasoning"),
        ],
        [
            oa.content("<thi"),
            oa.content("nk>The user wants a greeting."),
            oa.content("\n\nI will say hello.</th"),
            oa.content("ink>\n\n"),
        ],
    ],
    ids=["reasoning_content", "reasoning", "think-tags"],
)
async def test_reasoning_becomes_thinking_and_never_the_answer(
    live: tuple[LiveServer, OpenAIStub], user: str, script: list[dict[str, Any]]
) -> None:
    server, stub = live
    stub.queue(oa.stream(*script, oa.content("Hello"), oa.content("!")))
    async with ws_client(server, user) as client:
        events = await client.run("Greet me")
    types = [e["type"] for e in events]
    assert types[2:4] == ["agent_thinking", "agent_thinking"]
    assert [d["text"] for d in of_type(events, "agent_thinking")] == [
        "The user wants a greeting.",
        "I will say hello.",
    ]
    assert chunks(events) == ["Hello", "!"] and events[-2]["data"]["content"] == "Hello!"
    assert completed(events)["status"] == "completed"


async def test_reasoning_when_streamed_else_a_status_line_before_each_turn(
    live: tuple[LiveServer, OpenAIStub], user: str
) -> None:
    server, stub = live
    stub.queue(
        oa.stream(
            oa.reasoning("Two sums; the calculator does them."),
            oa.call_start(0, "call_1", "calculator"),
            oa.call_args(0, '{"expression": "2 + 2"}'),
            oa.call_start(1, "call_2", "calculator"),
            oa.call_args(1, '{"expression": "1 / 0"}'),
            finish="tool_calls",
        ),
        oa.stream(oa.content("4, and 1 / 0 has no answer.")),
    )
    async with ws_client(server, user) as client:
        events = await client.run("2 + 2 and 1 / 0")
    assert completed(events)["status"] == "completed"
    types = [e["type"] for e in events]
    assert types.index("agent_thinking") < types.index("tool_executing")
    last_call = max(i for i, t in enumerate(types) if t == "tool_completed")
    assert types[last_call + 1] == "agent_thinking"
    assert types[last_call + 2] == "response_chunk"
    assert of_type(events, "agent_thinking") == [
        {"text": "Two sums; the calculator does them.", "kind": "reasoning"},
        {
            "text": f"Asking {oa.MODEL} again, with the results of calculator and "
            "calculator (failed).",
            "kind": "status",
        },
    ]


def test_status_lines_name_the_model_and_the_tool_results() -> None:
    from agents.llm import status_line

    assert status_line("m", 1, []) == "Asking m."
    assert status_line("m", 2, [("clock", True)]) == "Asking m again, with the result of clock."
    assert status_line("m", 3, [("a", True), ("b", False), ("c", True)]) == (
        "Asking m again, with the results of a, b (failed) and c."
    )


@pytest.mark.parametrize(
    "failure",
    [
        oa.error(500, "overloaded"),
        oa.error(429, "slow down", **{"Retry-After": "0"}),
        oa.error(503, "unavailable"),
        oa.stream(StreamError("engine busy", 503)),  # an error event before any token
    ],
    ids=["500", "429", "503", "error-event"],
)
async def test_a_failure_before_the_first_token_is_retried(
    live: tuple[LiveServer, OpenAIStub], user: str, failure: oa.Reply
) -> None:
    server, stub = live
    stub.queue(failure, oa.stream(oa.content("Recovered.")))
    async with ws_client(server, user) as client:
        events = await client.run("hi")
    assert completed(events)["status"] == "completed"
    assert chunks(events) == ["Recovered."] and len(stub.requests) == 2


async def test_a_failure_after_the_first_token_falls_back(
    live: tuple[LiveServer, OpenAIStub], user: str, caplog: pytest.LogCaptureFixture
) -> None:
    server, stub = live
    stub.queue(oa.stream(oa.content("Partial"), StreamError("engine crashed: CUDA error")))
    with caplog.at_level(logging.WARNING, logger="chat.llm"):
        async with ws_client(server, user) as client:
            events = await client.run("hi")
    end = completed(events)
    assert end["status"] == "failed" and end["error"]["code"] == "llm_error"
    assert "CUDA" not in end["error"]["message"]  # the provider's words stay in the log
    assert "engine crashed: CUDA error" in caplog.text
    assert chunks(events)[0] == "Partial" and events[-2]["data"]["fallback"] is True
    assert events[-2]["data"]["content"].startswith("Partial\n\nSorry")
    assert len(stub.requests) == 1  # not retried: the answer had begun


@pytest.mark.parametrize(
    ("replies", "requests", "message"),
    [
        ([oa.error(500, "a"), oa.error(502, "b"), oa.error(503, "c")], 3, "HTTP 503"),
        ([oa.error(401, f"Incorrect API key provided: {API_KEY}")], 1, "HTTP 401"),
        ([oa.error(400, "bad request")], 1, "HTTP 400"),
    ],
    ids=["retries-exhausted", "401-not-retried", "400-not-retried"],
)
async def test_upstream_errors_end_the_run_with_llm_error(
    live: tuple[LiveServer, OpenAIStub],
    user: str,
    caplog: pytest.LogCaptureFixture,
    replies: list[oa.Reply],
    requests: int,
    message: str,
) -> None:
    server, stub = live
    stub.queue(*replies)
    with caplog.at_level(logging.INFO, logger="chat.llm"):
        async with ws_client(server, user) as client:
            events = await client.run("hi")
    end = completed(events)
    assert end["status"] == "failed" and end["error"]["code"] == "llm_error"
    assert message in end["error"]["message"]
    assert events[-2]["data"]["fallback"] is True and chunks(events)[0].startswith("Sorry")
    assert len(stub.requests) == requests and stub.pending == 0
    assert API_KEY not in caplog.text and API_KEY not in str(events)
    if "401" in message:
        assert "Incorrect API key provided: [redacted]" in caplog.text


async def test_cancel_closes_the_upstream_stream_at_once(
    live: tuple[LiveServer, OpenAIStub], user: str
) -> None:
    server, stub = live
    stub.queue(oa.stream(oa.content("Hel"), Hold(), oa.content("lo")))
    async with ws_client(server, user) as client:
        await client.send(type="user_message", content="Say hello")
        got = await client.recv_until("response_chunk")
        run_id = got[0]["run_id"]
        cancelled_at = time.monotonic()
        await client.send(type="cancel", run_id=run_id)
        got += await client.recv_until("agent_completed")
    (request,) = stub.requests
    await until(lambda: request.disconnected_at is not None, timeout=2)
    assert request.disconnected_at is not None
    assert request.disconnected_at - cancelled_at < 1.0
    events = [e for e in got if e.get("run_id") == run_id]
    assert completed(events)["status"] == "cancelled" and chunks(events) == ["Hel"]


async def test_cancel_while_paused_closes_the_upstream_stream(
    live: tuple[LiveServer, OpenAIStub], user: str
) -> None:
    server, stub = live
    first, second = Hold(), Hold()
    stub.queue(oa.stream(oa.content("Hel"), first, oa.content("lo"), second, oa.content("!")))
    async with ws_client(server, user) as client:
        await client.send(type="user_message", content="Say hello")
        got = await client.recv_until("response_chunk")
        run_id = got[0]["run_id"]
        await client.send(type="stop", run_id=run_id)
        got += await client.recv_until("run_status")
        first.release()  # "lo" is read, and its emit waits for start
        await asyncio.to_thread(second.reached.wait, 5)
        cancelled_at = time.monotonic()
        await client.send(type="cancel", run_id=run_id)
        got += await client.recv_until("agent_completed")
    (request,) = stub.requests
    await until(lambda: request.disconnected_at is not None, timeout=2)
    assert request.disconnected_at is not None
    assert request.disconnected_at - cancelled_at < 1.0
    events = [e for e in got if e.get("run_id") == run_id]
    assert completed(events)["status"] == "cancelled" and chunks(events) == ["Hel"]


async def test_stop_holds_the_events_until_start(
    live: tuple[LiveServer, OpenAIStub], user: str
) -> None:
    server, stub = live
    hold = Hold()
    stub.queue(oa.stream(oa.content("One"), hold, oa.content(" two"), oa.content(" three.")))
    async with ws_client(server, user) as client:
        await client.send(type="user_message", content="Count")
        got = await client.recv_until("response_chunk")
        run_id = got[0]["run_id"]
        await client.send(type="stop", run_id=run_id)
        got += await client.recv_until("run_status")
        hold.release()
        with pytest.raises(TimeoutError):  # the rest of the answer is held while paused
            await client.recv(timeout=0.3)
        (request,) = stub.requests
        assert request.disconnected_at is None  # held, not dropped
        await client.send(type="start", run_id=run_id)
        got += await client.recv_until("agent_completed")
    events = [e for e in got if e.get("run_id") == run_id]
    assert [d["status"] for d in of_type(events, "run_status")] == ["paused", "running"]
    assert chunks(events) == ["One", " two", " three."]
    assert completed(events)["status"] == "completed" and len(stub.requests) == 1


async def test_over_sse(live: tuple[LiveServer, OpenAIStub], user: str) -> None:
    server, stub = live
    stub.queue(
        oa.tool_turn(("call_1", "calculator", ['{"expression": "6 * 7"}'])),
        oa.stream(oa.content("It is "), oa.content("42.")),
    )
    async with http_client(server) as client:
        resp = await client.post(
            "/api/chat/stream", json={"message": "6 * 7?"}, headers=server.headers(user)
        )
    assert resp.status_code == 200
    messages = parse_sse(resp.text)
    assert messages[0]["event"] == "stream_start" and messages[-1]["event"] == "stream_end"
    events = [m["data"] for m in messages[1:-1]]
    assert completed(events)["status"] == "completed"
    assert of_type(events, "tool_completed")[0]["result"] == 42
    assert events[-2]["data"]["content"] == "It is 42."


async def test_the_threads_earlier_messages_go_to_the_model(
    live: tuple[LiveServer, OpenAIStub], user: str
) -> None:
    server, stub = live
    stub.queue(oa.stream(oa.content("Paris.")), oa.stream(oa.content("About 2 million.")))
    async with ws_client(server, user) as client:
        first = await client.run("Capital of France?")
        thread_id = first[0]["thread_id"]
        second = await client.run("Its population?", thread_id=thread_id)
    assert completed(first)["status"] == completed(second)["status"] == "completed"
    assert stub.requests[1].messages == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "Its population?"},
    ]


# In process: the agent on a run context of its own ------------------------------------


class _Controller:
    async def apply(self, action: str) -> str:
        return "running"

    def watchers_changed(self, count: int) -> None:
        pass


async def run_agent(
    agent: LLMAgent, message: str, history: Sequence[Message] = ()
) -> list[dict[str, Any]]:
    """Run the agent straight on a bridge; its events as they would go out."""
    broker = InMemoryBroker(run_log_max_bytes=1 << 20, resume_window_s=60)
    now = time.time()
    await broker.create_run(RunRecord("r_x", "t_x", "u", "llm", "running", now, now), _Controller())
    bridge = RunBridge(broker, "r_x", "t_x")
    adapter = EventAdapter()
    adapter.attach(bridge)
    ctx = RunContext("r_x", "t_x", "u", message, adapter, builtin_tools(), history=history)
    try:
        await agent.run(ctx)
    finally:
        watch = await broker.watch("r_x", 0, lambda: None)
        events = [{"type": e.type, "data": e.data} for e in await watch.read(1000)]
        watch.close()
    return events


async def test_history_is_capped_and_the_system_prompt_comes_first() -> None:
    history = [Message("user" if i % 2 == 0 else "assistant", f"m{i}") for i in range(30)]
    with run_stub() as stub:
        stub.queue(oa.stream(oa.content("ok")))
        config = LLMConfig(stub.url, oa.MODEL, max_history=4, system_prompt="Be brief.")
        events = await run_agent(LLMAgent(config), "now", history)
    assert [e["data"]["text"] for e in events if e["type"] == "response_chunk"] == ["ok"]
    assert stub.requests[0].messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "m26"},
        {"role": "assistant", "content": "m27"},
        {"role": "user", "content": "m28"},
        {"role": "assistant", "content": "m29"},
        {"role": "user", "content": "now"},
    ]
    # No key configured: a placeholder goes out, never OPENAI_API_KEY from the environment.
    assert stub.requests[0].headers["authorization"] == "Bearer unused"


async def test_timeouts_and_unreachable_endpoints_are_retried_then_fail() -> None:
    with run_stub() as stub:
        stub.queue(oa.stream(Hold(), oa.content("late")), oa.stream(Hold(), oa.content("late")))
        config = LLMConfig(stub.url, oa.MODEL, timeout_s=0.2, retries=1, retry_backoff_s=0.01)
        with pytest.raises(LLMError, match="timed out"):
            await run_agent(LLMAgent(config), "hi")
        assert len(stub.requests) == 2
    nowhere = f"http://127.0.0.1:{free_port()}/v1"
    config = LLMConfig(nowhere, oa.MODEL, retries=1, retry_backoff_s=0.01)
    with pytest.raises(LLMError, match="could not be reached") as info:
        await run_agent(LLMAgent(config), "hi")
    assert info.value.code == "llm_error"

"""Token usage: what the model's server (tests/openai_stub.py) or a remote AG-UI agent
reports reaches ``agent_completed``, the stored run behind the status route, and
``/metrics``, through a real gateway on each broker."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from agents.base import RunContext, Usage
from agents.llm import parse_usage
from bridge.bridge import EventAdapter
from tests import agui_servers as ag
from tests import openai_stub as oa
from tests.openai_stub import OpenAIStub, run_stub
from tests.support import LiveServer, check_run_invariants, run_server, ws_client


@pytest.fixture(scope="module", params=["memory", "redis"])
def gateway(request: pytest.FixtureRequest) -> Iterator[tuple[LiveServer, OpenAIStub]]:
    """One gateway whose default agent is ``llm`` on the stub, and an AG-UI agent that
    reports usage, on each broker."""
    extra: dict[str, Any] = {}
    if request.param == "redis":
        extra["broker_url"] = request.getfixturevalue("redis_url")
    with (
        run_stub() as stub,
        ag.agent_server() as base,
        run_server(
            llm_base_url=stub.url,
            llm_model=oa.MODEL,
            llm_api_key="sk-test-usage-0123456789",
            llm_retry_backoff_s=0.01,
            llm_timeout_s=5.0,
            agents=(f"counted={base}/raw/usage",),
            **extra,
        ) as server,
    ):
        yield server, stub


@pytest.fixture
def live(gateway: tuple[LiveServer, OpenAIStub]) -> Iterator[tuple[LiveServer, OpenAIStub]]:
    server, stub = gateway
    stub.reset()
    yield server, stub
    stub.release_all()


async def stored_usage(server: LiveServer, user: str, run_id: str) -> Any:
    """The status route's usage, once the run's end is stored (a queued write)."""
    async with httpx.AsyncClient(base_url=server.http, headers=server.headers(user)) as http:
        async with asyncio.timeout(10):
            while True:
                body = (await http.get(f"/api/chat/agents/{run_id}/status")).json()
                assert body["ok"], body
                if body["status"] == "completed" and body.get("usage") is not None:
                    return body["usage"]
                await asyncio.sleep(0.02)


async def metric_values(server: LiveServer, name: str) -> dict[str, float]:
    """Samples of one metric: the label text inside ``{}`` to its value."""
    async with httpx.AsyncClient(base_url=server.http) as http:
        text = (await http.get("/metrics")).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, _, value = line[len(name) + 1 :].rpartition("} ")
            values[labels] = float(value)
    return values


def tokens(values: dict[str, float], model: str, agent: str, kind: str) -> float:
    return values.get(f'agent="{agent}",kind="{kind}",model="{model}"', 0.0)


async def test_the_llm_agent_asks_for_usage_and_reports_the_sum_of_its_turns(
    live: tuple[LiveServer, OpenAIStub], user: str
) -> None:
    server, stub = live
    before = await metric_values(server, "chat_llm_tokens_total")
    stub.queue(
        oa.tool_turn(("call_u", "calculator", ['{"expression": "6 * 7"}'])),
        oa.stream(oa.content("6 * 7 "), oa.content("is 42.")),
    )
    async with ws_client(server, user) as client:
        events = await client.run("What is six times seven?")
    check_run_invariants(events)
    first, second = stub.requests
    for request in (first, second):
        assert request.body["stream_options"] == {"include_usage": True}
    assert first.usage is not None and second.usage is not None
    want = {
        "input_tokens": first.usage["prompt_tokens"] + second.usage["prompt_tokens"],
        "output_tokens": first.usage["completion_tokens"] + second.usage["completion_tokens"],
        "total_tokens": first.usage["total_tokens"] + second.usage["total_tokens"],
        "model": oa.MODEL,
    }
    assert want["input_tokens"] > 0 and want["output_tokens"] > 0
    done = events[-1]["data"]
    assert done["status"] == "completed" and done["usage"] == want
    assert await stored_usage(server, user, events[1]["run_id"]) == want
    after = await metric_values(server, "chat_llm_tokens_total")
    for kind in ("input", "output"):
        grown = tokens(after, oa.MODEL, "llm", kind) - tokens(before, oa.MODEL, "llm", kind)
        assert grown == want[f"{kind}_tokens"]


async def test_usage_the_server_names_is_reported_as_it_is(
    live: tuple[LiveServer, OpenAIStub], user: str
) -> None:
    server, stub = live
    reply = oa.stream(oa.content("Short."))
    reply.usage = {"prompt_tokens": 1000, "completion_tokens": 7, "total_tokens": 1007}
    stub.queue(reply)
    async with ws_client(server, user) as client:
        events = await client.run("hi")
    assert events[-1]["data"]["usage"] == {
        "input_tokens": 1000,
        "output_tokens": 7,
        "total_tokens": 1007,
        "model": oa.MODEL,
    }


async def test_a_run_that_failed_before_any_usage_has_none(
    live: tuple[LiveServer, OpenAIStub], user: str
) -> None:
    server, stub = live
    stub.queue(oa.error(400, "bad request"))
    async with ws_client(server, user) as client:
        events = await client.run("hi")
    check_run_invariants(events)
    assert events[-1]["data"]["status"] == "failed"
    assert "usage" not in events[-1]["data"]


async def test_an_agui_agent_reports_usage_in_run_finished(
    live: tuple[LiveServer, OpenAIStub], user: str
) -> None:
    server, _ = live
    before = await metric_values(server, "chat_llm_tokens_total")
    async with ws_client(server, user) as client:
        events = await client.run("count", agent="counted")
    check_run_invariants(events)
    want = {"input_tokens": 15, "output_tokens": 7, "total_tokens": 22, "model": "gpt-x+small-y"}
    assert events[-1]["data"]["usage"] == want
    assert await stored_usage(server, user, events[1]["run_id"]) == want
    after = await metric_values(server, "chat_llm_tokens_total")
    # By model: each of the agent's entries on its own.
    for model, kind, count in (
        ("gpt-x", "input", 12),
        ("gpt-x", "output", 5),
        ("small-y", "input", 3),
        ("small-y", "output", 2),
    ):
        grown = tokens(after, model, "counted", kind) - tokens(before, model, "counted", kind)
        assert grown == count, (model, kind)


def test_usage_adds_up_by_model() -> None:
    ctx = RunContext("r", "t", "u", "m", EventAdapter.__new__(EventAdapter), tools=None)  # type: ignore[arg-type]
    assert ctx.usage is None
    ctx.report_usage(Usage(10, 2, 12, "a"))
    ctx.report_usage(Usage(1, 1, 2, "a"))
    ctx.report_usage(Usage(5, 5, 10, "b"))
    assert ctx.usage_by_model() == [Usage(11, 3, 14, "a"), Usage(5, 5, 10, "b")]
    assert ctx.usage == Usage(16, 8, 24, "a+b")


def test_parse_usage() -> None:
    assert parse_usage({"choices": [], "usage": None}, "m") is None
    assert parse_usage({"usage": {"prompt_tokens": 3, "completion_tokens": 4}}, "m") == Usage(
        3, 4, 7, "m"
    )
    named = {"model": "served", "usage": {"prompt_tokens": 1, "completion_tokens": -2}}
    assert parse_usage(named, "m") == Usage(1, 0, 1, "served")


async def test_the_status_route_shows_the_usage_once_the_broker_forgot_the_run(
    user: str,
) -> None:
    with (
        ag.agent_server() as base,
        run_server(agents=(f"counted={base}/raw/usage",), resume_window_s=0.2) as server,
    ):
        async with ws_client(server, user) as client:
            events = await client.run("count", agent="counted")
            run_id = events[1]["run_id"]
            await asyncio.sleep(0.5)  # past the resume window: only the database has it
            await client.send(type="resume", run_id=run_id, after_seq=0)
            assert (await client.recv())["data"]["code"] == "not_found"
        async with httpx.AsyncClient(base_url=server.http, headers=server.headers(user)) as http:
            body = (await http.get(f"/api/chat/agents/{run_id}/status")).json()
    assert body["status"] == "completed"
    assert body["usage"] == events[-1]["data"]["usage"]
    assert body["usage"]["total_tokens"] == 22


async def test_usage_can_be_left_unasked(user: str) -> None:
    with (
        run_stub() as stub,
        run_server(llm_base_url=stub.url, llm_model=oa.MODEL, llm_usage="off") as server,
    ):
        stub.queue(oa.stream(oa.content("Hi.")))
        async with ws_client(server, user) as client:
            events = await client.run("hi", agent="llm")
    (request,) = stub.requests
    assert "stream_options" not in request.body and request.usage is None
    assert events[-1]["data"]["status"] == "completed"
    assert "usage" not in events[-1]["data"]

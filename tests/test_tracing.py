"""Traces: a run's spans, from the client's trace context to the model, the tools, a
remote agent, the store and another process, recorded by the SDK's in-memory exporter.

The gateways are real uvicorn servers on loopback in this process (``run_server``),
two of them sharing one redis-server for the hop across processes; they share the
process's tracer provider, whose in-memory exporter the tests read.  The OTLP test
runs a gateway process of its own against an OTLP/HTTP receiver of the test.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import secrets
import statistics
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bridge import logctx, tracing
from server.logs import JsonFormatter
from tests import agui_servers as ag
from tests import openai_stub as oa
from tests.openai_stub import run_stub
from tests.support import (
    check_run_invariants,
    free_port,
    run_server,
    spawn_server,
    wait_for,
    ws_client,
)

EXPORTER = InMemorySpanExporter()


@pytest.fixture(autouse=True)
def traced() -> Iterator[InMemorySpanExporter]:
    """Spans recorded for the test's gateways; none for the other tests' after it."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    tracing.install(provider)
    EXPORTER.clear()
    try:
        yield EXPORTER
    finally:
        tracing.uninstall()
        EXPORTER.clear()


def client_context() -> tuple[str, int, int]:
    """A client's ``traceparent`` and the trace and span ids it names."""
    trace_id = int.from_bytes(secrets.token_bytes(16), "big") or 1
    span_id = int.from_bytes(secrets.token_bytes(8), "big") or 1
    return f"00-{trace_id:032x}-{span_id:016x}-01", trace_id, span_id


def spans_of(trace_id: int) -> list[ReadableSpan]:
    return [s for s in EXPORTER.get_finished_spans() if s.context.trace_id == trace_id]


def one(spans: Sequence[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, (name, [s.name for s in spans])
    return found[0]


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def run_span(run_id: str) -> ReadableSpan:
    """The run's span, once it has ended (after ``agent_completed`` is out)."""

    async def ended() -> bool:
        return any(
            s.attributes.get("chat.run_id") == run_id and s.name.startswith("chat.run")
            for s in EXPORTER.get_finished_spans()
            if s.attributes is not None
        )

    await wait_for(ended, timeout=10)
    return next(
        s
        for s in EXPORTER.get_finished_spans()
        if s.attributes is not None
        and s.attributes.get("chat.run_id") == run_id
        and s.name.startswith("chat.run")
    )


def all_values(spans: Sequence[ReadableSpan]) -> str:
    """Every attribute value and event of the spans, as one text."""
    parts: list[str] = []
    for span in spans:
        parts.append(span.name)
        for value in (span.attributes or {}).values():
            parts.append(str(value))
        for event in span.events:
            parts.extend(str(v) for v in (event.attributes or {}).values())
    return "\n".join(parts)


async def test_a_run_and_a_command_from_another_process_are_one_trace_under_the_clients(
    redis_url: str, user: str
) -> None:
    traceparent, trace_id, client_span = client_context()
    with (
        run_server(broker_url=redis_url, typing_delay_ms=20) as a,
        run_server(broker_url=redis_url) as b,
    ):
        async with ws_client(a, user) as on_a, ws_client(b, user) as on_b:
            await on_a.send(type="user_message", content="hello there", traceparent=traceparent)
            first = await on_a.recv_until("agent_started")
            run_id = first[-1]["run_id"]
            # A client of the other process pauses and resumes the run over the bus.
            await on_b.send(type="stop", run_id=run_id, id="s")
            assert (await on_b.recv_until("ack"))[-1]["data"]["status"] == "paused"
            await on_b.send(type="start", run_id=run_id, id="g")
            assert (await on_b.recv_until("ack"))[-1]["data"]["status"] == "running"
            events = first + await on_a.recv_until("agent_completed")
    check_run_invariants([e for e in events if "seq" in e])
    run = await run_span(run_id)
    spans = spans_of(trace_id)
    assert run.context.trace_id == trace_id
    assert parent_id(run) == client_span and run.parent is not None and run.parent.is_remote
    assert run.kind is SpanKind.SERVER
    attrs = run.attributes or {}
    assert attrs["chat.run_id"] == run_id
    assert attrs["chat.thread_id"] == events[0]["thread_id"]
    assert attrs["chat.agent"] == "demo"
    assert attrs["chat.run.status"] == "completed"
    assert attrs["chat.run.events"] == events[-1]["seq"]
    assert attrs["chat.run.answer_bytes"] > 0
    assert 0 < float(attrs["chat.run.time_to_first_event_s"]) < 10  # type: ignore[arg-type]
    # On b: the command, in the run's trace (from its record in Redis) ...
    for action in ("stop", "start"):
        sent = one(spans, f"chat.command {action}")
        assert parent_id(sent) == run.context.span_id
        # ... and on a, where the run executes: its application, a child of b's span.
        applied = one(spans, f"chat.command.apply {action}")
        assert parent_id(applied) == sent.context.span_id
        sent_attrs, applied_attrs = sent.attributes or {}, applied.attributes or {}
        assert sent_attrs["chat.run_id"] == applied_attrs["chat.run_id"] == run_id
        # Two processes: the sender is not the node that runs the run.
        assert applied_attrs["chat.command.from"] != sent_attrs["chat.node"]
    # The store's transactions: roots of their own, linked to the run.
    linked = [
        s
        for s in EXPORTER.get_finished_spans()
        if s.name == "chat.store.write"
        and any(k.context.span_id == run.context.span_id for k in s.links)
    ]
    assert linked and all(s.parent is None for s in linked)
    assert {"db.system.name", "db.operation.batch.size"} <= set(linked[0].attributes or {})


async def test_model_and_tool_spans_carry_the_genai_attributes_and_the_servers_token_counts(
    user: str,
) -> None:
    traceparent, trace_id, _ = client_context()
    question, answer = "What is six times seven?", "is 42."
    with (
        run_stub() as stub,
        run_server(
            llm_base_url=stub.url,
            llm_model=oa.MODEL,
            llm_api_key="sk-test-traces-0123456789",
            llm_timeout_s=5.0,
        ) as server,
    ):
        stub.queue(
            oa.tool_turn(("call_t", "calculator", ['{"expression": "6 * 7"}'])),
            oa.stream(oa.content("6 * 7 "), oa.content(answer)),
        )
        async with ws_client(server, user) as client:
            events = await client.run(question, agent="llm", traceparent=traceparent)
        check_run_invariants(events)
        requests = list(stub.requests)
    run = await run_span(events[0]["run_id"])
    spans = spans_of(trace_id)
    models = sorted((s for s in spans if s.name == f"chat {oa.MODEL}"), key=lambda s: s.start_time)
    assert len(models) == 2 == len(requests)
    for span, request, finish in zip(models, requests, ("tool_calls", "stop"), strict=True):
        attrs = span.attributes or {}
        assert span.kind is SpanKind.CLIENT and parent_id(span) == run.context.span_id
        assert attrs["gen_ai.operation.name"] == "chat"
        assert attrs["gen_ai.system"] == attrs["gen_ai.provider.name"] == "openai"
        assert attrs["gen_ai.request.model"] == oa.MODEL
        assert request.usage is not None
        assert attrs["gen_ai.usage.input_tokens"] == request.usage["prompt_tokens"] > 0
        assert attrs["gen_ai.usage.output_tokens"] == request.usage["completion_tokens"] > 0
        assert tuple(attrs["gen_ai.response.finish_reasons"]) == (finish,)  # type: ignore[arg-type]
        assert float(attrs["gen_ai.response.time_to_first_chunk"]) >= 0  # type: ignore[arg-type]
        assert attrs["server.address"] == "127.0.0.1"
    tool = one(spans, "execute_tool calculator")
    assert parent_id(tool) == run.context.span_id
    tool_attrs = tool.attributes or {}
    assert tool_attrs["gen_ai.tool.name"] == "calculator"
    announced = next(e for e in events if e["type"] == "tool_executing")
    assert tool_attrs["gen_ai.tool.call.id"] == announced["data"]["call_id"]
    assert models[0].end_time is not None and tool.start_time is not None
    assert models[0].end_time <= tool.start_time
    # The run's span sums the tokens, as agent_completed does.
    usage = events[-1]["data"]["usage"]
    run_attrs = run.attributes or {}
    assert run_attrs["gen_ai.usage.input_tokens"] == usage["input_tokens"]
    assert run_attrs["gen_ai.usage.output_tokens"] == usage["output_tokens"]
    # No content by default: not the question, the answer, the arguments or the result.
    text = all_values(spans)
    for secret in (question, answer, "6 * 7"):
        assert secret not in text, secret
    for key in ("gen_ai.tool.call.arguments", "gen_ai.tool.call.result"):
        assert key not in tool_attrs
    assert not any(
        k.startswith(("chat.message", "chat.answer", "gen_ai.input", "gen_ai.output"))
        for s in spans
        for k in (s.attributes or {})
    )


async def test_content_goes_into_spans_only_with_the_setting(user: str) -> None:
    traceparent, trace_id, _ = client_context()
    question, answer = "What is six times seven?", "is 42."
    with (
        run_stub() as stub,
        run_server(
            llm_base_url=stub.url,
            llm_model=oa.MODEL,
            llm_api_key="sk-test-traces-0123456789",
            llm_timeout_s=5.0,
            trace_content="on",
        ) as server,
    ):
        stub.queue(
            oa.tool_turn(("call_c", "calculator", ['{"expression": "6 * 7"}'])),
            oa.stream(oa.content("6 * 7 "), oa.content(answer)),
        )
        try:
            async with ws_client(server, user) as client:
                events = await client.run(question, agent="llm", traceparent=traceparent)
        finally:
            tracing.configure(content=False)
    run = await run_span(events[0]["run_id"])
    spans = spans_of(trace_id)
    assert (run.attributes or {})["chat.message.content"] == question
    assert (run.attributes or {})["chat.answer.content"] == "6 * 7 is 42."
    tool = one(spans, "execute_tool calculator").attributes or {}
    assert tool["gen_ai.tool.call.arguments"] == '{"expression":"6 * 7"}'
    assert "42" in str(tool["gen_ai.tool.call.result"])
    first = min((s for s in spans if s.name.startswith("chat ")), key=lambda s: s.start_time)
    assert question in str((first.attributes or {})["gen_ai.input.messages"])


async def test_a_remote_agui_agent_receives_a_traceparent_in_the_runs_trace(user: str) -> None:
    traceparent, trace_id, _ = client_context()
    ag.SEEN.reset()
    with (
        ag.agent_server() as base,
        run_server(agents=(f"remote={base}/pai/secured",)) as server,
    ):
        async with ws_client(server, user) as client:
            events = await client.run("hi", agent="remote", traceparent=traceparent)
    check_run_invariants(events)
    run = await run_span(events[0]["run_id"])
    (headers,) = ag.SEEN.secured_headers
    version, sent_trace, sent_span, flags = headers["traceparent"].split("-")
    assert version == "00" and flags == "01"
    assert int(sent_trace, 16) == trace_id == run.context.trace_id
    request = one(spans_of(trace_id), "invoke_agent remote")
    # The header names the request's span, whose parent is the run's.
    assert int(sent_span, 16) == request.context.span_id
    assert parent_id(request) == run.context.span_id
    assert request.kind is SpanKind.CLIENT
    attrs = request.attributes or {}
    assert attrs["gen_ai.agent.name"] == "remote"
    assert attrs["url.full"] == f"{base}/pai/secured"


async def test_the_traceparent_header_of_http_routes_is_the_runs_parent(user: str) -> None:
    with run_server() as server:
        for path, body in (
            ("/api/chat/stream", {"message": "hi"}),
            (
                "/api/ai-sdk/chat",
                {
                    "id": f"c-{user}",
                    "messages": [
                        {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}
                    ],
                    "trigger": "submit-message",
                },
            ),
            (
                "/api/ag-ui/demo",
                {
                    "threadId": f"t-{user}",
                    "runId": "client-run",
                    "state": None,
                    "messages": [{"id": "m1", "role": "user", "content": "hi"}],
                    "tools": [],
                    "context": [],
                    "forwardedProps": {},
                },
            ),
        ):
            traceparent, trace_id, client_span = client_context()
            headers = {**server.headers(user), "traceparent": traceparent}
            async with (
                httpx.AsyncClient(base_url=server.http, timeout=10) as http,
                http.stream("POST", path, json=body, headers=headers) as resp,
            ):
                assert resp.status_code == 200, path
                text = b"".join([chunk async for chunk in resp.aiter_bytes()]).decode()
                run_id = resp.headers.get("x-chat-run-id")
            if run_id is None:
                found = re.search(r"\b(r_[A-Za-z0-9_-]{16})\b", text)
                assert found is not None, text[:500]
                run_id = found.group(1)
            run = await run_span(run_id)
            assert run.context.trace_id == trace_id, path
            assert parent_id(run) == client_span, path


async def test_a_run_without_a_traceparent_is_a_root_and_a_bad_one_is_ignored(user: str) -> None:
    with run_server() as server:
        async with ws_client(server, user) as client:
            plain = await client.run("hi")
            bad = await client.run("hi", traceparent="00-zz-not-a-context")
    for events in (plain, bad):
        check_run_invariants(events)
        run = await run_span(events[0]["run_id"])
        assert run.parent is None


async def test_log_lines_of_a_run_carry_its_trace_id(user: str) -> None:
    traceparent, trace_id, _ = client_context()
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect(logging.WARNING)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("chat")
    logger.addHandler(handler)
    try:
        with (
            run_stub() as stub,
            run_server(
                llm_base_url=stub.url,
                llm_model=oa.MODEL,
                llm_retries=0,
                llm_timeout_s=5.0,
            ) as server,
        ):
            stub.queue(oa.error(400, "bad request"))
            async with ws_client(server, user) as client:
                events = await client.run("hi", agent="llm", traceparent=traceparent)
    finally:
        logger.removeHandler(handler)
    assert events[-1]["data"]["status"] == "failed"
    import orjson

    mine = [orjson.loads(line) for line in lines]
    mine = [line for line in mine if line["run_id"] == events[0]["run_id"]]
    assert mine, lines
    assert all(line["trace_id"] == f"{trace_id:032x}" for line in mine)
    # The failed request's span says what failed, by type, not the server's words.
    run = await run_span(events[0]["run_id"])
    model = one(spans_of(trace_id), f"chat {oa.MODEL}")
    assert model.status.status_code is StatusCode.ERROR
    assert (model.attributes or {})["error.type"] == "BadRequestError"
    assert "bad request" not in all_values([model]) + (model.status.description or "")
    assert (run.attributes or {})["chat.run.status"] == "failed"
    assert run.status.status_code is StatusCode.ERROR
    assert logctx.TRACE_ID.get() is None  # the test's own context has none


async def test_tracing_off_records_nothing_and_keeps_no_context(
    redis_url: str, user: str, traced: InMemorySpanExporter
) -> None:
    import redis.asyncio as aioredis

    tracing.uninstall()
    traceparent, _, _ = client_context()
    with run_server(broker_url=redis_url) as server:
        async with ws_client(server, user) as client:
            events = await client.run("hi", traceparent=traceparent)
    check_run_invariants(events)
    assert traced.get_finished_spans() == ()
    r = aioredis.from_url(redis_url)
    try:
        fields = await r.hgetall(f"chat:run:{events[0]['run_id']}")
    finally:
        await r.aclose()
    assert fields and fields.get(b"traceparent", b"") == b""


# OTLP over HTTP, from a gateway process ----------------------------------------------


@contextlib.contextmanager
def otlp_receiver() -> Iterator[tuple[str, list[bytes]]]:
    """An OTLP/HTTP endpoint on loopback that keeps the bodies posted to /v1/traces."""
    bodies: list[bytes] = []

    async def traces(request: Request) -> Response:
        bodies.append(await request.body())
        return Response(b"", media_type="application/x-protobuf")

    app = Starlette(routes=[Route("/v1/traces", traces, methods=["POST"])])
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", bodies
    finally:
        server.should_exit = True
        thread.join(timeout=20)


async def test_a_gateway_process_exports_its_spans_over_otlp(tmp_path: Path, user: str) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    traceparent, trace_id, client_span = client_context()
    with otlp_receiver() as (endpoint, bodies):
        env = {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_SERVICE_NAME": "gateway-under-test",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
        }
        with spawn_server(tmp_path, **env) as server:
            async with ws_client(server, user) as client:
                events = await client.run("hello", traceparent=traceparent)
            check_run_invariants(events)

            def exported() -> list[Any]:
                found = []
                for body in list(bodies):
                    request = ExportTraceServiceRequest.FromString(body)
                    for resource in request.resource_spans:
                        service = {
                            a.key: a.value.string_value for a in resource.resource.attributes
                        }["service.name"]
                        for scope in resource.scope_spans:
                            found += [(service, s) for s in scope.spans]
                return found

            async def run_exported() -> bool:
                return any(s.name.startswith("chat.run") for _, s in exported())

            await wait_for(run_exported, timeout=15)
    service, run = next((sv, s) for sv, s in exported() if s.name.startswith("chat.run"))
    assert service == "gateway-under-test"
    assert int.from_bytes(run.trace_id, "big") == trace_id
    assert int.from_bytes(run.parent_span_id, "big") == client_span
    attrs = {a.key: a.value for a in run.attributes}
    assert attrs["chat.run_id"].string_value == events[0]["run_id"]
    assert attrs["chat.run.status"].string_value == "completed"


def test_no_exporter_named_installs_nothing() -> None:
    tracing.uninstall()
    for env in ({}, {"OTEL_TRACES_EXPORTER": "none"}, {"OTEL_TRACES_EXPORTER": ""}):
        assert tracing.configure(environ=env) is False
        assert not tracing.enabled()
    with pytest.raises(RuntimeError, match="unknown exporter"):
        tracing.configure(environ={"OTEL_TRACES_EXPORTER": "zipkin-please"})
    assert not tracing.enabled()
    # An exporter registered as an entry point, as the SDK's own configuration finds it.
    assert tracing.configure(environ={"OTEL_TRACES_EXPORTER": "otlp_proto_http"}) is True
    assert tracing.enabled()
    tracing.shutdown()
    tracing.uninstall()


# Overhead, measured (no threshold: the figures are recorded) --------------------------


def record_figures(name: str, figures: dict[str, Any]) -> None:
    out = Path(__file__).resolve().parent.parent / "var" / "figures"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\n{name}: {figures}")


async def test_tracing_overhead_per_run_is_measured(user: str) -> None:
    """Runs one after the other through one gateway, in alternating blocks with traces
    off and on (the in-memory exporter): the time per run and the fraction it grows,
    for a short run and a long one (the spans are per run, not per event)."""
    figures: dict[str, Any] = {
        "exporter": "InMemorySpanExporter via SimpleSpanProcessor (in process)",
        "note": "client and gateway share this process: times are the client's round trips",
    }
    with run_server(rate_limit_per_minute=100_000, max_active_runs_per_user=1_000) as server:
        async with ws_client(server, user) as client:
            for name, message in (
                ("short", "chunks=20 tools=1 thinking=1"),
                ("long", "chunks=2000 tools=1 thinking=1"),
            ):
                figures[name] = await overhead_of(client, message)
    record_figures("tracing_overhead", figures)


async def overhead_of(client: Any, message: str) -> dict[str, Any]:
    blocks, per_block = 6, 25
    timings: dict[str, list[float]] = {"off": [], "on": []}
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    spans_per_run = 0.0
    for _ in range(5):  # warm-up
        await client.run(message, agent="load")
    for block in range(blocks):
        mode = "on" if block % 2 else "off"
        if mode == "on":
            tracing.install(provider)
        else:
            tracing.uninstall()
        EXPORTER.clear()
        began_ns = time.time_ns()
        began = time.perf_counter()
        for _ in range(per_block):
            events = await client.run(message, agent="load")
        timings[mode].append((time.perf_counter() - began) / per_block * 1000)
        check_run_invariants(events)
        # Spans begun in this block (the previous block's last run may end in it).
        spans = EXPORTER.get_finished_spans()
        made = sum(1 for s in spans if (s.start_time or 0) >= began_ns)
        if mode == "on":
            assert made >= per_block  # every run made its span (and more)
            spans_per_run = made / per_block
        else:
            assert made == 0
    tracing.uninstall()
    off = statistics.median(timings["off"])
    on = statistics.median(timings["on"])
    return {
        "message": message,
        "events_per_run": len(events),
        "runs_per_block": per_block,
        "ms_per_run_off": [round(t, 3) for t in timings["off"]],
        "ms_per_run_on": [round(t, 3) for t in timings["on"]],
        "median_ms_per_run_off": round(off, 3),
        "median_ms_per_run_on": round(on, 3),
        "overhead_ms_per_run": round(on - off, 3),
        "overhead_fraction": round(on / off - 1, 4),
        "spans_per_run": round(spans_per_run, 2),
    }

"""Traces with OpenTelemetry: a span per run, its tool calls, model and agent requests.

Off unless an exporter is named: ``OTEL_TRACES_EXPORTER`` unset or ``none`` installs
no tracer provider, and every hook here returns at its first test (the module's
tracer is None).  ``otlp`` (the ``otlp`` extra: OTLP over HTTP to
``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) and
``console`` are the exporters; the service is ``OTEL_SERVICE_NAME``, with
``OTEL_RESOURCE_ATTRIBUTES``; the batch processor reads ``OTEL_BSP_*``.

The parent of a run's span is the W3C trace context of the message that started it:
the ``traceparent`` field of a ``user_message``, or the ``traceparent`` header of an
HTTP request.  The run's context is kept in its run record (in Redis with the Redis
broker, as ``traceparent``), so a command sent by another process, and the process
that runs it, join the run's trace; a bus command carries its sender's context.

Message content (the user's message, the answer, tool arguments and results) goes
into spans only with ``CHAT_TRACE_CONTENT=on``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping, MutableMapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Final

from bridge import logctx

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger("chat.tracing")

SCOPE: Final = "chat-gateway"
#: The most characters of content a span attribute holds (with CHAT_TRACE_CONTENT=on).
CONTENT_MAX_CHARS: Final = 4096
#: A traceparent longer than this is not one (W3C: 55 characters for version 00).
TRACEPARENT_MAX_CHARS: Final = 256

_tracer: Tracer | None = None
_provider: TracerProvider | None = None
_content = False
#: The trace context a request or a ``user_message`` came with, for the run it starts.
_INCOMING: Final[ContextVar[str | None]] = ContextVar("chat_incoming_traceparent", default=None)


def enabled() -> bool:
    return _tracer is not None


def content_enabled() -> bool:
    return _tracer is not None and _content


def configure(content: bool = False, environ: Mapping[str, str] | None = None) -> bool:
    """Install a tracer provider if ``OTEL_TRACES_EXPORTER`` names an exporter.

    Once per process: a provider already installed (:func:`install`) is kept.
    Answers whether traces are recorded.
    """
    global _content
    _content = content
    if _tracer is not None:
        return True
    env = os.environ if environ is None else environ
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",")]
    names = [n for n in names if n and n != "none"]
    if not names or env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": _service_name(env)}))
    for name in names:
        exporter: SpanExporter
        if name == "otlp":
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                    OTLPSpanExporter,
                )
            except ImportError as exc:
                raise RuntimeError(
                    "OTEL_TRACES_EXPORTER=otlp needs the otlp extra: "
                    "pip install 'chat-gateway[otlp]'"
                ) from exc
            exporter = OTLPSpanExporter()
        elif name == "console":
            exporter = ConsoleSpanExporter()
        else:
            exporter = _exporter_of_entry_point(name)
        provider.add_span_processor(BatchSpanProcessor(exporter))
    install(provider, content=content)
    log.info("traces: exporting to %s", ", ".join(names))
    return True


def _exporter_of_entry_point(name: str) -> SpanExporter:
    """An exporter an installed package registers, as the SDK's own configuration finds
    them (the ``opentelemetry_traces_exporter`` entry points: ``otlp_proto_grpc``,
    ``zipkin_json``, …)."""
    from importlib.metadata import entry_points

    found = list(entry_points(group="opentelemetry_traces_exporter", name=name))
    if not found:
        raise RuntimeError(
            f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} "
            "(otlp, console, or one an installed package registers)"
        )
    exporter: SpanExporter = found[0].load()()
    return exporter


def _service_name(env: Mapping[str, str]) -> str:
    return env.get("OTEL_SERVICE_NAME") or "chat-gateway"


def install(provider: TracerProvider, *, content: bool = False) -> None:
    """Record spans with ``provider`` (set as the global one if none is)."""
    global _tracer, _provider, _content
    from opentelemetry import trace

    _provider = provider
    _content = content
    _tracer = provider.get_tracer(SCOPE)
    if not isinstance(trace.get_tracer_provider(), type(provider)):
        trace.set_tracer_provider(provider)


def uninstall() -> None:
    """Record nothing again (tests)."""
    global _tracer, _provider
    _tracer = None
    _provider = None


def shutdown() -> None:
    """Export what is buffered (at the process's end)."""
    if _provider is not None:
        _provider.force_flush(5000)


# Trace context ---------------------------------------------------------------------


def incoming(traceparent: str | None, tracestate: str | None = None) -> None:
    """The trace context the message being handled came with (None: none).

    The next run this task starts takes it as its parent; it is set for every
    ``user_message``, so one message's context never passes to the next."""
    if _tracer is None:
        return
    if traceparent is not None and len(traceparent) > TRACEPARENT_MAX_CHARS:
        traceparent = None
    if traceparent is not None and tracestate:
        traceparent = f"{traceparent}\n{tracestate[:512]}"
    _INCOMING.set(traceparent)


def _context_of(carried: str | None) -> Context | None:
    """The context a carried ``traceparent`` (with its ``tracestate`` after a newline)
    names, or None for none (or one that does not parse)."""
    if not carried:
        return None
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    parent, _, state = carried.partition("\n")
    carrier = {"traceparent": parent}
    if state:
        carrier["tracestate"] = state
    ctx = TraceContextTextMapPropagator().extract(carrier)
    if not trace.get_current_span(ctx).get_span_context().is_valid:
        return None
    return ctx


def traceparent_of(span: Span | None) -> str | None:
    """The W3C ``traceparent`` that names ``span``."""
    if span is None:
        return None
    sc = span.get_span_context()
    if not sc.is_valid:
        return None
    return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"


def current_traceparent() -> str | None:
    """The ``traceparent`` of the current span (None with tracing off or none current)."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    return traceparent_of(trace.get_current_span())


def inject(headers: MutableMapping[str, str]) -> None:
    """Add the current span's ``traceparent`` (and ``tracestate``) to request headers."""
    if _tracer is None:
        return
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    TraceContextTextMapPropagator().inject(headers)


def _clip(text: str) -> str:
    return text if len(text) <= CONTENT_MAX_CHARS else text[:CONTENT_MAX_CHARS] + "…"


def _json(value: object) -> str:
    import orjson

    try:
        return _clip(orjson.dumps(value, default=str).decode())
    except TypeError:
        return _clip(repr(value))


# Runs ------------------------------------------------------------------------------


def start_run(
    run_id: str, thread_id: str, owner: str, agent: str, content: str, extra: dict[str, object]
) -> Span | None:
    """The run's span, its parent the incoming trace context (else the current one).

    Its ``traceparent`` goes into the run record's ``extra`` for other processes."""
    if _tracer is None:
        return None
    from opentelemetry.trace import SpanKind

    carried = _INCOMING.get()
    _INCOMING.set(None)
    parent = _context_of(carried)
    attributes: dict[str, Any] = {
        "chat.run_id": run_id,
        "chat.thread_id": thread_id,
        "chat.agent": agent,
        "gen_ai.agent.name": agent,
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.conversation.id": thread_id,
        "enduser.id": owner,
    }
    if _content:
        attributes["chat.message.content"] = _clip(content)
    span = _tracer.start_span(
        f"chat.run {agent}", context=parent, kind=SpanKind.SERVER, attributes=attributes
    )
    extra["traceparent"] = traceparent_of(span)
    return span


def bind_run(span: Span | None) -> None:
    """Make the run's span the current one of the run's task (and the tasks it starts),
    and its trace id the log lines' ``trace_id``."""
    if span is None:
        return
    from opentelemetry import context, trace

    context.attach(trace.set_span_in_context(span))
    logctx.TRACE_ID.set(f"{span.get_span_context().trace_id:032x}")


def end_run(
    span: Span | None,
    *,
    status: str,
    error_code: str | None,
    events: int,
    answer_bytes: int,
    first_event_s: float | None,
    usage: Mapping[str, object] | None,
    answer: str,
) -> None:
    if span is None:
        return
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("chat.run.status", status)
    span.set_attribute("chat.run.events", events)
    span.set_attribute("chat.run.answer_bytes", answer_bytes)
    if error_code:
        span.set_attribute("error.type", error_code)
        span.set_attribute("chat.run.error_code", error_code)
    if first_event_s is not None:
        span.set_attribute("chat.run.time_to_first_event_s", first_event_s)
    if usage:
        for key, name in (
            ("input_tokens", "gen_ai.usage.input_tokens"),
            ("output_tokens", "gen_ai.usage.output_tokens"),
            ("total_tokens", "chat.usage.total_tokens"),
        ):
            value = usage.get(key)
            if isinstance(value, int):
                span.set_attribute(name, value)
        model = usage.get("model")
        if isinstance(model, str) and model:
            span.set_attribute("gen_ai.request.model", model)
    if _content:
        span.set_attribute("chat.answer.content", _clip(answer))
    if status == "failed":
        span.set_status(Status(StatusCode.ERROR, error_code or "failed"))
    span.end()


# Tool calls, model requests, remote agents -------------------------------------------


class Hook:
    """What a hook answers with tracing off: every method does nothing."""

    __slots__ = ()

    def set(self, key: str, value: Any) -> None:
        return None

    def content(self, key: str, value: object) -> None:
        return None

    def first_token(self) -> None:
        return None

    def usage(self, input_tokens: int, output_tokens: int) -> None:
        return None

    def finish(self, reason: str | None) -> None:
        return None

    def failed(self, error_type: str) -> None:
        return None

    def inject(self, headers: MutableMapping[str, str]) -> None:
        return None

    def end(self) -> None:
        return None


NOOP: Final = Hook()


class Step(Hook):
    """A child span of a run: a tool call, a model request or an agent request."""

    __slots__ = ("_first", "span", "started")

    def __init__(self, span: Span) -> None:
        self.span = span
        self.started = time.perf_counter()
        self._first = False

    def set(self, key: str, value: Any) -> None:
        self.span.set_attribute(key, value)

    def content(self, key: str, value: object) -> None:
        if _content:
            self.span.set_attribute(key, value if isinstance(value, str) else _json(value))

    def first_token(self) -> None:
        if not self._first:
            self._first = True
            elapsed = time.perf_counter() - self.started
            self.span.set_attribute("gen_ai.response.time_to_first_chunk", elapsed)

    def usage(self, input_tokens: int, output_tokens: int) -> None:
        self.span.set_attribute("gen_ai.usage.input_tokens", input_tokens)
        self.span.set_attribute("gen_ai.usage.output_tokens", output_tokens)

    def finish(self, reason: str | None) -> None:
        if reason:
            self.span.set_attribute("gen_ai.response.finish_reasons", [reason])

    def failed(self, error_type: str) -> None:
        from opentelemetry.trace import Status, StatusCode

        self.span.set_attribute("error.type", error_type)
        self.span.set_status(Status(StatusCode.ERROR, error_type))

    def inject(self, headers: MutableMapping[str, str]) -> None:
        """Name this span in the ``traceparent`` of a request's headers."""
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        TraceContextTextMapPropagator().inject(headers, trace.set_span_in_context(self.span))

    def end(self) -> None:
        self.span.end()


@contextlib.contextmanager
def _stepping(span_cm: contextlib.AbstractContextManager[Any]) -> Iterator[Hook]:
    """The span as a :class:`Step`; an exception marks it failed, by its type alone."""
    with span_cm as span:
        step = Step(span)
        try:
            yield step
        except BaseException as exc:
            step.failed(type(exc).__name__)
            raise


@contextlib.contextmanager
def _step(name: str, kind: str, attributes: dict[str, Any]) -> Iterator[Hook]:
    if _tracer is None:
        yield NOOP
        return
    from opentelemetry.trace import SpanKind

    span_kind = SpanKind.CLIENT if kind == "client" else SpanKind.INTERNAL
    span = _tracer.start_as_current_span(
        name,
        kind=span_kind,
        attributes=attributes,
        record_exception=False,
        # The status is set by type alone: an exception's text may quote content.
        set_status_on_exception=False,
    )
    with _stepping(span) as step:
        yield step


def tool_call(name: str, call_id: str) -> contextlib.AbstractContextManager[Hook]:
    """A tool call's span (GenAI ``execute_tool``)."""
    if _tracer is None:
        return contextlib.nullcontext(NOOP)
    return _step(
        f"execute_tool {name}",
        "internal",
        {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": name,
            "gen_ai.tool.call.id": call_id,
        },
    )


def model_request(
    provider: str, model: str, server: str | None
) -> contextlib.AbstractContextManager[Hook]:
    """A model request's span (GenAI ``chat``)."""
    if _tracer is None:
        return contextlib.nullcontext(NOOP)
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.system": provider,
        "gen_ai.provider.name": provider,
        "gen_ai.request.model": model,
    }
    if server:
        attributes["server.address"] = server
    return _step(f"chat {model}", "client", attributes)


def agent_request(agent: str, url: str) -> Hook:
    """A remote agent's request's span (GenAI ``invoke_agent``), a child of the current
    one but not made current (it spans the reading of an event stream, across the
    agent's turns): :meth:`Step.inject` names it in the request's ``traceparent``, and
    its reader ends it."""
    if _tracer is None:
        return NOOP
    from opentelemetry.trace import SpanKind

    span = _tracer.start_span(
        f"invoke_agent {agent}",
        kind=SpanKind.CLIENT,
        attributes={
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.name": agent,
            "url.full": url,
            "http.request.method": "POST",
        },
    )
    return Step(span)


# Commands across processes, and the store's writes ----------------------------------


def command(
    name: str, run_id: str, action: str, carried: str | None
) -> contextlib.AbstractContextManager[Hook]:
    """A lifecycle command's span, its parent the context ``carried`` (the run's, or
    the sender's for a command that came over the bus), else the current one."""
    if _tracer is None:
        return contextlib.nullcontext(NOOP)
    return _carried_step(
        name, _context_of(carried), {"chat.run_id": run_id, "chat.command.action": action}
    )


@contextlib.contextmanager
def _carried_step(name: str, parent: Context | None, attributes: dict[str, Any]) -> Iterator[Hook]:
    from opentelemetry import context

    token = context.attach(parent) if parent is not None else None
    try:
        with _step(name, "internal", attributes) as step:
            yield step
    finally:
        if token is not None:
            context.detach(token)


def store_write(
    system: str, whats: list[str], carried: list[str]
) -> contextlib.AbstractContextManager[Hook]:
    """One transaction of the store's writer: a span of its own trace, linked to the
    runs whose writes it commits."""
    if _tracer is None:
        return contextlib.nullcontext(NOOP)
    return _store_span(system, whats, carried)


@contextlib.contextmanager
def _store_span(system: str, whats: list[str], carried: list[str]) -> Iterator[Hook]:
    from opentelemetry import context, trace
    from opentelemetry.trace import Link

    assert _tracer is not None
    links = []
    for value in dict.fromkeys(carried):
        ctx = _context_of(value)
        if ctx is not None:
            links.append(Link(trace.get_current_span(ctx).get_span_context()))
    attributes: dict[str, Any] = {
        "db.system.name": system,
        "db.operation.name": "write",
        "db.operation.batch.size": len(whats),
        "chat.store.writes": sorted(set(whats)),
    }
    # A root of its own: the writer serves every run, not the one that started it.
    span = _tracer.start_as_current_span(
        "chat.store.write",
        context=context.Context(),
        links=links,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    )
    with _stepping(span) as step:
        yield step


# HTTP ----------------------------------------------------------------------------------


class TraceContextMiddleware:
    """Takes the ``traceparent`` header of an HTTP request as the parent of the run the
    request starts (with tracing off: passes the request through untouched)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if _tracer is not None and scope["type"] == "http":
            parent: str | None = None
            state: str | None = None
            for key, value in scope.get("headers", ()):
                if key == b"traceparent":
                    parent = value.decode("latin-1")
                elif key == b"tracestate":
                    state = value.decode("latin-1")
            incoming(parent, state)
        await self.app(scope, receive, send)

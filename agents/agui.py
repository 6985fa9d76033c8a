"""AG-UI agents behind the gateway: any stream of ``ag_ui.core`` events, in process or
over HTTP (the transport is :mod:`agents.agui_http`).

One mapping serves both.  :class:`AGUIMapper` is pure: AG-UI events in, the run's
outputs out (thinking, chunks, tool calls and results, state, pass-through events,
the end), with the protocol's rules checked on the way (content for a message that
was never started, arguments for an unknown call, a patch that does not apply).
:class:`AGUIAgent` pumps it: it builds each ``RunAgentInput`` (the thread's history,
the new message, the gateway's tools, the current state), reads the events with a
silence timeout, emits what the mapper says, runs the gateway tools the agent left
for its client (AG-UI's client-side tools) and calls the agent again with their
results, up to ``max_steps`` rounds.

================================  ==============================================
AG-UI                             chat.v1
================================  ==============================================
RUN_STARTED                       (the run is already ``agent_started``)
REASONING_* / THINKING_*          ``agent_thinking`` (``reasoning``), a paragraph at a time
STEP_STARTED                      ``agent_thinking`` (``status``) naming the step
TOOL_CALL_START/_ARGS/_END        ``tool_executing`` with the arguments parsed as JSON
TOOL_CALL_RESULT                  ``tool_completed``
TEXT_MESSAGE_* (and _CHUNK)       ``response_chunk``
STATE_SNAPSHOT / STATE_DELTA      ``agent_state`` with the whole current state
CUSTOM, RAW, ACTIVITY_*, SUBAGENT ``agent_event``
RUN_FINISHED success              the run completes (after the client-side tools)
RUN_FINISHED cancelled            the run ends ``cancelled``
RUN_FINISHED interrupt            the run fails, ``agent_error`` (not supported yet)
RUN_ERROR, no RUN_FINISHED        the run fails, ``agent_error`` with the agent's message
================================  ==============================================

A round that shows no reasoning gets a ``status`` thinking line before its first
answer text or tool call, as the ``llm`` agent's turns do.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import jsonpatch
import jsonpointer
from ag_ui.core import (
    AssistantMessage,
    BaseEvent,
    Event,
    EventType,
    FunctionCall,
    RunAgentInput,
    Tool,
    ToolCall,
    ToolMessage,
    UserMessage,
)
from pydantic import TypeAdapter, ValidationError

from agents.base import RunContext, Usage
from agents.errors import RemoteAgentError
from agents.llm import ThoughtBuffer, status_line

log = logging.getLogger("chat.agui")

PROTOCOL_VERSION: Final = "1.0"
#: Characters of an upstream body or event quoted in a log line.
EXCERPT_CHARS: Final = 200

_EVENT: TypeAdapter[Any] = TypeAdapter(Event)

#: The deprecated ``THINKING_*`` events of AG-UI 0.x, read as their ``REASONING_*`` forms.
_THINKING: Final[dict[str, str]] = {
    "THINKING_START": "REASONING_START",
    "THINKING_END": "REASONING_END",
    "THINKING_TEXT_MESSAGE_START": "REASONING_MESSAGE_START",
    "THINKING_TEXT_MESSAGE_CONTENT": "REASONING_MESSAGE_CONTENT",
    "THINKING_TEXT_MESSAGE_END": "REASONING_MESSAGE_END",
}

_PASS_THROUGH: Final = frozenset(
    {
        EventType.CUSTOM,
        EventType.RAW,
        EventType.ACTIVITY_SNAPSHOT,
        EventType.ACTIVITY_DELTA,
        EventType.SUBAGENT_STARTED,
        EventType.SUBAGENT_FINISHED,
        EventType.SUBAGENT_ERROR,
    }
)


# Events ------------------------------------------------------------------------------------


def parse_event(data: str) -> BaseEvent:
    """One SSE message's data as an AG-UI event.

    Raises:
        RemoteAgentError: it is not JSON, or does not fit the AG-UI schema.
    """
    try:
        raw = json.loads(data)
    except json.JSONDecodeError:
        log.warning("an AG-UI agent sent an event that is not JSON (%d characters)", len(data))
        raise RemoteAgentError("the agent sent an event that is not valid JSON") from None
    return validate_event(raw)


def validate_event(raw: Any) -> BaseEvent:
    """A decoded event checked against the AG-UI schema (deprecated forms translated).

    Raises:
        RemoteAgentError: it does not fit the schema.
    """
    if isinstance(raw, dict) and raw.get("type") in _THINKING:
        raw = {**raw, "type": _THINKING[raw["type"]]}
        raw.setdefault("messageId", "thinking")
    kind = raw.get("type") if isinstance(raw, dict) else None
    try:
        event: BaseEvent = _EVENT.validate_python(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"][1:]) or "the event"
        detail = f"{where}: {first['msg']}"
        log.warning("an AG-UI agent sent an invalid %s event: %s", kind, detail)
        what = f"a {kind} event" if isinstance(kind, str) else "an event"
        raise RemoteAgentError(
            f"the agent sent {what} that does not fit the AG-UI schema ({detail})"
        ) from None
    return event


# The mapping ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Thinking:
    text: str
    kind: Literal["reasoning", "status"]


@dataclass(frozen=True, slots=True)
class Chunk:
    text: str


@dataclass(frozen=True, slots=True)
class ToolStarted:
    call_id: str
    name: str
    args: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ToolAnswered:
    call_id: str
    name: str
    result: Any


@dataclass(frozen=True, slots=True)
class StateChanged:
    state: Any


@dataclass(frozen=True, slots=True)
class PassedThrough:
    type: str
    event: dict[str, Any]


Output = Thinking | Chunk | ToolStarted | ToolAnswered | StateChanged | PassedThrough


@dataclass(slots=True)
class Call:
    """A tool call of the agent: its id, the gateway's ``call_id``, and what is known."""

    agent_id: str
    call_id: str
    name: str
    parts: list[str] = field(default_factory=list)
    args: dict[str, Any] | None = None  # set once announced
    answered: bool = False
    result_text: str | None = None


Outcome = Literal["success", "cancelled", "interrupt"]


class AGUIMapper:
    """AG-UI events to the run's outputs, for every round of one run.

    ``new_call_id`` gives the gateway's call ids (``call_1``, …), which the mapper
    keeps apart from the agent's own.
    """

    def __init__(self, new_call_id: Callable[[], str], status: str = "") -> None:
        self._new_call_id = new_call_id
        self._thoughts = ThoughtBuffer()
        #: Text messages started and not ended: id → whether it is the answer (its role
        #: is the assistant's, or none); other roles' text is not the answer.
        self._open_text: dict[str, bool] = {}
        self._earlier: set[str] = set()  # the agent's call ids of earlier rounds
        self._chunk_text: str | None = None  # the message a TEXT_MESSAGE_CHUNK continues
        self._chunk_call: str | None = None  # the call a TOOL_CALL_CHUNK continues
        self.answer = ""  # every chunk's text so far
        self.round_text = ""  # this round's answer text
        self.calls: dict[str, Call] = {}  # this round's calls, by the agent's id
        self.state: Any = None
        self.has_state = False
        self.outcome: Outcome | None = None
        self.interrupt = ""
        #: The tokens the agent reported in ``RUN_FINISHED.usage``, not yet the run's.
        self.usage: list[Usage] = []
        self._status = status
        self._shown = False  # this round showed a thinking line

    def begin_round(self, status: str) -> None:
        """Start the next call of the agent."""
        self._earlier.update(self.calls)
        self.calls = {}
        self.round_text = ""
        self.outcome = None
        self._open_text.clear()
        self._chunk_text = self._chunk_call = None
        self._status = status
        self._shown = False

    @property
    def finished(self) -> bool:
        return self.outcome is not None

    def unanswered(self) -> list[Call]:
        """The round's calls that got no ``TOOL_CALL_RESULT``, in the order they came."""
        return [call for call in self.calls.values() if not call.answered]

    def feed(self, event: BaseEvent) -> list[Output]:
        """The outputs of one event.

        Raises:
            RemoteAgentError: the event breaks the protocol, or reports the run failed.
        """
        out: list[Output] = []
        if self.finished:
            return out  # nothing after RUN_FINISHED belongs to the run
        kind = event.type
        if kind is not EventType.TEXT_MESSAGE_CHUNK:
            self._chunk_text = None
        if kind is not EventType.TOOL_CALL_CHUNK and self._chunk_call is not None:
            self._end_call(out, self._chunk_call)
            self._chunk_call = None
        field_ = _fields(event)
        if kind in (
            EventType.REASONING_MESSAGE_CONTENT,
            EventType.REASONING_MESSAGE_CHUNK,
        ):
            delta = field_.get("delta") or ""
            if delta:
                self._shown = True
                out.extend(Thinking(t, "reasoning") for t in self._thoughts.feed(delta))
        elif kind in (EventType.REASONING_MESSAGE_END, EventType.REASONING_END):
            self._flush_thoughts(out)
        elif kind is EventType.STEP_STARTED:
            self._flush_thoughts(out)
            self._shown = True
            out.append(Thinking(f"Step: {field_['step_name']}", "status"))
        elif kind is EventType.TEXT_MESSAGE_START:
            self._open_text[field_["message_id"]] = field_["role"] in (None, "assistant")
        elif kind is EventType.TEXT_MESSAGE_CONTENT:
            message_id = field_["message_id"]
            if message_id not in self._open_text:
                raise RemoteAgentError(
                    f"the agent sent content for message {message_id!r}, which it never started"
                )
            if self._open_text[message_id]:
                self._text(out, field_["delta"])
        elif kind is EventType.TEXT_MESSAGE_END:
            message_id = field_["message_id"]
            if message_id not in self._open_text:
                raise RemoteAgentError(
                    f"the agent ended message {message_id!r}, which it never started"
                )
            del self._open_text[message_id]
        elif kind is EventType.TEXT_MESSAGE_CHUNK:
            message_id = field_.get("message_id") or self._chunk_text
            if message_id is None:
                raise RemoteAgentError("the agent sent a text chunk that names no message")
            self._chunk_text = message_id
            if field_.get("role") in (None, "assistant"):
                self._text(out, field_.get("delta") or "")
        elif kind is EventType.TOOL_CALL_START:
            self._start_call(field_["tool_call_id"], field_["tool_call_name"])
        elif kind is EventType.TOOL_CALL_ARGS:
            self._call(field_["tool_call_id"], "arguments").parts.append(field_["delta"])
        elif kind is EventType.TOOL_CALL_END:
            self._end_call(out, field_["tool_call_id"])
        elif kind is EventType.TOOL_CALL_CHUNK:
            self._tool_chunk(out, field_)
        elif kind is EventType.TOOL_CALL_RESULT:
            if field_["tool_call_id"] not in self._earlier:  # a result it was sent: known
                self._result(out, field_["tool_call_id"], field_["content"])
        elif kind is EventType.STATE_SNAPSHOT:
            self.state, self.has_state = field_["snapshot"], True
            out.append(StateChanged(self.state))
        elif kind is EventType.STATE_DELTA:
            self._patch(out, event)
        elif kind in _PASS_THROUGH:
            out.append(PassedThrough(str(kind.value), _dump(event)))
        elif kind is EventType.RUN_ERROR:
            message = field_["message"]
            raise RemoteAgentError(f"the agent reported an error: {message}")
        elif kind is EventType.RUN_FINISHED:
            self._finish(out, field_.get("outcome"))
            self.usage.extend(_usage(field_.get("usage")))
        # RUN_STARTED, STEP_FINISHED, MESSAGES_SNAPSHOT, REASONING_START and the rest:
        # nothing of the run's own (the gateway's thread is the history).
        return out

    # Pieces ---------------------------------------------------------------------------

    def _flush_thoughts(self, out: list[Output]) -> None:
        out.extend(Thinking(t, "reasoning") for t in self._thoughts.flush())

    def _before_content(self, out: list[Output]) -> None:
        """Thoughts come out before the answer or a call; a round that showed none gets
        its status line."""
        self._flush_thoughts(out)
        if not self._shown:
            self._shown = True
            if self._status:
                out.append(Thinking(self._status, "status"))

    def _text(self, out: list[Output], delta: str) -> None:
        if not delta:
            return
        self._before_content(out)
        if not self.round_text and self.answer and not self.answer[-1].isspace():
            delta = "\n\n" + delta  # a later round's answer is a new paragraph
        self.round_text += delta
        self.answer += delta
        out.append(Chunk(delta))

    def _start_call(self, agent_id: str, name: str) -> Call:
        if agent_id in self.calls:
            raise RemoteAgentError(f"the agent started tool call {agent_id!r} twice")
        call = Call(agent_id, self._new_call_id(), name)
        self.calls[agent_id] = call
        return call

    def _call(self, agent_id: str, what: str) -> Call:
        call = self.calls.get(agent_id)
        if call is None:
            raise RemoteAgentError(
                f"the agent sent {what} for tool call {agent_id!r}, which it never started"
            )
        return call

    def _end_call(self, out: list[Output], agent_id: str) -> None:
        call = self._call(agent_id, "the end")
        if call.args is not None:
            return
        text = "".join(call.parts)
        try:
            args = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError:
            raise RemoteAgentError(
                f"the agent's arguments for {call.name} are not valid JSON"
            ) from None
        if not isinstance(args, dict):
            raise RemoteAgentError(f"the agent's arguments for {call.name} are not a JSON object")
        call.args = args
        self._before_content(out)
        out.append(ToolStarted(call.call_id, call.name, args))

    def _tool_chunk(self, out: list[Output], field_: Mapping[str, Any]) -> None:
        agent_id = field_.get("tool_call_id")
        if agent_id and agent_id != self._chunk_call:
            if self._chunk_call is not None:
                self._end_call(out, self._chunk_call)
            name = field_.get("tool_call_name")
            if not name:
                raise RemoteAgentError(f"the agent's tool call {agent_id!r} has no name")
            self._start_call(agent_id, name)
            self._chunk_call = agent_id
        if self._chunk_call is None:
            raise RemoteAgentError("the agent sent a tool call chunk that names no call")
        if field_.get("delta"):
            self.calls[self._chunk_call].parts.append(field_["delta"])

    def _result(self, out: list[Output], agent_id: str, content: Any) -> None:
        call = self._call(agent_id, "a result")
        if call.answered:
            raise RemoteAgentError(f"the agent answered tool call {agent_id!r} twice")
        self._end_call(out, agent_id)
        text = content if isinstance(content, str) else json.dumps(_plain(content))
        call.answered, call.result_text = True, text
        try:
            result = json.loads(text)
        except json.JSONDecodeError:
            result = text
        out.append(ToolAnswered(call.call_id, call.name, result))

    def _patch(self, out: list[Output], event: BaseEvent) -> None:
        ops = _dump(event)["delta"]
        try:
            self.state = jsonpatch.apply_patch(self.state if self.has_state else {}, ops)
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
            raise RemoteAgentError(f"the agent's state delta does not apply: {exc}") from None
        self.has_state = True
        out.append(StateChanged(self.state))

    def _finish(self, out: list[Output], outcome: Any) -> None:
        for agent_id in list(self.calls):
            self._end_call(out, agent_id)  # a call it never ended is as complete as it gets
        self._flush_thoughts(out)
        kind = getattr(outcome, "type", None) or "success"
        if kind == "interrupt":
            reasons = ", ".join(i.reason for i in getattr(outcome, "interrupts", []))
            self.interrupt = reasons or "interrupt"
        self.outcome = "success"
        if kind == "cancelled":
            self.outcome = "cancelled"
        elif kind == "interrupt":
            self.outcome = "interrupt"


def _usage(entries: Any) -> list[Usage]:
    """``RUN_FINISHED.usage`` (one ``TokenUsage`` per provider and model) as the run's."""
    out: list[Usage] = []
    for entry in entries or ():
        given = getattr(entry, "input_tokens", None), getattr(entry, "output_tokens", None)
        inputs, outputs = (value or 0 for value in given)
        total = getattr(entry, "total_tokens", None) or inputs + outputs
        out.append(Usage(inputs, outputs, total, getattr(entry, "model", None) or None))
    return out


def _fields(event: BaseEvent) -> dict[str, Any]:
    """The event's fields by attribute name (values as they are, models included)."""
    return {name: getattr(event, name) for name in type(event).model_fields}


def _dump(event: BaseEvent) -> dict[str, Any]:
    dumped: dict[str, Any] = event.model_dump(mode="json", by_alias=True, exclude_none=True)
    return dumped


def _plain(value: Any) -> Any:
    if isinstance(value, list):
        return [_plain(v) for v in value]
    dump = getattr(value, "model_dump", None)
    return dump(mode="json", by_alias=True, exclude_none=True) if callable(dump) else value


# The agent -------------------------------------------------------------------------------

#: Makes the event stream of one call of the agent.
EventSource = Callable[[RunAgentInput], AsyncIterator[Any]]


class AGUIAgent:
    """An agent whose events are AG-UI events from ``source``, mapped onto the run.

    ``max_steps`` bounds the calls of the agent in one run (each round of client-side
    tools is one more); ``timeout_s`` is how long it may send nothing.
    """

    def __init__(
        self,
        name: str,
        source: EventSource,
        *,
        description: str = "An AG-UI agent.",
        max_steps: int | None = None,
        timeout_s: float | None = None,
        label: str | None = None,
    ) -> None:
        self.name = name
        self.description = description
        self.source = source
        self.max_steps = max_steps
        self.timeout_s = timeout_s
        self.label = label or f"agent {name}"

    def configure(self, *, max_steps: int, timeout_s: float) -> None:
        """Limits from the settings, for those not given when it was made."""
        if self.max_steps is None:
            self.max_steps = max_steps
        if self.timeout_s is None:
            self.timeout_s = timeout_s

    async def run(self, ctx: RunContext) -> None:
        max_steps = self.max_steps or 6
        mapper = AGUIMapper(ctx.new_call_id)
        messages = history_messages(ctx)
        results: list[tuple[str, bool]] = []
        started: dict[str, float] = {}
        for step in range(1, max_steps + 1):
            mapper.begin_round(status_line(self.label, step, results))
            run_input = RunAgentInput(
                thread_id=ctx.thread_id,
                run_id=ctx.run_id if step == 1 else f"{ctx.run_id}.{step}",
                protocol_version=PROTOCOL_VERSION,
                state=mapper.state if mapper.has_state else {},
                messages=messages,
                tools=offered_tools(ctx),
                context=[],
                forwarded_props={},
            )
            try:
                await self._round(ctx, mapper, run_input, started)
            finally:
                # What the agent reported is the run's, however the round ended.
                for usage in mapper.usage:
                    ctx.report_usage(usage)
                mapper.usage.clear()
            if mapper.outcome == "cancelled":
                log.info("run %s: the AG-UI agent %s cancelled its run", ctx.run_id, self.name)
                raise asyncio.CancelledError
            if mapper.outcome == "interrupt":
                raise RemoteAgentError(
                    f"the agent asked for input ({mapper.interrupt}); interrupts are not "
                    "supported yet"
                )
            pending = mapper.unanswered()
            runnable = [c for c in pending if c.name in ctx.tools]
            left = [c for c in pending if c.name not in ctx.tools and ctx.client_tool(c.name)]
            for call in left:
                # The gateway's own client runs it: left open for its next request.
                await ctx.leave_to_client(call.call_id, call.name)
                call.answered = True
            for call in pending:
                if call.name not in ctx.tools and not call.answered:
                    error = f"the agent left {call.name} unanswered, and it is no gateway tool"
                    await ctx.emit.tool_completed(
                        call.call_id,
                        call.name,
                        ok=False,
                        error=error,
                        duration_ms=_since(started, call.call_id),
                    )
                    # Its next input answers it too: no call goes back without a result.
                    call.answered, call.result_text = True, json.dumps({"error": error})
            if not runnable and not left:
                return
            if step == max_steps and not left:
                for call in runnable:
                    await ctx.emit.tool_completed(
                        call.call_id,
                        call.name,
                        ok=False,
                        error=f"not run: the agent was called {step} times, the most allowed",
                        duration_ms=_since(started, call.call_id),
                    )
                names = ", ".join(sorted({c.name for c in runnable}))
                await ctx.emit.thinking(
                    f"The agent still asked for tools ({names}) after {step} calls, the most "
                    "allowed; they were not run.",
                    kind="status",
                )
                lead = "\n\n" if mapper.answer and not mapper.answer[-1].isspace() else ""
                await ctx.emit.chunk(f"{lead}I could not finish within {step} steps.")
                return
            results = []
            for call in runnable:
                outcome = await ctx.answer_tool(call.call_id, call.name, call.args or {})
                call.answered = True
                body = outcome.result if outcome.ok else {"error": outcome.error or "failed"}
                call.result_text = json.dumps(body, ensure_ascii=False, default=str)
                results.append((call.name, outcome.ok))
            if left:
                return  # the run that answers the client's calls goes on
            messages = [*messages, *round_messages(ctx, step, mapper)]

    async def _round(
        self,
        ctx: RunContext,
        mapper: AGUIMapper,
        run_input: RunAgentInput,
        started: dict[str, float],
    ) -> None:
        timeout = self.timeout_s or 60.0
        events = self.source(run_input)
        try:
            while not mapper.finished:
                try:
                    # Only the wait for the agent is timed: a paused run's emit is not.
                    async with asyncio.timeout(timeout):
                        raw = await anext(events)
                except StopAsyncIteration:
                    raise RemoteAgentError(
                        "the agent's stream ended without RUN_FINISHED"
                    ) from None
                except TimeoutError:
                    raise RemoteAgentError(f"the agent sent nothing for {timeout:g} s") from None
                event = raw if isinstance(raw, BaseEvent) else validate_event(raw)
                for output in mapper.feed(event):
                    await _apply(ctx, output, started)
        finally:
            # Cancelled, failed or done: the stream (and its connection) is closed now.
            closer = getattr(events, "aclose", None)
            if closer is not None:
                await closer()


async def _apply(ctx: RunContext, output: Output, started: dict[str, float]) -> None:
    emit = ctx.emit
    if isinstance(output, Chunk):
        await emit.chunk(output.text)
    elif isinstance(output, Thinking):
        await emit.thinking(output.text, kind=output.kind)
    elif isinstance(output, ToolStarted):
        started[output.call_id] = time.perf_counter()
        await emit.tool_executing(output.call_id, output.name, output.args)
    elif isinstance(output, ToolAnswered):
        await emit.tool_completed(
            output.call_id,
            output.name,
            ok=True,
            result=output.result,
            duration_ms=_since(started, output.call_id),
        )
    elif isinstance(output, StateChanged):
        await emit.agent_state(output.state)
    else:
        await emit.agent_event(output.type, output.event)


def _since(started: Mapping[str, float], call_id: str) -> float:
    began = started.get(call_id)
    return (time.perf_counter() - began) * 1000 if began is not None else 0.0


def history_messages(ctx: RunContext) -> list[Any]:
    """The thread's earlier messages and the new one, as AG-UI messages; for a run that
    goes on from the client's tool results, the calls and their results instead of a
    new message (the previous run's stored answer is the calls' message's text)."""
    out: list[Any] = []
    history = list(ctx.history)
    text = ""
    if ctx.tool_results and history and history[-1].role == "assistant":
        text = history.pop().content
    for i, message in enumerate(history):
        if not message.content:
            continue
        if message.role == "user":
            out.append(UserMessage(id=f"{ctx.thread_id}.{i}", content=message.content))
        elif message.role == "assistant":
            out.append(AssistantMessage(id=f"{ctx.thread_id}.{i}", content=message.content))
    if not ctx.tool_results:
        out.append(UserMessage(id=f"{ctx.run_id}.user", content=ctx.message))
        return out
    out.append(
        AssistantMessage(
            id=f"{ctx.run_id}.calls",
            content=text or None,
            tool_calls=[
                ToolCall(
                    id=r.call_id,
                    function=FunctionCall(name=r.name, arguments=json.dumps(dict(r.args))),
                )
                for r in ctx.tool_results
            ],
        )
    )
    out += [
        ToolMessage(
            id=f"{ctx.run_id}.{r.call_id}", tool_call_id=r.call_id, content=r.content, error=r.error
        )
        for r in ctx.tool_results
    ]
    return out


def round_messages(ctx: RunContext, step: int, mapper: AGUIMapper) -> list[Any]:
    """A round as the agent's next input carries it: its answer and calls, and every
    call's result."""
    calls = [c for c in mapper.calls.values() if c.args is not None]
    assistant = AssistantMessage(
        id=f"{ctx.run_id}.{step}.assistant",
        content=mapper.round_text.strip() or None,
        tool_calls=[
            ToolCall(
                id=c.agent_id,
                function=FunctionCall(name=c.name, arguments=json.dumps(c.args)),
            )
            for c in calls
        ],
    )
    results = [
        ToolMessage(
            id=f"{ctx.run_id}.{step}.{c.agent_id}",
            tool_call_id=c.agent_id,
            content=c.result_text or "",
        )
        for c in calls
        if c.result_text is not None
    ]
    return [assistant, *results]


def gateway_tools(ctx: RunContext) -> list[Tool]:
    """The gateway's tools, offered to the agent as its client's tools."""
    return [
        Tool(name=t.name, description=t.description, parameters=dict(t.parameters))
        for t in ctx.tools
    ]


def offered_tools(ctx: RunContext) -> list[Tool]:
    """The gateway's tools and the gateway's client's own (a gateway tool of the same
    name wins): the agent's client-side tools.  A call of a client's tool is left to
    that client; a call of a gateway tool is run here."""
    client = [
        Tool(name=t.name, description=t.description, parameters=dict(t.parameters))
        for t in ctx.client_tools
        if t.name not in ctx.tools
    ]
    return [*gateway_tools(ctx), *client]


# In process ----------------------------------------------------------------------------------


def agui_agent(
    stream: EventSource,
    *,
    name: str = "agui",
    description: str = "An in-process AG-UI agent.",
    max_steps: int | None = None,
    timeout_s: float | None = None,
) -> AGUIAgent:
    """A gateway agent from any callable that, given a ``RunAgentInput``, returns an async
    iterator of ``ag_ui.core`` events — a framework's in-process AG-UI adapter::

        support = agui_agent(lambda run: AGUIAdapter(agent=my_agent, run_input=run).run_stream())

    and ``CHAT_AGENTS=support=my_pkg.agents:support``.  ``max_steps`` and ``timeout_s``
    default to ``CHAT_LLM_MAX_STEPS`` and ``CHAT_AGENT_TIMEOUT_S``.
    """
    return AGUIAgent(
        name,
        stream,
        description=description,
        max_steps=max_steps,
        timeout_s=timeout_s,
        label=f"agent {name}",
    )

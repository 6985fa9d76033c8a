"""AG-UI over the gateway's runs: ``chat.v1`` run events framed as AG-UI events.

:class:`AguiFramer` is pure: a run's events in, in ``seq`` order, AG-UI events out,
each encoded by ``ag_ui.encoder``'s :class:`EventEncoder` with ``id: <seq>`` (the
``seq`` of the run event it came from) in front.  It keeps what is open (the run,
a reasoning message, the answer) so that every ``*_START`` is closed by its
``*_END`` before anything else begins, as AG-UI's client verification demands.

A rejoin after ``seq`` N reads the run from its first event: the events up to N
are fed to the framer with their output held back, and at the first event after N
the framer writes a prelude that re-opens what was open at N (``RUN_STARTED``, the
open reasoning message's or answer's ``*_START``), then carries on.  A rejoin at or
after the last event of a finished run gets ``RUN_STARTED`` and the run's own
``RUN_FINISHED``/``RUN_ERROR`` again (:meth:`AguiFramer.tail`), not an empty body.  Tool calls are
opened and closed within one event, so none is ever open at a cut.

======================  ================================================================
chat.v1                 AG-UI
======================  ================================================================
``user_message``        ``RUN_STARTED`` (``runId``: the client's, else the gateway's)
``agent_started``       (nothing)
``agent_thinking``      ``REASONING_START`` + ``REASONING_MESSAGE_START`` when none is
                        open, then ``REASONING_MESSAGE_CONTENT``
``tool_executing``      ``TOOL_CALL_START`` / ``TOOL_CALL_ARGS`` (JSON) / ``TOOL_CALL_END``
``tool_completed``      ``TOOL_CALL_RESULT`` (the result or ``{"error": …}`` as JSON);
                        nothing when ``pending`` (a client tool's call, left open)
``input_requested``     ``RUN_FINISHED`` with an ``interrupt`` outcome
                        (:func:`interrupt_outcome`); the response ends there, and a
                        ``RunAgentInput`` with ``resume`` gets the rest of the run
``response_chunk``      ``TEXT_MESSAGE_START`` when none is open, ``TEXT_MESSAGE_CONTENT``
``run_status``          (nothing: a paused run's stream carries ``: ping`` comments)
``response_complete``   ``TEXT_MESSAGE_END`` (and ``START`` first for an empty answer)
``agent_completed``     ``RUN_FINISHED`` (completed; ``outcome: cancelled`` when
                        cancelled) or ``RUN_ERROR`` with the error's code (failed)
connection ``error``    ``RUN_ERROR`` with its code (``resume_unavailable``, a cut)
======================  ================================================================

Whatever is open is closed (``REASONING_MESSAGE_END``/``REASONING_END``,
``TEXT_MESSAGE_END``) before the next kind of event and before the run's end.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, Final

from ag_ui.core import (
    AssistantMessage,
    BaseEvent,
    ReasoningEndEvent,
    ReasoningMessageContentEvent,
    ReasoningMessageEndEvent,
    ReasoningMessageStartEvent,
    ReasoningStartEvent,
    ResumeEntry,
    RunAgentInput,
    RunErrorEvent,
    RunFinishedEvent,
    RunStartedEvent,
    TextMessageContentEvent,
    TextMessageEndEvent,
    TextMessageStartEvent,
    TextPart,
    ToolCallArgsEvent,
    ToolCallEndEvent,
    ToolCallResultEvent,
    ToolCallStartEvent,
    ToolMessage,
)
from ag_ui.encoder import EventEncoder
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from agents.base import ClientTool, ClientToolResult
from bridge.events import Event
from server import routes, sse
from server.auth import Principal
from server.commands import client_ref, optional_id
from server.errors import ProtocolError
from server.gateway import Gateway, frontend_key

_ENCODER: Final = EventEncoder()
#: Validation errors quoted in a 400's message.
MAX_ERRORS: Final = 10


def answer_id(run_id: str) -> str:
    """The AG-UI ``messageId`` of a run's answer."""
    return f"{run_id}:answer"


def reasoning_id(run_id: str, n: int) -> str:
    """The ``messageId`` of the run's ``n``-th reasoning message."""
    return f"{run_id}:reasoning:{n}"


def interrupt_id(run_id: str, request_id: str) -> str:
    """The AG-UI interrupt id of a run's input request: the gateway's run id and the
    request's, so that a ``resume`` entry names both."""
    return f"{run_id}:{request_id}"


def parse_interrupt_id(value: str) -> tuple[str, str]:
    """The run id and request id an interrupt id names.

    Raises:
        ProtocolError: it is not one of this gateway's interrupt ids.
    """
    run_id, _, request_id = value.rpartition(":")
    if not run_id or not request_id:
        raise ProtocolError("bad_message", f"resume names no interrupt of this gateway: {value!r}")
    return run_id, request_id


def interrupt_outcome(run_id: str, data: dict[str, Any]) -> dict[str, Any]:
    """The ``RUN_FINISHED`` outcome for an ``input_requested`` (approvals and questions).

    One ``Interrupt``: ``id`` (:func:`interrupt_id`), ``reason`` (the request's
    ``kind``), ``message`` (the question, or what is to be approved), ``toolCallId``
    for an approval, ``expiresAt`` (ISO 8601), a ``responseSchema`` of the answer, and
    the request as ``chat.v1`` has it in ``metadata`` (``request_id``, ``kind``,
    ``tool``/``args`` or ``question``/``choices``, ``expires_at``).
    """
    kind = str(data.get("kind"))
    request_id = str(data.get("request_id"))
    metadata: dict[str, Any] = {"request_id": request_id, "kind": kind, "run_id": run_id}
    interrupt: dict[str, Any] = {"id": interrupt_id(run_id, request_id), "reason": kind}
    if kind == "tool_approval":
        interrupt["toolCallId"] = str(data.get("call_id"))
        interrupt["message"] = f"Approve the call of {data.get('tool')}?"
        interrupt["responseSchema"] = APPROVAL_SCHEMA
        metadata.update(call_id=data.get("call_id"), tool=data.get("tool"), args=data.get("args"))
    else:
        interrupt["message"] = str(data.get("question") or "")
        interrupt["responseSchema"] = QUESTION_SCHEMA
        metadata.update(question=data.get("question"), choices=data.get("choices"))
    expires_at = data.get("expires_at")
    if isinstance(expires_at, int | float):
        metadata["expires_at"] = expires_at
        when = datetime.fromtimestamp(expires_at, UTC)
        interrupt["expiresAt"] = when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    interrupt["metadata"] = metadata
    return {"type": "interrupt", "interrupts": [interrupt]}


#: What a ``resume`` entry's ``payload`` holds for each kind (``respond``'s fields).
APPROVAL_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "properties": {
        "approved": {"type": "boolean"},
        "args": {"type": "object"},
        "reason": {"type": "string"},
    },
    "required": ["approved"],
}
QUESTION_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "properties": {"answer": {"type": "string"}},
    "required": ["answer"],
}


def resume_payload(entry: ResumeEntry) -> dict[str, Any]:
    """The ``respond`` fields a ``resume`` entry stands for: its ``payload`` when
    ``resolved`` (a bare string is a question's answer, a bare boolean an approval),
    a denial when ``cancelled`` (a question is then answered empty)."""
    if entry.status == "cancelled":
        return {"approved": False, "answer": "", "reason": "cancelled by the client"}
    payload = entry.payload
    if isinstance(payload, str):
        return {"answer": payload}
    if isinstance(payload, bool):
        return {"approved": payload}
    if not isinstance(payload, dict):
        raise ProtocolError("bad_message", "a resume entry's payload must be an object")
    return payload


class AguiFramer:
    """One stream's framing; see the module docstring.

    ``thread_id``/``run_id`` are the ids the client knows the run by (``RUN_STARTED``
    and ``RUN_FINISHED`` carry them); ``after_seq`` is the rejoin point: events up to
    it only bring the state up to date.
    """

    def __init__(
        self,
        *,
        client_run_id: str | None = None,
        after_seq: int = 0,
        resume_of: str | None = None,
    ) -> None:
        self.client_run_id = client_run_id
        self.after_seq = after_seq
        #: A resumed stream's request id: everything up to its ``input_requested`` only
        #: brings the state up to date, then the run goes on from there.
        self._resume_of = resume_of
        #: The run's AG-UI end (an interrupt, or the run's own end) was written: the
        #: response is over (:attr:`done`).
        self._done = False
        #: The last AG-UI run ended at an interrupt, which the next event re-opens.
        self._interrupted = False
        self.thread_id = ""
        self.run_id = ""
        self._gateway_run_id = ""
        self._started = False
        self._reasoning: str | None = None
        self._reasonings = 0
        self._text_open = False
        self._ended = False
        #: The run's last AG-UI event (``RUN_FINISHED``/``RUN_ERROR``) and its ``seq``.
        self._end: tuple[BaseEvent, int | None] | None = None
        self._preluded = after_seq == 0 and resume_of is None

    @property
    def done(self) -> bool:
        """Whether the response has written its run's end: ``RUN_FINISHED`` (an
        interrupt's included) or ``RUN_ERROR``; nothing more goes in it."""
        return self._done

    # Pure mapping ----------------------------------------------------------------------

    def events(self, event: Event) -> list[BaseEvent]:
        """The AG-UI events one run event stands for, the framer's state advanced."""
        if event.seq is None:
            if event.type != "error" or self._ended:
                return []
            data = event.data
            self._ended = True
            return [*self._close_all(), RunErrorEvent(message=data["message"], code=data["code"])]
        data = event.data
        out: list[BaseEvent] = []
        kind: str = event.type  # with types this gateway does not emit yet
        if self._interrupted:
            # The run goes on after an interrupt: AG-UI's next run (a resume) begins.
            self._interrupted = self._ended = False
            self._end = None
            out.append(self._run_started())
        if self._ended:
            return []
        if not self._started:
            self._gateway_run_id = event.run_id or ""
            self.thread_id = event.thread_id or ""
            ref = data.get("ref") if kind == "user_message" else None
            self.run_id = (
                self.client_run_id
                or (ref if isinstance(ref, str) else None)
                or (self._gateway_run_id)
            )
            self._started = True
            out.append(self._run_started())
        if kind == "agent_thinking":
            out += self._close_text()
            if self._reasoning is None:
                self._reasonings += 1
                self._reasoning = reasoning_id(self._gateway_run_id, self._reasonings)
                out += self._reasoning_start()
            text = str(data.get("text") or "")
            if text:
                out.append(ReasoningMessageContentEvent(message_id=self._reasoning, delta=text))
        elif kind == "tool_executing":
            out += self._close_all()
            call_id = str(data["call_id"])
            out.append(
                ToolCallStartEvent(
                    tool_call_id=call_id,
                    tool_call_name=str(data["tool"]),
                    parent_message_id=answer_id(self._gateway_run_id),
                )
            )
            args = json.dumps(data.get("args") or {}, ensure_ascii=False)
            out.append(ToolCallArgsEvent(tool_call_id=call_id, delta=args))
            out.append(ToolCallEndEvent(tool_call_id=call_id))
        elif kind == "tool_completed" and data.get("pending"):
            # A client tool's call, left to the client: open in AG-UI's sense, no result.
            out += self._close_all()
        elif kind == "tool_completed":
            out += self._close_all()
            call_id = str(data["call_id"])
            if data.get("ok"):
                content = _as_text(data.get("result"))
            else:
                content = json.dumps({"error": data.get("error")}, ensure_ascii=False)
            out.append(
                ToolCallResultEvent(
                    message_id=f"{call_id}:result", tool_call_id=call_id, content=content
                )
            )
        elif kind == "response_chunk":
            out += self._close_reasoning()
            text = str(data.get("text") or "")
            if text:
                out += self._open_text()
                out.append(
                    TextMessageContentEvent(message_id=answer_id(self._gateway_run_id), delta=text)
                )
        elif kind == "response_complete":
            out += self._close_reasoning()
            if str(data.get("content") or "") and not self._text_open:
                # An answer no chunk carried (never in chat.v1, but kept whole here).
                out += self._open_text()
                out.append(
                    TextMessageContentEvent(
                        message_id=answer_id(self._gateway_run_id), delta=str(data["content"])
                    )
                )
            out += self._close_text()
        elif kind == "input_requested":
            out += self._close_all()
            self._ended = self._interrupted = True
            out.append(
                RunFinishedEvent.model_validate(
                    {
                        "threadId": self.thread_id,
                        "runId": self.run_id,
                        "outcome": interrupt_outcome(self._gateway_run_id, data),
                    }
                )
            )
        elif kind == "agent_completed":
            out += self._close_all()
            self._ended = True
            status = data.get("status")
            if status == "failed":
                error = data.get("error") or {}
                out.append(
                    RunErrorEvent(
                        message=str(error.get("message") or "the run failed"),
                        code=str(error.get("code") or "agent_error"),
                    )
                )
            else:
                outcome = {"type": "cancelled"} if status == "cancelled" else None
                out.append(
                    RunFinishedEvent.model_validate(
                        {"threadId": self.thread_id, "runId": self.run_id, "outcome": outcome}
                    )
                )
        return out

    def _ending(self, out: list[BaseEvent], seq: int | None) -> list[BaseEvent]:
        if self._ended and self._end is None and out:
            self._end = (out[-1], seq)
        return out

    def frame(self, event: Event) -> bytes:
        """The run event as AG-UI SSE messages: nothing up to the rejoin point, then a
        prelude re-opening what was open there, then each event with ``id: <seq>``;
        nothing once the run's end (or an interrupt) is written."""
        if self._done:
            return b""
        if self._resume_of is not None and event.seq is not None:
            if event.type == "input_requested" and event.data.get("request_id") == self._resume_of:
                self._resume_of = None
                self.after_seq = event.seq
            self._ending(self.events(event), event.seq)  # only the state moves
            return b""
        if event.seq is not None and event.seq <= self.after_seq:
            self._ending(self.events(event), event.seq)  # only the state moves
            return b""
        head = b""
        if not self._preluded:
            self._preluded = True
            prelude = self._prelude()
            head = _encode(prelude, self.after_seq)
        out = self._ending(self.events(event), event.seq)
        if self._ended and out:
            self._done = True
        return head + _encode(out, event.seq)

    def tail(self, _status: str | None = None) -> bytes:
        """The end of a rejoin at or past the run's last event: nothing came after the
        rejoin point, so the run is re-opened and its end repeated (``RUN_STARTED``
        then its ``RUN_FINISHED``/``RUN_ERROR``), a stream AG-UI's verification takes,
        rather than an empty one.  Nothing for any other stream."""
        if self._preluded or self._end is None or not self._started:
            return b""
        self._preluded = True
        end, seq = self._end
        return _encode([self._run_started(), end], seq)

    # What is open ----------------------------------------------------------------------

    def _prelude(self) -> list[BaseEvent]:
        if not self._started or self._ended:
            return []
        out: list[BaseEvent] = [self._run_started()]
        if self._reasoning is not None:
            out += self._reasoning_start()
        if self._text_open:
            self._text_open = False
            out += self._open_text()
        return out

    def _run_started(self) -> RunStartedEvent:
        return RunStartedEvent(thread_id=self.thread_id, run_id=self.run_id)

    def _reasoning_start(self) -> list[BaseEvent]:
        assert self._reasoning is not None
        return [
            ReasoningStartEvent(message_id=self._reasoning),
            ReasoningMessageStartEvent(message_id=self._reasoning, role="reasoning"),
        ]

    def _open_text(self) -> list[BaseEvent]:
        if self._text_open:
            return []
        self._text_open = True
        return [TextMessageStartEvent(message_id=answer_id(self._gateway_run_id), role="assistant")]

    def _close_text(self) -> list[BaseEvent]:
        if not self._text_open:
            return []
        self._text_open = False
        return [TextMessageEndEvent(message_id=answer_id(self._gateway_run_id))]

    def _close_reasoning(self) -> list[BaseEvent]:
        if self._reasoning is None:
            return []
        message_id, self._reasoning = self._reasoning, None
        return [
            ReasoningMessageEndEvent(message_id=message_id),
            ReasoningEndEvent(message_id=message_id),
        ]

    def _close_all(self) -> list[BaseEvent]:
        return [*self._close_reasoning(), *self._close_text()]


def _as_text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _encode(out: list[BaseEvent], seq: int | None) -> bytes:
    head = f"id: {seq}\n" if seq is not None else ""
    return "".join(head + _ENCODER.encode(e) for e in out).encode()


# Routes ------------------------------------------------------------------------------------


def last_user_text(body: RunAgentInput) -> str:
    """The text of the last user message of a ``RunAgentInput``: the run's new message.

    Raises:
        ProtocolError: there is none, or it has no text.
    """
    for message in reversed(body.messages):
        if message.role != "user":
            continue
        content = message.content
        if isinstance(content, str):
            text = content
        else:
            text = "".join(part.text for part in content if isinstance(part, TextPart))
        if text.strip():
            return text
        break
    raise ProtocolError("bad_message", "messages must end with a user message that has text")


def client_tools(body: RunAgentInput) -> list[ClientTool]:
    """The tools the client offers, for the agent to call and the client to run."""
    return [
        ClientTool(t.name, t.description or "", dict(t.parameters or {})) for t in body.tools or ()
    ]


def tool_results(body: RunAgentInput) -> list[ClientToolResult]:
    """The client's answers when its messages end with ``tool`` messages: each answers a
    call of the assistant message before them (``[…, user, assistant(toolCalls),
    tool…]``), the calls the thread's previous run left to the client.  None otherwise.

    Raises:
        ProtocolError: a ``tool`` message answers no call of that assistant message, or
            one of its calls has no answer.
    """
    answers: list[ToolMessage] = []
    i = len(body.messages) - 1
    while i >= 0 and isinstance(body.messages[i], ToolMessage):
        message = body.messages[i]
        assert isinstance(message, ToolMessage)
        answers.insert(0, message)
        i -= 1
    if not answers:
        return []
    asked = body.messages[i] if i >= 0 else None
    if not isinstance(asked, AssistantMessage) or not asked.tool_calls:
        raise ProtocolError(
            "bad_message", "tool messages must follow the assistant message whose calls they answer"
        )
    calls = {call.id: call for call in asked.tool_calls}
    out: list[ClientToolResult] = []
    for answer in answers:
        call = calls.pop(answer.tool_call_id, None)
        if call is None:
            raise ProtocolError(
                "bad_message",
                f"tool message {answer.id!r} answers no call of the assistant message before it",
            )
        try:
            args = json.loads(call.function.arguments or "{}")
        except json.JSONDecodeError:
            args = {}
        out.append(
            ClientToolResult(
                call.id,
                call.function.name,
                args if isinstance(args, dict) else {},
                _text_of(answer.content),
                answer.error,
            )
        )
    if calls:
        raise ProtocolError(
            "bad_message", f"tool calls without a tool message answering them: {sorted(calls)}"
        )
    return out


def _text_of(content: object) -> str:
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else []
    return "".join(part.text for part in parts if isinstance(part, TextPart))


def results_text(results: list[ClientToolResult]) -> str:
    """What the thread stores as the message of a run that goes on from tool results."""
    lines = []
    for r in results:
        outcome = r.content if r.error is None else f"error: {r.error} {r.content}".rstrip()
        lines.append(f"Result of {r.name} ({r.call_id}): {outcome}")
    return "\n".join(lines)


def _run_input(raw: dict[str, Any]) -> RunAgentInput:
    try:
        return RunAgentInput.model_validate(raw)
    except ValidationError as exc:
        errors = [
            {"loc": ".".join(str(part) for part in error["loc"]), "msg": error["msg"]}
            for error in exc.errors(include_url=False)[:MAX_ERRORS]
        ]
        raise ProtocolError(
            "bad_message", "not a RunAgentInput: " + json.dumps(errors, ensure_ascii=False)
        ) from None


@routes.api
async def run_agent(request: Request) -> Response:
    """``POST /api/ag-ui/{agent}``: a ``RunAgentInput`` in, the run as AG-UI events out.

    ``threadId`` is the user's thread (created when new); the last user message is
    the run's message, or, when the messages end with ``tool`` messages, the run goes
    on from those answers to the calls the previous run left to the client
    (:func:`tool_results`); ``tools`` are offered to the agent as client tools;
    ``runId`` is kept as the client's id of the run.  The
    gateway's own ids come in the ``X-Chat-Run-Id`` and ``X-Chat-Thread-Id``
    headers, for the rejoin route and the lifecycle routes.
    """
    gateway = routes.gateway_of(request)
    user = routes.authenticate(request)
    raw = await routes.read_json_body(request, gateway.settings.max_frontend_body_bytes)
    body = _run_input(raw)
    if body.resume:
        return await _resume(gateway, user, body)
    thread_id = optional_id({"threadId": body.thread_id}, "threadId")
    agent = optional_id({"agent": request.path_params["agent"]}, "agent")
    client_run_id = client_ref({"id": body.run_id})
    results = tool_results(body)
    text = results_text(results) if results else last_user_text(body)
    content = routes.new_message(text, gateway.settings.max_message_bytes)
    framer = AguiFramer(client_run_id=body.run_id)
    stream = await sse.open_stream(gateway, user, framer=framer.frame, until=lambda: framer.done)
    async with sse.opening(stream):
        # A retried POST (same runId, same message) rejoins its run rather than starting
        # another; a runId used again for another message starts a run of its own.
        key = None
        if client_run_id is not None:
            key = frontend_key("ag-ui", thread_id, str(client_run_id), content)
        sent = await gateway.send(
            user,
            content,
            thread_id=thread_id,
            agent=agent,
            ref=client_run_id,
            key=key,
            client_tools=client_tools(body),
            tool_results=results,
        )
        record = sent.record
        stream.headers["x-chat-run-id"] = record.run_id
        stream.headers["x-chat-thread-id"] = record.thread_id
        stream.attach(await gateway.watch(user, record.run_id, 0, stream.wake))
    return stream


async def _resume(gateway: Gateway, user: Principal, body: RunAgentInput) -> Response:
    """A ``RunAgentInput`` whose ``resume`` answers the interrupt that ended the
    previous response: each entry goes to ``respond`` (as the REST route's), then the
    response is the rest of the SAME run, from just after the interrupt, as a new
    AG-UI run (``RUN_STARTED`` with the input's ``runId``) to its end or its next
    interrupt.  Another user's run is 404, an interrupt already answered 409.
    """
    entries = body.resume or []
    named = [parse_interrupt_id(entry.interrupt_id) for entry in entries]
    run_ids = {run_id for run_id, _ in named}
    if len(run_ids) != 1:
        raise ProtocolError("bad_message", "resume entries must answer the interrupts of one run")
    (run_id,) = run_ids
    record = await gateway.find_run(user, run_id)
    if record.thread_id != body.thread_id:
        raise ProtocolError(
            "bad_message", f"the interrupt's run is not of thread {body.thread_id!r}"
        )
    for (_, request_id), entry in zip(named, entries, strict=True):
        await gateway.respond(user, run_id, request_id, resume_payload(entry))
    framer = AguiFramer(client_run_id=body.run_id, resume_of=named[-1][1])
    stream = await sse.open_stream(gateway, user, framer=framer.frame, until=lambda: framer.done)
    async with sse.opening(stream):
        stream.headers["x-chat-run-id"] = run_id
        stream.headers["x-chat-thread-id"] = record.thread_id
        stream.attach(await gateway.watch(user, run_id, 0, stream.wake))
    return stream


@routes.api
async def rejoin(request: Request) -> Response:
    """``GET /api/ag-ui/runs/{run_id}/events``: rejoin after ``Last-Event-ID`` (or
    ``?after_seq=``), what was open there re-opened first."""
    gateway = routes.gateway_of(request)
    user = routes.authenticate(request)
    run_id = request.path_params["run_id"]
    after = routes.after_seq(request)
    framer = AguiFramer(after_seq=after)
    stream = await sse.open_stream(
        gateway, user, framer=framer.frame, tail=framer.tail, until=lambda: framer.done
    )
    async with sse.opening(stream):
        # From the first event: those up to ``after`` only tell the framer what is open.
        stream.attach(await gateway.watch(user, run_id, 0, stream.wake))
    return stream

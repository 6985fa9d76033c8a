"""The AI SDK's UI message stream over the gateway's runs (``useChat``'s protocol).

:class:`AiSdkFramer` is pure: a run's ``chat.v1`` events in, in ``seq`` order, the
parts of the UI message stream out, each one SSE ``data:`` line of JSON; the
stream ends with ``data: [DONE]``.  The part shapes are those of the ``ai``
package pinned in ``tests/js/package-lock.json`` (its ``uiMessageChunkSchema``).

======================  ================================================================
chat.v1                 UI message stream parts
======================  ================================================================
``user_message``        ``start`` (``messageId``: the answer's id), ``start-step``
``agent_thinking``      ``reasoning-start`` when none is open, ``reasoning-delta``
``tool_executing``      ``tool-input-start`` / ``tool-input-delta`` (JSON) /
                        ``tool-input-available`` (``dynamic``: the gateway's own tools)
``tool_completed``      ``tool-output-available`` or ``tool-output-error``
                        (``tool-output-denied`` for a call denied its approval), then
                        ``finish-step`` (the next content opens a ``start-step``)
``input_requested``     ``tool-approval-request`` for a ``tool_approval``, an ``ask_user``
                        call for a ``question``; then ``finish`` and the response ends:
                        the next request's answer (:func:`input_answer`) continues it
``response_chunk``      ``text-start`` when none is open, ``text-delta``
``run_status``          (nothing: a paused run's stream carries ``: ping`` comments)
``response_complete``   ``text-end``
``agent_completed``     ``finish-step``, then ``finish`` (``finishReason: stop``) when
                        completed, ``abort`` (``reason``: the error code) when cancelled,
                        ``error`` (``errorText``) and ``finish`` (``error``) when failed
connection ``error``    ``error`` (``resume_unavailable``, a cut)
======================  ================================================================
"""

from __future__ import annotations

import json
from typing import Any, Final

import orjson
from starlette.requests import Request
from starlette.responses import Response

from bridge.events import Event
from server import routes, sse
from server.commands import MAX_ID_CHARS, optional_id
from server.errors import ProtocolError
from server.gateway import Gateway, frontend_key

HEADER: Final = {"x-vercel-ai-ui-message-stream": "v1"}
DONE: Final = b"data: [DONE]\n\n"
TRIGGERS: Final = frozenset({"submit-message", "regenerate-message"})

Part = dict[str, Any]
#: The dynamic tool a question is asked through: its output is the user's answer.
ASK_TOOL: Final = "ask_user"


def input_id(run_id: str, request_id: str) -> str:
    """The ``approvalId`` (or the ``ask_user`` call's ``toolCallId``) of an input
    request: the gateway's run id and the request's."""
    return f"{run_id}:{request_id}"


def part_bytes(part: Part) -> bytes:
    return b"data: " + orjson.dumps(part) + b"\n\n"


class AiSdkFramer:
    """One stream's framing; see the module docstring."""

    def __init__(self, *, resume_of: str | None = None) -> None:
        #: A continuation's request id: the run's events up to its ``input_requested``
        #: are not written, the rest of the run is.
        self._resume_of = resume_of
        #: The stream's end was written (the run's, or an input request's): nothing more.
        self.done = False
        self._opened = False
        #: The calls waiting for approval, by request id, and those denied.
        self._asked: dict[str, str] = {}
        self._denied: set[str] = set()
        self._run_id = ""
        self._started = False
        self._step = False
        self._reasoning: str | None = None
        self._reasonings = 0
        self._text: str | None = None
        self._ended = False

    def parts(self, event: Event) -> list[Part]:
        """The parts one run event stands for, the framer's state advanced."""
        if self._ended:
            return []
        if event.seq is None:
            if event.type != "error":
                return []
            data = event.data
            self._ended = True
            return [
                *self._close_all(),
                {"type": "error", "errorText": f"{data['code']}: {data['message']}"},
            ]
        data = event.data
        kind: str = event.type  # with types this gateway does not emit yet
        out: list[Part] = []
        if not self._started:
            self._started = True
            self._run_id = event.run_id or ""
            out.append({"type": "start", "messageId": f"{self._run_id}:answer"})
        if kind == "agent_thinking":
            out += self._open_step()
            out += self._close_text()
            if self._reasoning is None:
                self._reasonings += 1
                self._reasoning = f"{self._run_id}:reasoning:{self._reasonings}"
                out.append({"type": "reasoning-start", "id": self._reasoning})
            text = str(data.get("text") or "")
            if text:
                out.append({"type": "reasoning-delta", "id": self._reasoning, "delta": text})
        elif kind == "tool_executing":
            out += self._open_step()
            out += self._close_all()
            call = {"toolCallId": str(data["call_id"]), "toolName": str(data["tool"])}
            args = data.get("args") or {}
            out.append({"type": "tool-input-start", **call, "dynamic": True})
            out.append(
                {
                    "type": "tool-input-delta",
                    "toolCallId": call["toolCallId"],
                    "inputTextDelta": json.dumps(args, ensure_ascii=False),
                }
            )
            out.append({"type": "tool-input-available", **call, "input": args, "dynamic": True})
        elif kind == "input_resolved":
            waited = self._asked.pop(str(data.get("request_id")), None)
            if waited is not None and data.get("approved") is False:
                self._denied.add(waited)
        elif kind == "tool_completed":
            out += self._open_step()
            out += self._close_all()
            call_id = str(data["call_id"])
            if call_id in self._denied and not data.get("ok"):
                # The SDK's own part for a call its approval response denied.
                out.append({"type": "tool-output-denied", "toolCallId": call_id})
            elif data.get("ok"):
                output = data.get("result")
                out.append(
                    {
                        "type": "tool-output-available",
                        "toolCallId": call_id,
                        "output": output,
                        "dynamic": True,
                    }
                )
            else:
                out.append(
                    {
                        "type": "tool-output-error",
                        "toolCallId": call_id,
                        "errorText": str(data.get("error") or "tool failed"),
                        "dynamic": True,
                    }
                )
            out += self._close_step()
        elif kind == "input_requested":
            out += self._open_step()
            out += self._close_all()
            answer_id = input_id(self._run_id, str(data.get("request_id")))
            if data.get("kind") == "tool_approval":
                self._asked[str(data.get("request_id"))] = str(data.get("call_id"))
                out.append(
                    {
                        "type": "tool-approval-request",
                        "approvalId": answer_id,
                        "toolCallId": str(data.get("call_id")),
                    }
                )
            else:
                ask = {"toolCallId": answer_id, "toolName": ASK_TOOL}
                question = {"question": data.get("question"), "choices": data.get("choices")}
                out.append({"type": "tool-input-start", **ask, "dynamic": True})
                out.append(
                    {"type": "tool-input-available", **ask, "input": question, "dynamic": True}
                )
            out += self._close_step()
            out.append({"type": "finish", "finishReason": "tool-calls"})
            self._ended = True
        elif kind == "response_chunk":
            out += self._open_step()
            out += self._close_reasoning()
            text = str(data.get("text") or "")
            if text:
                if self._text is None:
                    self._text = f"{self._run_id}:text"
                    out.append({"type": "text-start", "id": self._text})
                out.append({"type": "text-delta", "id": self._text, "delta": text})
        elif kind == "response_complete":
            out += self._close_all()
        elif kind == "agent_completed":
            out += self._close_all()
            out += self._close_step()
            self._ended = True
            status = data.get("status")
            error = data.get("error") or {}
            if status == "completed":
                out.append({"type": "finish", "finishReason": "stop"})
            elif status == "cancelled":
                out.append({"type": "abort", "reason": str(error.get("code") or "cancelled")})
            else:
                message = str(error.get("message") or "the run failed")
                out.append({"type": "error", "errorText": f"{error.get('code')}: {message}"})
                out.append({"type": "finish", "finishReason": "error"})
        return out

    def frame(self, event: Event) -> bytes:
        if self._resume_of is not None and event.seq is not None:
            # A continuation: the run so far is the client's already.
            if event.type == "input_requested" and event.data.get("kind") == "tool_approval":
                self._asked[str(event.data.get("request_id"))] = str(event.data.get("call_id"))
            if event.type == "input_requested" and event.data.get("request_id") == self._resume_of:
                self._resume_of = None
            if not self._started:
                self._started = True
                self._run_id = event.run_id or ""
            return b""
        out = self.parts(event)
        if not self._opened and out:
            self._opened = True
            if out[0].get("type") != "start":
                out.insert(0, {"type": "start", "messageId": f"{self._run_id}:answer"})
        self.done = self._ended
        return b"".join(part_bytes(part) for part in out)

    def _open_step(self) -> list[Part]:
        if self._step:
            return []
        self._step = True
        return [{"type": "start-step"}]

    def _close_step(self) -> list[Part]:
        if not self._step:
            return []
        self._step = False
        return [{"type": "finish-step"}]

    def _close_reasoning(self) -> list[Part]:
        if self._reasoning is None:
            return []
        part = {"type": "reasoning-end", "id": self._reasoning}
        self._reasoning = None
        return [part]

    def _close_text(self) -> list[Part]:
        if self._text is None:
            return []
        part = {"type": "text-end", "id": self._text}
        self._text = None
        return [part]

    def _close_all(self) -> list[Part]:
        return [*self._close_reasoning(), *self._close_text()]


# Routes ------------------------------------------------------------------------------------


def last_user_text(messages: object) -> str:
    """The text of the last user message among UI messages (``parts`` of ``text``).

    Raises:
        ProtocolError: there is none, or it has no text.
    """
    return last_user_message(messages)[0]


def last_user_message(messages: object) -> tuple[str, str | None]:
    """The text and the client's ``id`` of the last user message among UI messages
    (the id None when it has none, or when it is not a string of at most
    :data:`~server.commands.MAX_ID_CHARS` characters).

    Raises:
        ProtocolError: there is none, or it has no text.
    """
    if not isinstance(messages, list):
        raise ProtocolError("bad_message", "field 'messages' must be a list of UI messages")
    for message in reversed(messages):
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        parts = message.get("parts")
        if not isinstance(parts, list):
            break
        texts = [p.get("text") for p in parts if isinstance(p, dict) and p.get("type") == "text"]
        if any(not isinstance(t, str) for t in texts):
            raise ProtocolError("bad_message", "a text part's 'text' must be a string")
        text = "".join(t for t in texts if isinstance(t, str))
        if text.strip():
            ref = message.get("id")
            usable = isinstance(ref, str) and 0 < len(ref) <= MAX_ID_CHARS
            return text, ref if usable else None
        break
    raise ProtocolError("bad_message", "messages must end with a user message that has text")


def input_answer(messages: object) -> tuple[str, str, dict[str, Any]] | None:
    """The answer a request carries to the input request that ended the previous
    response, when its messages end with that assistant message: the last tool part
    in state ``approval-responded`` (``approval: {id, approved, reason}``), or the
    ``ask_user`` call with its output (the answer).  ``(run_id, request_id,
    respond's fields)``, or None for an ordinary message.

    Raises:
        ProtocolError: the part names no input request of this gateway.
    """
    if not isinstance(messages, list) or not messages:
        return None
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant":
        return None
    parts = last.get("parts")
    found: tuple[str, dict[str, Any]] | None = None
    for part in parts if isinstance(parts, list) else ():
        if not isinstance(part, dict):
            continue
        approval = part.get("approval")
        if part.get("state") == "approval-responded" and isinstance(approval, dict):
            fields: dict[str, Any] = {"approved": approval.get("approved")}
            if approval.get("reason") is not None:
                fields["reason"] = approval.get("reason")
            found = (str(approval.get("id")), fields)
        elif part.get("toolName") == ASK_TOOL and part.get("state") == "output-available":
            output = part.get("output")
            answer = output.get("answer") if isinstance(output, dict) else output
            found = (str(part.get("toolCallId")), {"answer": answer})
    if found is None:
        return None
    run_id, _, request_id = found[0].rpartition(":")
    if not run_id or not request_id:
        raise ProtocolError("bad_message", f"no input request of this gateway: {found[0]!r}")
    return run_id, request_id, found[1]


async def _open(gateway: Gateway, user: Any, framer: AiSdkFramer) -> sse.SseStream:
    """A UI message stream rendered by ``framer``: its header, ``[DONE]`` last, and
    its end where the framer says (a run's end, or a request the client must answer)."""
    return await sse.open_stream(
        gateway,
        user,
        framer=framer.frame,
        tail=lambda _status: DONE,
        headers=HEADER,
        until=lambda: framer.done,
    )


async def _stream_run(request: Request, user: Any, run_id: str) -> sse.SseStream:
    gateway = routes.gateway_of(request)
    framer = AiSdkFramer()
    stream = await _open(gateway, user, framer)
    async with sse.opening(stream):
        stream.attach(await gateway.watch(user, run_id, 0, stream.wake))
    return stream


@routes.api
async def chat(request: Request) -> Response:
    """``POST /api/ai-sdk/chat``: what ``DefaultChatTransport`` sends, the run's UI
    message stream back.

    The chat ``id`` is the user's thread (created when new); for ``submit-message``
    the last user message is the run's message.  ``regenerate-message`` answers the
    thread's stored last user message again in place of its answer (which
    ``messageId``, when given, must name): see :meth:`Gateway.regenerate`; a chat
    with no answer to regenerate is 409 ``conflict``.  An ``agent`` field (the
    transport's ``body`` option) names the agent.
    """
    gateway = routes.gateway_of(request)
    user = routes.authenticate(request)
    body = await routes.read_json_body(request, gateway.settings.max_frontend_body_bytes)
    limit = gateway.settings.max_message_bytes
    thread_id = optional_id(body, "id")
    if thread_id is None:
        raise ProtocolError("bad_message", "field 'id' (the chat's id) is required")
    trigger = body.get("trigger", "submit-message")
    if not isinstance(trigger, str) or trigger not in TRIGGERS:
        raise ProtocolError("bad_message", f"field 'trigger' must be one of {sorted(TRIGGERS)}")
    agent = optional_id(body, "agent")
    regenerate = trigger == "regenerate-message"
    answer_ref = body.get("messageId")
    if regenerate and answer_ref is not None and not isinstance(answer_ref, str):
        raise ProtocolError("bad_message", "field 'messageId' must be a string")
    answer = None if regenerate else input_answer(body.get("messages"))
    if answer is not None:
        return await _continue(request, user, *answer)
    text, message_ref = last_user_message(body.get("messages"))
    content = routes.new_message(text, limit)
    framer = AiSdkFramer()
    stream = await _open(gateway, user, framer)
    async with sse.opening(stream):
        if regenerate:
            record = await gateway.regenerate(
                user,
                thread_id,
                agent=agent,
                answer_ref=answer_ref if isinstance(answer_ref, str) else None,
            )
        else:
            # A retried POST of the same message (the SDK's id for it, and its text)
            # streams the run the first one started instead of starting another; an
            # edited message (its id kept, another text) is a message of its own.
            key = None
            if message_ref is not None:
                key = frontend_key("ai-sdk", thread_id, message_ref, content)
            sent = await gateway.send(user, content, thread_id=thread_id, agent=agent, key=key)
            record = sent.record
        stream.headers["x-chat-run-id"] = record.run_id
        stream.attach(await gateway.watch(user, record.run_id, 0, stream.wake))
    return stream


async def _continue(
    request: Request, user: Any, run_id: str, request_id: str, fields: dict[str, Any]
) -> Response:
    """The client's answer to an input request: ``respond`` (404 for another user's
    run, 409 when already answered), then the rest of the same run, from just after
    the request, continuing the assistant message the client has."""
    gateway = routes.gateway_of(request)
    await gateway.respond(user, run_id, request_id, fields)
    framer = AiSdkFramer(resume_of=request_id)
    stream = await _open(gateway, user, framer)
    async with sse.opening(stream):
        stream.headers["x-chat-run-id"] = run_id
        stream.attach(await gateway.watch(user, run_id, 0, stream.wake))
    return stream


@routes.api
async def resume(request: Request) -> Response:
    """``GET /api/ai-sdk/chat/{id}/stream``: the thread's active run from its start,
    or 204 when it has none (an unknown thread, or another user's, has none)."""
    gateway = routes.gateway_of(request)
    user = routes.authenticate(request)
    thread_id = request.path_params["id"]
    active = await gateway.store.unfinished_runs(thread_id, user.user_id)
    if not active:
        return Response(status_code=204)
    return await _stream_run(request, user, active[-1])

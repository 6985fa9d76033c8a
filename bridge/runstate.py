"""A run's state as its events say it, with no I/O.

:class:`RunState` is fed a run's events as they are made (by the run's bridge)
or replayed from a log (by a broker that ends a run its process lost, by the
tests and the load client, over what they received).  It checks each event
against the run's invariants, and answers the events that close the run for a
given ending, as typed records:

* ``seq`` counts from 1 with no gap;
* a tool call is announced once (``tool_executing``) and answered once
  (``tool_completed``), and none is open at ``agent_completed``;
* response chunks are numbered from 0 (``index``), and their texts in order make
  the answer ``response_complete`` carries;
* an input request (``input_requested``) is resolved once (``input_resolved``), and
  none is open at ``agent_completed``;
* nothing follows ``agent_completed``.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Literal

from bridge.errors import InvariantBroken
from bridge.events import (
    AgentCompletedData,
    ErrorData,
    Event,
    ResponseChunkData,
    ResponseCompleteData,
    ToolCompletedData,
)
from bridge.wire import RunStatus

#: How an open input request is named among the open calls a run's appends record.
INPUT_KEY_PREFIX: Final = "input:"


@dataclass(frozen=True, slots=True)
class ToolFailed:
    """An open tool call answered as failed, because the run ends."""

    type: ClassVar[Literal["tool_completed"]] = "tool_completed"
    call_id: str
    tool: str
    error: str
    duration_ms: float = 0.0

    def data(self) -> ToolCompletedData:
        return {
            "call_id": self.call_id,
            "tool": self.tool,
            "ok": False,
            "error": self.error,
            "duration_ms": round(self.duration_ms, 3),
        }


@dataclass(frozen=True, slots=True)
class InputCancelled:
    """An open input request resolved because the run ends (``by: cancel``)."""

    type: ClassVar[Literal["input_resolved"]] = "input_resolved"
    request_id: str
    kind: str

    def data(self) -> dict[str, Any]:
        data: dict[str, Any] = {"request_id": self.request_id, "by": "cancel"}
        if self.kind == "question":
            data["answer"] = ""
        else:
            data["approved"] = False
        data["reason"] = "the run ended"
        return data


@dataclass(frozen=True, slots=True)
class ResponseChunk:
    type: ClassVar[Literal["response_chunk"]] = "response_chunk"
    text: str
    index: int

    def data(self) -> ResponseChunkData:
        return {"text": self.text, "index": self.index}


@dataclass(frozen=True, slots=True)
class ResponseComplete:
    type: ClassVar[Literal["response_complete"]] = "response_complete"
    message_id: str
    content: str
    fallback: bool
    stored: bool

    def data(self) -> ResponseCompleteData:
        return {
            "message_id": self.message_id,
            "content": self.content,
            "fallback": self.fallback,
            "stored": self.stored,
        }


@dataclass(frozen=True, slots=True)
class AgentCompleted:
    type: ClassVar[Literal["agent_completed"]] = "agent_completed"
    status: RunStatus
    duration_ms: float
    error: ErrorData | None = None
    #: The tokens the run's models used, when its agent reported any.
    usage: dict[str, object] | None = None

    def data(self) -> AgentCompletedData:
        data: AgentCompletedData = {
            "status": self.status.value,
            "duration_ms": round(self.duration_ms, 3),
        }
        if self.error is not None and self.status is not RunStatus.COMPLETED:
            data["error"] = self.error
        if self.usage is not None:
            data["usage"] = self.usage
        return data


#: An event that closes a run.
Closing = InputCancelled | ToolFailed | ResponseChunk | ResponseComplete | AgentCompleted


class RunState:
    """What one run's events so far leave open, and the checks the next must pass."""

    __slots__ = (
        "_answer",
        "_last_char",
        "answer_bytes",
        "chars",
        "chunks",
        "completed",
        "open_calls",
        "open_requests",
        "resolved_requests",
        "responded",
        "seq",
        "status",
    )

    def __init__(self, *, keep_answer: bool = True) -> None:
        #: ``seq`` of the last event.
        self.seq = 0
        #: Tool calls announced and not yet answered: call id → tool name.
        self.open_calls: dict[str, str] = {}
        #: Input requests made and not yet resolved: request id → kind.
        self.open_requests: dict[str, str] = {}
        #: Ids of the requests resolved so far (each is resolved once).
        self.resolved_requests: set[str] = set()
        #: Response chunks so far (the next chunk's ``index``).
        self.chunks = 0
        #: Characters and UTF-8 bytes of the answer so far.
        self.chars = 0
        self.answer_bytes = 0
        #: Whether ``response_complete`` was made; ``agent_completed``; its status.
        self.responded = False
        self.completed = False
        self.status: RunStatus | None = None
        # The answer, as one buffer (its memory is the answer's, however small the
        # chunks), unless someone else holds the chunks anyway.
        self._answer: io.StringIO | None = io.StringIO() if keep_answer else None
        self._last_char = ""

    @classmethod
    def resumed(
        cls,
        *,
        seq: int,
        open_calls: Mapping[str, str],
        chunks: int,
        responded: bool,
        content: str,
    ) -> RunState:
        """The state of a run from what its appends recorded, not from its events."""
        state = cls()
        state.seq = seq
        for key, value in open_calls.items():
            if key.startswith(INPUT_KEY_PREFIX):  # an input request, not a call
                state.open_requests[key.removeprefix(INPUT_KEY_PREFIX)] = value
            else:
                state.open_calls[key] = value
        state.chunks = chunks
        state.responded = responded
        if content:
            state.add_chunk(content, len(content.encode()), count=False)
        return state

    @classmethod
    def replay(cls, events: Iterable[Event]) -> RunState:
        """The state after ``events``, a run's log from its first event, each checked.

        Raises:
            InvariantBroken: an event breaks the run's invariants.
        """
        state = cls()
        for event in events:
            state.feed(event.type, event.data, event.seq)
        return state

    # The answer ---------------------------------------------------------------

    @property
    def content(self) -> str:
        """The answer so far (empty when the state does not keep it)."""
        return self._answer.getvalue() if self._answer is not None else ""

    @property
    def ends_with_space(self) -> bool:
        """Whether the answer so far is empty or ends with whitespace."""
        return not self._last_char or self._last_char.isspace()

    def add_chunk(self, text: str, nbytes: int, *, count: bool = True) -> None:
        """Count a response chunk of ``text`` (``nbytes`` of UTF-8) into the answer."""
        if self._answer is not None:
            self._answer.write(text)
        if count:
            self.chunks += 1
        self.chars += len(text)
        self.answer_bytes += nbytes
        self._last_char = text[-1]

    # Events -------------------------------------------------------------------

    def check(self, type: str, data: Mapping[str, Any]) -> Mapping[str, Any]:
        """The event's data as it is to be made, if it keeps the run's invariants
        (nothing is changed yet); a chunk gets its ``index``.

        Raises:
            InvariantBroken: it does not.
        """
        if self.completed:
            raise InvariantBroken(f"{type} cannot follow agent_completed")
        if type == "response_chunk":
            text = data["text"]
            if not isinstance(text, str) or not text:
                raise InvariantBroken("a response chunk needs non-empty text")
            return {"text": text, "index": self.chunks}
        if type == "tool_executing":
            if data["call_id"] in self.open_calls:
                raise InvariantBroken(f"tool call {data['call_id']} is already open")
        elif type == "tool_completed":
            if data["call_id"] not in self.open_calls:
                raise InvariantBroken(
                    f"tool call {data['call_id']} was never announced or already completed"
                )
        elif type == "input_requested":
            request_id = data["request_id"]
            if request_id in self.open_requests or request_id in self.resolved_requests:
                raise InvariantBroken(f"input request {request_id} was already made")
        elif type == "input_resolved":
            if data["request_id"] not in self.open_requests:
                raise InvariantBroken(
                    f"input request {data['request_id']} was never made or already resolved"
                )
        elif type == "agent_completed" and self.open_calls:
            raise InvariantBroken(f"tool calls still open: {sorted(self.open_calls)}")
        elif type == "agent_completed" and self.open_requests:
            raise InvariantBroken(f"input requests still open: {sorted(self.open_requests)}")
        return data

    def apply(self, type: str, data: Mapping[str, Any]) -> None:
        """Record what a checked event changes, once it is made."""
        if type == "response_chunk":
            text = data["text"]
            self.add_chunk(text, _utf8_len(text))
        elif type == "tool_executing":
            self.open_calls[data["call_id"]] = data["tool"]
        elif type == "tool_completed":
            del self.open_calls[data["call_id"]]
        elif type == "input_requested":
            self.open_requests[data["request_id"]] = data["kind"]
        elif type == "input_resolved":
            del self.open_requests[data["request_id"]]
            self.resolved_requests.add(data["request_id"])
        elif type == "response_complete":
            self.responded = True
        elif type == "agent_completed":
            self.completed = True
            self.status = RunStatus(data["status"])

    def feed(self, type: str, data: Mapping[str, Any], seq: int | None) -> None:
        """Check and apply the run's next event, as made or as read from a log.

        Raises:
            InvariantBroken: it breaks the run's invariants (a chunk's ``index`` and
                ``response_complete``'s ``content`` included).
        """
        if seq != self.seq + 1:
            raise InvariantBroken(f"{type} has seq {seq}; {self.seq + 1} was next")
        made = self.check(type, data)
        if type == "response_chunk" and data.get("index") != made["index"]:
            raise InvariantBroken(f"chunk index {data.get('index')}; {made['index']} was next")
        if (
            type == "response_complete"
            and self._answer is not None
            and data.get("content") != self.content
        ):
            raise InvariantBroken("response_complete's content is not its chunks' texts")
        self.apply(type, data)
        self.seq = seq

    # Endings ------------------------------------------------------------------

    def failed_calls(
        self, error: str, durations: Mapping[str, float] | None = None
    ) -> list[ToolFailed]:
        """Every open call answered as failed with ``error`` (``durations`` in ms)."""
        took = durations or {}
        return [
            ToolFailed(call_id, tool, error, took.get(call_id, 0.0))
            for call_id, tool in self.open_calls.items()
        ]

    def cancelled_requests(self) -> list[InputCancelled]:
        """Every open input request resolved ``by: cancel``, because the run ends."""
        return [InputCancelled(rid, kind) for rid, kind in self.open_requests.items()]

    def lost(
        self, *, code: str, message: str, apology: str, message_id: str, duration_ms: float
    ) -> list[Closing]:
        """The events that end a run its agent cannot end (its process was lost, or its
        events could not be kept): open calls answered, the answer completed (what its
        chunks said, and an apology) unless it was, ``agent_completed`` failed."""
        ending: list[Closing] = [*self.cancelled_requests(), *self.failed_calls(code)]
        if not self.responded:
            content = self.content
            text = ("\n\n" if content else "") + apology
            ending.append(ResponseChunk(text, self.chunks))
            ending.append(ResponseComplete(message_id, content + text, True, False))
        ending.append(
            AgentCompleted(RunStatus.FAILED, duration_ms, {"code": code, "message": message})
        )
        return ending


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())

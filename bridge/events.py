"""The events of protocol ``chat.v1``, as typed records encoded once.

Every event the server sends is an :class:`Event`: the envelope of the contract
(``type``, ``run_id``, ``thread_id``, ``seq``, ``ts``, ``data``) plus its JSON text,
encoded with orjson when the event is made.  However many sessions watch a run,
the event is never encoded again; transports only frame the ready text.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Final, Literal, NotRequired, TypedDict, get_args

import orjson

PROTOCOL: Final = "chat.v1"

#: The client's ``id`` of a frame, echoed back as ``ref``.
Ref = str | int | None

RunEventType = Literal[
    "user_message",
    "agent_started",
    "agent_thinking",
    "tool_executing",
    "tool_completed",
    "response_chunk",
    "agent_state",
    "agent_event",
    "run_status",
    "input_requested",
    "input_resolved",
    "response_complete",
    "agent_completed",
]
#: What an ``agent_thinking`` is: the agent's reasoning, or a progress line about it.
ThinkingKind = Literal["reasoning", "status"]
THINKING_KINDS: Final[frozenset[str]] = frozenset(get_args(ThinkingKind))

ConnectionEventType = Literal["connection_ready", "pong", "ack", "error"]
EventType = RunEventType | ConnectionEventType


# The payloads of the events that end a run, as the contract spells them.


class ErrorData(TypedDict):
    code: str
    message: str


class ToolCompletedData(TypedDict):
    call_id: str
    tool: str
    ok: bool
    duration_ms: float
    result: NotRequired[Any]
    error: NotRequired[str]


class ResponseChunkData(TypedDict):
    text: str
    index: int


class ResponseCompleteData(TypedDict):
    message_id: str
    content: str
    fallback: bool
    stored: bool


class AgentCompletedData(TypedDict):
    status: str
    duration_ms: float
    error: NotRequired[ErrorData]
    usage: NotRequired[dict[str, object]]


class Event:
    """One server-to-client message: the contract's envelope as encoded JSON text.

    Only what routing needs is kept as fields (``type``, ``run_id``, ``thread_id``,
    ``seq``, ``ts``); ``data`` is decoded from the text when asked for.  A run log
    keeps many events, and the text alone is what every transport sends.
    """

    __slots__ = ("chunk", "run_id", "seq", "size", "text", "thread_id", "ts", "type")

    def __init__(
        self,
        type: EventType,
        run_id: str | None,
        thread_id: str | None,
        seq: int | None,
        ts: float,
        text: str,
        size: int,
    ) -> None:
        self.type = type
        self.run_id = run_id
        self.thread_id = thread_id
        self.seq = seq
        self.ts = ts
        #: The envelope, encoded once.
        self.text = text
        #: Bytes of the encoded envelope.
        self.size = size
        #: A response chunk's text when the event was made here with it at hand (the
        #: bridge's hot path), so that a broker need not decode ``data`` for it.
        self.chunk: str | None = None

    @property
    def data(self) -> dict[str, Any]:
        """The event's ``data``, decoded from its text (not cached)."""
        data: dict[str, Any] = orjson.loads(self.text)["data"]
        return data

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Event) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return f"Event({self.type!r}, run_id={self.run_id!r}, seq={self.seq!r})"

    def sse(self) -> bytes:
        """The event as one Server-Sent Events message, ``id`` being its ``seq``."""
        head = f"id: {self.seq}\n" if self.seq is not None else ""
        return f"{head}event: {self.type}\ndata: {self.text}\n\n".encode()


def make_event(
    type: EventType,
    data: Mapping[str, Any],
    *,
    run_id: str | None = None,
    thread_id: str | None = None,
    seq: int | None = None,
    ts: float | None = None,
) -> Event:
    """Build an event and encode it, once."""
    if ts is None:
        ts = time.time()
    envelope = {
        "type": type,
        "run_id": run_id,
        "thread_id": thread_id,
        "seq": seq,
        "ts": ts,
        "data": data,
    }
    raw = orjson.dumps(envelope)
    return Event(type, run_id, thread_id, seq, ts, raw.decode(), len(raw))


def decode_event(text: str | bytes) -> Event:
    """Parse an encoded event back into a record (for clients, tests and brokers)."""
    raw = orjson.loads(text)
    encoded = text.encode() if isinstance(text, str) else text
    if not isinstance(raw, dict):
        raise ValueError("an event is a JSON object")
    return Event(
        raw["type"],
        raw.get("run_id"),
        raw.get("thread_id"),
        raw.get("seq"),
        float(raw["ts"]),
        encoded.decode(),
        len(encoded),
    )


# Connection-level events -------------------------------------------------------


def connection_ready(
    session_id: str, user_id: str, heartbeat_s: float, max_message_bytes: int
) -> Event:
    return make_event(
        "connection_ready",
        {
            "session_id": session_id,
            "user_id": user_id,
            "protocol": PROTOCOL,
            "heartbeat_s": heartbeat_s,
            "max_message_bytes": max_message_bytes,
        },
    )


def pong(ref: Ref) -> Event:
    return make_event("pong", {"ref": ref})


def ack(ref: Ref, action: str, run_id: str | None, status: str | None, **extra: Any) -> Event:
    return make_event(
        "ack", {"ref": ref, "action": action, "run_id": run_id, "status": status, **extra}
    )


def error(code: str, message: str, ref: Ref = None, **extra: Any) -> Event:
    return make_event("error", {"code": code, "message": message, "ref": ref, **extra})

"""Client frames of ``chat.v1``, parsed into typed commands.  No I/O.

Every frame becomes one :data:`Command`, or a :class:`ProtocolError` whose code
is ``bad_json`` (not JSON text, unpaired surrogates included), ``bad_message``
(JSON that is not an object, or wrong or missing fields) or ``unknown_type``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

from bridge.events import Ref
from server.errors import ProtocolError
from server.params import INT64_MAX

MAX_ID_CHARS: Final = 128
MAX_THREAD_ID_CHARS: Final = 128


@dataclass(frozen=True, slots=True)
class UserMessage:
    content: str
    id: Ref = None
    thread_id: str | None = None
    agent: str | None = None
    #: reject, enqueue, interrupt or rollback; None: the server's ``CHAT_ON_ACTIVE``.
    on_active: str | None = None
    #: The client's W3C trace context: the parent of the run's span.
    traceparent: str | None = None
    type: Literal["user_message"] = "user_message"


@dataclass(frozen=True, slots=True)
class Control:
    action: Literal["stop", "start", "cancel"]
    run_id: str
    id: Ref = None
    type: Literal["control"] = "control"


@dataclass(frozen=True, slots=True)
class Resume:
    run_id: str
    after_seq: int
    id: Ref = None
    type: Literal["resume"] = "resume"


@dataclass(frozen=True, slots=True)
class Respond:
    """An answer to a run's ``input_requested`` (6.4): ``approved`` with optional
    ``args`` and ``reason`` for an approval, ``answer`` for a question."""

    run_id: str
    request_id: str
    payload: dict[str, Any]
    id: Ref = None
    type: Literal["respond"] = "respond"


@dataclass(frozen=True, slots=True)
class Ping:
    id: Ref = None
    type: Literal["ping"] = "ping"


@dataclass(frozen=True, slots=True)
class WatchThread:
    """``watch_thread`` (``watch``) or ``unwatch_thread``: follow a thread's runs."""

    thread_id: str
    watch: bool = True
    id: Ref = None
    type: Literal["watch_thread"] = "watch_thread"


Command = UserMessage | Control | Resume | Ping | Respond | WatchThread

KNOWN_TYPES: Final = (
    "user_message",
    "stop",
    "start",
    "cancel",
    "resume",
    "ping",
    "respond",
    "watch_thread",
    "unwatch_thread",
)
#: The fields of an answer that go to the run (the rest of a frame is the envelope's).
RESPONSE_FIELDS: Final = ("approved", "args", "reason", "answer")


def parse_command(frame: str | bytes) -> Command:
    """Parse one client frame.

    Raises:
        ProtocolError: the frame is not a valid command; its ``ref`` is the frame's
            ``id`` when one could be read.
    """
    try:
        raw = orjson.loads(frame)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError("bad_json", f"frame is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ProtocolError("bad_message", "a frame must be a JSON object")
    ref = client_ref(raw)
    kind = raw.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("bad_message", "field 'type' must be a string", ref)
    if kind == "user_message":
        return UserMessage(
            content=_content(raw, ref),
            id=ref,
            thread_id=optional_id(raw, "thread_id", ref),
            agent=optional_id(raw, "agent", ref),
            on_active=on_active(raw, ref),
            traceparent=_traceparent(raw),
        )
    if kind in ("stop", "start", "cancel"):
        return Control(action=kind, run_id=_run_id(raw, ref), id=ref)  # type: ignore[arg-type]
    if kind == "resume":
        after = raw.get("after_seq")
        if isinstance(after, bool) or not isinstance(after, int) or not 0 <= after <= INT64_MAX:
            raise ProtocolError(
                "bad_message", f"field 'after_seq' must be an integer from 0 to {INT64_MAX}", ref
            )
        return Resume(run_id=_run_id(raw, ref), after_seq=after, id=ref)
    if kind == "ping":
        return Ping(id=ref)
    if kind in ("watch_thread", "unwatch_thread"):
        thread_id = optional_id(raw, "thread_id", ref)
        if thread_id is None:
            raise ProtocolError("bad_message", "field 'thread_id' is required", ref)
        return WatchThread(thread_id, watch=kind == "watch_thread", id=ref)
    if kind == "respond":
        return Respond(
            run_id=_run_id(raw, ref),
            request_id=request_id(raw, ref),
            payload=response_payload(raw, ref),
            id=ref,
        )
    raise ProtocolError(
        "unknown_type",
        f"unknown type {kind[:64]!r}; expected one of {', '.join(KNOWN_TYPES)}",
        ref,
    )


def request_id(raw: dict[str, Any], ref: Ref = None) -> str:
    value = raw.get("request_id")
    if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS:
        raise ProtocolError("bad_message", "field 'request_id' must be a request id string", ref)
    return value


def response_payload(raw: dict[str, Any], ref: Ref = None) -> dict[str, Any]:
    """The answer's fields; whether they fit the request is the run's to say."""
    payload = {name: raw[name] for name in RESPONSE_FIELDS if raw.get(name) is not None}
    if "approved" not in payload and "answer" not in payload:
        raise ProtocolError(
            "bad_message", "an answer needs 'approved' (an approval) or 'answer' (a question)", ref
        )
    return payload


def client_ref(raw: dict[str, Any]) -> Ref:
    value = raw.get("id")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ProtocolError("bad_message", "field 'id' must be a string or an integer")
    if isinstance(value, str) and len(value) > MAX_ID_CHARS:
        raise ProtocolError("bad_message", f"field 'id' is longer than {MAX_ID_CHARS} characters")
    return value


def _content(raw: dict[str, Any], ref: Ref) -> str:
    content = raw.get("content")
    if not isinstance(content, str) or not content.strip():
        raise ProtocolError("bad_message", "field 'content' must be a non-empty string", ref)
    return content


def _traceparent(raw: dict[str, Any]) -> str | None:
    # A trace context that is not one is ignored, as W3C trace context asks.
    value = raw.get("traceparent")
    return value if isinstance(value, str) and 0 < len(value) <= 256 else None


def _run_id(raw: dict[str, Any], ref: Ref) -> str:
    run_id = raw.get("run_id")
    if not isinstance(run_id, str) or not run_id or len(run_id) > MAX_ID_CHARS:
        raise ProtocolError("bad_message", "field 'run_id' must be a run id string", ref)
    return run_id


ON_ACTIVE: Final = ("reject", "enqueue", "interrupt", "rollback")


def on_active(raw: dict[str, Any], ref: Ref = None) -> str | None:
    """The message's ``on_active`` policy, when it names one."""
    value = raw.get("on_active")
    if value is None:
        return None
    if value not in ON_ACTIVE:
        raise ProtocolError(
            "bad_message", f"field 'on_active' must be one of {', '.join(ON_ACTIVE)}", ref
        )
    return str(value)


def optional_id(raw: dict[str, Any], name: str, ref: Ref = None) -> str | None:
    value = raw.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_THREAD_ID_CHARS:
        raise ProtocolError(
            "bad_message",
            f"field {name!r} must be a non-empty string of at most "
            f"{MAX_THREAD_ID_CHARS} characters",
            ref,
        )
    if not value.isprintable():
        raise ProtocolError("bad_message", f"field {name!r} has unprintable characters", ref)
    return value

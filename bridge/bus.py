"""The messages processes sharing a Redis broker send each other, as typed records.

Each process listens on a channel of its own (``{prefix}:bus:{node}``).  A
message is one JSON object whose ``kind`` tags it; :func:`decode` answers the
record, or None for anything that is not a message of this bus (a process of
another version, a stray publish), which the listener drops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson


@dataclass(frozen=True, slots=True)
class CommandRequest:
    """Apply a lifecycle ``action`` to a run the receiver executes; answer ``reply_to``."""

    kind: Literal["cmd"]
    id: str
    run_id: str
    action: str
    reply_to: str
    #: For ``respond``: the answer, with its ``request_id``.
    payload: dict[str, Any] | None = None
    #: The sender's W3C trace context (None: tracing is off there).
    traceparent: str | None = None


@dataclass(frozen=True, slots=True)
class CommandReply:
    """The answer to :class:`CommandRequest` ``id``: the run's status, or an error."""

    kind: Literal["reply"]
    id: str
    status: str | None = None
    error_code: str | None = None
    error_message: str | None = None


@dataclass(frozen=True, slots=True)
class WatcherCount:
    """The run the receiver executes has ``count`` watchers, over every process."""

    kind: Literal["watchers"]
    run_id: str
    count: int


@dataclass(frozen=True, slots=True)
class RunCreated:
    """A new run of ``thread_id`` exists (sent to every process, for thread followers)."""

    kind: Literal["run"]
    thread_id: str
    run_id: str


Message = CommandRequest | CommandReply | WatcherCount | RunCreated


def command(
    id: str,
    run_id: str,
    action: str,
    reply_to: str,
    payload: dict[str, Any] | None = None,
    traceparent: str | None = None,
) -> CommandRequest:
    return CommandRequest("cmd", id, run_id, action, reply_to, payload, traceparent)


def reply(id: str, status: str) -> CommandReply:
    return CommandReply("reply", id, status=status)


def failed(id: str, code: str, message: str) -> CommandReply:
    return CommandReply("reply", id, error_code=code, error_message=message)


def watchers(run_id: str, count: int) -> WatcherCount:
    return WatcherCount("watchers", run_id, count)


def run_created(thread_id: str, run_id: str) -> RunCreated:
    return RunCreated("run", thread_id, run_id)


def encode(message: Message) -> bytes:
    if isinstance(message, CommandRequest):
        body: dict[str, Any] = {
            "kind": message.kind,
            "id": message.id,
            "run_id": message.run_id,
            "action": message.action,
            "reply_to": message.reply_to,
        }
        if message.payload is not None:
            body["payload"] = message.payload
        if message.traceparent is not None:
            body["traceparent"] = message.traceparent
    elif isinstance(message, CommandReply):
        body = {"kind": message.kind, "id": message.id}
        if message.error_code is not None:
            body["error"] = {"code": message.error_code, "message": message.error_message or ""}
        else:
            body["status"] = message.status
    elif isinstance(message, RunCreated):
        body = {"kind": message.kind, "thread_id": message.thread_id, "run_id": message.run_id}
    else:
        body = {"kind": message.kind, "run_id": message.run_id, "count": message.count}
    return orjson.dumps(body)


def decode(raw: bytes | str) -> Message | None:
    """The message ``raw`` encodes, or None when it is not one of this bus."""
    try:
        body = orjson.loads(raw)
        if not isinstance(body, dict):
            return None
        kind = body.get("kind")
        if kind == "cmd":
            payload = body.get("payload")
            parent = body.get("traceparent")
            return command(
                str(body["id"]),
                str(body["run_id"]),
                str(body["action"]),
                str(body["reply_to"]),
                payload if isinstance(payload, dict) else None,
                parent if isinstance(parent, str) else None,
            )
        if kind == "reply":
            error = body.get("error")
            if isinstance(error, dict):
                return failed(str(body["id"]), str(error["code"]), str(error["message"]))
            return reply(str(body["id"]), str(body["status"]))
        if kind == "watchers":
            return watchers(str(body["run_id"]), int(body["count"]))
        if kind == "run":
            return run_created(str(body["thread_id"]), str(body["run_id"]))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    return None

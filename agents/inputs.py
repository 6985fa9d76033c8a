"""Input requests of a run: approvals of tool calls and questions to the user (6.4).

An :class:`InputDesk` holds the open requests of one run.  The agent's task makes a
request and waits for its :class:`Resolution`; an answer (``respond``), the request's
expiry or the run's end resolves it, exactly once.  Parsing an answer and making the
events' data is plain code with no I/O; the desk's timers are the loop's.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from agents.errors import BadResponse, InputConflict, InputNotFound

InputKind = Literal["tool_approval", "question"]
ResolvedBy = Literal["user", "timeout", "cancel"]

MAX_REASON_CHARS: Final = 2000
MAX_ANSWER_CHARS: Final = 20_000
#: Resolved request ids a desk remembers, to answer a second answer ``conflict``.
MAX_RESOLVED_KEPT: Final = 1024


@dataclass(frozen=True, slots=True)
class Resolution:
    """How a request was resolved: by its owner, its expiry or the run's end."""

    by: ResolvedBy
    approved: bool | None = None
    answer: str | None = None
    args: dict[str, Any] | None = None
    reason: str | None = None

    def data(self, request_id: str) -> dict[str, Any]:
        """``input_resolved``'s data."""
        data: dict[str, Any] = {"request_id": request_id, "by": self.by}
        if self.approved is not None:
            data["approved"] = self.approved
        if self.answer is not None:
            data["answer"] = self.answer
        if self.args is not None:
            data["args"] = self.args
        if self.reason is not None:
            data["reason"] = self.reason
        return data

    def denial(self, tool: str) -> str:
        """The error of a denied call's ``tool_completed``: the denial and its reason."""
        if self.by == "timeout":
            why = "no answer came in time"
        elif self.by == "cancel":
            why = "the run ended"
        else:
            why = self.reason or "no reason given"
        return f"denied: {tool} was not approved ({why})"


def parse_response(kind: InputKind, payload: Mapping[str, Any]) -> Resolution:
    """The owner's answer to a request of ``kind``.

    Raises:
        BadResponse: a field is missing or of the wrong type for the request.
    """
    reason = payload.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS):
        raise BadResponse(f"field 'reason' must be a string of at most {MAX_REASON_CHARS} chars")
    if kind == "tool_approval":
        approved = payload.get("approved")
        if not isinstance(approved, bool):
            raise BadResponse("field 'approved' (a boolean) answers a tool approval")
        args = payload.get("args")
        if args is not None and not isinstance(args, dict):
            raise BadResponse("field 'args' must be an object of the call's arguments")
        return Resolution("user", approved=approved, args=args if approved else None, reason=reason)
    answer = payload.get("answer")
    if not isinstance(answer, str) or len(answer) > MAX_ANSWER_CHARS:
        raise BadResponse(
            f"field 'answer' (a string of at most {MAX_ANSWER_CHARS} chars) answers a question"
        )
    return Resolution("user", answer=answer, reason=reason)


def expired(kind: InputKind) -> Resolution:
    """The resolution of a request nobody answered in time: denied, or an empty answer."""
    if kind == "tool_approval":
        return Resolution("timeout", approved=False)
    return Resolution("timeout", answer="")


@dataclass(slots=True)
class InputRequest:
    """One open request."""

    request_id: str
    kind: InputKind
    expires_at: float
    fields: dict[str, Any]
    future: asyncio.Future[Resolution]
    timer: asyncio.TimerHandle | None = None

    def data(self) -> dict[str, Any]:
        """``input_requested``'s data."""
        return {
            "request_id": self.request_id,
            "kind": self.kind,
            "expires_at": round(self.expires_at, 3),
            **self.fields,
        }


@dataclass(slots=True)
class InputDesk:
    """The open requests of one run, and the answers that resolve them."""

    timeout_s: float
    open: dict[str, InputRequest] = field(default_factory=dict)
    resolved: dict[str, None] = field(default_factory=dict)  # ordered: oldest first
    #: Counts for the metrics: requests made, answered by the user, timed out.
    made: int = 0
    answered: int = 0
    timed_out: int = 0
    #: Called when a request is answered or expires (before its run announces it).
    on_resolved: Callable[[], None] | None = None

    def make(self, kind: InputKind, fields: Mapping[str, Any]) -> InputRequest:
        """A new open request; it resolves itself ``by: timeout`` after the timeout."""
        loop = asyncio.get_running_loop()
        request = InputRequest(
            f"in_{secrets.token_urlsafe(9)}",
            kind,
            time.time() + self.timeout_s,
            dict(fields),
            loop.create_future(),
        )
        request.timer = loop.call_later(self.timeout_s, self._expire, request.request_id)
        self.open[request.request_id] = request
        self.made += 1
        return request

    def respond(self, request_id: str, payload: Mapping[str, Any]) -> InputRequest:
        """Resolve an open request with its owner's answer.

        Raises:
            InputNotFound: the run made no such request.
            InputConflict: the request is already resolved.
            BadResponse: the answer does not fit the request.
        """
        request = self.open.get(request_id)
        if request is None or request.future.done():
            if request is not None or request_id in self.resolved:
                raise InputConflict(f"input request {request_id} is already resolved")
            raise InputNotFound(f"no input request {request_id}")
        resolution = parse_response(request.kind, payload)
        self._resolve(request, resolution)
        self.answered += 1
        return request

    def close(self, request: InputRequest) -> None:
        """Forget a request whose resolution was announced (or that the run's end
        resolved)."""
        if request.timer is not None:
            request.timer.cancel()
            request.timer = None
        self.open.pop(request.request_id, None)
        self.resolved[request.request_id] = None
        while len(self.resolved) > MAX_RESOLVED_KEPT:
            del self.resolved[next(iter(self.resolved))]

    def pending(self) -> int:
        """Requests still waiting for an answer."""
        return sum(1 for r in self.open.values() if not r.future.done())

    def close_all(self) -> None:
        """The run ended: stop every request's timer."""
        for request in list(self.open.values()):
            self.close(request)

    def earliest_expiry(self) -> float | None:
        pending = [r.expires_at for r in self.open.values() if not r.future.done()]
        return min(pending) if pending else None

    def _expire(self, request_id: str) -> None:
        request = self.open.get(request_id)
        if request is None or request.future.done():
            return
        request.timer = None
        self.timed_out += 1
        self._resolve(request, expired(request.kind))

    def _resolve(self, request: InputRequest, resolution: Resolution) -> None:
        if request.timer is not None:
            request.timer.cancel()
            request.timer = None
        # Answered: a second answer is a conflict even before the run announces it.
        self.resolved[request.request_id] = None
        if not request.future.done():
            request.future.set_result(resolution)
        if self.on_resolved is not None:
            self.on_resolved()

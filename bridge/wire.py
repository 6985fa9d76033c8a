"""The wire's vocabulary, at the bottom floor: every package may import it.

Run statuses and lifecycle actions, WebSocket close codes, error codes with the
HTTP status each has, and the one base of every error that reaches a client.
Nothing else in the tree spells these as bare strings or ints.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import ClassVar, Final


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    #: Waiting for its owner's answer to an ``input_requested``.
    WAITING = "waiting"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


#: The statuses a run ends in.
TERMINAL: Final = frozenset({RunStatus.COMPLETED, RunStatus.CANCELLED, RunStatus.FAILED})
#: The statuses of a run that has not ended, in lifecycle order.
UNFINISHED: Final = (RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.PAUSED, RunStatus.WAITING)


def is_terminal(status: str) -> bool:
    """Whether ``status`` (a status as stored, a plain string) is one a run ends in."""
    return status in TERMINAL


class Action(StrEnum):
    STOP = "stop"
    START = "start"
    CANCEL = "cancel"


#: Answering a run's ``input_requested`` (not a lifecycle move: it changes no status itself).
RESPOND: Final = "respond"


class CloseCode(IntEnum):
    """The WebSocket close codes the server sends (RFC 6455 §7.4 and the 4xxx range)."""

    NORMAL = 1000
    TOO_BIG = 1009
    RESTART = 1012
    TRY_AGAIN_LATER = 1013
    UNAUTHORIZED = 4401
    FORBIDDEN = 4403
    SLOW_CONSUMER = 4408
    TOO_MANY = 4429


class ErrorCode(StrEnum):
    """The ``error.code`` values of the contract, each with its HTTP status."""

    BAD_JSON = "bad_json"
    BAD_MESSAGE = "bad_message"
    UNKNOWN_TYPE = "unknown_type"
    BAD_INPUT = "bad_input"
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    RESUME_UNAVAILABLE = "resume_unavailable"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    INTERNAL = "internal"

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS[self]


_HTTP_STATUS: Final[dict[ErrorCode, int]] = {
    ErrorCode.BAD_JSON: 400,
    ErrorCode.BAD_MESSAGE: 400,
    ErrorCode.UNKNOWN_TYPE: 400,
    ErrorCode.BAD_INPUT: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.CONFLICT: 409,
    ErrorCode.RESUME_UNAVAILABLE: 410,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.INTERNAL: 500,
}


class WireError(Exception):
    """The base of every package's error root: an error that knows its wire ``code``.

    ``code`` may name a code a client never sees (``agent_error``, ``llm_error``, …:
    they are reported in run events); mapping to the wire reports those as
    ``internal``.  ``http_status`` overrides the code's own status when set;
    ``public`` says whether the message of an ``internal`` error may be shown.
    """

    code: str = "internal"
    http_status: ClassVar[int | None] = None
    public: ClassVar[bool | None] = None

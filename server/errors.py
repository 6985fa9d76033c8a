"""Errors of the server layer, and how every error of the project maps to the wire.

The whole tree, under one root::

    GatewayError
    ├── ProtocolError   a client frame or request body is not what the contract says
    ├── AuthError       no token, or a token that does not verify
    ├── RateLimited     a per-user limit was reached
    └── ShuttingDown    the server takes no new work while it shuts down

Errors of ``bridge`` and ``agents`` carry their own ``code``; :func:`wire_error`
maps any of them to the code and HTTP status a client sees.
"""

from __future__ import annotations

from typing import Final


class GatewayError(Exception):
    code = "internal"


class ProtocolError(GatewayError):
    """A bad frame or body; ``code`` is ``bad_json``, ``bad_message`` or ``unknown_type``."""

    def __init__(self, code: str, message: str, ref: str | int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.ref = ref


class AuthError(GatewayError):
    code = "unauthorized"


class RateLimited(GatewayError):
    code = "rate_limited"


class ShuttingDown(GatewayError):
    # The contract has no code of its own for this; ``internal`` with a clear
    # message on the socket, 503 on HTTP.
    code = "internal"
    http_status = 503


HTTP_STATUS: Final[dict[str, int]] = {
    "bad_json": 400,
    "bad_message": 400,
    "unknown_type": 400,
    "bad_input": 400,
    "unauthorized": 401,
    "not_found": 404,
    "conflict": 409,
    "resume_unavailable": 410,
    "too_large": 413,
    "rate_limited": 429,
    "internal": 500,
}

#: Codes a client may see in an ``error`` event; anything else is reported as ``internal``.
CLIENT_CODES: Final = frozenset(
    {
        "bad_json",
        "bad_message",
        "unknown_type",
        "not_found",
        "conflict",
        "rate_limited",
        "resume_unavailable",
        "internal",
    }
)


def wire_error(exc: BaseException) -> tuple[str, str, int]:
    """The ``(code, message, http_status)`` a client sees for an error."""
    code = getattr(exc, "code", "internal")
    if not isinstance(code, str) or code not in HTTP_STATUS:
        code = "internal"
    status = getattr(exc, "http_status", HTTP_STATUS[code])
    if code == "internal" and not getattr(exc, "public", isinstance(exc, GatewayError)):
        return code, "internal error", status  # an unexpected error's text stays in the log
    return code, str(exc), status

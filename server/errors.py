"""Errors of the server layer, and how every error of the project maps to the wire.

The whole tree, under one root::

    GatewayError
    ├── ProtocolError   a client frame or request body is not what the contract says
    │   └── BodyTooLarge    a request body over the route's bound (413)
    ├── AuthError       no token, or a token that does not verify
    ├── RateLimited     a per-user limit was reached
    ├── DuplicateConflict  an idempotency key used again with other content (409)
    ├── ShuttingDown    the server takes no new work while it shuts down
    ├── StorageUnavailable  the database could not record what must be recorded first
    └── StoreError      the database failed or is unreachable (its text stays in the log)

Every package's root (``BridgeError``, ``AgentError``, this one)
derives from :class:`bridge.wire.WireError`; :func:`wire_error` maps any of them
to the code and HTTP status a client sees with one ``isinstance``.
"""

from __future__ import annotations

from typing import Final

from bridge.wire import ErrorCode, WireError


class GatewayError(WireError):
    code = "internal"


class ProtocolError(GatewayError):
    """A bad frame or body; ``code`` is ``bad_json``, ``bad_message`` or ``unknown_type``."""

    def __init__(self, code: str, message: str, ref: str | int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.ref = ref


class BodyTooLarge(ProtocolError):
    """A request body larger than the route accepts."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.TOO_LARGE, message)


class AuthError(GatewayError):
    code = "unauthorized"


class RateLimited(GatewayError):
    code = "rate_limited"


class DuplicateConflict(GatewayError):
    """An idempotency key used again within its window with different content."""

    code = "conflict"


class ShuttingDown(GatewayError):
    # The contract has no code of its own for this; ``internal`` with a clear
    # message on the socket, 503 on HTTP.
    code = "internal"
    http_status = 503


class StorageUnavailable(GatewayError):
    """The database could not record what a request needs recorded first."""

    code = "internal"
    http_status = 503


class StoreError(GatewayError):
    """The database failed or is unreachable; the store's own errors are mapped to this."""

    code = "internal"
    #: Its message may name the database's own error: it stays in the log.
    public = False


HTTP_STATUS: Final[dict[str, int]] = {code.value: code.http_status for code in ErrorCode}

#: Codes a client may see in an ``error`` event; anything else is reported as ``internal``.
CLIENT_CODES: Final = frozenset(
    {
        ErrorCode.BAD_JSON,
        ErrorCode.BAD_MESSAGE,
        ErrorCode.UNKNOWN_TYPE,
        ErrorCode.NOT_FOUND,
        ErrorCode.CONFLICT,
        ErrorCode.RATE_LIMITED,
        ErrorCode.RESUME_UNAVAILABLE,
        ErrorCode.INTERNAL,
    }
)


def wire_error(exc: BaseException) -> tuple[str, str, int]:
    """The ``(code, message, http_status)`` a client sees for an error."""
    if not isinstance(exc, WireError):
        return ErrorCode.INTERNAL.value, "internal error", 500  # the text stays in the log
    code = exc.code if exc.code in HTTP_STATUS else ErrorCode.INTERNAL.value
    status = exc.http_status or HTTP_STATUS[code]
    public = exc.public if exc.public is not None else isinstance(exc, GatewayError)
    if code == ErrorCode.INTERNAL and not public:
        return code, "internal error", status  # an unexpected error's text stays in the log
    return str(code), str(exc), status

"""Logging set-up shared by the command line and each ``--workers`` process."""

from __future__ import annotations

import logging

from server.auth import redact_query_tokens

#: uvicorn's loggers that write a request's path (and so may write a query token).
PATH_LOGGERS = ("uvicorn.access", "uvicorn.error")


class RedactTokens(logging.Filter):
    """Keep query tokens (``access_token=…``, however its name is percent-encoded) out
    of the access and error logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                redact_query_tokens(a) if isinstance(a, str) else a for a in record.args
            )
        if isinstance(record.msg, str):
            record.msg = redact_query_tokens(record.msg)
        return True


def configure_logging(level: str, fmt: str) -> None:
    """Log at ``level`` in ``fmt``, with query tokens redacted from uvicorn's logs."""
    logging.basicConfig(level=level.upper(), format=fmt)
    for name in PATH_LOGGERS:
        logging.getLogger(name).addFilter(RedactTokens())

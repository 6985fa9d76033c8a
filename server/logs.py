"""The process's logging: text (the default) or one JSON object per line.

``CHAT_LOG_FORMAT=json`` writes every record — the gateway's and uvicorn's access
and error logs alike — as ``{"time", "level", "logger", "message", "run_id",
"thread_id", "session_id", "trace_id"}`` (the ids from :mod:`bridge.logctx`, null
where there is none), and ``exc`` with a traceback.  Tokens never get in: query
tokens are redacted as in the text logs, and so is anything shaped like a JWT and
the configured secrets wherever they appear.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Final

import orjson

from bridge import logctx
from server.auth import redact_query_tokens
from server.settings import Settings

UVICORN_LOGGERS: Final = ("uvicorn", "uvicorn.error", "uvicorn.access")
REDACTED: Final = "[redacted]"
#: A JWT (three base64url parts, the first two JSON objects): ``bearer.<token>``,
#: a header or a query string, wherever a message quotes one.
_JWT: Final = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    text = _JWT.sub(REDACTED, redact_query_tokens(text))
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


class JsonFormatter(logging.Formatter):
    """One JSON object per record, with the context's ids, redacted."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        # Longest first: a secret that contains another is redacted whole.
        self.secrets = sorted({s for s in secrets if len(s) >= 8}, key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage(), self.secrets),
            **logctx.current(),
        }
        if record.exc_info:
            line["exc"] = redact(self.formatException(record.exc_info), self.secrets)
        return orjson.dumps(line).decode()


def secrets_of(settings: Settings) -> list[str]:
    """What must never be written: the settings' secrets."""
    values = [settings.jwt_secret, settings.metrics_token, settings.llm_api_key]
    # The values of the headers sent to AG-UI agents (``agent.Header-Name=value``).
    values += [spec.partition("=")[2] for spec in settings.agent_headers]
    return [v for v in values if v]


def use_json(settings: Settings) -> None:
    """Write every record as JSON.  Called again once uvicorn's config is made (which
    installs uvicorn's own handlers): uvicorn's loggers lose them and write through
    the root's JSON handler."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(secrets_of(settings)))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.propagate = True


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

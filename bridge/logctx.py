"""The ids a log line is about (run, thread, session, trace), in context variables.

They are set where a run's task, a session or a request starts, and copied into the
tasks started from there; :mod:`server.logs` writes them into each JSON log line.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Final

RUN_ID: Final[ContextVar[str | None]] = ContextVar("chat_run_id", default=None)
THREAD_ID: Final[ContextVar[str | None]] = ContextVar("chat_thread_id", default=None)
SESSION_ID: Final[ContextVar[str | None]] = ContextVar("chat_session_id", default=None)
#: Null until traces are recorded.
TRACE_ID: Final[ContextVar[str | None]] = ContextVar("chat_trace_id", default=None)


def bind_run(run_id: str, thread_id: str) -> None:
    """The current task (and those it starts) is about this run."""
    RUN_ID.set(run_id)
    THREAD_ID.set(thread_id)


def current() -> dict[str, str | None]:
    return {
        "run_id": RUN_ID.get(),
        "thread_id": THREAD_ID.get(),
        "session_id": SESSION_ID.get(),
        "trace_id": TRACE_ID.get(),
    }

"""Conversations that last: threads, messages and runs in SQLite or PostgreSQL.

:func:`open_store` picks the backend from ``CHAT_DB_URL``: ``sqlite:///var/chat.db``
(the default; a relative path is relative to the working directory),
``sqlite:///:memory:``, or ``postgresql://user:password@host:port/db``.
"""

from __future__ import annotations

from server.store.base import MessageRow, RunRow, Store, StoreError, ThreadRow
from server.store.sql import SqlStore, open_store

__all__ = [
    "MessageRow",
    "RunRow",
    "SqlStore",
    "Store",
    "StoreError",
    "ThreadRow",
    "open_store",
]

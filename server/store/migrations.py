"""Versioned schema migrations, one list of statements per version, for both dialects.

``{pk_serial}`` and ``{real}`` are filled per dialect.  A database records its
version in ``schema_version``; opening a store applies every newer migration, each
in a transaction of its own.  Never edit a released migration: add the next one.
"""

from __future__ import annotations

from typing import Final

DIALECT_TYPES: Final[dict[str, dict[str, str]]] = {
    "sqlite": {"pk_serial": "INTEGER PRIMARY KEY AUTOINCREMENT", "real": "REAL"},
    "postgresql": {"pk_serial": "BIGSERIAL PRIMARY KEY", "real": "DOUBLE PRECISION"},
}

MIGRATIONS: Final[list[list[str]]] = [
    # 1: threads, messages and runs.
    [
        """CREATE TABLE threads (
            id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            title TEXT NOT NULL,
            created_at {real} NOT NULL,
            updated_at {real} NOT NULL
        )""",
        """CREATE TABLE messages (
            pos {pk_serial},
            id TEXT NOT NULL UNIQUE,
            thread_id TEXT NOT NULL REFERENCES threads(id) ON DELETE CASCADE,
            role TEXT NOT NULL,
            content TEXT NOT NULL,
            run_id TEXT,
            fallback INTEGER NOT NULL DEFAULT 0,
            created_at {real} NOT NULL
        )""",
        """CREATE TABLE runs (
            id TEXT PRIMARY KEY,
            thread_id TEXT NOT NULL REFERENCES threads(id) ON DELETE CASCADE,
            owner TEXT NOT NULL,
            agent TEXT NOT NULL,
            status TEXT NOT NULL,
            error_code TEXT,
            created_at {real} NOT NULL,
            updated_at {real} NOT NULL,
            last_seq INTEGER NOT NULL DEFAULT 0
        )""",
    ],
    # 2: the indexes the routes read by; the process that ran each run.
    [
        "CREATE INDEX threads_by_owner ON threads (owner, updated_at DESC, id DESC)",
        "CREATE INDEX messages_by_thread ON messages (thread_id, pos)",
        "CREATE INDEX runs_unfinished ON runs (status)",
        "ALTER TABLE runs ADD COLUMN node TEXT",
    ],
    # 3: a deleted thread stays as a tombstone (its id taken) while its runs can still write.
    [
        "ALTER TABLE threads ADD COLUMN deleted_at {real}",
    ],
    # 4: the tokens a run used (JSON: input_tokens, output_tokens, total_tokens, model).
    [
        "ALTER TABLE runs ADD COLUMN usage TEXT",
    ],
]

LATEST: Final = len(MIGRATIONS)


def statements(version: int, dialect: str) -> list[str]:
    """The statements that take a database from ``version - 1`` to ``version``."""
    types = DIALECT_TYPES[dialect]
    return [sql.format(**types) for sql in MIGRATIONS[version - 1]]

"""Rows and the store interface."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

#: One SQL statement and its arguments.
Step = tuple[str, tuple[Any, ...]]


class StoreError(Exception):
    """The database failed or is unreachable; the store's own errors are mapped to this."""

    code = "internal"


@dataclass(frozen=True, slots=True)
class ThreadRow:
    id: str
    owner: str
    title: str
    created_at: float
    updated_at: float

    def public(self) -> dict[str, Any]:
        return {
            "thread_id": self.id,
            "title": self.title,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True, slots=True)
class MessageRow:
    id: str
    thread_id: str
    role: str  # "user" or "assistant"
    content: str
    run_id: str | None
    fallback: bool
    created_at: float
    pos: int = 0  # insertion order, set by the database

    def public(self) -> dict[str, Any]:
        return {
            "message_id": self.id,
            "thread_id": self.thread_id,
            "role": self.role,
            "content": self.content,
            "run_id": self.run_id,
            "fallback": self.fallback,
            "created_at": self.created_at,
        }


@dataclass(frozen=True, slots=True)
class RunRow:
    id: str
    thread_id: str
    owner: str
    agent: str
    status: str
    error_code: str | None
    created_at: float
    updated_at: float
    last_seq: int
    node: str | None = None  # the process that ran it


class Store(Protocol):
    """What the gateway keeps in its database."""

    name: str

    async def open(self) -> None:
        """Connect and bring the schema to the newest version."""
        ...

    async def close(self) -> None: ...

    async def schema_version(self) -> int: ...

    async def get_thread(self, thread_id: str) -> ThreadRow | None: ...

    async def create_thread(self, row: ThreadRow) -> None: ...

    async def list_threads(
        self, owner: str, limit: int, before: tuple[float, str] | None
    ) -> list[ThreadRow]:
        """The owner's threads, newest first, strictly after the cursor ``before``."""
        ...

    async def delete_thread(self, thread_id: str) -> None: ...

    async def add_message(self, row: MessageRow) -> None: ...

    async def list_messages(self, thread_id: str, limit: int, after_pos: int) -> list[MessageRow]:
        """Messages of the thread, oldest first, with ``pos > after_pos``."""
        ...

    async def recent_messages(self, thread_id: str, limit: int) -> list[MessageRow]:
        """The thread's last ``limit`` messages, oldest first."""
        ...

    async def upsert_run(self, row: RunRow) -> None: ...

    async def get_run(self, run_id: str) -> RunRow | None: ...

    async def unfinished_runs(self, thread_id: str) -> list[str]:
        """Ids of the thread's runs still ``queued``, ``running`` or ``paused``."""
        ...

    async def fail_unfinished_runs(self, error_code: str, now: float) -> int:
        """Mark every run still ``queued``, ``running`` or ``paused`` as failed."""
        ...

    # Writes as steps, so that many can go in one transaction -------------------------
    def thread_steps(self, row: ThreadRow) -> list[Step]: ...

    def message_steps(self, row: MessageRow) -> list[Step]:
        """Add the message and touch its thread."""
        ...

    def run_steps(self, row: RunRow) -> list[Step]: ...

    async def write(self, steps: list[Step]) -> None:
        """Run the steps, in order, in one transaction."""
        ...

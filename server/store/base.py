"""Rows and the store interface.

Ownership is enforced by the writes themselves: a message or run write changes
nothing unless the thread exists, is not deleted and belongs to the run's owner,
checked in the same transaction as the write.  A deleted thread is kept as a
tombstone (its id still taken, its messages gone) until every run it had has
ended, so that its id cannot pass to another user while one of them can write.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from bridge import wire
from server.errors import StoreError as StoreError

#: One SQL statement and its arguments.
Step = tuple[str, tuple[Any, ...]]

#: Run statuses of a run that has not ended (and may still write).
UNFINISHED: Final = tuple(status.value for status in wire.UNFINISHED)

#: The leading steps of a :meth:`Store.message_steps` or :meth:`Store.run_steps` write
#: that check the thread: when none of them changed a row, the store refused the write.
CHECKED_STEPS: Final = 2


def refused(counts: Sequence[int]) -> bool:
    """Whether a message or run write, given the rows each of its steps changed, was
    refused: its thread is missing, deleted, or not its run's owner's."""
    return not any(count > 0 for count in counts[:CHECKED_STEPS])


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
    #: The tokens it used (``input_tokens``, ``output_tokens``, ``total_tokens``, ``model``).
    usage: dict[str, Any] | None = None


class Store(Protocol):
    """What the gateway keeps in its database."""

    name: str

    async def open(self) -> None:
        """Connect and bring the schema to the newest version."""
        ...

    async def close(self) -> None: ...

    async def schema_version(self) -> int: ...

    async def get_thread(self, thread_id: str) -> ThreadRow | None:
        """The thread, or None when there is none or it was deleted."""
        ...

    async def list_threads(
        self, owner: str, limit: int, before: tuple[float, str] | None
    ) -> list[ThreadRow]:
        """The owner's threads, newest first, strictly after the cursor ``before``."""
        ...

    async def delete_thread(self, thread_id: str, owner: str, now: float) -> bool:
        """Delete the owner's thread, its messages and its finished runs, in one
        transaction; False when it is not the owner's or is already deleted.

        A thread that still has unfinished runs stays as a tombstone: no run or message
        can be written to it any more and its id cannot be claimed, until the last of
        those runs records its end.
        """
        ...

    async def list_messages(self, thread_id: str, limit: int, after_pos: int) -> list[MessageRow]:
        """Messages of the thread, oldest first, with ``pos > after_pos``."""
        ...

    async def recent_messages(self, thread_id: str, limit: int) -> list[MessageRow]:
        """The thread's last ``limit`` messages, oldest first."""
        ...

    async def get_run(self, run_id: str) -> RunRow | None: ...

    async def unfinished_runs(self, thread_id: str, owner: str) -> list[str]:
        """Ids of the owner's runs of the thread still ``queued``, ``running`` or ``paused``."""
        ...

    async def fail_unfinished_runs(self, error_code: str, now: float) -> int:
        """Mark every run still ``queued``, ``running`` or ``paused`` as failed."""
        ...

    async def purge_deleted_threads(self) -> int:
        """Remove the tombstones whose runs have all ended (and those runs); how many."""
        ...

    # Writes as steps, so that many can go in one transaction -------------------------
    def thread_steps(self, row: ThreadRow) -> list[Step]:
        """Create the thread; nothing when its id is taken (a deleted thread's included),
        but a title given to the same owner's thread that has none."""
        ...

    def message_steps(self, row: MessageRow, owner: str) -> list[Step]:
        """Add the message and touch its thread, only if the thread is ``owner``'s and not
        deleted; see :func:`refused`."""
        ...

    def forget_run_steps(self, run_id: str, thread_id: str, owner: str) -> list[Step]:
        """Remove the messages of a run (its user message and answer) from its thread,
        as if it had never been sent (a ``rollback``)."""

    def message_delete_steps(self, message_id: str, thread_id: str) -> list[Step]:
        """Remove one message of the thread (an answer being regenerated); the rows
        changed say whether it was still there."""
        ...

    def run_steps(self, row: RunRow, *, first: bool = False) -> list[Step]:
        """Update the run, or insert it if its thread is its owner's and not deleted;
        see :func:`refused`.  A run's end on a deleted thread removes the run, and the
        thread's tombstone with its last run.  A run's ``first`` record only inserts it
        (a row already there is left as it is)."""
        ...

    async def write(self, steps: list[Step]) -> list[int]:
        """Run the steps, in order, in one transaction; the rows each one changed."""
        ...

    def can_write_now(self) -> bool:
        """Whether :meth:`write_now` may write: no other write of the store in progress."""
        ...

    def write_now(self, steps: list[Step]) -> list[int] | None:
        """:meth:`write` at once, on the caller's thread, without waiting for anything
        (a lock, another call); None, with nothing written, when it cannot."""
        ...

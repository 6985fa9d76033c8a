"""Where a run's conversation is recorded: threads, messages, run statuses.

The supervisor records through :class:`Recorder`; the server gives it one backed
by its database.  :class:`MemoryRecorder` keeps threads in this process only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from agents.base import Message
from bridge.broker import RunRecord
from bridge.errors import RunNotFound


class Recorder(Protocol):
    async def open_thread(
        self, owner: str, thread_id: str, first_message: str, *, new: bool
    ) -> Sequence[Message]:
        """Make sure ``thread_id`` is the owner's (creating it when unknown) and return
        its earlier messages, oldest first.  ``new`` says the id was just made, not
        named by the client.

        Raises:
            RunNotFound: the thread belongs to another user.
        """
        ...

    async def user_message(self, run: RunRecord, message_id: str, content: str) -> bool:
        """Record the message that starts a run; False when it could not be stored."""
        ...

    async def answer(self, run: RunRecord, message_id: str, content: str, fallback: bool) -> bool:
        """Record the run's answer; False when it could not be stored."""
        ...

    async def run_changed(self, run: RunRecord) -> None:
        """Record the run's status, error code and last seq."""
        ...

    async def input_event(self, run: RunRecord, type: str, data: Mapping[str, Any]) -> None:
        """Record an ``input_requested`` or ``input_resolved`` of the run, as part of its
        thread's history (not given to agents as context)."""
        ...


class MemoryRecorder:
    """Threads and messages in this process's memory (tests, and no database)."""

    def __init__(self) -> None:
        self.owners: dict[str, str] = {}
        self.messages: dict[str, list[Message]] = {}
        self.runs: dict[str, RunRecord] = {}
        self.inputs: dict[str, list[tuple[str, dict[str, Any]]]] = {}

    async def open_thread(
        self, owner: str, thread_id: str, first_message: str, *, new: bool
    ) -> Sequence[Message]:
        if self.owners.setdefault(thread_id, owner) != owner:
            raise RunNotFound(f"no thread {thread_id}")
        return list(self.messages.get(thread_id, ()))

    async def user_message(self, run: RunRecord, message_id: str, content: str) -> bool:
        self.messages.setdefault(run.thread_id, []).append(Message("user", content))
        return True

    async def answer(self, run: RunRecord, message_id: str, content: str, fallback: bool) -> bool:
        self.messages.setdefault(run.thread_id, []).append(Message("assistant", content))
        return True

    async def run_changed(self, run: RunRecord) -> None:
        self.runs[run.run_id] = run

    async def input_event(self, run: RunRecord, type: str, data: Mapping[str, Any]) -> None:
        self.inputs.setdefault(run.thread_id, []).append((type, dict(data)))

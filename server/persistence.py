"""The gateway's recorder: the database behind the supervisor, never in the stream's way.

Every write has a timeout.  A write that fails or times out is logged and counted,
and the live stream goes on: the run's events still reach its clients, and
``response_complete`` says ``stored: false``.  Only a thread's ownership is checked
strictly: when it cannot be read, a run that names an existing thread is refused
(a run on a new thread goes on).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Sequence
from typing import TypeVar

from agents.base import Message
from bridge.broker import RunRecord
from bridge.errors import RunNotFound
from server.errors import GatewayError
from server.store import MessageRow, RunRow, Store, ThreadRow

log = logging.getLogger("chat.store")
T = TypeVar("T")

TITLE_CHARS = 80


class StorageUnavailable(GatewayError):
    code = "internal"
    http_status = 503


def title_of(message: str) -> str:
    line = " ".join(message.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1] + "…"


class Persistence:
    """A :class:`~agents.recorder.Recorder` over a :class:`~server.store.Store`."""

    def __init__(self, store: Store, *, timeout_s: float, history_messages: int, node: str) -> None:
        self.store = store
        self.timeout_s = timeout_s
        self.history_messages = history_messages
        self.node = node
        self.failures = 0

    async def _guard(self, what: str, call: Awaitable[T]) -> T | None:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await call
        except Exception as exc:
            self.failures += 1
            log.error("store: %s failed: %r", what, exc)
            return None

    async def open_thread(
        self, owner: str, thread_id: str, first_message: str, *, new: bool
    ) -> Sequence[Message]:
        try:
            async with asyncio.timeout(self.timeout_s):
                thread = await self.store.get_thread(thread_id)
                if thread is None:
                    now = time.time()
                    await self.store.create_thread(
                        ThreadRow(thread_id, owner, title_of(first_message), now, now)
                    )
                    return []
                if thread.owner != owner:
                    raise RunNotFound(f"no thread {thread_id}")
                rows = await self.store.recent_messages(thread_id, self.history_messages)
        except RunNotFound:
            raise
        except Exception as exc:
            self.failures += 1
            log.error("store: opening thread %s failed: %r", thread_id, exc)
            if new:
                return []  # nothing to check or load: the run goes on, unstored
            raise StorageUnavailable("the conversation store is unavailable") from None
        return [Message(row.role, row.content) for row in rows]

    async def user_message(self, run: RunRecord, message_id: str, content: str) -> bool:
        row = MessageRow(message_id, run.thread_id, "user", content, run.run_id, False, time.time())
        return await self._guard("storing a user message", self._add(row)) is not None

    async def answer(self, run: RunRecord, message_id: str, content: str, fallback: bool) -> bool:
        row = MessageRow(
            message_id, run.thread_id, "assistant", content, run.run_id, fallback, time.time()
        )
        return await self._guard("storing an answer", self._add(row)) is not None

    async def _add(self, row: MessageRow) -> bool:
        await self.store.add_message(row)
        await self.store.touch_thread(row.thread_id, row.created_at)
        return True

    async def run_changed(self, run: RunRecord) -> None:
        row = RunRow(
            run.run_id,
            run.thread_id,
            run.owner,
            run.agent,
            run.status,
            run.error_code,
            run.created_at,
            run.updated_at,
            run.last_seq,
            self.node,
        )
        await self._guard(f"recording run {run.run_id}", self.store.upsert_run(row))

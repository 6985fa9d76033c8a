"""The gateway's recorder: the database behind the supervisor, never in the stream's way.

Writes go, in order, through one writer task that commits whatever is queued in
one transaction, so that a run's first events never wait for the database: a new
thread, the user's message and each status change are queued and written behind
the stream.  The answer is the one write a run waits for, at its end, because
``response_complete`` names the stored message and says whether it was stored.
Every write has a timeout; one that fails or times out is logged and counted,
and the live stream goes on (``stored: false``).

Only a thread's ownership is checked strictly: when it cannot be read, a run that
names an existing thread is refused (a run on a new thread goes on).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from agents.base import Message
from bridge.broker import RunRecord
from bridge.errors import RunNotFound
from server.errors import GatewayError
from server.store import MessageRow, RunRow, Store, ThreadRow
from server.store.base import Step

log = logging.getLogger("chat.store")

TITLE_CHARS: Final = 80
#: Writes that may wait for the database; past it a write is counted as failed.
MAX_QUEUED_WRITES: Final = 10_000
#: Writes committed together in one transaction at most.
MAX_BATCH: Final = 256


@dataclass(frozen=True, slots=True)
class _Write:
    what: str
    steps: list[Step]
    done: asyncio.Future[bool] | None


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
        self._queue: asyncio.Queue[_Write] | None = None
        self._writer: asyncio.Task[None] | None = None

    # The writer -------------------------------------------------------------------

    def start(self) -> None:
        self._queue = asyncio.Queue(MAX_QUEUED_WRITES)
        self._writer = asyncio.get_running_loop().create_task(self._write_loop(), name="store")

    async def flush(self) -> None:
        """Wait until every write queued so far is done."""
        if self._queue is not None:
            await self._queue.join()

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (for up to ``timeout_s``), then stop the writer."""
        if self._queue is not None and self._writer is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._queue.join()
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        self._writer = None

    def _submit(
        self, what: str, steps: list[Step], *, wait: bool = False
    ) -> asyncio.Future[bool] | None:
        done: asyncio.Future[bool] | None = None
        if wait:
            done = asyncio.get_running_loop().create_future()
        if self._queue is None:
            self.start()
        assert self._queue is not None
        try:
            self._queue.put_nowait(_Write(what, steps, done))
        except asyncio.QueueFull:
            self._failed(what, "too many writes waiting for the database")
            if done is not None:
                done.set_result(False)
        return done

    async def _write_loop(self) -> None:
        """Commit what is queued, in order, many writes to a transaction."""
        queue = self._queue
        assert queue is not None
        while True:
            batch = [await queue.get()]
            while len(batch) < MAX_BATCH and not queue.empty():
                batch.append(queue.get_nowait())
            try:
                if await self._write(batch):
                    results = [True] * len(batch)
                else:  # one bad write must not fail the others: each again, alone
                    results = [await self._write([w]) for w in batch]
                for write, ok in zip(batch, results, strict=True):
                    if write.done is not None and not write.done.done():
                        write.done.set_result(ok)
            except Exception as exc:
                # The writer outlives anything a batch does (a MemoryError included):
                # if it stopped, every answer after it would wait for good.
                self._failed(f"writing {len(batch)} queued writes", repr(exc))
                for write in batch:
                    if write.done is not None and not write.done.done():
                        write.done.set_result(False)
            finally:
                for _ in batch:
                    queue.task_done()

    async def _write(self, batch: list[_Write]) -> bool:
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.store.write([step for w in batch for step in w.steps])
        except Exception as exc:
            if len(batch) == 1:  # a batch's failure is counted write by write
                self._failed(batch[0].what, repr(exc))
            return False
        return True

    def _failed(self, what: str, why: str) -> None:
        self.failures += 1
        log.error("store: %s failed: %s", what, why)

    # Recorder ---------------------------------------------------------------------

    async def open_thread(
        self, owner: str, thread_id: str, first_message: str, *, new: bool
    ) -> Sequence[Message]:
        now = time.time()
        row = ThreadRow(thread_id, owner, title_of(first_message), now, now)
        if new:  # an id just made: nothing to check or load
            self._submit(f"creating thread {thread_id}", self.store.thread_steps(row))
            return []
        try:
            async with asyncio.timeout(self.timeout_s):
                thread = await self.store.get_thread(thread_id)
                if thread is None:
                    # A client-chosen id seen for the first time: claimed now, not behind
                    # the stream, so that whoever names it first owns it.
                    await self.store.write(self.store.thread_steps(row))
                    thread = await self.store.get_thread(thread_id)
                if thread is None or thread.owner != owner:
                    raise RunNotFound(f"no thread {thread_id}")
                rows = await self.store.recent_messages(thread_id, self.history_messages)
        except RunNotFound:
            raise
        except Exception as exc:
            self._failed(f"opening thread {thread_id}", repr(exc))
            raise StorageUnavailable("the conversation store is unavailable") from None
        return [Message(r.role, r.content) for r in rows]

    async def user_message(self, run: RunRecord, message_id: str, content: str) -> bool:
        row = MessageRow(message_id, run.thread_id, "user", content, run.run_id, False, time.time())
        self._submit(f"storing user message {message_id}", self.store.message_steps(row))
        return True

    async def answer(self, run: RunRecord, message_id: str, content: str, fallback: bool) -> bool:
        row = MessageRow(
            message_id, run.thread_id, "assistant", content, run.run_id, fallback, time.time()
        )
        done = self._submit(
            f"storing answer {message_id}", self.store.message_steps(row), wait=True
        )
        assert done is not None
        if self._writer is not None and self._writer.done() and not done.done():
            self._failed(f"storing answer {message_id}", "the writer has stopped")
            return False
        return await done

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
        self._submit(f"recording run {run.run_id}", self.store.run_steps(row))

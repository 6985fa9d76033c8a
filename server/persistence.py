"""The gateway's recorder: the database behind the supervisor, never in the stream's way.

Writes go, in order, through one writer task that commits whatever is queued in
one transaction: a new thread, the user's message and each status change are
queued and written behind the stream.  A run waits for two writes: its first
record (with its thread and its message, in the same transaction), before its
first event is published, so that a run a client has seen is in the database
even if the process dies the next moment; and its answer, at its end, because
``response_complete`` names the stored message and says whether it was stored.
Every write has a timeout; one that fails or times out is logged and counted,
and the live stream goes on (``stored: false``).

A small batch (at most 8 writes and 64 KiB of message text) is committed at once,
on the event loop's thread, when the store can do it without waiting (SQLite with
no write in flight on its thread and the write lock free; see
:meth:`~server.store.sql.SqliteDriver.script_now`): a run's first record with the
writes queued before it, in the call that records it, and the writer's own small
batches.  The order is the same (nothing is in flight behind the store's thread
then, and what is queued goes first); what is saved is the hop to the store's
thread and back, which is most of a first record's time.  Otherwise writes go to
the store's thread as above.

Only a thread's ownership is checked strictly: when it cannot be read, a run that
names an existing thread is refused (a run on a new thread goes on).  The store
checks it again in every message and run write: a write the store refuses (the
thread was deleted meanwhile, or its id passed to someone else) is never made,
and the run it belongs to is reported to :attr:`Persistence.on_refused`, which
cancels it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final

import orjson

from agents.base import Message
from agents.lifecycle import RunStatus
from bridge import tracing
from bridge.broker import RunRecord
from bridge.errors import RunNotFound
from server.errors import StorageUnavailable
from server.store import MessageRow, RunRow, Store, ThreadRow
from server.store.base import Step, refused

log = logging.getLogger("chat.store")

TITLE_CHARS: Final = 80
#: Writes that may wait for the database; past it a write is counted as failed.
MAX_QUEUED_WRITES: Final = 10_000
#: Writes committed together in one transaction at most.
MAX_BATCH: Final = 256
#: Writes committed together at most on the event loop's thread (a transaction of a few
#: tens of microseconds); a larger batch goes to the store's thread.
MAX_BATCH_NOW: Final = 8
#: Characters of messages a batch committed on the event loop's thread carries at most:
#: a long answer is copied into the database on the store's thread.
MAX_CHARS_NOW: Final = 64 * 1024


class Outcome(Enum):
    STORED = "stored"
    #: The store refused it: the run's thread is deleted or not its owner's.
    REFUSED = "refused"
    #: The database failed or timed out.
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class _Write:
    what: str
    steps: list[Step]
    done: asyncio.Future[Outcome] | None
    #: The run a message or run write belongs to; the store may refuse such a write.
    run: RunRecord | None = None
    #: The characters of the message it stores, if any.
    chars: int = 0


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
        #: Told of a run one of whose writes the store refused (the gateway cancels it).
        self.on_refused: Callable[[RunRecord], None] | None = None
        #: Told how long each committed transaction of the writer took, in seconds.
        self.observe_write: Callable[[float], None] | None = None
        self._queue: asyncio.Queue[_Write] | None = None
        self._writer: asyncio.Task[None] | None = None
        #: Whether the writer holds a batch it has not settled yet.
        self._writing = False

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
        self,
        what: str,
        steps: list[Step],
        *,
        wait: bool = False,
        run: RunRecord | None = None,
        chars: int = 0,
    ) -> asyncio.Future[Outcome] | None:
        done: asyncio.Future[Outcome] | None = None
        if wait:
            done = asyncio.get_running_loop().create_future()
        if self._queue is None:
            self.start()
        assert self._queue is not None
        try:
            self._queue.put_nowait(_Write(what, steps, done, run, chars))
        except asyncio.QueueFull:
            self._failed(what, "too many writes waiting for the database")
            if done is not None:
                done.set_result(Outcome.FAILED)
        return done

    async def _write_loop(self) -> None:
        """Commit what is queued, in order, many writes to a transaction."""
        queue = self._queue
        assert queue is not None
        while True:
            batch = [await queue.get()]
            while len(batch) < MAX_BATCH and not queue.empty():
                batch.append(queue.get_nowait())
            self._writing = True
            try:
                results = self._write_now(batch) if len(batch) <= MAX_BATCH_NOW else None
                if results is None:
                    results = await self._write(batch)
                if results is None:  # one bad write must not fail the others: each again, alone
                    results = []
                    for write in batch:
                        alone = await self._write([write])
                        results.append(alone[0] if alone else Outcome.FAILED)
                self._settle(batch, results)
            except Exception as exc:
                # The writer outlives anything a batch does (a MemoryError included):
                # if it stopped, every answer after it would wait for good.
                self._failed(f"writing {len(batch)} queued writes", repr(exc))
                for write in batch:
                    if write.done is not None and not write.done.done():
                        write.done.set_result(Outcome.FAILED)
            finally:
                self._writing = False
                for _ in batch:
                    queue.task_done()

    def _settle(self, batch: list[_Write], results: list[Outcome]) -> None:
        for write, outcome in zip(batch, results, strict=True):
            if outcome is Outcome.REFUSED:
                self._refused(write)
            if write.done is not None and not write.done.done():
                write.done.set_result(outcome)

    def _write_now(self, batch: list[_Write]) -> list[Outcome] | None:
        """Commit the batch in one transaction at once, on this thread, when the store
        can without waiting; None when it cannot (nothing was written)."""
        if sum(w.chars for w in batch) > MAX_CHARS_NOW or not self.store.can_write_now():
            return None
        began = time.perf_counter()
        try:
            with _store_span(self.store, batch) as traced:
                counts = self.store.write_now([step for w in batch for step in w.steps])
                traced.set("chat.store.steps", len(counts or ()))
        except Exception as exc:  # the store's thread tries it again, and says what failed
            log.debug("store: a write on the event loop's thread failed: %r", exc)
            return None
        if counts is None:
            return None
        if self.observe_write is not None:
            self.observe_write(time.perf_counter() - began)
        return _outcomes(batch, counts)

    def _first_record_now(self, write: _Write) -> bool:
        """Commit a run's first record at once, behind every write queued before it, if
        the writer is idle and the store can without waiting (see :meth:`_write_now`).
        False, with everything as it was, when it cannot."""
        queue = self._queue
        if queue is None or self._writing or queue.qsize() >= MAX_BATCH_NOW:
            return False
        if not self.store.can_write_now():
            return False
        # What is queued was written before this record: it goes first, in the same
        # transaction, and the writer finds the queue empty.
        earlier = [queue.get_nowait() for _ in range(queue.qsize())]
        results = self._write_now([*earlier, write])
        if results is None:
            for queued in earlier:  # back, in order, ahead of this record
                queue.put_nowait(queued)
            for _ in earlier:
                queue.task_done()
            return False
        try:
            self._settle([*earlier, write], results)
        except Exception as exc:  # as in the writer: the record is written, the run goes on
            self._failed(f"settling {len(earlier) + 1} writes", repr(exc))
            for queued in earlier:
                if queued.done is not None and not queued.done.done():
                    queued.done.set_result(Outcome.FAILED)
        finally:
            for _ in earlier:
                queue.task_done()
        return True

    async def _write(self, batch: list[_Write]) -> list[Outcome] | None:
        """Commit the batch in one transaction: each write's outcome, or None if it failed."""
        began = time.perf_counter()
        span = _store_span(self.store, batch)
        try:
            with span as traced:
                async with asyncio.timeout(self.timeout_s):
                    counts = await self.store.write([step for w in batch for step in w.steps])
                traced.set("chat.store.steps", len(counts))
        except Exception as exc:
            if len(batch) == 1:  # a batch's failure is counted write by write
                self._failed(batch[0].what, repr(exc))
            return None
        if self.observe_write is not None:
            self.observe_write(time.perf_counter() - began)
        return _outcomes(batch, counts)

    def _refused(self, write: _Write) -> None:
        run = write.run
        assert run is not None
        log.warning(
            "store: %s refused: thread %s is deleted or not %s's",
            write.what,
            run.thread_id,
            run.owner,
        )
        if self.on_refused is not None:
            self.on_refused(run)

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
        # Input requests and their answers are the thread's history, not the agent's.
        return [Message(r.role, r.content) for r in rows if r.role in ("user", "assistant")]

    async def user_message(self, run: RunRecord, message_id: str, content: str) -> bool:
        row = MessageRow(message_id, run.thread_id, "user", content, run.run_id, False, time.time())
        steps = self.store.message_steps(row, run.owner)
        self._submit(f"storing user message {message_id}", steps, run=run, chars=len(content))
        return True

    async def answer(self, run: RunRecord, message_id: str, content: str, fallback: bool) -> bool:
        row = MessageRow(
            message_id, run.thread_id, "assistant", content, run.run_id, fallback, time.time()
        )
        steps = self.store.message_steps(row, run.owner)
        done = self._submit(
            f"storing answer {message_id}", steps, wait=True, run=run, chars=len(content)
        )
        assert done is not None
        if self._writer is not None and self._writer.done() and not done.done():
            self._failed(f"storing answer {message_id}", "the writer has stopped")
            return False
        return await done is Outcome.STORED

    async def forget_run(self, run: RunRecord) -> None:
        """Remove the run's messages from its thread, behind every write queued before."""
        steps = self.store.forget_run_steps(run.run_id, run.thread_id, run.owner)
        done = self._submit(f"removing the messages of run {run.run_id}", steps, wait=True)
        if done is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.timeout_s):
                    await asyncio.shield(done)

    async def input_event(self, run: RunRecord, type: str, data: Mapping[str, Any]) -> None:
        """Store an ``input_requested`` or ``input_resolved`` as a message row of its
        thread: ``role`` the event's type, ``content`` its data as JSON."""
        message_id = f"m_{data.get('request_id', '')}_{type.removeprefix('input_')}"
        content = orjson.dumps(dict(data)).decode()
        row = MessageRow(message_id, run.thread_id, type, content, run.run_id, False, time.time())
        steps = self.store.message_steps(row, run.owner)
        self._submit(f"storing {type} {message_id}", steps, run=run, chars=len(content))

    async def run_changed(self, run: RunRecord) -> None:
        """Record the run's status.

        Its first record (``queued``) is awaited, and with it everything queued before
        it (the thread of a new run, the user's message): the supervisor publishes the
        run's first event only after this returns, so a run that a client has seen is
        in the database, and a restart can fail it (``server_restart``) rather than
        forget it.  The wait is bounded by the store timeout, so a slow database delays
        a run's start by at most that, and never fails it.
        """
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
            _usage_of(run),
        )
        first = run.status == RunStatus.QUEUED
        what, steps = f"recording run {run.run_id}", self.store.run_steps(row, first=first)
        if first and self._first_record_now(_Write(what, steps, None, run)):
            return
        done = self._submit(what, steps, wait=first, run=run)
        if done is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.timeout_s):
                    await asyncio.shield(done)

    async def run_lost(self, run: RunRecord) -> None:
        """Record the ending of a run that the broker ended itself (its process was lost).

        The process that ran it may have died, or stopped, before its own writes of the
        run's thread reached the database: the thread is made here too (its owner's, as
        the run's record says; nothing when it exists), so that the ending is stored.  The
        title comes with the run's process's own write of the thread, if ever it lands.
        """
        now = time.time()
        thread = ThreadRow(run.thread_id, run.owner, "", run.created_at or now, now)
        self._submit(
            f"making thread {run.thread_id} of a lost run", self.store.thread_steps(thread)
        )
        await self.run_changed(run)


def _outcomes(batch: list[_Write], counts: Sequence[int]) -> list[Outcome]:
    """Each write's outcome, from the rows each step of the batch changed."""
    outcomes: list[Outcome] = []
    at = 0
    for write in batch:
        mine = counts[at : at + len(write.steps)]
        at += len(write.steps)
        checked = write.run is not None
        outcomes.append(Outcome.REFUSED if checked and refused(mine) else Outcome.STORED)
    return outcomes


def _store_span(store: Store, batch: list[_Write]) -> AbstractContextManager[tracing.Hook]:
    """The transaction's span (a no-op with tracing off), linked to its runs' spans."""
    if not tracing.enabled():
        return tracing.store_write("", [], [])
    driver = getattr(store, "driver", None)
    system = str(getattr(driver, "dialect", type(store).__name__))
    whats = [w.what.rsplit(" ", 1)[0] for w in batch]
    carried = [str(w.run.extra.get("traceparent") or "") for w in batch if w.run is not None]
    return tracing.store_write(system, whats, [c for c in carried if c])


def _usage_of(run: RunRecord) -> dict[str, Any] | None:
    usage = run.extra.get("usage")
    return dict(usage) if isinstance(usage, dict) else None

"""Appending a run's events to its stream, by the one process that executes the run.

Events are numbered by the run, appended in order (up to :data:`FLUSH_BATCH`
events a write, the writes of many runs in one fenced script call:
:meth:`~bridge.redis_core.RedisCore.fenced_write`) with what an ending written
elsewhere needs (open tool calls, the answer so far) and the record's fields that
changed (the others are written once, at the run's start), and the stream trimmed by
the same policy as the in-memory log (:func:`bridge.log.trim`).  A short outage
is ridden out; a long one ends the run (:meth:`RedisAppender.give_up`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any, Final

from redis.exceptions import RedisError

from bridge import redis_scripts as lua
from bridge.broker import RunRecord
from bridge.errors import BrokerUnavailable, RunNotFound
from bridge.events import Event
from bridge.log import kept_size, trim
from bridge.redis_core import MISSING, WRITTEN, Answer, Owned, RedisCore, seq_id
from bridge.redis_lease import ending
from bridge.redis_registry import record_fields
from bridge.runstate import INPUT_KEY_PREFIX, RunState
from bridge.wire import RunStatus

log = logging.getLogger("chat.redis")

#: Events appended in one pipeline at most.
FLUSH_BATCH: Final = 512
OUTAGE_APOLOGY: Final = "Sorry, this answer could not be kept going. Please try again."
#: The ``error.code`` of a run ended because its events could not reach Redis.
OUTAGE_CODE: Final = "broker_unavailable"
#: How long an ending that could not be appended is tried again.
ENDING_RETRY_S: Final = 600.0


class RedisAppender:
    """The appends of every run this process executes, sent by the core's one writer.

    :meth:`publish` queues the event on its run and lists the run for the writer
    (no task or future per event); each turn the writer takes every listed run's
    pending events (:meth:`collect`, up to :data:`FLUSH_BATCH` a run), sends them
    in as few script calls as the caps allow, and each run's answer is handled
    here (:meth:`_answered`).  A run has at most one write on its way: its events
    published meanwhile wait for the turn after its answer, so they land in order.
    """

    def __init__(self, core: RedisCore) -> None:
        self.core = core
        #: Runs with events for the writer's next turn, in the order they were listed.
        self._queued: list[Owned] = []
        core.collect = self.collect
        core.collectable = self.collectable

    async def publish(self, event: Event) -> None:
        owned = self.append(event)
        if owned is not None:
            await self.drain(owned)

    def append(self, event: Event) -> Owned | None:
        """Queue ``event`` on its run for the writer; the run if its events are to be
        drained before the publisher goes on (:meth:`publish` without a coroutine)."""
        run_id = event.run_id
        owned = self.core.owned.get(run_id or "")
        if owned is None:
            raise RunNotFound(f"run {run_id} is not executed by this process")
        if owned.failure is not None:
            raise BrokerUnavailable("Redis is unreachable: the run's events cannot be kept") from (
                owned.failure
            )
        owned.pending.append(event)
        if not (owned.queued or owned.sending):
            owned.queued = True
            self._queued.append(owned)
            self.core.wake_writer()
        if len(owned.pending) >= FLUSH_BATCH * 8 or event.type == "agent_completed":
            # Back-pressure on a fast agent, and the run's end is durable before it returns.
            return owned
        return None

    async def drain(self, owned: Owned) -> None:
        """Wait until every event the run published is appended (or the run is lost)."""
        while owned.queued or owned.sending:
            if owned.drained is None:
                owned.drained = asyncio.get_running_loop().create_future()
            await asyncio.shield(owned.drained)
        if owned.failure is not None:
            raise BrokerUnavailable("Redis is unreachable: the run's events cannot be kept") from (
                owned.failure
            )

    def _settled(self, owned: Owned) -> None:
        """Nothing of the run is pending or on its way any more: its drains return."""
        drained, owned.drained = owned.drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def _fail(self, owned: Owned, exc: BaseException) -> None:
        """The run's events cannot be kept (not a Redis error: the broker closed, or
        its write could not be made): nothing more of it is written, its drains
        return and its next publish raises."""
        owned.sending = False
        owned.batch = None
        owned.pending.clear()
        if owned.failure is None:
            owned.failure = exc
        self._settled(owned)

    def _queue(self, owned: Owned) -> None:
        """List the run for the writer's next turn if it has events to write, or
        tell its drains that it has none."""
        if (owned.pending or owned.batch) and owned.failure is None:
            owned.queued = True
            self._queued.append(owned)
            self.core.wake_writer()
        else:
            owned.batch = None
            self._settled(owned)

    def collectable(self) -> bool:
        """Whether a run is listed for the writer's next turn."""
        return bool(self._queued)

    def collect(self) -> list[tuple[list[Any], Answer]]:
        """The writes of every listed run, for the writer's turn: each run's oldest
        pending events (up to :data:`FLUSH_BATCH`), or the write to send again."""
        queued, self._queued = self._queued, []
        writes: list[tuple[list[Any], Answer]] = []
        now = 0.0
        for owned in queued:
            owned.queued = False
            if owned.failure is not None:
                # Lost meanwhile (reaped, or given up): nothing more is written.
                owned.batch = None
                self._settled(owned)
                continue
            batch = owned.batch
            if batch is None:
                batch = owned.pending[:FLUSH_BATCH]
                del owned.pending[:FLUSH_BATCH]
                if not batch:
                    self._settled(owned)
                    continue
                owned.batch = batch
                now = now or time.monotonic()
                owned.since = now
            try:
                commands, applied = self._append_commands(owned, batch, recreate=owned.recreate)
            except Exception as exc:  # this run's alone: the other runs' writes go on
                log.exception("run %s: its write could not be made", owned.record.run_id)
                self._fail(owned, exc)
                continue
            run_key = owned.keys[1] if owned.keys else self.core.k("run", owned.record.run_id)
            write: list[Any] = [run_key, int(not owned.recreate), *commands]
            owned.sending = True
            writes.append((write, partial(self._answered, owned, applied)))
        return writes

    def _answered(
        self, owned: Owned, applied: Callable[[], None], answer: int | BaseException
    ) -> None:
        """What Redis answered to the run's write: see :meth:`_ride_out` for the
        outage and fencing rules, which this follows.  If handling it raises, the
        run is failed rather than left neither listed nor on its way (its drain
        would wait for good)."""
        try:
            self._answer(owned, applied, answer)
        except Exception as exc:
            log.exception("run %s: handling its write's answer failed", owned.record.run_id)
            self._fail(owned, exc)

    def _answer(
        self, owned: Owned, applied: Callable[[], None], answer: int | BaseException
    ) -> None:
        c = self.core
        if isinstance(answer, RedisError | OSError):
            c.spawn(self._ride_out(owned, applied, answer))
            return
        owned.sending = False
        if isinstance(answer, asyncio.CancelledError):
            # The broker is closing.
            drained, owned.drained = owned.drained, None
            if drained is not None:
                drained.cancel()
            return
        if isinstance(answer, BaseException):
            # Not Redis's answer (the broker is closed): the run's events cannot be kept.
            log.error("run %s: appending to Redis failed: %r", owned.record.run_id, answer)
            self._fail(owned, answer)
            return
        if answer == MISSING and not owned.recreate:
            # Redis lost the record (restarted empty): written again, whole.
            owned.sending = False
            owned.recreate = True
            self._queue(owned)
            return
        c.reachable = True
        owned.sending = False
        self._done(owned, applied, appended=answer == WRITTEN)

    def _done(self, owned: Owned, applied: Callable[[], None], *, appended: bool) -> None:
        """The run's write landed (or the fence refused it): note it, tell the run's
        local watchers, and list the run again if it published more meanwhile."""
        c = self.core
        run_id = owned.record.run_id
        batch, owned.batch = owned.batch or [], None
        owned.recreate = False
        if not appended:
            log.error("run %s: this process was reaped; its events are refused", run_id)
            c.lease.lose(owned)
            c.lease.fenced_out()
            self._settled(owned)
            return
        applied()
        if batch:
            last = batch[-1]
            owned.flushed_seq = last.seq or 0
            c.watches.mirror_append(run_id, batch)
            if last.type == "agent_completed":
                c.owned.pop(run_id, None)
                c.forget_mirror(run_id)
        self._queue(owned)

    async def _ride_out(
        self, owned: Owned, applied: Callable[[], None], exc: BaseException
    ) -> None:
        """:meth:`_riding_out`, and whatever else ends it (the broker closing, a
        failure that is not Redis's) answers the run's drains."""
        try:
            await self._riding_out(owned, applied, exc)
        except asyncio.CancelledError:
            owned.sending = False
            drained, owned.drained = owned.drained, None
            if drained is not None:
                drained.cancel()
            raise
        except Exception as error:
            log.exception("run %s: riding out a Redis outage failed", owned.record.run_id)
            self._fail(owned, error)

    async def _riding_out(
        self, owned: Owned, applied: Callable[[], None], exc: BaseException
    ) -> None:
        """Append the run's write that failed on a Redis error; ride out a short outage.

        While Redis is unreachable the run's events wait (the agent waits too, once
        too many are pending) and its write is tried again with a growing pause;
        after ``outage_s`` from its first try the run is ended ``failed`` /
        ``broker_unavailable`` by :meth:`give_up`.  A write refused by the fence
        (this process was reaped) stops the run: its ending is the reaper's.
        """
        c = self.core
        run_id = owned.record.run_id
        batch = owned.batch or []
        recreate = owned.recreate
        pause, gave_up_at = 0.05, owned.since + c.outage_s
        while True:
            c.reachable = False
            if time.monotonic() > gave_up_at:
                log.error("run %s: appending to Redis failed: %r", run_id, exc)
                owned.sending = False
                owned.batch = None
                self.give_up(owned, exc)
                self._settled(owned)
                return
            log.warning("run %s: Redis unreachable (%r); trying again", run_id, exc)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)
            # The write may have landed (whole: it is one script) before the
            # connection broke; it is not appended twice.
            if batch and await self._landed(run_id, batch[-1]):
                appended = True
                break
            try:
                while True:
                    commands, _ = self._append_commands(owned, batch, recreate=recreate)
                    answer = await c.fenced_write(run_id, commands, if_recorded=not recreate)
                    if answer != MISSING:
                        break
                    # Redis lost the record (restarted empty): written again, whole.
                    recreate = True
                appended = answer == WRITTEN
                break
            except (RedisError, OSError) as error:
                exc = error
        c.reachable = True
        owned.sending = False
        self._done(owned, applied, appended=appended)

    async def _landed(self, run_id: str, last: Event) -> bool:
        """Whether the stream holds ``last`` itself (its batch landed whole, its reply
        lost).  A stream that merely reaches its seq is not enough: a reaper that
        ended the run meanwhile put its own ending at the seqs this batch numbered."""
        c = self.core
        entry_id = seq_id(last.seq or 0)
        try:
            entries = await c.r.xrange(c.k("log", run_id), entry_id, entry_id, count=1)
        except (RedisError, OSError):
            return False
        return bool(entries) and entries[0][1].get(b"e") == last.text.encode()

    def _append_commands(
        self, owned: Owned, batch: list[Event], *, recreate: bool
    ) -> tuple[list[lua.Command], Callable[[], None]]:
        """The fenced write that appends ``batch`` and updates what changed in the
        run's record (with ``recreate``, the whole record and the sets that list the
        run, which a Redis restarted empty lost), and what to note once it is done."""
        c = self.core
        record = owned.record
        run_id = record.run_id
        keys = owned.keys
        if keys is None:
            keys = owned.keys = (
                c.k("log", run_id),
                c.k("run", run_id),
                c.k("answer", run_id),
                c.k("calls", run_id),
            )
        log_key, run_key, answer_key, calls_key = keys
        commands: list[lua.Command] = []
        added: list[tuple[int, int]] = []
        added_bytes = 0
        text: list[str] = []
        opened: dict[str, str] = {}
        closed: list[str] = []
        responded = False
        for event in batch:
            seq = event.seq or 0
            size = kept_size(event)
            added.append((seq, size))
            added_bytes += size
            commands.append(["XADD", log_key, f"0-{seq}", "e", event.text])
            # What an ending written by another process needs, whatever the trim keeps.
            kind = event.type
            if kind == "response_chunk":
                chunk = event.chunk
                text.append(chunk if chunk is not None else event.data["text"])
            elif kind == "tool_executing":
                data = event.data
                opened[data["call_id"]] = data["tool"]
                commands.append(["HSET", calls_key, data["call_id"], data["tool"]])
            elif kind == "tool_completed":
                call_id = event.data["call_id"]
                closed.append(call_id)
                commands.append(["HDEL", calls_key, call_id])
            elif kind == "input_requested":
                # Kept with the calls, so that an ending written elsewhere resolves it.
                key = INPUT_KEY_PREFIX + event.data["request_id"]
                opened[key] = event.data["kind"]
                commands.append(["HSET", calls_key, key, event.data["kind"]])
            elif kind == "input_resolved":
                key = INPUT_KEY_PREFIX + event.data["request_id"]
                closed.append(key)
                commands.append(["HDEL", calls_key, key])
            elif kind == "response_complete":
                responded = True
        progress = owned.progress
        last = batch[-1]
        # What changed in the record, in one HSET.
        changed: list[str | int | float] = ["last_seq", last.seq or 0, "updated_at", last.ts]
        if responded:
            changed += ["responded", 1]
        answer = "".join(text)
        if text:
            commands.append(["APPEND", answer_key, answer])
            changed += ["chunks", progress.chunks + len(text)]
        # The oldest first, over what the stream keeps and this batch, keeping the newest.
        kept, held = owned.sizes, owned.held + added_bytes
        drop = 0
        if held > c.max_bytes:
            count = len(kept) + len(added)

            def entry(i: int) -> tuple[int, int]:
                return kept[i] if i < len(kept) else added[i - len(kept)]

            drop, held = trim(held, c.max_bytes, count, lambda i: entry(i)[1])
            if drop:
                first_kept = entry(drop)[0]
                commands.append(["XTRIM", log_key, "MINID", seq_id(first_kept)])
                changed += ["first_seq", first_kept]
        if recreate:
            # The fields written once at the run's start, and what lists the run.
            for name, value in record_fields(record, c.node).items():
                if name not in ("first_seq", "last_seq", "updated_at"):
                    commands.append(["HSETNX", run_key, name, value])
            if progress.responded and not responded:
                changed += ["responded", 1]
            if not text and progress.chunks:
                changed += ["chunks", progress.chunks]
        commands.append(["HSET", run_key, *changed])
        if last.type == "agent_completed":
            # The run's end and its status land together: whoever reads the record
            # after seeing agent_completed finds the run ended.
            final = last.data
            code = (final.get("error") or {}).get("code", "")
            commands.append(["HSET", run_key, "status", final["status"], "error_code", code])
            commands.append(["SREM", c.k("active", record.owner), run_id])
            commands.append(["SREM", c.k("runs", c.node), run_id])
            expire = max(1, int(c.window_s))
            for key in (log_key, run_key, c.k("watchers", run_id), answer_key, calls_key):
                commands.append(["EXPIRE", key, expire])
        elif recreate:
            commands.append(["SADD", c.k("runs", c.node), run_id])
            commands.append(["SADD", c.k("active", record.owner), run_id])

        def applied() -> None:
            progress.chunks += len(text)
            progress.chars += len(answer)
            progress.open_calls.update(opened)
            for call_id in closed:
                progress.open_calls.pop(call_id, None)
            progress.responded = progress.responded or responded
            kept.extend(added)
            for _ in range(drop):
                kept.popleft()
            owned.held = held

        return commands, applied

    # Runs whose events cannot reach Redis ------------------------------------------------

    def give_up(self, owned: Owned, exc: BaseException) -> None:
        """End a run whose events could not be appended for ``outage_s``.

        Its clients here get the ending at once (after the last event the stream
        holds: what every client saw); the store records it; the stream gets the
        same ending once Redis is back (tried for ``ENDING_RETRY_S``).
        """
        c = self.core
        record = owned.record
        owned.failure = exc
        c.lease.lose(owned)
        progress = owned.progress
        state = RunState.resumed(
            seq=owned.flushed_seq,
            open_calls=progress.open_calls,
            chunks=progress.chunks,
            responded=progress.responded,
            content=owned.controller.answer(progress.chars),
        )
        closing = ending(
            record,
            state,
            code=OUTAGE_CODE,
            message="the run's events could not be kept: Redis was unreachable",
            apology=OUTAGE_APOLOGY,
        )
        c.watches.mirror_append(record.run_id, closing)
        ended = dataclasses.replace(record, extra=dict(record.extra))
        c.spawn(self._end_when_back(ended, closing))

    async def _end_when_back(self, record: RunRecord, closing: list[Event]) -> None:
        c = self.core
        last = closing[-1]
        expected_last = (closing[0].seq or 1) - 1
        stored = dataclasses.replace(
            record,
            status=RunStatus.FAILED.value,
            error_code=OUTAGE_CODE,
            last_seq=last.seq or 0,
            updated_at=time.time(),
        )
        if c.on_run_lost is not None:
            with contextlib.suppress(Exception):
                await c.on_run_lost(stored)
        record.last_seq = expected_last
        node = c.node
        deadline = time.monotonic() + ENDING_RETRY_S
        while time.monotonic() < deadline:
            try:
                if await c.lease.write_ending(record, closing, node, recreate=True):
                    return
                # The stream moved on: a batch landed whose reply was lost. The run is
                # ended from what Redis holds, unless another process ended it already.
                if await c.lease.fail_lost_run(
                    record.run_id,
                    node,
                    code=OUTAGE_CODE,
                    message=closing[-1].data["error"]["message"],
                    apology=OUTAGE_APOLOGY,
                ):
                    log.warning("run %s: ended from what Redis kept", record.run_id)
                return
            except (RedisError, OSError):
                await asyncio.sleep(1.0)
        log.error("run %s: its ending could not be appended to Redis", record.run_id)

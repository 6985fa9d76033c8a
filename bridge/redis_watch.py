"""Watching runs through the Redis broker: a local mirror per watched run, fed by one
``XREAD`` loop, and the watcher counts each process keeps in Redis.

Watches read the mirror exactly as with the in-memory broker and fall back to
``XRANGE`` for events older than it.  A run executed here feeds its mirror from
its own appends, once Redis holds them; the others from their streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.exceptions import RedisError

from bridge import bus
from bridge.broker import RunRecord, Wake
from bridge.errors import BrokerUnavailable, CursorAhead, ResumeUnavailable, RunNotFound
from bridge.events import Event, decode_event
from bridge.log import RunLog
from bridge.redis_core import TAIL_BLOCK_MS, Mirror, RedisCore, seq_id, seq_of, text

log = logging.getLogger("chat.redis")


class RedisWatch:
    __slots__ = ("_closed", "_finished", "_watches", "cursor", "run_id", "wake")

    def __init__(self, watches: RedisWatches, run_id: str, cursor: int, wake: Wake) -> None:
        self._watches = watches
        self.run_id = run_id
        self.cursor = cursor
        self.wake = wake
        self._closed = False
        self._finished = False

    async def read(self, limit: int) -> list[Event]:
        mirror = self._watches.core.mirrors.get(self.run_id)
        events: list[Event]
        if mirror is not None and self.cursor + 1 >= mirror.log.first_kept_seq:
            events = mirror.log.read(self.cursor, limit)
        else:  # older than the mirror holds: from the stream itself
            events = await self._watches.xrange(self.run_id, self.cursor, limit)
        if events:
            self.cursor = events[-1].seq or self.cursor
            if events[-1].type == "agent_completed":
                self._finished = True
        return events

    def lag_bytes(self) -> int:
        mirror = self._watches.core.mirrors.get(self.run_id)
        if mirror is None:
            return 0
        return mirror.log.lag_bytes(max(self.cursor, mirror.log.first_kept_seq - 1))

    @property
    def finished(self) -> bool:
        return self._finished

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._watches.unwatch(self)


class RedisWatches:
    def __init__(self, core: RedisCore) -> None:
        self.core = core

    def mirror_append(self, run_id: str, events: list[Event]) -> None:
        mirror = self.core.mirrors.get(run_id)
        if mirror is None:
            return
        for event in events:
            if (event.seq or 0) == mirror.log.last_seq + 1:
                mirror.log.append(event)
            elif (event.seq or 0) > mirror.log.last_seq:
                log.error("run %s: mirror gap at seq %s", run_id, event.seq)
        for watch in list(mirror.watchers):
            watch.wake()

    async def xrange(self, run_id: str, after_seq: int, limit: int) -> list[Event]:
        c = self.core
        entries = await c.call(
            "read log",
            c.r.xrange(c.k("log", run_id), f"({seq_id(after_seq)}", "+", count=limit),
        )
        if entries and seq_of(entries[0][0]) != after_seq + 1:
            raise ResumeUnavailable(
                f"run {run_id}: events after seq {after_seq} are no longer kept"
            )
        if not entries:
            record = await c.registry.get_run(run_id)
            if record is not None and after_seq < record.last_seq:
                raise ResumeUnavailable(
                    f"run {run_id}: events after seq {after_seq} are no longer kept"
                )
        return [decode_event(fields[b"e"]) for _, fields in entries]

    async def watch(self, run_id: str, after_seq: int, wake: Wake) -> RedisWatch:
        c = self.core
        record = await c.registry.get_run(run_id)
        if record is None:
            raise RunNotFound(f"no run {run_id}")
        if after_seq > record.last_seq:
            raise CursorAhead(
                f"after_seq {after_seq} is beyond the run's last seq {record.last_seq}"
            )
        first = int(str(record.extra.get("first_seq", 1)))
        if after_seq + 1 < first:
            raise ResumeUnavailable(
                f"run {run_id}: events after seq {after_seq} are no longer kept "
                f"(oldest kept is {first})"
            )
        mirror = c.mirrors.get(run_id)
        if mirror is None:
            # Mirror from what the stream holds now (for a run executed here, what this
            # process appended); older events come from the stream itself.
            owned = c.owned.get(run_id)
            held = owned.flushed_seq if owned is not None else record.last_seq
            mirror = Mirror(RunLog(run_id, c.max_bytes, first_seq=held + 1))
            c.mirrors[run_id] = mirror
            c.mirrors_changed.set()
        watch = RedisWatch(self, run_id, after_seq, wake)
        if record.ended and after_seq >= record.last_seq:
            watch._finished = True  # its agent_completed is the cursor's: nothing follows
        mirror.watchers.add(watch)
        try:
            await self.watchers_changed(run_id, record)
        except BaseException:
            watch.close()  # never handed out: nobody else would close it
            raise
        if mirror.log.last_seq > after_seq or record.last_seq > after_seq:
            wake()
        return watch

    def unwatch(self, watch: RedisWatch) -> None:
        c = self.core
        mirror = c.mirrors.get(watch.run_id)
        if mirror is None:
            return
        mirror.watchers.discard(watch)
        if not mirror.watchers:
            del c.mirrors[watch.run_id]
        c.spawn(self.watchers_changed(watch.run_id, None))

    async def watchers_changed(self, run_id: str, record: RunRecord | None) -> None:
        c = self.core
        mirror = c.mirrors.get(run_id)
        count = len(mirror.watchers) if mirror else 0
        keys = [c.k("watchers", run_id), c.k("watching", c.node)]
        try:
            total = await c.script("COUNT_WATCHERS", keys, [c.p, c.node, count, run_id])
            await self.tell_watchers(run_id, int(total), record)
        except (RedisError, OSError, BrokerUnavailable) as exc:
            log.warning("run %s: could not count watchers: %r", run_id, exc)

    async def tell_watchers(self, run_id: str, total: int, record: RunRecord | None) -> None:
        """Tell the process executing the run how many watchers it has, over every process."""
        c = self.core
        owned = c.owned.get(run_id)
        if owned is not None:
            owned.controller.watchers_changed(total)
            return
        record = record or await c.registry.get_run(run_id)
        if record is not None and not record.ended and record.extra.get("node"):
            await c.bus.send(str(record.extra["node"]), bus.watchers(run_id, total))

    async def drop_watchers(self, node: str) -> None:
        """Remove ``node``'s share of every run's watcher count; tell the runs' owners."""
        c = self.core
        for raw in await c.r.smembers(c.k("watching", node)):
            run_id = text(raw)
            keys = [c.k("watchers", run_id), c.k("watching", node)]
            total = await c.script("COUNT_WATCHERS", keys, [c.p, node, 0, run_id])
            await self.tell_watchers(run_id, int(total), None)

    async def tail(self) -> None:
        """Feed the mirrors of runs executed elsewhere, in order, from their streams."""
        c = self.core
        assert c.tail_r is not None
        while True:
            streams = {
                c.k("log", run_id): seq_id(mirror.log.last_seq)
                for run_id, mirror in c.mirrors.items()
                if run_id not in c.owned
            }
            if not streams:
                c.mirrors_changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1):
                        await c.mirrors_changed.wait()
                continue
            try:
                answer = await c.tail_r.xread(streams, count=1000, block=TAIL_BLOCK_MS)
            except (RedisError, OSError) as exc:
                c.reachable = False
                log.warning("reading streams failed: %r; retrying", exc)
                await asyncio.sleep(0.5)
                continue
            prefix = len(c.k("log", ""))
            for stream, entries in answer or ():
                run_id = text(stream)[prefix:]
                events = [decode_event(fields[b"e"]) for _, fields in entries]
                self.mirror_append(run_id, events)

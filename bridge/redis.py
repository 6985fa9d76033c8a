"""The Redis broker: any gateway process can serve any client for any run.

Keys (all under ``prefix``, ``chat:`` by default)::

    run:{id}          hash   the run's record: owner, thread, agent, status, seqs, node
    log:{id}          stream its events, entry id ``0-{seq}``, field ``e`` = the envelope
    active:{user}     set    the user's runs not yet ended
    rate:{user}       zset   the user's recent run starts (sliding window)
    conns:{node}      hash   open connections per user on one process
    watchers:{id}     hash   attached watchers per process
    runs:{node}       set    runs a process executes
    node:{node}       string the process's lease (expires unless renewed)
    nodes             set    every process that took part
    bus:{node}        pubsub lifecycle commands, their replies, watcher counts

The process that runs an agent is the only writer of its run's stream: it numbers
events, appends them in order (pipelined, one round trip for many events), trims
the stream to ``run_log_max_bytes`` and sets it to expire ``resume_window_s`` after
the run ends.  Every process keeps, for the runs its clients watch, a local
mirror (a :class:`~bridge.log.RunLog`) fed by one ``XREAD`` loop; watches read the
mirror exactly as with the in-memory broker, and fall back to ``XRANGE`` for
events older than it.  A process renews its lease every ``lease_s / 3``; when one
lapses, any other process fails the dead process's runs with ``node_lost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from bridge.broker import RunController, RunRecord, Wake
from bridge.errors import BrokerUnavailable, ResumeUnavailable, RunConflict, RunNotFound
from bridge.events import Event, decode_event, make_event
from bridge.log import EVENT_OVERHEAD, RunLog

log = logging.getLogger("chat.redis")

#: Events appended in one pipeline at most.
FLUSH_BATCH: Final = 512
#: How long the XREAD loop blocks before it looks at the set of mirrored runs again.
TAIL_BLOCK_MS: Final = 100
COMMAND_TIMEOUT_S: Final = 10.0
#: How long a run's events wait for an unreachable Redis before its publishes fail.
OUTAGE_GIVE_UP_S: Final = 30.0
NODE_LOST_APOLOGY: Final = "Sorry, the server working on this answer stopped. Please try again."

Reaped = Callable[[RunRecord], Awaitable[None]]


def _seq_id(seq: int) -> str:
    return f"0-{seq}"


def _seq_of(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-", 1)[1])


@dataclass(slots=True)
class _Owned:
    """A run this process executes: its pending appends and what its stream holds."""

    record: RunRecord
    controller: RunController
    pending: list[Event] = field(default_factory=list)
    flusher: asyncio.Task[None] | None = None
    failure: BaseException | None = None
    sizes: deque[tuple[int, int]] = field(default_factory=deque)  # (seq, bytes) kept
    held: int = 0
    flushed_seq: int = 0  # the last seq the stream holds


class _Mirror:
    """This process's copy of a run's recent events, for its local watchers."""

    __slots__ = ("log", "watchers")

    def __init__(self, log: RunLog) -> None:
        self.log = log
        self.watchers: set[_RedisWatch] = set()


class _RedisWatch:
    __slots__ = ("_broker", "_closed", "_finished", "cursor", "run_id", "wake")

    def __init__(self, broker: RedisBroker, run_id: str, cursor: int, wake: Wake) -> None:
        self._broker = broker
        self.run_id = run_id
        self.cursor = cursor
        self.wake = wake
        self._closed = False
        self._finished = False

    async def read(self, limit: int) -> list[Event]:
        mirror = self._broker._mirrors.get(self.run_id)
        events: list[Event]
        if mirror is not None and self.cursor + 1 >= mirror.log.first_kept_seq:
            events = mirror.log.read(self.cursor, limit)
        else:  # older than the mirror holds: from the stream itself
            events = await self._broker._xrange(self.run_id, self.cursor, limit)
        if events:
            self.cursor = events[-1].seq or self.cursor
            if events[-1].type == "agent_completed":
                self._finished = True
        return events

    def lag_bytes(self) -> int:
        mirror = self._broker._mirrors.get(self.run_id)
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
        self._broker._unwatch(self)


class RedisBroker:
    """The :class:`~bridge.broker.Broker` over Redis (``CHAT_BROKER_URL=redis://…``)."""

    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        run_log_max_bytes: int,
        resume_window_s: float,
        lease_s: float = 10.0,
        node: str | None = None,
        prefix: str = "chat:",
    ) -> None:
        self.url = url
        self.max_bytes = run_log_max_bytes
        self.window_s = resume_window_s
        self.lease_s = lease_s
        self.node = node or f"n_{secrets.token_hex(6)}"
        self.p = prefix
        # redis-py's asyncio typing does not follow its decoded replies: kept as Any.
        self._r: Any = None
        self._tail_r: Any = None
        self._owned: dict[str, _Owned] = {}
        self._mirrors: dict[str, _Mirror] = {}
        self._mirrors_changed = asyncio.Event()
        self._replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._pubsub: Any = None
        #: Told of each run this process failed for a lost node (to record it).
        self.on_reaped: Reaped | None = None
        self.reachable = False

    @property
    def r(self) -> Any:
        if self._r is None:
            raise BrokerUnavailable("the Redis broker is not started")
        return self._r

    def k(self, *parts: str) -> str:
        return self.p + ":".join(parts)

    # Lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        self._r = aioredis.Redis.from_url(
            self.url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=15
        )
        self._tail_r = aioredis.Redis.from_url(
            self.url, socket_timeout=5 + TAIL_BLOCK_MS / 1000, socket_connect_timeout=5
        )
        try:
            await self.r.ping()
            await self._renew_lease()
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"cannot reach Redis at {_safe_url(self.url)}: {exc}") from exc
        self.reachable = True
        self._pubsub = self.r.pubsub(ignore_subscribe_messages=True)
        await self._pubsub.subscribe(self.k("bus", self.node))
        loop = asyncio.get_running_loop()
        for coro, name in (
            (self._listen(), "bus"),
            (self._tail(), "tail"),
            (self._keep_lease(), "lease"),
            (self._janitor(), "janitor"),
        ):
            self._tasks.append(loop.create_task(coro, name=f"redis {name} {self.node}"))

    async def close(self) -> None:
        for owned in list(self._owned.values()):
            with contextlib.suppress(Exception):
                await self._drain(owned)
        tasks = [*self._tasks, *self._background]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        with contextlib.suppress(Exception):
            if self._pubsub is not None:
                await self._pubsub.aclose()
            await self.r.delete(self.k("node", self.node), self.k("conns", self.node))
            await self.r.srem(self.k("nodes"), self.node)
        for client in (self._r, self._tail_r):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()
        self._r = self._tail_r = None

    async def healthy(self) -> bool:
        try:
            async with asyncio.timeout(2):
                await self.r.ping()
            self.reachable = True
        except (RedisError, OSError, TimeoutError, BrokerUnavailable):
            self.reachable = False
        return self.reachable

    async def _call(self, what: str, coro: Awaitable[Any]) -> Any:
        """Await a Redis call; its failure becomes :class:`BrokerUnavailable`."""
        try:
            result = await coro
        except (RedisError, OSError) as exc:
            self.reachable = False
            raise BrokerUnavailable(f"Redis is unreachable ({what})") from exc
        self.reachable = True
        return result

    # Registry -----------------------------------------------------------------------

    async def create_run(self, record: RunRecord, controller: RunController) -> None:
        run_key = self.k("run", record.run_id)
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(run_key, mapping=_record_fields(record, self.node))
        pipe.sadd(self.k("runs", self.node), record.run_id)
        pipe.sadd(self.k("active", record.owner), record.run_id)
        await self._call("create run", pipe.execute())
        self._owned[record.run_id] = _Owned(record, controller)

    async def get_run(self, run_id: str) -> RunRecord | None:
        raw = await self._call("get run", self.r.hgetall(self.k("run", run_id)))
        return _record_from(run_id, raw) if raw else None

    async def set_status(self, run_id: str, status: str, error_code: str | None = None) -> None:
        fields: dict[str, Any] = {"status": status, "updated_at": time.time()}
        if error_code is not None:
            fields["error_code"] = error_code
        owner: str | None = None
        if status in ("completed", "cancelled", "failed"):
            owned = self._owned.get(run_id)
            record = owned.record if owned is not None else await self.get_run(run_id)
            owner = record.owner if record is not None else None
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.k("run", run_id), mapping=fields)
        if owner is not None:
            pipe.srem(self.k("active", owner), run_id)
            pipe.srem(self.k("runs", self.node), run_id)
        await self._call("set status", pipe.execute())

    async def active_runs(self, owner: str) -> int:
        return int(await self._call("active runs", self.r.scard(self.k("active", owner))))

    # Per-user limits, shared by every process ----------------------------------------

    async def connection_opened(self, user: str, limit: int) -> bool:
        nodes = await self._live_nodes()
        pipe = self.r.pipeline(transaction=False)
        for node in nodes:
            pipe.hget(self.k("conns", node), user)
        counts = await self._call("count connections", pipe.execute())
        if sum(int(c or 0) for c in counts) >= limit:
            return False
        await self._call("count connections", self.r.hincrby(self.k("conns", self.node), user, 1))
        return True

    async def connection_closed(self, user: str) -> None:
        with contextlib.suppress(BrokerUnavailable):
            left = await self._call(
                "count connections", self.r.hincrby(self.k("conns", self.node), user, -1)
            )
            if int(left) <= 0:
                await self._call("count connections", self.r.hdel(self.k("conns", self.node), user))

    async def new_run_wait(self, user: str, limit: int, window_s: float) -> float:
        key = self.k("rate", user)
        now = time.time()
        pipe = self.r.pipeline(transaction=True)
        pipe.zremrangebyscore(key, 0, now - window_s)
        pipe.zcard(key)
        pipe.zrange(key, 0, 0, withscores=True)
        _, count, oldest = await self._call("rate limit", pipe.execute())
        if int(count) < limit:
            return 0.0
        return max(0.0, float(oldest[0][1]) + window_s - now) if oldest else window_s

    async def new_run_started(self, user: str, window_s: float) -> None:
        key = self.k("rate", user)
        now = time.time()
        pipe = self.r.pipeline(transaction=True)
        pipe.zadd(key, {f"{now}:{secrets.token_hex(4)}": now})
        pipe.expire(key, int(window_s) + 1)
        await self._call("rate limit", pipe.execute())

    # Event logs -----------------------------------------------------------------------

    async def publish(self, event: Event) -> None:
        run_id = event.run_id
        owned = self._owned.get(run_id or "")
        if owned is None:
            raise RunNotFound(f"run {run_id} is not executed by this process")
        if owned.failure is not None:
            raise BrokerUnavailable("Redis is unreachable: the run's events cannot be kept") from (
                owned.failure
            )
        owned.pending.append(event)
        if owned.flusher is None or owned.flusher.done():
            owned.flusher = asyncio.get_running_loop().create_task(self._flush(owned))
        if len(owned.pending) >= FLUSH_BATCH * 8 or event.type == "agent_completed":
            # Back-pressure on a fast agent, and the run's end is durable before it returns.
            await self._drain(owned)

    async def _drain(self, owned: _Owned) -> None:
        while owned.flusher is not None and not owned.flusher.done():
            await asyncio.shield(owned.flusher)
        if owned.failure is not None:
            raise BrokerUnavailable("Redis is unreachable: the run's events cannot be kept") from (
                owned.failure
            )

    async def _flush(self, owned: _Owned) -> None:
        """Append what the run published, in order; ride out a short Redis outage.

        While Redis is unreachable the events wait here (the agent waits too, once
        too many are pending) and each batch is tried again with a growing pause;
        only after ``OUTAGE_GIVE_UP_S`` does the run's next publish fail.
        """
        run_id = owned.record.run_id
        while owned.pending:
            batch = owned.pending[:FLUSH_BATCH]
            del owned.pending[:FLUSH_BATCH]
            pause, gave_up_at = 0.05, time.monotonic() + OUTAGE_GIVE_UP_S
            while True:
                try:
                    await self._append(owned, batch)
                    break
                except (RedisError, OSError) as exc:
                    self.reachable = False
                    if time.monotonic() > gave_up_at:
                        owned.failure = exc
                        log.error("run %s: appending to Redis failed: %r", run_id, exc)
                        return
                    log.warning("run %s: Redis unreachable (%r); trying again", run_id, exc)
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 1.0)
                    # A batch may have landed before the connection broke: keep the rest.
                    batch = await self._not_yet_appended(run_id, batch)
            self.reachable = True
            last = batch[-1] if batch else None
            if last is not None:
                owned.flushed_seq = last.seq or 0
                self._mirror_append(run_id, batch)
                if last.type == "agent_completed":
                    self._owned.pop(run_id, None)

    async def _not_yet_appended(self, run_id: str, batch: list[Event]) -> list[Event]:
        try:
            newest = await self.r.xrevrange(self.k("log", run_id), "+", "-", count=1)
        except (RedisError, OSError):
            return batch
        stored = _seq_of(newest[0][0]) if newest else 0
        return [event for event in batch if (event.seq or 0) > stored]

    async def _append(self, owned: _Owned, batch: list[Event]) -> None:
        if not batch:
            return
        run_id = owned.record.run_id
        log_key = self.k("log", run_id)
        pipe = self.r.pipeline(transaction=True)
        added = [(event.seq or 0, event.size + EVENT_OVERHEAD) for event in batch]
        for event in batch:
            pipe.xadd(log_key, {"e": event.text}, id=_seq_id(event.seq or 0))
        # The oldest first, over what the stream keeps and this batch, keeping the newest.
        kept, held = owned.sizes, owned.held + sum(size for _, size in added)
        count, drop = len(kept) + len(added), 0

        def entry(i: int) -> tuple[int, int]:
            return kept[i] if i < len(kept) else added[i - len(kept)]

        while held > self.max_bytes and count - drop > 1:
            held -= entry(drop)[1]
            drop += 1
        first_kept = entry(drop)[0] if drop else None
        if first_kept is not None:
            pipe.xtrim(log_key, minid=_seq_id(first_kept))
            pipe.hset(self.k("run", run_id), "first_seq", first_kept)
        last = batch[-1]
        pipe.hset(self.k("run", run_id), mapping={"last_seq": last.seq or 0, "updated_at": last.ts})
        if last.type == "agent_completed":
            # The run's end and its status land together: whoever reads the record
            # after seeing agent_completed finds the run ended.
            final = last.data
            pipe.hset(
                self.k("run", run_id),
                mapping={
                    "status": final["status"],
                    "error_code": (final.get("error") or {}).get("code", ""),
                },
            )
            pipe.srem(self.k("active", owned.record.owner), run_id)
            pipe.srem(self.k("runs", self.node), run_id)
            for key in (log_key, self.k("run", run_id), self.k("watchers", run_id)):
                pipe.expire(key, max(1, int(self.window_s)))
        await pipe.execute()
        kept.extend(added)
        for _ in range(drop):
            kept.popleft()
        owned.held = held

    def _mirror_append(self, run_id: str, events: list[Event]) -> None:
        mirror = self._mirrors.get(run_id)
        if mirror is None:
            return
        for event in events:
            if (event.seq or 0) == mirror.log.last_seq + 1:
                mirror.log.append(event)
            elif (event.seq or 0) > mirror.log.last_seq:
                log.error("run %s: mirror gap at seq %s", run_id, event.seq)
        for watch in list(mirror.watchers):
            watch.wake()

    async def _xrange(self, run_id: str, after_seq: int, limit: int) -> list[Event]:
        entries = await self._call(
            "read log",
            self.r.xrange(self.k("log", run_id), f"({_seq_id(after_seq)}", "+", count=limit),
        )
        if entries and _seq_of(entries[0][0]) != after_seq + 1:
            raise ResumeUnavailable(
                f"run {run_id}: events after seq {after_seq} are no longer kept"
            )
        if not entries:
            record = await self.get_run(run_id)
            if record is not None and after_seq < record.last_seq:
                raise ResumeUnavailable(
                    f"run {run_id}: events after seq {after_seq} are no longer kept"
                )
        return [decode_event(fields[b"e"]) for _, fields in entries]

    async def watch(self, run_id: str, after_seq: int, wake: Wake) -> _RedisWatch:
        record = await self.get_run(run_id)
        if record is None:
            raise RunNotFound(f"no run {run_id}")
        if after_seq > record.last_seq:
            raise ValueError(
                f"after_seq {after_seq} is beyond the run's last seq {record.last_seq}"
            )
        first = int(str(record.extra.get("first_seq", 1)))
        if after_seq + 1 < first:
            raise ResumeUnavailable(
                f"run {run_id}: events after seq {after_seq} are no longer kept "
                f"(oldest kept is {first})"
            )
        mirror = self._mirrors.get(run_id)
        if mirror is None:
            # Mirror from what the stream holds now (for a run executed here, what this
            # process appended); older events come from the stream itself.
            owned = self._owned.get(run_id)
            held = owned.flushed_seq if owned is not None else record.last_seq
            mirror = _Mirror(RunLog(run_id, self.max_bytes, first_seq=held + 1))
            self._mirrors[run_id] = mirror
            self._mirrors_changed.set()
        watch = _RedisWatch(self, run_id, after_seq, wake)
        mirror.watchers.add(watch)
        try:
            await self._watchers_changed(run_id, record)
        except BaseException:
            watch.close()  # never handed out: nobody else would close it
            raise
        if mirror.log.last_seq > after_seq or record.last_seq > after_seq:
            wake()
        return watch

    def _unwatch(self, watch: _RedisWatch) -> None:
        mirror = self._mirrors.get(watch.run_id)
        if mirror is None:
            return
        mirror.watchers.discard(watch)
        if not mirror.watchers:
            del self._mirrors[watch.run_id]
        task = asyncio.get_running_loop().create_task(self._watchers_changed(watch.run_id, None))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _watchers_changed(self, run_id: str, record: RunRecord | None) -> None:
        mirror = self._mirrors.get(run_id)
        count = len(mirror.watchers) if mirror else 0
        key = self.k("watchers", run_id)
        try:
            if count:
                await self.r.hset(key, self.node, count)
            else:
                await self.r.hdel(key, self.node)
            values = await self.r.hvals(key)
            total = sum(int(v) for v in values)
            owned = self._owned.get(run_id)
            if owned is not None:
                owned.controller.watchers_changed(total)
                return
            record = record or await self.get_run(run_id)
            if record is not None and record.extra.get("node"):
                await self._send(
                    str(record.extra["node"]),
                    {"kind": "watchers", "run_id": run_id, "count": total},
                )
        except (RedisError, OSError) as exc:
            log.warning("run %s: could not count watchers: %r", run_id, exc)

    async def _tail(self) -> None:
        """Feed the mirrors of runs executed elsewhere, in order, from their streams."""
        assert self._tail_r is not None
        while True:
            streams = {
                self.k("log", run_id): _seq_id(mirror.log.last_seq)
                for run_id, mirror in self._mirrors.items()
                if run_id not in self._owned
            }
            if not streams:
                self._mirrors_changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1):
                        await self._mirrors_changed.wait()
                continue
            try:
                answer = await self._tail_r.xread(streams, count=1000, block=TAIL_BLOCK_MS)
            except (RedisError, OSError) as exc:
                self.reachable = False
                log.warning("reading streams failed: %r; retrying", exc)
                await asyncio.sleep(0.5)
                continue
            for stream, entries in answer or ():
                name = stream.decode() if isinstance(stream, bytes) else stream
                run_id = name[len(self.k("log", "")) :]
                events = [decode_event(fields[b"e"]) for _, fields in entries]
                self._mirror_append(run_id, events)

    # Lifecycle commands ----------------------------------------------------------------

    async def command(self, run_id: str, action: str) -> str:
        owned = self._owned.get(run_id)
        if owned is not None:
            return await owned.controller.apply(action)
        record = await self.get_run(run_id)
        if record is None:
            raise RunNotFound(f"no run {run_id}")
        node = str(record.extra.get("node") or "")
        if record.ended or not node:
            # Nothing executes it any more: answer as the lifecycle would.
            return _ended_answer(record, action)
        request_id = secrets.token_hex(8)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[request_id] = future
        try:
            await self._send(
                node,
                {
                    "kind": "cmd",
                    "id": request_id,
                    "run_id": run_id,
                    "action": action,
                    "reply_to": self.node,
                },
            )
            async with asyncio.timeout(COMMAND_TIMEOUT_S):
                reply = await future
        except TimeoutError:
            raise BrokerUnavailable(f"the process running {run_id} did not answer") from None
        finally:
            self._replies.pop(request_id, None)
        if "error" in reply:
            raise _RemoteError(reply["error"]["code"], reply["error"]["message"])
        return str(reply["status"])

    async def _send(self, node: str, message: dict[str, Any]) -> None:
        await self._call("publish", self.r.publish(self.k("bus", node), orjson.dumps(message)))

    async def _listen(self) -> None:
        while True:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
            except (RedisError, OSError) as exc:
                self.reachable = False
                log.warning("the command bus failed: %r; resubscribing", exc)
                await asyncio.sleep(0.5)
                with contextlib.suppress(Exception):
                    await self._pubsub.subscribe(self.k("bus", self.node))
                continue
            if message is None:
                continue
            try:
                body = orjson.loads(message["data"])
            except orjson.JSONDecodeError:
                continue
            task = asyncio.get_running_loop().create_task(self._on_message(body))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _on_message(self, body: dict[str, Any]) -> None:
        kind = body.get("kind")
        if kind == "reply":
            future = self._replies.get(body.get("id", ""))
            if future is not None and not future.done():
                future.set_result(body)
        elif kind == "cmd":
            reply: dict[str, Any] = {"kind": "reply", "id": body["id"]}
            owned = self._owned.get(body["run_id"])
            try:
                if owned is None:
                    record = await self.get_run(body["run_id"])
                    if record is None:
                        raise RunNotFound(f"no run {body['run_id']}")
                    reply["status"] = _ended_answer(record, body["action"])
                else:
                    reply["status"] = await owned.controller.apply(body["action"])
            except Exception as exc:
                code = getattr(exc, "code", "internal")
                reply["error"] = {"code": code, "message": str(exc)}
            with contextlib.suppress(BrokerUnavailable):
                await self._send(body["reply_to"], reply)
        elif kind == "watchers":
            owned = self._owned.get(body.get("run_id", ""))
            if owned is not None:
                owned.controller.watchers_changed(int(body["count"]))

    # Leases and lost nodes --------------------------------------------------------------

    async def _renew_lease(self) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.set(self.k("node", self.node), str(time.time()), px=int(self.lease_s * 1000))
        pipe.sadd(self.k("nodes"), self.node)
        await pipe.execute()

    async def _keep_lease(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await self._renew_lease()
                self.reachable = True
            except (RedisError, OSError) as exc:
                self.reachable = False
                log.warning("renewing the lease failed: %r", exc)

    async def _live_nodes(self) -> list[str]:
        nodes = [
            n.decode() if isinstance(n, bytes) else n
            for n in await self._call("nodes", self.r.smembers(self.k("nodes")))
        ]
        pipe = self.r.pipeline(transaction=False)
        for node in nodes:
            pipe.exists(self.k("node", node))
        alive = await self._call("nodes", pipe.execute())
        return [n for n, ok in zip(nodes, alive, strict=True) if ok]

    async def _janitor(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 4 + secrets.randbelow(100) / 1000)
            try:
                await self.reap_lost_nodes()
            except (RedisError, OSError) as exc:
                log.warning("looking for lost processes failed: %r", exc)
            except Exception:
                log.exception("looking for lost processes failed")

    async def reap_lost_nodes(self) -> int:
        """Fail the runs of every process whose lease lapsed; how many runs."""
        nodes = [
            n.decode() if isinstance(n, bytes) else n
            for n in await self.r.smembers(self.k("nodes"))
        ]
        reaped = 0
        for node in nodes:
            if node == self.node or await self.r.exists(self.k("node", node)):
                continue
            # One process reaps a node; the lock outlives a reaper that dies halfway.
            if not await self.r.set(self.k("reaping", node), self.node, nx=True, ex=30):
                continue
            runs = await self.r.smembers(self.k("runs", node))
            for raw in runs:
                run_id = raw.decode() if isinstance(raw, bytes) else raw
                if await self._fail_lost_run(run_id):
                    reaped += 1
            pipe = self.r.pipeline(transaction=False)
            pipe.delete(self.k("runs", node), self.k("conns", node), self.k("reaping", node))
            pipe.srem(self.k("nodes"), node)
            await pipe.execute()
            log.warning("process %s lost its lease; %d of its runs failed", node, len(runs))
        return reaped

    async def _fail_lost_run(self, run_id: str) -> bool:
        record = await self.get_run(run_id)
        if record is None or record.ended:
            return False
        log_key = self.k("log", run_id)
        entries = await self.r.xrange(log_key, "-", "+")
        events = [decode_event(fields[b"e"]) for _, fields in entries]
        seq = record.last_seq
        thread = record.thread_id
        open_calls: dict[str, str] = {}
        chunks: list[str] = []
        responded = False
        for event in events:
            data = event.data
            if event.type == "tool_executing":
                open_calls[data["call_id"]] = data["tool"]
            elif event.type == "tool_completed":
                open_calls.pop(data["call_id"], None)
            elif event.type == "response_chunk":
                chunks.append(data["text"])
            elif event.type == "response_complete":
                responded = True
            elif event.type == "agent_completed":
                return False
        ending: list[tuple[str, dict[str, Any]]] = [
            (
                "tool_completed",
                {
                    "call_id": call_id,
                    "tool": tool,
                    "ok": False,
                    "error": "node_lost",
                    "duration_ms": 0.0,
                },
            )
            for call_id, tool in open_calls.items()
        ]
        if not responded:
            apology = ("\n\n" if chunks else "") + NODE_LOST_APOLOGY
            ending.append(("response_chunk", {"text": apology, "index": len(chunks)}))
            ending.append(
                (
                    "response_complete",
                    {
                        "message_id": f"m_{secrets.token_urlsafe(12)}",
                        "content": "".join(chunks) + apology,
                        "fallback": True,
                        "stored": False,
                    },
                )
            )
        duration = round((time.time() - record.created_at) * 1000, 3)
        ending.append(
            (
                "agent_completed",
                {
                    "status": "failed",
                    "duration_ms": duration,
                    "error": {
                        "code": "node_lost",
                        "message": "the process running the run was lost",
                    },
                },
            )
        )
        pipe = self.r.pipeline(transaction=True)
        for kind, data in ending:
            seq += 1
            event = make_event(kind, data, run_id=run_id, thread_id=thread, seq=seq)  # type: ignore[arg-type]
            pipe.xadd(log_key, {"e": event.text}, id=_seq_id(seq))
        now = time.time()
        pipe.hset(
            self.k("run", run_id),
            mapping={
                "status": "failed",
                "error_code": "node_lost",
                "last_seq": seq,
                "updated_at": now,
            },
        )
        pipe.srem(self.k("active", record.owner), run_id)
        for key in (log_key, self.k("run", run_id), self.k("watchers", run_id)):
            pipe.expire(key, max(1, int(self.window_s)))
        await pipe.execute()
        if self.on_reaped is not None:
            record.status, record.error_code, record.last_seq = "failed", "node_lost", seq
            record.updated_at = now
            with contextlib.suppress(Exception):
                await self.on_reaped(record)
        return True


class _RemoteError(Exception):
    """An error the process running the run answered a command with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _ended_answer(record: RunRecord, action: str) -> str:
    """The answer for a run no process executes any more (the lifecycle's, for its end)."""
    if record.status == "cancelled" and action == "cancel":
        return record.status
    raise RunConflict(f"cannot {action} run {record.run_id}: it is {record.status}")


def _record_fields(record: RunRecord, node: str) -> dict[str, Any]:
    return {
        "thread_id": record.thread_id,
        "owner": record.owner,
        "agent": record.agent,
        "status": record.status,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "last_seq": record.last_seq,
        "error_code": record.error_code or "",
        "first_seq": 1,
        "node": node,
    }


def _record_from(run_id: str, raw: dict[bytes, bytes]) -> RunRecord:
    f = {k.decode(): v.decode() for k, v in raw.items()}
    return RunRecord(
        run_id,
        f.get("thread_id", ""),
        f.get("owner", ""),
        f.get("agent", ""),
        f.get("status", "queued"),
        float(f.get("created_at", 0)),
        float(f.get("updated_at", 0)),
        int(f.get("last_seq", 0)),
        f.get("error_code") or None,
        {"node": f.get("node", ""), "first_seq": int(f.get("first_seq", 1))},
    )


def _safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    head, sep, tail = url.partition("@")
    if not sep:
        return url
    scheme, _, _ = head.partition("://")
    return f"{scheme}://…@{tail}"

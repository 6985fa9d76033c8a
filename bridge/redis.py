"""The Redis broker: any gateway process can serve any client for any run.

Keys (all under ``prefix``, ``chat:`` by default)::

    run:{id}          hash   the run's record: owner, thread, agent, status, seqs, node
    log:{id}          stream its events, entry id ``0-{seq}``, field ``e`` = the envelope
    active:{user}     set    the user's runs not yet ended
    rate:{user}       zset   the user's recent run starts (sliding window)
    starting:{user}   zset   the user's run starts under way (reservations)
    answer:{id}       string the concatenated response chunks appended so far
    calls:{id}        hash   the run's open tool calls: call id → tool
    conns:{node}      hash   open connections per user on one process
    watchers:{id}     hash   attached watchers per process
    watching:{node}   set    runs a process has watchers of
    runs:{node}       set    runs a process executes
    node:{node}       string the process's lease (expires unless renewed)
    fenced:{node}     string set when the process was reaped: it may write no more
    nodes             set    every process that took part
    bus:{node}        pubsub lifecycle commands, their replies, watcher counts

The process that runs an agent is the only writer of its run's stream: it numbers
events, appends them in order (pipelined, one round trip for many events), trims
the stream to ``run_log_max_bytes`` and sets it to expire ``resume_window_s`` after
the run ends.  Every process keeps, for the runs its clients watch, a local
mirror (a :class:`~bridge.log.RunLog`) fed by one ``XREAD`` loop; watches read the
mirror exactly as with the in-memory broker, and fall back to ``XRANGE`` for
events older than it.  A process renews its lease every ``lease_s / 3``; when one
lapses, any other process fails the dead process's runs with ``node_lost``, and
drops its share of every run's watcher count.

Every write of a run by its process is *fenced* (:data:`~bridge.redis_scripts.FENCED_WRITE`):
a reaper marks the lost process ``fenced`` before it ends that process's runs, and
an append is refused once the mark is there.  A process that was reaped while
alive (an event loop stalled past the lease, a partition from Redis) finds out at
its next append or lease renewal; its runs' endings are the reaper's, which its
own clients then read from the streams, and it joins again under a new name.
Limits and watcher counts are checked and counted in one script each.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from bridge import bus, tracing
from bridge import redis_scripts as lua
from bridge.broker import (
    BrokerStats,
    RunAnnounced,
    RunController,
    RunLost,
    RunQuota,
    RunRecord,
    Wake,
)
from bridge.errors import (
    BrokerUnavailable,
    CursorAhead,
    RemoteCommandError,
    ResumeUnavailable,
    RunConflict,
    RunNotFound,
)
from bridge.events import Event, decode_event, make_event
from bridge.log import RunLog, kept_size, trim
from bridge.runstate import INPUT_KEY_PREFIX, RunState
from bridge.wire import RESPOND, Action, RunStatus, WireError, is_terminal

log = logging.getLogger("chat.redis")

#: Events appended in one pipeline at most.
FLUSH_BATCH: Final = 512
#: How long the XREAD loop blocks before it looks at the set of mirrored runs again.
TAIL_BLOCK_MS: Final = 100
COMMAND_TIMEOUT_S: Final = 10.0
NODE_LOST_APOLOGY: Final = "Sorry, the server working on this answer stopped. Please try again."
OUTAGE_APOLOGY: Final = "Sorry, this answer could not be kept going. Please try again."
#: The ``error.code`` of a run ended because its events could not reach Redis.
OUTAGE_CODE: Final = "broker_unavailable"
#: How long a reserved run start counts, at most, if its process never releases it.
RESERVATION_HOLD_S: Final = 30.0
#: How long a reaped process's fence mark is kept (it names a process that is gone).
FENCE_KEEP_S: Final = 86_400
#: How long an ending that could not be appended is tried again.
ENDING_RETRY_S: Final = 600.0


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
    #: What the appended events opened and said, for an ending written without them
    #: (the answer itself is the controller's: it holds the chunks anyway).
    progress: RunState = field(default_factory=lambda: RunState(keep_answer=False))


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


class _RedisFollow:
    __slots__ = ("_followers", "announce", "thread_id")

    def __init__(
        self, thread_id: str, announce: RunAnnounced, followers: dict[str, set[_RedisFollow]]
    ) -> None:
        self.thread_id = thread_id
        self.announce = announce
        self._followers = followers

    def close(self) -> None:
        followers = self._followers.get(self.thread_id)
        if followers is not None:
            followers.discard(self)
            if not followers:
                del self._followers[self.thread_id]


class RedisBroker:
    """The :class:`~bridge.broker.Broker` over Redis (``CHAT_BROKER_URL=redis://…``)."""

    name = "redis"
    shared = True

    def __init__(
        self,
        url: str,
        *,
        run_log_max_bytes: int,
        resume_window_s: float,
        lease_s: float = 10.0,
        outage_s: float = 30.0,
        node: str | None = None,
        prefix: str = "chat:",
    ) -> None:
        self.url = url
        self.max_bytes = run_log_max_bytes
        self.window_s = resume_window_s
        self.lease_s = lease_s
        #: How long a run's events wait for an unreachable Redis before the run is ended.
        self.outage_s = outage_s
        self._base_node = node or f"n_{secrets.token_hex(6)}"
        #: This process's name in Redis; a new one each time it joins again after
        #: being reaped (its lease epoch is the name's suffix).
        self.node = self._base_node
        self.epoch = 1
        #: Counts for the metrics: lease renewals (and failed ones), writes or renewals
        #: the fence refused, times this process was found reaped while alive, and
        #: other processes this one reaped.
        self.counts: dict[str, int] = dict.fromkeys(
            (
                "lease_renewals",
                "lease_renewal_failures",
                "fence_refusals",
                "fenced",
                "nodes_reaped",
            ),
            0,
        )
        self.p = prefix
        # redis-py's asyncio typing does not follow its decoded replies: kept as Any.
        self._r: Any = None
        self._tail_r: Any = None
        self._owned: dict[str, _Owned] = {}
        self._mirrors: dict[str, _Mirror] = {}
        self._mirrors_changed = asyncio.Event()
        self._replies: dict[str, asyncio.Future[bus.CommandReply]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._pubsub: Any = None
        self._scripts: dict[str, Any] = {}
        self._conns: dict[str, int] = {}  # this process's open connections, per user
        self._followers: dict[str, set[_RedisFollow]] = {}  # thread: its followers here
        self._rejoining: asyncio.Task[None] | None = None
        #: Told of each run this process ended without its agent: failed for a lost
        #: node, or for Redis out of reach too long (to record it).
        self.on_run_lost: RunLost | None = None
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
        for name in (
            "FENCED_WRITE",
            "END_LOST_RUN",
            "RENEW_LEASE",
            "CLAIM_LOST_NODE",
            "OPEN_CONNECTION",
            "RESERVE_RUN",
            "COUNT_WATCHERS",
            "RELEASE_KEY",
        ):
            # Sent by hash, loaded again by redis-py when a restarted Redis lacks it.
            self._scripts[name] = self._r.register_script(getattr(lua, name))
        try:
            await self.r.ping()
            if not await self._renew_lease():
                raise BrokerUnavailable(f"process {self.node} was reaped; start it again")
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"cannot reach Redis at {_safe_url(self.url)}: {exc}") from exc
        self.reachable = True
        self._pubsub = self.r.pubsub(ignore_subscribe_messages=True)
        await self._pubsub.subscribe(*self._channels())
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
            # Runs elsewhere that this process's clients watched: their owners are told,
            # so that their detach grace starts (no reaper will: the lease is given up).
            self._mirrors.clear()
            await self._drop_watchers(self.node)
        with contextlib.suppress(Exception):
            if self._pubsub is not None:
                await self._pubsub.aclose()
            await self.r.delete(
                self.k("node", self.node), self.k("conns", self.node), self.k("watching", self.node)
            )
            await self.r.srem(self.k("nodes"), self.node)
        for client in (self._r, self._tail_r):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()
        self._r = self._tail_r = None

    def stats(self) -> BrokerStats:
        # Runs and their logs are kept in Redis, not in this process.
        return BrokerStats(counts=dict(self.counts))

    async def healthy(self) -> bool:
        try:
            async with asyncio.timeout(2):
                await self.r.ping()
            self.reachable = True
        except (RedisError, OSError, TimeoutError, BrokerUnavailable):
            self.reachable = False
        return self.reachable

    def _script(self, name: str, keys: list[str], args: list[Any]) -> Awaitable[Any]:
        return self._scripts[name](keys=keys, args=args)  # type: ignore[no-any-return]

    async def _fenced_write(self, run_id: str, commands: list[lua.Command]) -> bool:
        """Run ``commands`` unless this process may no longer write the run."""
        keys = [self.k("run", run_id), self.k("fenced", self.node)]
        done = await self._script("FENCED_WRITE", keys, [self.node, *lua.flatten(commands)])
        return bool(done)

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
        fields = _record_fields(record, self.node)
        commands: list[lua.Command] = [
            ["HSET", run_key, *_pairs(fields)],
            ["SADD", self.k("runs", self.node), record.run_id],
            ["SADD", self.k("active", record.owner), record.run_id],
            ["ZADD", self.k("thread", record.thread_id), record.created_at, record.run_id],
        ]
        if not await self._call("create run", self._fenced_write(record.run_id, commands)):
            self._fenced_out()
            raise BrokerUnavailable("this process is joining Redis again; try again shortly")
        self._owned[record.run_id] = _Owned(record, controller)
        # Followers of the thread, on every process (this one included), watch it now.
        announced = bus.encode(bus.run_created(record.thread_id, record.run_id))
        with contextlib.suppress(BrokerUnavailable):
            await self._call("announce run", self.r.publish(self.k("threads"), announced))

    async def get_run(self, run_id: str) -> RunRecord | None:
        raw = await self._call("get run", self.r.hgetall(self.k("run", run_id)))
        return _record_from(run_id, raw) if raw else None

    async def set_status(self, run_id: str, status: str, error_code: str | None = None) -> None:
        fields: dict[str, Any] = {"status": status, "updated_at": time.time()}
        if error_code is not None:
            fields["error_code"] = error_code
        owned = self._owned.get(run_id)
        ended = is_terminal(status)
        if owned is None and ended:
            # Its agent_completed was appended with the status, in one step: nothing
            # is left to write (and a Redis that just restarted cannot fail it).
            return
        commands: list[lua.Command] = [["HSET", self.k("run", run_id), *_pairs(fields)]]
        if ended and owned is not None:
            commands.append(["SREM", self.k("active", owned.record.owner), run_id])
            commands.append(["ZREM", self.k("thread", owned.record.thread_id), run_id])
            commands.append(["SREM", self.k("runs", self.node), run_id])
        if not await self._call("set status", self._fenced_write(run_id, commands)):
            # Reaped: the run's ending is another process's; this one stops it.
            if owned is not None:
                self._lose(owned)
            self._fenced_out()

    async def active_runs(self, owner: str) -> int:
        return int(await self._call("active runs", self.r.scard(self.k("active", owner))))

    # Threads ------------------------------------------------------------------------

    def _channels(self) -> list[str]:
        return [self.k("bus", self.node), self.k("threads")]

    async def thread_runs(self, thread_id: str) -> list[str]:
        key = self.k("thread", thread_id)
        raw = await self._call("thread runs", self.r.zrange(key, 0, -1))
        going: list[str] = []
        for item in raw:
            run_id = item.decode() if isinstance(item, bytes) else str(item)
            record = await self.get_run(run_id)
            if record is None or record.ended:
                # Ended without this set knowing (its process was lost): forget it here.
                await self._call("thread runs", self.r.zrem(key, run_id))
                continue
            going.append(run_id)
        return going

    async def follow_thread(self, thread_id: str, announce: RunAnnounced) -> _RedisFollow:
        follow = _RedisFollow(thread_id, announce, self._followers)
        self._followers.setdefault(thread_id, set()).add(follow)
        return follow

    # Per-user limits, shared by every process ----------------------------------------

    async def connection_opened(self, user: str, limit: int) -> bool:
        counted = await self._call(
            "count connections",
            self._script("OPEN_CONNECTION", [self.k("nodes")], [self.p, self.node, user, limit]),
        )
        if not counted:
            return False
        self._conns[user] = self._conns.get(user, 0) + 1
        return True

    async def connection_closed(self, user: str) -> None:
        left_here = self._conns.get(user, 0) - 1
        if left_here > 0:
            self._conns[user] = left_here
        else:
            self._conns.pop(user, None)
        with contextlib.suppress(BrokerUnavailable):
            left = await self._call(
                "count connections", self.r.hincrby(self.k("conns", self.node), user, -1)
            )
            if int(left) <= 0:
                await self._call("count connections", self.r.hdel(self.k("conns", self.node), user))

    async def reserve_run(
        self, user: str, *, max_active: int, per_window: int, window_s: float
    ) -> RunQuota:
        token = f"{self.node}/{secrets.token_hex(6)}"
        keys = [self.k("active", user), self.k("starting", user), self.k("rate", user)]
        now = time.time()
        args = [now, window_s, max_active, per_window, token, RESERVATION_HOLD_S]
        answer = await self._call("run limits", self._script("RESERVE_RUN", keys, args))
        verdict = int(answer[0])
        if verdict == 0:
            return RunQuota(token)
        if verdict == 1:
            return RunQuota(None, active=int(answer[1]))
        oldest = float(answer[1])
        return RunQuota(None, wait_s=max(0.001, oldest + window_s - now))

    async def release_run(self, user: str, token: str, *, started: bool) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.zrem(self.k("starting", user), token)
        if not started:
            pipe.zrem(self.k("rate", user), token)
        try:
            await self._call("run limits", pipe.execute())
        except BrokerUnavailable as exc:
            # The reservation lapses by itself after RESERVATION_HOLD_S.
            log.warning("releasing a run start of %s failed: %s", user, exc)

    async def claim_key(self, user: str, key: str, value: str, ttl_s: float) -> str | None:
        name = self.k("idem", user, key)
        ttl_ms = max(1, int(ttl_s * 1000))
        for _ in range(3):
            claimed = await self._call("claim key", self.r.set(name, value, nx=True, px=ttl_ms))
            if claimed:
                return None
            held = await self._call("claim key", self.r.get(name))
            if held is not None:
                return held.decode() if isinstance(held, bytes) else str(held)
            # Released or expired between the two calls: claim it again.
        raise BrokerUnavailable(f"the key {key[:32]!r} changed hands too often; try again")

    async def release_key(self, user: str, key: str, value: str) -> None:
        with contextlib.suppress(BrokerUnavailable):  # the claim lapses by itself
            await self._call(
                "release key",
                self._script("RELEASE_KEY", [self.k("idem", user, key)], [value]),
            )

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
        after ``outage_s`` the run is ended ``failed`` / ``broker_unavailable``
        by :meth:`_give_up`.  An append refused by the fence (this process was
        reaped) stops the run: its ending is the reaper's.
        """
        run_id = owned.record.run_id
        while owned.pending:
            batch = owned.pending[:FLUSH_BATCH]
            del owned.pending[:FLUSH_BATCH]
            pause, gave_up_at = 0.05, time.monotonic() + self.outage_s
            commands, applied = self._append_commands(owned, batch)
            while True:
                try:
                    appended = bool(await self._fenced_write(run_id, commands))
                    break
                except (RedisError, OSError) as exc:
                    self.reachable = False
                    if time.monotonic() > gave_up_at:
                        log.error("run %s: appending to Redis failed: %r", run_id, exc)
                        self._give_up(owned, exc)
                        return
                    log.warning("run %s: Redis unreachable (%r); trying again", run_id, exc)
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 1.0)
                    # The batch may have landed (whole: it is one script) before the
                    # connection broke; it is not appended twice.
                    if await self._landed(run_id, batch[-1].seq or 0):
                        appended = True
                        break
            self.reachable = True
            if appended:
                applied()
            if not appended:
                log.error("run %s: this process was reaped; its events are refused", run_id)
                self._lose(owned)
                self._fenced_out()
                return
            last = batch[-1] if batch else None
            if last is not None:
                owned.flushed_seq = last.seq or 0
                self._mirror_append(run_id, batch)
                if last.type == "agent_completed":
                    self._owned.pop(run_id, None)

    async def _landed(self, run_id: str, seq: int) -> bool:
        try:
            newest = await self.r.xrevrange(self.k("log", run_id), "+", "-", count=1)
        except (RedisError, OSError):
            return False
        return bool(newest) and _seq_of(newest[0][0]) >= seq

    def _append_commands(
        self, owned: _Owned, batch: list[Event]
    ) -> tuple[list[lua.Command], Callable[[], None]]:
        """The fenced write that appends ``batch`` with the run's record, and what to
        note once it is done."""
        record = owned.record
        run_id = record.run_id
        log_key, run_key = self.k("log", run_id), self.k("run", run_id)
        answer_key, calls_key = self.k("answer", run_id), self.k("calls", run_id)
        commands: list[lua.Command] = []
        added = [(event.seq or 0, kept_size(event)) for event in batch]
        text: list[str] = []
        opened: dict[str, str] = {}
        closed: list[str] = []
        responded = False
        for event in batch:
            commands.append(["XADD", log_key, _seq_id(event.seq or 0), "e", event.text])
            # What an ending written by another process needs, whatever the trim keeps.
            kind = event.type
            if kind == "response_chunk":
                text.append(event.data["text"])
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
                commands.append(["HSET", run_key, "responded", 1])
        progress = owned.progress
        if text:
            commands.append(["APPEND", answer_key, "".join(text)])
            commands.append(["HSET", run_key, "chunks", progress.chunks + len(text)])
        # The oldest first, over what the stream keeps and this batch, keeping the newest.
        kept, held = owned.sizes, owned.held + sum(size for _, size in added)
        count = len(kept) + len(added)

        def entry(i: int) -> tuple[int, int]:
            return kept[i] if i < len(kept) else added[i - len(kept)]

        drop, held = trim(held, self.max_bytes, count, lambda i: entry(i)[1])
        first_kept = entry(drop)[0] if drop else None
        if first_kept is not None:
            commands.append(["XTRIM", log_key, "MINID", _seq_id(first_kept)])
            commands.append(["HSET", run_key, "first_seq", first_kept])
        last = batch[-1]
        # A record that a restarted Redis lost is written again, whole.
        for name, value in _record_fields(record, self.node).items():
            if name not in ("first_seq", "last_seq", "updated_at"):
                commands.append(["HSETNX", run_key, name, value])
        commands.append(["HSET", run_key, "last_seq", last.seq or 0, "updated_at", last.ts])
        if last.type == "agent_completed":
            # The run's end and its status land together: whoever reads the record
            # after seeing agent_completed finds the run ended.
            final = last.data
            code = (final.get("error") or {}).get("code", "")
            commands.append(["HSET", run_key, "status", final["status"], "error_code", code])
            commands.append(["SREM", self.k("active", record.owner), run_id])
            commands.append(["SREM", self.k("runs", self.node), run_id])
            expire = max(1, int(self.window_s))
            for key in (log_key, run_key, self.k("watchers", run_id), answer_key, calls_key):
                commands.append(["EXPIRE", key, expire])
        else:
            commands.append(["SADD", self.k("runs", self.node), run_id])
            commands.append(["SADD", self.k("active", record.owner), run_id])

        def applied() -> None:
            progress.chunks += len(text)
            progress.chars += sum(len(t) for t in text)
            progress.open_calls.update(opened)
            for call_id in closed:
                progress.open_calls.pop(call_id, None)
            progress.responded = progress.responded or responded
            kept.extend(added)
            for _ in range(drop):
                kept.popleft()
            owned.held = held

        return commands, applied

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
            raise CursorAhead(
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
        keys = [self.k("watchers", run_id), self.k("watching", self.node)]
        try:
            total = await self._script("COUNT_WATCHERS", keys, [self.p, self.node, count, run_id])
            await self._tell_watchers(run_id, int(total), record)
        except (RedisError, OSError) as exc:
            log.warning("run %s: could not count watchers: %r", run_id, exc)

    async def _tell_watchers(self, run_id: str, total: int, record: RunRecord | None) -> None:
        """Tell the process executing the run how many watchers it has, over every process."""
        owned = self._owned.get(run_id)
        if owned is not None:
            owned.controller.watchers_changed(total)
            return
        record = record or await self.get_run(run_id)
        if record is not None and not record.ended and record.extra.get("node"):
            await self._send(str(record.extra["node"]), bus.watchers(run_id, total))

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
        return await self._remote(run_id, action)

    async def respond(self, run_id: str, request_id: str, payload: Mapping[str, Any]) -> str:
        owned = self._owned.get(run_id)
        if owned is not None:
            return await owned.controller.respond(request_id, payload)
        return await self._remote(run_id, RESPOND, {**payload, "request_id": request_id})

    async def _remote(self, run_id: str, action: str, payload: dict[str, Any] | None = None) -> str:
        """Send a command to the process that executes the run, and wait for its answer."""
        record = await self.get_run(run_id)
        if record is None:
            raise RunNotFound(f"no run {run_id}")
        node = str(record.extra.get("node") or "")
        if record.ended or not node:
            # Nothing executes it any more: answer as the lifecycle would.
            return _ended_answer(record, action)
        request_id = secrets.token_hex(8)
        future: asyncio.Future[bus.CommandReply] = asyncio.get_running_loop().create_future()
        self._replies[request_id] = future
        # In the run's trace (its context is in its record): the process running it
        # continues it from this span.
        carried = record.extra.get("traceparent")
        with tracing.command(
            f"chat.command {action}", run_id, action, carried if isinstance(carried, str) else None
        ) as span:
            span.set("chat.node", node)
            try:
                message = bus.command(
                    request_id, run_id, action, self.node, payload, tracing.current_traceparent()
                )
                await self._send(node, message)
                async with asyncio.timeout(COMMAND_TIMEOUT_S):
                    reply = await future
            except TimeoutError:
                raise BrokerUnavailable(f"the process running {run_id} did not answer") from None
            finally:
                self._replies.pop(request_id, None)
        if reply.error_code is not None:
            raise RemoteCommandError(reply.error_code, reply.error_message or "")
        return str(reply.status)

    async def _send(self, node: str, message: bus.Message) -> None:
        await self._call("publish", self.r.publish(self.k("bus", node), bus.encode(message)))

    async def _listen(self) -> None:
        while True:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
            except (RedisError, OSError) as exc:
                self.reachable = False
                log.warning("the command bus failed: %r; resubscribing", exc)
                await asyncio.sleep(0.5)
                with contextlib.suppress(Exception):
                    await self._pubsub.subscribe(*self._channels())
                continue
            if message is None:
                continue
            body = bus.decode(message["data"])
            if body is None:
                continue
            task = asyncio.get_running_loop().create_task(self._on_message(body))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _on_message(self, body: bus.Message) -> None:
        if isinstance(body, bus.RunCreated):
            for follower in list(self._followers.get(body.thread_id, ())):
                follower.announce(body.run_id)
        elif isinstance(body, bus.CommandReply):
            future = self._replies.get(body.id)
            if future is not None and not future.done():
                future.set_result(body)
        elif isinstance(body, bus.CommandRequest):
            owned = self._owned.get(body.run_id)
            answer: bus.CommandReply
            with tracing.command(
                f"chat.command.apply {body.action}", body.run_id, body.action, body.traceparent
            ) as span:
                span.set("chat.command.from", body.reply_to)
                try:
                    if owned is None:
                        record = await self.get_run(body.run_id)
                        if record is None:
                            raise RunNotFound(f"no run {body.run_id}")
                        answer = bus.reply(body.id, _ended_answer(record, body.action))
                    elif body.action == RESPOND:
                        payload = dict(body.payload or {})
                        request_id = str(payload.pop("request_id", ""))
                        status = await owned.controller.respond(request_id, payload)
                        answer = bus.reply(body.id, status)
                    else:
                        answer = bus.reply(body.id, await owned.controller.apply(body.action))
                except Exception as exc:
                    code = exc.code if isinstance(exc, WireError) else "internal"
                    answer = bus.failed(body.id, code, str(exc))
                    span.failed(code)
            with contextlib.suppress(BrokerUnavailable):
                await self._send(body.reply_to, answer)
        else:
            owned = self._owned.get(body.run_id)
            if owned is not None:
                owned.controller.watchers_changed(body.count)

    # Leases and lost nodes --------------------------------------------------------------

    async def _renew_lease(self) -> bool:
        """Renew this process's lease; False when it was reaped (fenced) meanwhile."""
        keys = [self.k("node", self.node), self.k("fenced", self.node), self.k("nodes")]
        args = [str(time.time()), int(self.lease_s * 1000), self.node]
        return bool(await self._script("RENEW_LEASE", keys, args))

    async def _keep_lease(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                renewed = await self._renew_lease()
                self.reachable = True
            except (RedisError, OSError) as exc:
                self.reachable = False
                self.counts["lease_renewal_failures"] += 1
                log.warning("renewing the lease failed: %r", exc)
                continue
            self.counts["lease_renewals"] += 1
            if not renewed:
                log.error("process %s was reaped while alive (its lease lapsed)", self.node)
                self._fenced_out()

    # Being reaped while alive -------------------------------------------------------

    def _lose(self, owned: _Owned) -> None:
        """Stop a run this process may no longer write: its ending is written elsewhere
        (or by :meth:`_give_up`); local watchers then read it from the stream."""
        run_id = owned.record.run_id
        if self._owned.get(run_id) is owned:
            del self._owned[run_id]
        owned.pending.clear()
        if owned.failure is None:
            owned.failure = BrokerUnavailable(f"this process no longer executes run {run_id}")
        owned.controller.lost()
        self._mirrors_changed.set()

    def _fenced_out(self) -> None:
        """This process was (or may have been) reaped: check, and join again if so."""
        self.counts["fence_refusals"] += 1
        if self._rejoining is None or self._rejoining.done():
            task = asyncio.get_running_loop().create_task(self._rejoin(), name="redis rejoin")
            self._rejoining = task

    async def _rejoin(self) -> None:
        old = self.node
        while True:
            try:
                if not await self.r.exists(self.k("fenced", old)):
                    return  # not reaped: a run's record names another process, that is all
                break
            except (RedisError, OSError) as exc:
                log.warning("checking this process's fence failed: %r", exc)
                await asyncio.sleep(0.5)
        self.counts["fenced"] += 1
        for owned in list(self._owned.values()):
            self._lose(owned)
            # Normally the reaper's; written here if no reaper did yet (written once).
            with contextlib.suppress(RedisError, OSError):
                await self._fail_lost_run(owned.record.run_id, old)
        self.epoch += 1
        self.node = f"{self._base_node}~{self.epoch}"
        while True:
            try:
                await self._renew_lease()
                await self._pubsub.subscribe(self.k("bus", self.node))
                with contextlib.suppress(RedisError, OSError):
                    await self._pubsub.unsubscribe(self.k("bus", old))
                if self._conns:
                    await self.r.hset(self.k("conns", self.node), mapping=dict(self._conns))
                break
            except (RedisError, OSError) as exc:
                log.warning("joining Redis again failed: %r; retrying", exc)
                await asyncio.sleep(0.5)
        for run_id, mirror in list(self._mirrors.items()):
            if mirror.watchers:
                await self._watchers_changed(run_id, None)
        log.warning("process %s joined again as %s", old, self.node)

    # Leases and lost nodes --------------------------------------------------------------

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
        """Fail the runs of every process whose lease lapsed; how many runs.

        The lost process is fenced first, so that nothing it still appends (were it
        alive after all) lands after the endings written here.  Its share of each
        run's watcher count goes with it, so the detach grace of runs it was the
        last to watch starts.
        """
        nodes = [
            n.decode() if isinstance(n, bytes) else n
            for n in await self.r.smembers(self.k("nodes"))
        ]
        reaped = 0
        for node in nodes:
            if node == self.node:
                continue
            keys = [self.k("node", node), self.k("fenced", node), self.k("reaping", node)]
            if not await self._script("CLAIM_LOST_NODE", keys, [self.node, FENCE_KEEP_S]):
                continue  # alive, or another process reaps it
            runs = await self.r.smembers(self.k("runs", node))
            for raw in runs:
                run_id = raw.decode() if isinstance(raw, bytes) else raw
                if await self._fail_lost_run(run_id, node):
                    reaped += 1
            await self._drop_watchers(node)
            pipe = self.r.pipeline(transaction=False)
            pipe.delete(
                self.k("runs", node),
                self.k("conns", node),
                self.k("watching", node),
                self.k("reaping", node),
            )
            pipe.srem(self.k("nodes"), node)
            await pipe.execute()
            self.counts["nodes_reaped"] += 1
            log.warning("process %s lost its lease; %d of its runs failed", node, len(runs))
        return reaped

    async def _drop_watchers(self, node: str) -> None:
        """Remove ``node``'s share of every run's watcher count; tell the runs' owners."""
        for raw in await self.r.smembers(self.k("watching", node)):
            run_id = raw.decode() if isinstance(raw, bytes) else raw
            keys = [self.k("watchers", run_id), self.k("watching", node)]
            total = await self._script("COUNT_WATCHERS", keys, [self.p, node, 0, run_id])
            await self._tell_watchers(run_id, int(total), None)

    async def _fail_lost_run(
        self,
        run_id: str,
        node: str,
        *,
        code: str = "node_lost",
        message: str = "the process running the run was lost",
        apology: str = NODE_LOST_APOLOGY,
    ) -> bool:
        """End a run of the lost process ``node`` with ``node_lost``, unless it ended.

        The ending is built from what the run's appends recorded (open tool calls,
        the answer so far), not from its stream, which may be trimmed.
        """
        record = await self.get_run(run_id)
        if record is None or record.ended or record.extra.get("node") != node:
            return False
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(self.k("calls", run_id))
        pipe.get(self.k("answer", run_id))
        pipe.hmget(self.k("run", run_id), "chunks", "responded")
        calls, answer, (chunk_count, responded) = await pipe.execute()
        state = RunState.resumed(
            seq=record.last_seq,
            open_calls={k.decode(): v.decode() for k, v in calls.items()},
            chunks=int(chunk_count or 0),
            responded=bool(responded),
            content=answer.decode() if answer else "",
        )
        ending = _ending(record, state, code=code, message=message, apology=apology)
        if not await self._write_ending(record, ending, node):
            return False
        if self.on_run_lost is not None:
            with contextlib.suppress(Exception):
                await self.on_run_lost(record)
        return True

    async def _write_ending(
        self, record: RunRecord, ending: list[Event], node: str, *, recreate: bool = False
    ) -> bool:
        """Append the ending of a run that ``node`` executed and record it failed, once:
        False when the run ended or moved on meanwhile.  ``record`` is updated.

        With ``recreate``, a run whose record Redis lost (restarted empty) is written
        again, with its ending only."""
        run_id = record.run_id
        log_key, run_key = self.k("log", run_id), self.k("run", run_id)
        last = ending[-1]
        code = last.data["error"]["code"]
        commands: list[lua.Command] = [
            ["XADD", log_key, _seq_id(event.seq or 0), "e", event.text] for event in ending
        ]
        now = time.time()
        fields = {
            **_record_fields(record, ""),
            "status": RunStatus.FAILED.value,
            "error_code": code,
            "last_seq": last.seq or 0,
            "updated_at": now,
        }
        fields.pop("first_seq")
        commands.append(["HSET", run_key, *_pairs(fields)])
        if recreate:
            commands.append(["HSETNX", run_key, "first_seq", ending[0].seq or 1])
        commands.append(["SREM", self.k("active", record.owner), run_id])
        commands.append(["SREM", self.k("runs", node), run_id])
        expire = max(1, int(self.window_s))
        for key in (
            log_key,
            run_key,
            self.k("watchers", run_id),
            self.k("answer", run_id),
            self.k("calls", run_id),
        ):
            commands.append(["EXPIRE", key, expire])
        args = [node, record.last_seq, int(recreate), *lua.flatten(commands)]
        if not await self._script("END_LOST_RUN", [run_key], args):
            return False
        record.status, record.error_code, record.last_seq = (
            RunStatus.FAILED.value,
            code,
            last.seq or 0,
        )
        record.updated_at = now
        return True

    # Runs whose events cannot reach Redis ------------------------------------------------

    def _give_up(self, owned: _Owned, exc: BaseException) -> None:
        """End a run whose events could not be appended for ``outage_s``.

        Its clients here get the ending at once (after the last event the stream
        holds: what every client saw); the store records it; the stream gets the
        same ending once Redis is back (tried for ``ENDING_RETRY_S``).
        """
        record = owned.record
        owned.failure = exc
        self._lose(owned)
        progress = owned.progress
        state = RunState.resumed(
            seq=owned.flushed_seq,
            open_calls=progress.open_calls,
            chunks=progress.chunks,
            responded=progress.responded,
            content=owned.controller.answer(progress.chars),
        )
        ending = _ending(
            record,
            state,
            code=OUTAGE_CODE,
            message="the run's events could not be kept: Redis was unreachable",
            apology=OUTAGE_APOLOGY,
        )
        self._mirror_append(record.run_id, ending)
        ended = dataclasses.replace(record, extra=dict(record.extra))
        task = asyncio.get_running_loop().create_task(self._end_when_back(ended, ending))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _end_when_back(self, record: RunRecord, ending: list[Event]) -> None:
        last = ending[-1]
        expected_last = (ending[0].seq or 1) - 1
        stored = dataclasses.replace(
            record,
            status=RunStatus.FAILED.value,
            error_code=OUTAGE_CODE,
            last_seq=last.seq or 0,
            updated_at=time.time(),
        )
        if self.on_run_lost is not None:
            with contextlib.suppress(Exception):
                await self.on_run_lost(stored)
        record.last_seq = expected_last
        node = self.node
        deadline = time.monotonic() + ENDING_RETRY_S
        while time.monotonic() < deadline:
            try:
                if await self._write_ending(record, ending, node, recreate=True):
                    return
                # The stream moved on: a batch landed whose reply was lost. The run is
                # ended from what Redis holds, unless another process ended it already.
                if await self._fail_lost_run(
                    record.run_id,
                    node,
                    code=OUTAGE_CODE,
                    message=ending[-1].data["error"]["message"],
                    apology=OUTAGE_APOLOGY,
                ):
                    log.warning("run %s: ended from what Redis kept", record.run_id)
                return
            except (RedisError, OSError):
                await asyncio.sleep(1.0)
        log.error("run %s: its ending could not be appended to Redis", record.run_id)


def _ending(
    record: RunRecord, state: RunState, *, code: str, message: str, apology: str
) -> list[Event]:
    """The events that end a run its agent cannot end, after ``state``'s last ``seq``
    (see :meth:`RunState.lost`)."""
    closing = state.lost(
        code=code,
        message=message,
        apology=apology,
        message_id=f"m_{secrets.token_urlsafe(12)}",
        duration_ms=(time.time() - record.created_at) * 1000,
    )
    run_id, thread, seq = record.run_id, record.thread_id, state.seq
    events: list[Event] = []
    for item in closing:
        seq += 1
        events.append(make_event(item.type, item.data(), run_id=run_id, thread_id=thread, seq=seq))
    return events


def _pairs(fields: dict[str, Any]) -> list[Any]:
    return [item for pair in fields.items() for item in pair]


def _ended_answer(record: RunRecord, action: str) -> str:
    """The answer for a run no process executes any more (the lifecycle's, for its end)."""
    if record.status == RunStatus.CANCELLED and action == Action.CANCEL:
        return record.status
    if action == RESPOND:
        raise RunConflict(f"run {record.run_id} has ended: its requests are resolved")
    raise RunConflict(f"cannot {action} run {record.run_id}: it is {record.status}")


def _record_fields(record: RunRecord, node: str) -> dict[str, Any]:
    fields: dict[str, Any] = {
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
    traceparent = record.extra.get("traceparent")
    if traceparent:
        # The run's trace context (traces on): commands from other processes join it.
        fields["traceparent"] = str(traceparent)
    return fields


def _record_from(run_id: str, raw: dict[bytes, bytes]) -> RunRecord:
    f = {k.decode(): v.decode() for k, v in raw.items()}
    return RunRecord(
        run_id,
        f.get("thread_id", ""),
        f.get("owner", ""),
        f.get("agent", ""),
        f.get("status", RunStatus.QUEUED.value),
        float(f.get("created_at", 0)),
        float(f.get("updated_at", 0)),
        int(f.get("last_seq", 0)),
        f.get("error_code") or None,
        _extra_of(f),
    )


def _extra_of(f: dict[str, str]) -> dict[str, object]:
    extra: dict[str, object] = {"node": f.get("node", ""), "first_seq": int(f.get("first_seq", 1))}
    if f.get("traceparent"):
        extra["traceparent"] = f["traceparent"]
    return extra


def _safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    head, sep, tail = url.partition("@")
    if not sep:
        return url
    scheme, _, _ = head.partition("://")
    return f"{scheme}://…@{tail}"

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

Every write of a run by its process is *fenced* (:data:`~bridge.redis_scripts.FENCED_WRITES`):
a reaper marks the lost process ``fenced`` before it ends that process's runs, and
an append is refused once the mark is there.  A process that was reaped while
alive (an event loop stalled past the lease, a partition from Redis) finds out at
its next append or lease renewal; its runs' endings are the reaper's, which its
own clients then read from the streams, and it joins again under a new name.
Limits and watcher counts are checked and counted in one script each.

:class:`RedisBroker` composes the parts, each a module of its own over one shared
:class:`~bridge.redis_core.RedisCore`: the registry (run records, the live-run
sets, per-user limits: :mod:`bridge.redis_registry`), the appender
(:mod:`bridge.redis_appender`), the watches and their ``XREAD`` loop
(:mod:`bridge.redis_watch`), the command bus (:mod:`bridge.redis_bus`) and leases,
the reaper and fencing (:mod:`bridge.redis_lease`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

from redis.exceptions import RedisError

from bridge.broker import (
    BrokerStats,
    RunAnnounced,
    RunController,
    RunLost,
    RunQuota,
    RunRecord,
    ThreadFollow,
    Wake,
)
from bridge.errors import BrokerUnavailable
from bridge.events import Event
from bridge.redis_appender import RedisAppender
from bridge.redis_bus import RedisBus
from bridge.redis_core import RedisCore, safe_url
from bridge.redis_lease import RedisLease
from bridge.redis_registry import RedisRegistry
from bridge.redis_watch import RedisWatch, RedisWatches

__all__ = ["RedisBroker"]


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
        max_connections: int = 100,
        append_window_s: float = 0.0,
    ) -> None:
        core = RedisCore(
            url,
            run_log_max_bytes=run_log_max_bytes,
            resume_window_s=resume_window_s,
            lease_s=lease_s,
            outage_s=outage_s,
            node=node,
            prefix=prefix,
            max_connections=max_connections,
            append_window_s=append_window_s,
        )
        self.core = core
        self.registry = core.registry = RedisRegistry(core)
        self.appender = RedisAppender(core)
        self.watches = core.watches = RedisWatches(core)
        self.bus = core.bus = RedisBus(core)
        self.lease = core.lease = RedisLease(core)
        self._tasks: list[asyncio.Task[None]] = []

    # What the rest of the gateway reads of it ---------------------------------------

    @property
    def url(self) -> str:
        return self.core.url

    @property
    def node(self) -> str:
        """This process's name in Redis (a new one after each rejoin)."""
        return self.core.node

    @property
    def epoch(self) -> int:
        return self.core.epoch

    @property
    def counts(self) -> dict[str, int]:
        return self.core.counts

    @property
    def reachable(self) -> bool:
        return self.core.reachable

    @property
    def on_run_lost(self) -> RunLost | None:
        return self.core.on_run_lost

    @on_run_lost.setter
    def on_run_lost(self, callback: RunLost | None) -> None:
        self.core.on_run_lost = callback

    @property
    def r(self) -> Any:
        return self.core.r

    def k(self, *parts: str) -> str:
        return self.core.k(*parts)

    # Lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        core = self.core
        core.connect()
        try:
            await core.r.ping()
            if not await self.lease.renew():
                raise BrokerUnavailable(f"process {core.node} was reaped; start it again")
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"cannot reach Redis at {safe_url(core.url)}: {exc}") from exc
        core.reachable = True
        core.pubsub = core.r.pubsub(ignore_subscribe_messages=True)
        await core.pubsub.subscribe(*core.channels())
        loop = asyncio.get_running_loop()
        for coro, name in (
            (self.bus.listen(), "bus"),
            (self.watches.tail(), "tail"),
            (self.lease.keep(), "lease"),
            (self.lease.janitor(), "janitor"),
        ):
            self._tasks.append(loop.create_task(coro, name=f"redis {name} {core.node}"))

    async def close(self) -> None:
        core = self.core
        for owned in list(core.owned.values()):
            with contextlib.suppress(Exception):
                await self.appender.drain(owned)
        tasks = [*self._tasks, *core.background]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        await self.lease.cancel_rejoin()
        with contextlib.suppress(Exception):
            # Runs elsewhere that this process's clients watched: their owners are told,
            # so that their detach grace starts (no reaper will: the lease is given up).
            core.mirrors.clear()
            await self.watches.drop_watchers(core.node)
        with contextlib.suppress(Exception):
            if core.pubsub is not None:
                await core.pubsub.aclose()
            await core.r.delete(
                core.k("node", core.node), core.k("conns", core.node), core.k("watching", core.node)
            )
            await core.r.srem(core.k("nodes"), core.node)
        await core.disconnect()

    def stats(self) -> BrokerStats:
        # Runs and their logs are kept in Redis, not in this process.
        return BrokerStats(counts=dict(self.core.counts))

    async def healthy(self) -> bool:
        core = self.core
        try:
            async with asyncio.timeout(2):
                await core.r.ping()
            core.reachable = True
        except (RedisError, OSError, TimeoutError, BrokerUnavailable):
            core.reachable = False
        return core.reachable

    # Registry -----------------------------------------------------------------------

    async def create_run(self, record: RunRecord, controller: RunController) -> None:
        await self.registry.create_run(record, controller)

    async def get_run(self, run_id: str) -> RunRecord | None:
        return await self.registry.get_run(run_id)

    async def set_status(self, run_id: str, status: str, error_code: str | None = None) -> None:
        await self.registry.set_status(run_id, status, error_code)

    async def thread_runs(self, thread_id: str) -> list[str]:
        return await self.registry.thread_runs(thread_id)

    async def follow_thread(self, thread_id: str, announce: RunAnnounced) -> ThreadFollow:
        return self.registry.follow_thread(thread_id, announce)

    async def claim_key(self, user: str, key: str, value: str, ttl_s: float) -> str | None:
        return await self.registry.claim_key(user, key, value, ttl_s)

    async def release_key(self, user: str, key: str, value: str) -> None:
        await self.registry.release_key(user, key, value)

    async def active_runs(self, owner: str) -> int:
        return await self.registry.active_runs(owner)

    async def live_runs(self) -> list[tuple[RunRecord, int, str]]:
        """Every live run of every process: its record, watchers, and executing process."""
        return await self.registry.live_runs()

    async def connection_opened(self, user: str, limit: int) -> bool:
        return await self.registry.connection_opened(user, limit)

    async def connection_closed(self, user: str) -> None:
        await self.registry.connection_closed(user)

    async def reserve_run(
        self, user: str, *, max_active: int, per_window: int, window_s: float
    ) -> RunQuota:
        return await self.registry.reserve_run(
            user, max_active=max_active, per_window=per_window, window_s=window_s
        )

    async def release_run(self, user: str, token: str, *, started: bool) -> None:
        await self.registry.release_run(user, token, started=started)

    # Event logs and lifecycle commands -------------------------------------------------

    async def publish(self, event: Event) -> None:
        appender = self.appender
        owned = appender.append(event)  # no second coroutine per event
        if owned is not None:
            await appender.drain(owned)

    async def watch(self, run_id: str, after_seq: int, wake: Wake) -> RedisWatch:
        return await self.watches.watch(run_id, after_seq, wake)

    async def command(self, run_id: str, action: str) -> str:
        return await self.bus.command(run_id, action)

    async def respond(self, run_id: str, request_id: str, payload: Mapping[str, Any]) -> str:
        return await self.bus.respond(run_id, request_id, payload)

    async def reap_lost_nodes(self) -> int:
        """Fail the runs of every process whose lease lapsed; how many runs."""
        return await self.lease.reap_lost_nodes()

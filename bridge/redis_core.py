"""What the parts of the Redis broker share: the connections and scripts, the keys,
this process's name in Redis, the runs it executes and the mirrors of the runs its
clients watch.

:class:`~bridge.redis.RedisBroker` builds one :class:`RedisCore` and the parts over
it (``registry``, ``appender``, ``watches``, ``bus``, ``lease``); the parts reach
each other through it, each as the small protocol declared here (no import circle).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final, Protocol

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

from bridge import bus
from bridge import redis_scripts as lua
from bridge.broker import Followers, RunController, RunLost, RunRecord, Wake
from bridge.errors import BrokerUnavailable
from bridge.events import Event
from bridge.log import RunLog
from bridge.runstate import RunState

log = logging.getLogger("chat.redis")

#: How long the XREAD loop blocks before it looks at the set of mirrored runs again.
TAIL_BLOCK_MS: Final = 100
#: How long a Redis call waits for a free pooled connection before it fails.
POOL_WAIT_S: Final = 5.0
#: Fenced writes (of as many runs) one script call applies at most: a call runs
#: whole, with every other client of the Redis waiting.
WRITES_PER_CALL: Final = 256
#: Commands one script call runs at most (one run's write may pass it alone), so that
#: many fast runs' batches of up to 512 events do not hold Redis in one long call.
COMMANDS_PER_CALL: Final = 32768
#: What a fenced write answers (:meth:`RedisCore.fenced_write`).
REFUSED: Final = 0
WRITTEN: Final = 1
MISSING: Final = 2
SCRIPTS: Final = (
    "FENCED_WRITES",
    "END_LOST_RUN",
    "RENEW_LEASE",
    "CLAIM_LOST_NODE",
    "OPEN_CONNECTION",
    "RESERVE_RUN",
    "COUNT_WATCHERS",
    "RELEASE_KEY",
)


#: How a fenced write is answered: with :data:`WRITTEN`, :data:`REFUSED` or
#: :data:`MISSING`, or the error that kept it from Redis.
Answer = Callable[[int | BaseException], None]


def _tell(answer: Answer, got: int | BaseException) -> None:
    """Answer one write; what its answer raises is logged, and the writer goes on to
    the others (other runs' writes among them)."""
    try:
        answer(got)
    except Exception:
        log.exception("handling a fenced write's answer failed")


def _answer_future(future: asyncio.Future[int], answer: int | BaseException) -> None:
    if future.done():
        return
    if isinstance(answer, asyncio.CancelledError):
        future.cancel()
    elif isinstance(answer, BaseException):
        future.set_exception(answer)
    else:
        future.set_result(answer)


def seq_id(seq: int) -> str:
    return f"0-{seq}"


def seq_of(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-", 1)[1])


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def pairs(fields: dict[str, Any]) -> list[Any]:
    return [item for pair in fields.items() for item in pair]


def safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    head, sep, tail = url.partition("@")
    if not sep:
        return url
    scheme, _, _ = head.partition("://")
    return f"{scheme}://…@{tail}"


def retry_once() -> Retry:
    """One more try, at once, of a command whose connection turned out dead (a
    connection error only: after a timeout the command may have run)."""
    return Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))


@dataclass(slots=True)
class Owned:
    """A run this process executes: its pending appends and what its stream holds."""

    record: RunRecord
    controller: RunController
    pending: list[Event] = field(default_factory=list)
    #: The events of the write on its way (or to be sent again), the oldest pending.
    batch: list[Event] | None = None
    #: Listed for the writer's next turn; a write of it on its way (at most one).
    queued: bool = False
    sending: bool = False
    #: The write goes with the whole record (Redis lost it), and since when it is tried.
    recreate: bool = False
    since: float = 0.0
    #: Told once nothing is pending or on its way (made only when someone waits).
    drained: asyncio.Future[None] | None = None
    failure: BaseException | None = None
    #: The run's keys its appends write (log, record, answer, calls), made once.
    keys: tuple[str, str, str, str] | None = None
    sizes: deque[tuple[int, int]] = field(default_factory=deque)  # (seq, bytes) kept
    held: int = 0
    flushed_seq: int = 0  # the last seq the stream holds
    #: What the appended events opened and said, for an ending written without them
    #: (the answer itself is the controller's: it holds the chunks anyway).
    progress: RunState = field(default_factory=lambda: RunState(keep_answer=False))


class Watcher(Protocol):
    """A local watch, as its run's mirror knows it."""

    wake: Wake


class Registry(Protocol):
    """What the other parts ask of :class:`~bridge.redis_registry.RedisRegistry`."""

    async def get_run(self, run_id: str) -> RunRecord | None: ...


class Watches(Protocol):
    """What the other parts ask of :class:`~bridge.redis_watch.RedisWatches`."""

    def mirror_append(self, run_id: str, events: list[Event]) -> None: ...

    async def watchers_changed(self, run_id: str, record: RunRecord | None) -> None: ...

    async def drop_watchers(self, node: str) -> None: ...


class Bus(Protocol):
    """What the other parts ask of :class:`~bridge.redis_bus.RedisBus`."""

    async def send(self, node: str, message: bus.Message) -> None: ...


class Lease(Protocol):
    """What the other parts ask of :class:`~bridge.redis_lease.RedisLease`."""

    def lose(self, owned: Owned) -> None: ...

    def fenced_out(self) -> None: ...

    async def write_ending(
        self, record: RunRecord, closing: list[Event], node: str, *, recreate: bool = False
    ) -> bool: ...

    async def fail_lost_run(
        self, run_id: str, node: str, *, code: str = ..., message: str = ..., apology: str = ...
    ) -> bool: ...


class Mirror:
    """This process's copy of a run's recent events, for its local watchers."""

    __slots__ = ("log", "watchers")

    def __init__(self, log: RunLog) -> None:
        self.log = log
        self.watchers: set[Watcher] = set()


class RedisCore:
    """The state every part of the Redis broker reads and writes."""

    def __init__(
        self,
        url: str,
        *,
        run_log_max_bytes: int,
        resume_window_s: float,
        lease_s: float,
        outage_s: float,
        node: str | None,
        prefix: str,
        max_connections: int,
        append_window_s: float = 0.0,
    ) -> None:
        self.url = url
        self.max_bytes = run_log_max_bytes
        self.window_s = resume_window_s
        self.lease_s = lease_s
        #: How long a run's events wait for an unreachable Redis before the run is ended.
        self.outage_s = outage_s
        #: Pooled connections to Redis at most (besides the stream reader's and the bus's).
        self.max_connections = max_connections
        #: How long the first fenced write waits for others to go with it.
        self.append_window_s = append_window_s
        self.base_node = node or f"n_{secrets.token_hex(6)}"
        #: This process's name in Redis; a new one each time it joins again after
        #: being reaped (its lease epoch is the name's suffix).
        self.node = self.base_node
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
        self.tail_r: Any = None
        self.pubsub: Any = None
        self.scripts: dict[str, Any] = {}
        self.owned: dict[str, Owned] = {}
        self.mirrors: dict[str, Mirror] = {}
        self.mirrors_changed = asyncio.Event()
        self.replies: dict[str, asyncio.Future[bus.CommandReply]] = {}
        self.background: set[asyncio.Task[None]] = set()
        self.conns: dict[str, int] = {}  # this process's open connections, per user
        #: Followers of threads in this process (thread id: its follows), told of each
        #: new run of the thread on any process.
        self.followers = Followers()
        #: Told of each run this process ended without its agent: failed for a lost
        #: node, or for Redis out of reach too long (to record it).
        self.on_run_lost: RunLost | None = None
        self.reachable = False
        #: Fenced writes waiting for the next pipeline, and the task that sends them.
        self._writes: list[tuple[list[Any], Answer]] = []
        self._writer: asyncio.Task[None] | None = None
        #: The appender's: every run's pending write, taken by the writer each turn.
        self.collect: Callable[[], list[tuple[list[Any], Answer]]] | None = None
        #: The appender's: whether a run has a write for the writer's next turn.
        self.collectable: Callable[[], bool] | None = None
        # The parts the others call, set by the broker that builds them.
        self.registry: Registry
        self.watches: Watches
        self.bus: Bus
        self.lease: Lease

    @property
    def r(self) -> Any:
        if self._r is None:
            raise BrokerUnavailable("the Redis broker is not started")
        return self._r

    def k(self, *parts: str) -> str:
        return self.p + ":".join(parts)

    def connect(self) -> None:
        """Make the clients (no round trip yet).

        A pooled connection that a restarted Redis closed fails its next command:
        that command is sent once more on a new connection.  More concurrent calls
        than the pool holds wait for a connection instead of failing as if Redis
        were down.
        """
        pool = aioredis.BlockingConnectionPool.from_url(
            self.url,
            max_connections=self.max_connections,
            timeout=POOL_WAIT_S,
            socket_timeout=5,
            socket_connect_timeout=5,
            health_check_interval=15,
            retry=retry_once(),
        )
        # The client owns the pool: closing it closes the pooled connections too.
        self._r = aioredis.Redis.from_pool(pool)
        self.tail_r = aioredis.Redis.from_url(
            self.url,
            socket_timeout=5 + TAIL_BLOCK_MS / 1000,
            socket_connect_timeout=5,
            retry=retry_once(),
        )
        for name in SCRIPTS:
            # Sent by hash, loaded again by redis-py when a restarted Redis lacks it.
            self.scripts[name] = self._r.register_script(getattr(lua, name))

    async def disconnect(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._writer
        for client in (self._r, self.tail_r):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()
        self._r = self.tail_r = None

    def channels(self) -> list[str]:
        """What this process listens to: its own bus, and new runs of every thread."""
        return [self.k("bus", self.node), self.k("threads")]

    def script(self, name: str, keys: list[str], args: list[Any]) -> Awaitable[Any]:
        return self.scripts[name](keys=keys, args=args)  # type: ignore[no-any-return]

    async def fenced_write(
        self, run_id: str, commands: list[lua.Command], *, if_recorded: bool = False
    ) -> int:
        """Run ``commands`` unless this process may no longer write the run:
        :data:`WRITTEN`, :data:`REFUSED`, or with ``if_recorded`` :data:`MISSING`
        (nothing written) when Redis holds no record of the run.

        Sent by the one writer (:meth:`send_writes`) with every other fenced write
        made meanwhile."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        # Numbers go as JSON numbers: Redis gives a script's numeric arguments to a
        # command with 17 significant digits, so a float reads back as the same float.
        write: list[Any] = [self.k("run", run_id), int(if_recorded), *commands]
        self._writes.append((write, partial(_answer_future, future)))
        self.wake_writer()
        return await future

    def wake_writer(self) -> None:
        """Have the writer send what is waiting: the fenced writes queued here and
        those the appender's ``collect`` makes (every run's pending events)."""
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_batches())

    async def _write_batches(self) -> None:
        """The one writer of this process's fenced writes.

        The writes made within ``append_window_s`` of the first (or while a batch
        is on its way) go to Redis together: one script call checks the fence once
        for up to :data:`WRITES_PER_CALL` of them (:data:`COMMANDS_PER_CALL`
        commands) and applies each; the calls of a turn go in one pipeline; each
        write is answered on its own, and a connection that breaks fails each.

        A writer woken from idle sends what waits at once, and once a call is
        answered with nothing new waiting it is idle again: the window gathers the
        writes of a busy process, and would only delay a lone run's (its first event
        among them)."""
        woken = True
        while True:
            if not woken and self.append_window_s > 0:
                if not self._writes and not (self.collectable and self.collectable()):
                    return  # nothing came while the last call was on its way: idle
                # Each later turn gathers for the window: the runs answered in the last
                # one come back with what their agents published meanwhile.
                await asyncio.sleep(self.append_window_s)
            woken = False
            batch, self._writes = self._writes, []
            try:
                if self.collect is not None:
                    batch += self.collect()
            except Exception as exc:  # the writes taken are answered, not left waiting
                log.exception("collecting the runs' writes failed")
                for _, answer in batch:
                    _tell(answer, exc)
                continue
            if not batch:
                return
            calls: list[list[tuple[list[Any], Answer]]] = [[]]
            size = 0
            for item in batch:
                commands = len(item[0]) - 2
                if calls[-1] and (
                    len(calls[-1]) >= WRITES_PER_CALL or size + commands > COMMANDS_PER_CALL
                ):
                    calls.append([])
                    size = 0
                calls[-1].append(item)
                size += commands
            while calls:
                calls = await self._send_writes(calls)

    async def _send_writes(
        self, calls: list[list[tuple[list[Any], Answer]]]
    ) -> list[list[tuple[list[Any], Answer]]]:
        """Send ``calls`` (each one script call's writes) in one pipeline; answer
        each write; the calls to send again (a restarted Redis lacked the script)."""
        script = self.scripts["FENCED_WRITES"]
        fence = self.k("fenced", self.node)
        try:
            # Built inside the try: whatever fails here answers every write with it,
            # rather than leaving them (other users' runs among them) waiting.
            pipe = self.r.pipeline(transaction=False)
            for call in calls:
                payload = orjson.dumps([write for write, _ in call])
                pipe.evalsha(script.sha, 1, fence, self.node, payload)
            results = await pipe.execute(raise_on_error=False)
        except asyncio.CancelledError:
            for call in calls:
                for _, answer in call:
                    _tell(answer, asyncio.CancelledError())
            raise
        except Exception as exc:
            for call in calls:
                for _, answer in call:
                    _tell(answer, exc)
            return []
        again = []
        for call, result in zip(calls, results, strict=True):
            if isinstance(result, NoScriptError):
                again.append(call)
                continue
            answers = result if isinstance(result, list) else [result] * len(call)
            for (_, answer), got in zip(call, answers, strict=True):
                if isinstance(got, BaseException):
                    _tell(answer, got)
                elif isinstance(got, bytes | str):
                    _tell(answer, ResponseError(text(got)))
                else:
                    _tell(answer, int(got))
        if again:
            try:
                await self.r.script_load(lua.FENCED_WRITES)
            except (RedisError, OSError) as exc:
                for call in again:
                    for _, answer in call:
                        _tell(answer, exc)
                return []
        return again

    async def call(self, what: str, coro: Awaitable[Any]) -> Any:
        """Await a Redis call; its failure becomes :class:`BrokerUnavailable`."""
        try:
            result = await coro
        except (RedisError, OSError) as exc:
            self.reachable = False
            raise BrokerUnavailable(f"Redis is unreachable ({what})") from exc
        self.reachable = True
        return result

    def forget_mirror(self, run_id: str) -> None:
        """Drop the mirror of ``run_id`` if no watcher here reads it and this process no
        longer executes the run (an executed run's mirror holds it from the start)."""
        mirror = self.mirrors.get(run_id)
        if mirror is not None and not mirror.watchers and run_id not in self.owned:
            del self.mirrors[run_id]

    def spawn(self, coro: Coroutine[Any, Any, None], name: str | None = None) -> None:
        """Run ``coro`` in the background; cancelled when the broker closes."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

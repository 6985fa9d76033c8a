"""The services behind every endpoint, and the owner checks they all share.

Endpoints (WebSocket sessions, SSE and REST routes) only ever reach runs through
this object, which reaches them only through the broker: no endpoint touches
another session's objects or an agent's task.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agents.base import ClientTool, ClientToolResult
from agents.errors import LifecycleConflict
from agents.registry import llm_agent
from agents.supervisor import RunError, new_id
from bridge.broker import Broker, RunAnnounced, RunRecord, ThreadFollow, Wake, Watch
from bridge.errors import ResumeUnavailable, RunConflict, RunNotFound
from bridge.wire import ErrorCode
from server.auth import Authenticator, Principal
from server.compose import Services, build_services, make_broker
from server.errors import DuplicateConflict, ProtocolError, RateLimited, ShuttingDown
from server.metrics import MetricsSnapshot
from server.sessions import CHECK_EVERY_S, Counters, LocalSession, SessionRegistry
from server.settings import Settings
from server.store import ThreadRow

log = logging.getLogger("chat")

THREAD_DELETED = RunError("cancelled", "the thread was deleted")

__all__ = ["Gateway", "Sent", "llm_agent", "make_broker"]

#: How long a repeated send waits for the run its first send is starting (another
#: process may be creating it) before it answers with what it has.
CLAIM_WAIT_S = 10.0
#: How much longer than a cancel and its wait a thread's turn may be held, in seconds.
TURN_MARGIN_S = 5.0
#: How often a message waiting for its thread's turn tries again, in seconds.
TURN_POLL_S = 0.005


@dataclass(frozen=True, slots=True)
class Sent:
    """The answer to a send: the run it started, or the one its key started before."""

    record: RunRecord
    duplicate: bool = False


def idempotency_key(key: str | int) -> str:
    """A client's key as the broker holds it: strings and integers kept apart."""
    return f"s:{key}" if isinstance(key, str) else f"i:{key}"


def content_digest(content: str) -> str:
    return hashlib.sha256(content.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def frontend_key(protocol: str, *parts: str | None) -> str:
    """An idempotency key a front-end route makes from the request's own ids and text:
    ``parts`` are kept apart whatever they hold (ids may contain any character), and the
    protocol's name keeps its keys apart from the other routes'."""
    digest = hashlib.sha256()
    for part in parts:  # each length-prefixed, so no two lists of parts hash alike
        data = b"-" if part is None else b"s" + part.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return f"{protocol}:{digest.hexdigest()[:40]}"


class Gateway:
    def __init__(
        self,
        settings: Settings,
        auth: Authenticator,
        *,
        broker: Broker | None = None,
        services: Services | None = None,
    ) -> None:
        built = services or build_services(settings, broker=broker)
        self.settings = settings
        self.auth = auth
        self.broker: Broker = built.broker
        self.agents = built.agents
        self.tools = built.tools
        self.store = built.store
        self.metrics = built.metrics
        self.persistence = built.persistence
        self.supervisor = built.supervisor
        self.metrics.bind(self.metrics_snapshot)
        self.persistence.observe_write = self.metrics.store_write.observe
        self.counters = Counters()
        self.shutting_down = False
        #: The clients connected to this process.
        self.clients = SessionRegistry(
            self.broker,
            self.counters,
            max_per_user=settings.max_connections_per_user,
            check_every_s=min(CHECK_EVERY_S, settings.send_timeout_s / 4),
        )
        self.persistence.on_refused = self._refused_by_store

    # Sessions -----------------------------------------------------------------

    async def add_session(self, session: LocalSession) -> bool:
        """Count a new connection; False when its user already has the most allowed
        (counted across every process sharing the broker)."""
        return await self.clients.add(session)

    async def remove_session(self, session: LocalSession) -> None:
        await self.clients.remove(session)

    def count_delivered(self, events: int) -> None:
        self.counters.events_delivered += events

    def memory_report(self) -> dict[str, int]:
        """What the process holds for runs, for the health route."""
        stats = self.broker.stats()
        report = {"runs_in_memory": stats.runs_in_memory, "run_log_bytes": stats.run_log_bytes}
        # What clients have not been sent yet: bytes their cursors still hold in the
        # run logs, which stay alive (even past the resume window) until read or cut.
        report["sse_streams"] = self.counters.sse_streams
        report["outbound_buffered_bytes"] = self.clients.buffered_bytes()
        return report

    def metrics_snapshot(self) -> MetricsSnapshot:
        """The counts ``/metrics`` reports, read when scraped."""
        counters = self.counters
        return MetricsSnapshot(
            connections=counters.connections,
            sse_streams=counters.sse_streams,
            outbound_buffered_bytes=self.clients.buffered_bytes(),
            runs=self.supervisor.statuses(),
            runs_started=counters.runs_started,
            events_emitted=self.supervisor.events_emitted(),
            events_delivered=counters.events_delivered,
            slow_consumer_closes=counters.slow_consumer_closes,
            auth_failures=counters.auth_failures,
            rate_limited=counters.rate_limited,
            store_failures=self.persistence.failures,
            inputs=self.supervisor.input_counts(),
            slow_consumer_by=dict(counters.slow_consumer_by),
            resumes_recovered=counters.resumes_recovered,
            resumes_unavailable=counters.resumes_unavailable,
            outbound_lag=self._outbound_lag(),
            broker_counts=self.broker.stats().counts,
        )

    def _outbound_lag(self) -> dict[str, tuple[int, int]]:
        lag: dict[str, tuple[int, int]] = {}
        for transport in ("ws", "sse"):
            held = [s.buffered_bytes() for s in self.sessions() if s.transport == transport]
            lag[transport] = (sum(held), max(held, default=0))
        return lag

    def sessions(self) -> list[LocalSession]:
        return self.clients.all()

    async def start(self) -> None:
        await self.store.open()
        self.persistence.start()
        if not self.broker.shared:
            # Runs are this process's alone: whatever is unfinished died with the last one.
            # With a shared broker, other processes may be running theirs; a dead
            # process's runs are failed by lease instead (node_lost).
            failed = await self.store.fail_unfinished_runs("server_restart", time.time())
            if failed:
                log.warning("marked %d runs left unfinished by the last process failed", failed)
        # Deleted threads whose last runs ended without recording it (their process died).
        await self.store.purge_deleted_threads()
        await self.broker.start()
        self.clients.start()

    async def drain(self, close_code: int) -> None:
        """Shut down gracefully: no new runs; runs finish for up to the grace, then are
        cancelled with ``shutdown``; every session gets its runs' last events, then
        ``close_code``."""
        if self.shutting_down:
            return
        self.shutting_down = True
        await self.supervisor.shutdown(self.settings.shutdown_grace_s)
        sessions = self.sessions()
        for session in sessions:
            session.close(close_code, "server shutting down")
        if sessions:
            await asyncio.wait([asyncio.create_task(s.closed.wait()) for s in sessions], timeout=5)

    async def close(self) -> None:
        self.clients.stop()
        self.shutting_down = True
        await self.supervisor.shutdown(self.settings.shutdown_grace_s)
        await self.broker.close()
        await self.persistence.stop()
        await self.store.close()

    async def start_run(
        self,
        user: Principal,
        content: str,
        *,
        thread_id: str | None = None,
        agent: str | None = None,
        ref: str | int | None = None,
        run_id: str | None = None,
        on_active: str | None = None,
        restate: str | None = None,
        prepare: Callable[[], Awaitable[None]] | None = None,
        client_tools: Sequence[ClientTool] = (),
        tool_results: Sequence[ClientToolResult] = (),
    ) -> RunRecord:
        """Start a run of ``content`` (see ``Supervisor.start_run``); ``prepare`` is
        awaited once the user's limits let the run start, just before it does."""
        if self.shutting_down:
            raise ShuttingDown("the server is shutting down; start the run again shortly")
        uid = user.user_id
        # Checked and counted in one step by the broker (across processes with Redis),
        # so that requests arriving together cannot all pass the same check.
        quota = await self.broker.reserve_run(
            uid,
            max_active=self.settings.max_active_runs_per_user,
            per_window=self.settings.rate_limit_per_minute,
            window_s=60.0,
        )
        if quota.token is None:
            self.counters.rate_limited += 1
            if quota.wait_s > 0:
                limit = self.settings.rate_limit_per_minute
                raise RateLimited(
                    f"more than {limit} new runs in a minute; "
                    f"try again in {math.ceil(quota.wait_s)} s"
                )
            limit = self.settings.max_active_runs_per_user
            raise RateLimited(f"{quota.active} runs are still going; at most {limit} at once")
        started = False
        policy = on_active or self.settings.on_active
        try:
            async with self._thread_turn(user, thread_id):
                # Every run of a named thread takes its place in the thread's queue, so
                # that messages sent at once run one after the other, not side by side
                # (a regenerate's message is in the thread already: it is not queued).
                queued = thread_id is not None and restate is None
                if thread_id is not None and restate is None:
                    await self._double_text(user, thread_id, policy)
                elif thread_id is not None and await self._runs_going(user, thread_id):
                    # A regenerate: the answer it replaces must stay the thread's last.
                    raise ProtocolError(
                        ErrorCode.CONFLICT,
                        "a run of this chat is still going: stop or cancel it before regenerating",
                    )
                if prepare is not None:
                    await prepare()
                record = await self.supervisor.start_run(
                    owner=uid,
                    content=content,
                    thread_id=thread_id,
                    agent=agent,
                    ref=ref,
                    run_id=run_id,
                    queued=queued,
                    restate=restate,
                    client_tools=client_tools,
                    tool_results=tool_results,
                )
            started = True  # only runs that started count against the per-minute window
        finally:
            await self.broker.release_run(uid, quota.token, started=started)
        self.counters.runs_started += 1
        return record

    async def send(
        self,
        user: Principal,
        content: str,
        *,
        thread_id: str | None = None,
        agent: str | None = None,
        ref: str | int | None = None,
        key: str | int | None = None,
        on_active: str | None = None,
        client_tools: Sequence[ClientTool] = (),
        tool_results: Sequence[ClientToolResult] = (),
    ) -> Sent:
        """Start a run for a message, once per idempotency ``key`` within the window.

        The key is claimed in the broker (atomically, across processes) with the run
        id the message will get and a digest of its content, before the run starts.
        A repeat finds the claim: same content, it answers the run of the first send
        (waiting while that run is being created); other content is a conflict.  A
        first send that starts nothing (a limit, an unknown agent) gives the key up.
        """
        if key is None:
            return Sent(
                await self.start_run(
                    user,
                    content,
                    thread_id=thread_id,
                    agent=agent,
                    ref=ref,
                    on_active=on_active,
                    client_tools=client_tools,
                    tool_results=tool_results,
                )
            )
        uid = user.user_id
        name = idempotency_key(key)
        digest = content_digest(content)
        window = self.settings.idempotency_window_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLAIM_WAIT_S
        while True:
            run_id = new_id("r_")
            mine = f"{run_id} {digest}"
            held = await self.broker.claim_key(uid, name, mine, window)
            if held is None:
                try:
                    record = await self.start_run(
                        user,
                        content,
                        thread_id=thread_id,
                        agent=agent,
                        ref=ref,
                        run_id=run_id,
                        on_active=on_active,
                        client_tools=client_tools,
                        tool_results=tool_results,
                    )
                except BaseException:
                    await self.broker.release_key(uid, name, mine)
                    raise
                return Sent(record)
            held_run, _, held_digest = held.partition(" ")
            if held_digest != digest:
                raise DuplicateConflict(
                    f"id {str(key)[:64]!r} was sent with other content (run {held_run})"
                )
            found = await self.broker.get_run(held_run)
            if found is None:
                stored = await self.store.get_run(held_run)
                if stored is not None and stored.owner == uid:
                    found = RunRecord(
                        stored.id,
                        stored.thread_id,
                        stored.owner,
                        stored.agent,
                        stored.status,
                        stored.created_at,
                        stored.updated_at,
                        stored.last_seq,
                        stored.error_code,
                    )
            if found is not None and found.owner == uid:
                self.counters.duplicate_sends += 1
                return Sent(found, duplicate=True)
            if loop.time() >= deadline:
                raise ShuttingDown(
                    f"the run of id {str(key)[:64]!r} is still being started; send it again"
                )
            await asyncio.sleep(0.02)  # the first send is creating it, or gives the key up

    @contextlib.asynccontextmanager
    async def _thread_turn(self, user: Principal, thread_id: str | None) -> AsyncIterator[None]:
        """Hold the thread's turn, in the broker, while a message to it (or a
        regenerate) looks at the thread's runs, applies its policy and creates its run:
        messages sent at once (through two processes, say) are handled one after the
        other, so that each sees the runs of those before it (``reject`` refuses,
        ``interrupt`` cancels, ``enqueue`` queues behind them, a regenerate is refused)
        instead of several finding the thread idle.  A turn its process never gives
        back lapses after three store timeouts and ten seconds.
        """
        if thread_id is None:  # a new thread: nobody else can name it yet
            yield
            return
        uid = user.user_id
        name = f"turn:{thread_id}"
        mine = new_id("turn_")
        # The longest a turn is held: the runs' cancel and wait, a rollback's removal,
        # the thread's opening and the run's first record, each bounded by the store's
        # timeout; and a margin.
        hold_s = 3 * self.settings.store_timeout_s + 5 + TURN_MARGIN_S
        loop = asyncio.get_running_loop()
        deadline = loop.time() + hold_s
        while await self.broker.claim_key(uid, name, mine, hold_s) is not None:
            if loop.time() >= deadline:
                raise RunConflict(
                    f"another message to thread {thread_id} is still being handled; send again"
                )
            await asyncio.sleep(TURN_POLL_S)
        try:
            yield
        finally:
            await self.broker.release_key(uid, name, mine)

    async def _runs_going(self, user: Principal, thread_id: str) -> list[RunRecord]:
        """The user's runs of the thread not ended, oldest first, as the broker has them."""
        going: list[RunRecord] = []
        for run_id in await self.broker.thread_runs(thread_id):
            record = await self.broker.get_run(run_id)
            if record is not None and not record.ended and record.owner == user.user_id:
                going.append(record)
        return going

    async def _double_text(self, user: Principal, thread_id: str, policy: str) -> None:
        """Apply ``policy`` to the thread's runs not ended (contract section 6.2), before
        the new run takes its place in the thread's queue: ``enqueue`` leaves them;
        ``reject`` refuses the new run; ``interrupt`` and ``rollback`` end them first, so
        the new run begins at once.
        """
        if policy == "enqueue":
            return
        going = await self._runs_going(user, thread_id)
        if not going:
            return
        if policy == "reject":
            names = ", ".join(r.run_id for r in going)
            raise RunConflict(f"thread {thread_id} has a run going ({names}); nothing was sent")
        code = "interrupted" if policy == "interrupt" else "rolled_back"
        for record in going:
            with contextlib.suppress(RunConflict, RunNotFound, LifecycleConflict):
                await self.broker.command(record.run_id, f"cancel:{code}")
        # Waited for together: the thread's turn is held meanwhile.
        await asyncio.gather(*(self._until_ended(record.run_id) for record in going))
        if policy == "rollback":
            await asyncio.gather(*(self.persistence.forget_run(record) for record in going))

    async def _until_ended(self, run_id: str) -> None:
        """Wait for a cancelled run's ``agent_completed`` (its answer is stored before
        it), for at most the store timeout and five seconds more."""
        record = await self.broker.get_run(run_id)
        if record is None:
            return
        woken = asyncio.Event()
        try:
            watch = await self.broker.watch(run_id, record.last_seq, woken.set)
        except (RunNotFound, ResumeUnavailable):
            return  # forgotten already: long ended
        try:
            async with asyncio.timeout(self.settings.store_timeout_s + 5):
                while not watch.finished:
                    woken.clear()
                    if not await watch.read(256):
                        await woken.wait()
        except TimeoutError:
            log.warning("run %s: not ended after its cancel; the new run starts anyway", run_id)
        finally:
            watch.close()

    async def regenerate(
        self,
        user: Principal,
        thread_id: str,
        *,
        agent: str | None = None,
        answer_ref: str | None = None,
    ) -> RunRecord:
        """Answer a thread's last user message again, in place of the answer it had:
        that answer is removed from the thread and the user's message is not stored
        again.  ``answer_ref`` is the client's id of the answer it regenerates
        (``<run_id>:answer``); only the last answer can be.

        Raises:
            RunNotFound: no such thread of the user's.
            ProtocolError: ``conflict``: a run of the thread is still going, the thread
                does not end with an answer to a user message, ``answer_ref`` names
                another answer, or another regenerate took the answer first.
        """
        thread = await self.store.get_thread(thread_id)
        if thread is None:
            raise ProtocolError(ErrorCode.CONFLICT, "this chat has no answer to regenerate")
        if thread.owner != user.user_id:
            raise RunNotFound(f"no thread {thread_id}")
        if await self.store.unfinished_runs(thread_id, user.user_id):
            raise ProtocolError(
                ErrorCode.CONFLICT,
                "a run of this chat is still going: stop or cancel it before regenerating",
            )
        last = await self.store.recent_messages(thread_id, 2)
        if len(last) < 2 or last[-1].role != "assistant" or last[-2].role != "user":
            raise ProtocolError(ErrorCode.CONFLICT, "this chat has no answer to regenerate")
        question, answer = last
        if answer_ref is not None and answer_ref != f"{answer.run_id}:answer":
            raise ProtocolError(
                ErrorCode.CONFLICT, "only the chat's last answer can be regenerated"
            )

        async def drop_answer() -> None:
            # The delete decides between regenerates sent together: one removes the answer.
            changed = await self.store.write(self.store.message_delete_steps(answer.id, thread_id))
            if not changed or changed[0] == 0:
                raise ProtocolError(ErrorCode.CONFLICT, "this answer is being regenerated already")

        return await self.start_run(
            user,
            question.content,
            thread_id=thread_id,
            agent=agent,
            restate=question.id,
            prepare=drop_answer,
        )

    async def find_run(self, user: Principal, run_id: str) -> RunRecord:
        """The user's run; someone else's is as unknown as a missing one."""
        record = await self.broker.get_run(run_id)
        if record is None or record.owner != user.user_id:
            raise RunNotFound(f"no run {run_id}")
        return record

    async def run_status(self, user: Principal, run_id: str) -> dict[str, object]:
        """The run's status, from memory while it is there, else from the store."""
        record = await self.broker.get_run(run_id)
        if record is not None:
            if record.owner != user.user_id:
                raise RunNotFound(f"no run {run_id}")
            public = record.public()
            public["usage"] = None
            if record.ended:
                # The tokens a run used are in its stored record once it has ended.
                try:
                    stored = await self.store.get_run(run_id)
                except Exception:
                    stored = None  # the store is out: the status without the tokens
                public["usage"] = stored.usage if stored is not None else None
            return public
        row = await self.store.get_run(run_id)
        if row is None or row.owner != user.user_id:
            raise RunNotFound(f"no run {run_id}")
        return {
            "run_id": row.id,
            "thread_id": row.thread_id,
            "agent": row.agent,
            "status": row.status,
            "last_seq": row.last_seq,
            "created_at": row.created_at,
            "updated_at": row.updated_at,
            "error_code": row.error_code,
            "usage": row.usage,
        }

    # Threads ------------------------------------------------------------------

    async def own_thread(self, user: Principal, thread_id: str) -> ThreadRow:
        thread = await self.store.get_thread(thread_id)
        if thread is None or thread.owner != user.user_id:
            raise RunNotFound(f"no thread {thread_id}")
        return thread

    async def follow_thread(
        self, user: Principal, thread_id: str, announce: RunAnnounced
    ) -> tuple[ThreadFollow, list[str]]:
        """Follow the user's thread: ``announce`` gets each run created from now on (by
        any process); the answer's list, the runs of it not ended yet.

        Followed before the runs are listed, so a run created meanwhile is in one or
        both (a follower watches each run once).
        """
        await self.own_thread(user, thread_id)
        follow = await self.broker.follow_thread(thread_id, announce)
        try:
            going = await self.broker.thread_runs(thread_id)
        except BaseException:
            follow.close()
            raise
        return follow, going

    async def delete_thread(self, user: Principal, thread_id: str) -> None:
        """Delete a thread, its messages and runs, and cancel its runs still going.

        The store orders the delete against every run's start: a run's first record is
        written only if its thread is still there and its owner's, in one transaction
        with that check.  So a run either was recorded before the delete, and is
        cancelled here, or finds the thread deleted, and is cancelled as its record is
        refused (:meth:`_refused_by_store`).  The thread's id stays taken until the
        runs it had have ended.
        """
        if not await self.store.delete_thread(thread_id, user.user_id, time.time()):
            raise RunNotFound(f"no thread {thread_id}")
        for handle in self.supervisor.runs_of_thread(thread_id):
            if handle.record.owner == user.user_id:
                handle.cancel_for(THREAD_DELETED)
        # Runs of the thread that other processes execute (shared broker) are cancelled
        # through the broker; the store knows which are still going.
        for run_id in await self.store.unfinished_runs(thread_id, user.user_id):
            with contextlib.suppress(Exception):  # ended meanwhile, or its process is gone
                await self.broker.command(run_id, "cancel")

    def _refused_by_store(self, run: RunRecord) -> None:
        """A write of the run was refused: its thread was deleted (or passed to another
        user) after the run started.  Nothing of it is stored; it must not go on."""
        for handle in self.supervisor.runs_of_thread(run.thread_id):
            if handle.run_id == run.run_id and handle.cancel_for(THREAD_DELETED):
                log.warning(
                    "run %s: its thread %s was deleted; cancelled", run.run_id, run.thread_id
                )

    async def control(self, user: Principal, run_id: str, action: str) -> str:
        await self.find_run(user, run_id)
        return await self.broker.command(run_id, action)

    async def respond(
        self, user: Principal, run_id: str, request_id: str, payload: Mapping[str, Any]
    ) -> str:
        """Answer an input request of one of the user's runs, wherever it executes."""
        await self.find_run(user, run_id)
        return await self.broker.respond(run_id, request_id, payload)

    async def watch(
        self, user: Principal, run_id: str, after_seq: int, wake: Wake, *, resume: bool = False
    ) -> Watch:
        """Watch a run's events after ``after_seq``; a ``resume`` (of a run the client
        watched before) is counted, recovered or ``resume_unavailable``."""
        await self.find_run(user, run_id)
        try:
            watch = await self.broker.watch(run_id, after_seq, wake)
        except ResumeUnavailable:
            self.counters.resumes_unavailable += resume
            raise
        self.counters.resumes_recovered += resume
        return watch

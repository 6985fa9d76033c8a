"""The services behind every endpoint, and the owner checks they all share.

Endpoints (WebSocket sessions, SSE and REST routes) only ever reach runs through
this object, which reaches them only through the broker: no endpoint touches
another session's objects or an agent's task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from agents.base import ClientTool, ClientToolResult
from agents.registry import llm_agent
from agents.supervisor import RunError
from bridge.broker import Broker, RunRecord, Wake, Watch
from bridge.errors import ResumeUnavailable, RunNotFound
from bridge.wire import ErrorCode
from server.auth import Authenticator, Principal
from server.compose import Services, build_services, make_broker
from server.errors import ProtocolError, RateLimited, ShuttingDown
from server.metrics import MetricsSnapshot
from server.sessions import CHECK_EVERY_S, Counters, LocalSession, SessionRegistry
from server.settings import Settings
from server.store import ThreadRow

log = logging.getLogger("chat")

THREAD_DELETED = RunError("cancelled", "the thread was deleted")

__all__ = ["Gateway", "llm_agent", "make_broker"]


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
        try:
            if prepare is not None:
                await prepare()
            record = await self.supervisor.start_run(
                owner=uid,
                content=content,
                thread_id=thread_id,
                agent=agent,
                ref=ref,
                restate=restate,
                client_tools=client_tools,
                tool_results=tool_results,
            )
            started = True  # only runs that started count against the per-minute window
        finally:
            await self.broker.release_run(uid, quota.token, started=started)
        self.counters.runs_started += 1
        return record

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

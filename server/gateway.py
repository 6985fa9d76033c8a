"""The services behind every endpoint, and the owner checks they all share.

Endpoints (WebSocket sessions, SSE and REST routes) only ever reach runs through
this object, which reaches them only through the broker: no endpoint touches
another session's objects or an agent's task.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Protocol

from agents.base import AgentRegistry
from agents.demo import DemoAgent
from agents.load import LoadAgent
from agents.supervisor import Supervisor, SupervisorConfig
from agents.tools import builtin_tools
from bridge.broker import Broker, RunRecord, Wake, Watch
from bridge.errors import RunNotFound
from bridge.memory import InMemoryBroker
from server.auth import Authenticator, Principal
from server.errors import ProtocolError, RateLimited, ShuttingDown
from server.limits import SlidingWindow
from server.settings import Settings


@dataclass(slots=True)
class Counters:
    """Plain counts the health route reports."""

    started_at: float = field(default_factory=time.time)
    connections: int = 0
    runs_started: int = 0
    rate_limited: int = 0
    slow_consumer_closes: int = 0
    auth_failures: int = 0


class LocalSession(Protocol):
    """What the gateway needs of a session in this process: its user, and a way to close it."""

    user_id: str

    def close(self, code: int, reason: str, *, drain: bool = True) -> None: ...

    @property
    def closed(self) -> asyncio.Event: ...


class Gateway:
    def __init__(
        self,
        settings: Settings,
        auth: Authenticator,
        *,
        broker: Broker | None = None,
    ) -> None:
        self.settings = settings
        self.auth = auth
        self.broker: Broker = broker or InMemoryBroker(
            run_log_max_bytes=settings.run_log_max_bytes,
            resume_window_s=settings.resume_window_s,
        )
        self.agents = AgentRegistry([DemoAgent(), LoadAgent()], default=settings.default_agent)
        self.supervisor = Supervisor(
            self.broker,
            self.agents,
            builtin_tools(),
            SupervisorConfig(
                detach_grace_s=settings.detach_grace_s,
                typing_delay_ms=settings.typing_delay_ms,
            ),
        )
        self.counters = Counters()
        self.shutting_down = False
        self._sessions: dict[str, set[LocalSession]] = {}
        self._new_runs = SlidingWindow(settings.rate_limit_per_minute, 60.0)

    # Sessions -----------------------------------------------------------------

    def add_session(self, session: LocalSession) -> bool:
        """Count a new connection; False when its user already has the most allowed."""
        sessions = self._sessions.setdefault(session.user_id, set())
        if len(sessions) >= self.settings.max_connections_per_user:
            return False
        sessions.add(session)
        self.counters.connections += 1
        return True

    def remove_session(self, session: LocalSession) -> None:
        sessions = self._sessions.get(session.user_id)
        if sessions is not None and session in sessions:
            sessions.discard(session)
            self.counters.connections -= 1
            if not sessions:
                del self._sessions[session.user_id]

    def memory_report(self) -> dict[str, int]:
        """What the process holds for runs, for the health route."""
        report = {"runs_in_memory": 0, "run_log_bytes": 0}
        if isinstance(self.broker, InMemoryBroker):
            report["runs_in_memory"] = self.broker.runs_in_memory()
            report["run_log_bytes"] = self.broker.held_bytes()
        return report

    def sessions(self) -> list[LocalSession]:
        return [s for group in self._sessions.values() for s in group]

    async def start(self) -> None:
        await self.broker.start()

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
        self.shutting_down = True
        await self.supervisor.shutdown(self.settings.shutdown_grace_s)
        await self.broker.close()

    async def start_run(
        self,
        user: Principal,
        content: str,
        *,
        thread_id: str | None = None,
        agent: str | None = None,
        ref: str | int | None = None,
    ) -> RunRecord:
        if self.shutting_down:
            raise ShuttingDown("the server is shutting down; start the run again shortly")
        await self._check_run_limits(user)
        record = await self.supervisor.start_run(
            owner=user.user_id, content=content, thread_id=thread_id, agent=agent, ref=ref
        )
        self.counters.runs_started += 1
        return record

    async def _check_run_limits(self, user: Principal) -> None:
        active = await self.broker.active_runs(user.user_id)
        limit = self.settings.max_active_runs_per_user
        if active >= limit:
            self.counters.rate_limited += 1
            raise RateLimited(f"{active} runs are still going; at most {limit} at once")
        now = time.monotonic()
        if not self._new_runs.allow(user.user_id, now):
            self.counters.rate_limited += 1
            wait = self._new_runs.retry_after(user.user_id, now)
            raise RateLimited(
                f"more than {self._new_runs.limit} new runs in a minute; try again in {wait:.0f} s"
            )
        if len(self._new_runs) > 10_000:
            self._new_runs.forget_idle(now)

    async def find_run(self, user: Principal, run_id: str) -> RunRecord:
        """The user's run; someone else's is as unknown as a missing one."""
        record = await self.broker.get_run(run_id)
        if record is None or record.owner != user.user_id:
            raise RunNotFound(f"no run {run_id}")
        return record

    async def control(self, user: Principal, run_id: str, action: str) -> str:
        await self.find_run(user, run_id)
        return await self.broker.command(run_id, action)

    async def watch(self, user: Principal, run_id: str, after_seq: int, wake: Wake) -> Watch:
        await self.find_run(user, run_id)
        try:
            return await self.broker.watch(run_id, after_seq, wake)
        except ValueError as exc:
            raise ProtocolError("bad_message", str(exc)) from None

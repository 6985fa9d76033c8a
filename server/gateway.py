"""The services behind every endpoint, and the owner checks they all share.

Endpoints (WebSocket sessions, SSE and REST routes) only ever reach runs through
this object, which reaches them only through the broker: no endpoint touches
another session's objects or an agent's task.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from agents.base import AgentRegistry
from agents.demo import DemoAgent
from agents.load import LoadAgent
from agents.supervisor import Supervisor, SupervisorConfig
from agents.tools import builtin_tools
from bridge.broker import Broker, RunRecord, Wake, Watch
from bridge.errors import RunNotFound
from bridge.memory import InMemoryBroker
from server.auth import Authenticator, Principal
from server.errors import ProtocolError
from server.settings import Settings


@dataclass(slots=True)
class Counters:
    """Plain counts the health route reports."""

    started_at: float = field(default_factory=time.time)
    connections: int = 0
    runs_started: int = 0


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

    async def start(self) -> None:
        await self.broker.start()

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
        record = await self.supervisor.start_run(
            owner=user.user_id, content=content, thread_id=thread_id, agent=agent, ref=ref
        )
        self.counters.runs_started += 1
        return record

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

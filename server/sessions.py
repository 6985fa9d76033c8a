"""The clients connected to this process: counted against the per-user cap, and policed.

Every WebSocket session and SSE stream is registered here for its lifetime.  The
registry counts them (across processes through the broker), reports them to the
health route and the metrics, and runs the one task that asks each client's outbox
whether it must be cut.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Final, Protocol

from bridge.broker import Broker
from server.flags import Waitable
from server.outbox import Outbox

#: How often each client's outbox is asked whether it must be cut, at most (more
#: often when a quarter of ``CHAT_SEND_TIMEOUT_S`` is shorter).
CHECK_EVERY_S: Final = 1.0


@dataclass(slots=True)
class Counters:
    """Plain counts the health route reports."""

    started_at: float = field(default_factory=time.time)
    connections: int = 0
    runs_started: int = 0
    rate_limited: int = 0
    sse_streams: int = 0
    slow_consumer_closes: int = 0
    auth_failures: int = 0
    events_delivered: int = 0
    #: Slow-consumer closes by transport (``ws``, ``sse``).
    slow_consumer_by: dict[str, int] = field(default_factory=lambda: {"ws": 0, "sse": 0})
    #: Resumes (a watch after a seq) that replayed the run, and those answered
    #: ``resume_unavailable``.
    resumes_recovered: int = 0
    resumes_unavailable: int = 0
    #: Sends whose idempotency key had started a run already (answered with that run).
    duplicate_sends: int = 0


class LocalSession(Protocol):
    """What the gateway needs of a client in this process (a WebSocket session or an
    SSE stream): its user, a way to close it, and its outbox's verdict."""

    user_id: str
    #: ``"ws"`` or ``"sse"``.
    transport: str
    #: Its outbound side, whose verdict :meth:`check` acts on.
    box: Outbox

    def close(self, code: int, reason: str, *, drain: bool = True) -> None: ...

    def check(self, now: float) -> None:
        """Cut the client if its outbox says it must be (``now`` on the loop's clock)."""
        ...

    def buffered_bytes(self) -> int:
        """Bytes published to its runs that it has not been sent yet."""
        ...

    @property
    def closed(self) -> Waitable: ...


class SessionRegistry:
    """The process's clients, by user."""

    def __init__(
        self, broker: Broker, counters: Counters, *, max_per_user: int, check_every_s: float
    ) -> None:
        self.broker = broker
        self.counters = counters
        self.max_per_user = max_per_user
        #: How often each client's outbox is asked whether it must be cut.
        self.check_every_s = check_every_s
        self._by_user: dict[str, set[LocalSession]] = {}
        self._watchdog: asyncio.Task[None] | None = None

    async def add(self, session: LocalSession) -> bool:
        """Count a new connection; False when its user already has the most allowed
        (counted across every process sharing the broker)."""
        if not await self.broker.connection_opened(session.user_id, self.max_per_user):
            return False
        self._by_user.setdefault(session.user_id, set()).add(session)
        if session.transport == "sse":
            self.counters.sse_streams += 1
        else:
            self.counters.connections += 1
        return True

    async def remove(self, session: LocalSession) -> None:
        sessions = self._by_user.get(session.user_id)
        if sessions is not None and session in sessions:
            sessions.discard(session)
            if session.transport == "sse":
                self.counters.sse_streams -= 1
            else:
                self.counters.connections -= 1
            if not sessions:
                del self._by_user[session.user_id]
            await self.broker.connection_closed(session.user_id)

    def all(self) -> list[LocalSession]:
        return [s for group in self._by_user.values() for s in group]

    def buffered_bytes(self) -> int:
        """Bytes published to the clients' runs that they have not been sent yet."""
        return sum(s.buffered_bytes() for s in self.all())

    def start(self) -> None:
        self._watchdog = asyncio.get_running_loop().create_task(self._police())

    def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()

    async def _police(self) -> None:
        """Ask every client's outbox, a few times per ``CHAT_SEND_TIMEOUT_S``, whether it
        must be cut (send stalled, unread bytes over the buffer, token expired).

        One task for every client of the process: an idle connection costs no timer.
        Only the clients whose outbox's verdict can be a cut are asked: those in a
        send (stalled, or over the buffer while stalled) and those whose token has
        expired.  The outbox of any other answers nothing, and its record of a stuck
        send is of a send that has completed since (it counts them), so skipping it
        changes no verdict: with 10,000 idle connections this is most of the idle
        CPU that is not the keepalive pings.
        """
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.check_every_s)
            now = loop.time()
            for session in self.all():
                box = session.box
                if box.in_send or (box.expires_at is not None and now >= box.expires_at):
                    session.check(now)

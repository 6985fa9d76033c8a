"""The broker seam: run registry, per-run event logs and lifecycle commands.

Everything the gateway shares between sessions goes through :class:`Broker`.
Sessions never touch each other, nor the agent's task: they create runs, watch
their logs with a cursor and send lifecycle commands, all through this
interface.  :class:`~bridge.memory.InMemoryBroker` implements it for one
process; an implementation over a networked store can replace it without
touching the endpoints or the agents.

Watching is *pull*: a :class:`Watch` is a cursor into a run's log plus a wake-up
callback.  Publishing appends to the log and calls the wake-ups; each reader then
reads what it has not read yet, at its own pace.  Nothing is copied per watcher,
a slow reader costs no memory beyond the log (which is bounded), and a reader
that fell behind further than the log keeps gets :class:`ResumeUnavailable`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from bridge.events import Event
from bridge.wire import is_terminal

Wake = Callable[[], None]
#: Told the id of each new run of a followed thread.
RunAnnounced = Callable[[str], None]


class ThreadFollow(Protocol):
    """A follower of a thread's new runs; :meth:`close` stops the announcements."""

    thread_id: str

    def close(self) -> None: ...


class _Follow:
    __slots__ = ("_by_thread", "announce", "thread_id")

    def __init__(
        self, thread_id: str, announce: RunAnnounced, by_thread: dict[str, set[_Follow]]
    ) -> None:
        self.thread_id = thread_id
        self.announce = announce
        self._by_thread = by_thread

    def close(self) -> None:
        follows = self._by_thread.get(self.thread_id)
        if follows is not None:
            follows.discard(self)
            if not follows:
                del self._by_thread[self.thread_id]


class Followers:
    """The followers of threads in one process: whom to tell of a thread's new runs.
    Each broker keeps one; how a new run reaches it (a call, a bus message) is the
    broker's."""

    def __init__(self) -> None:
        self._by_thread: dict[str, set[_Follow]] = {}

    def follow(self, thread_id: str, announce: RunAnnounced) -> ThreadFollow:
        follow = _Follow(thread_id, announce, self._by_thread)
        self._by_thread.setdefault(thread_id, set()).add(follow)
        return follow

    def announce(self, thread_id: str, run_id: str) -> None:
        for follow in list(self._by_thread.get(thread_id, ())):
            follow.announce(run_id)


@dataclass(frozen=True, slots=True)
class BrokerStats:
    """What a broker holds in this process's memory, for the health route."""

    #: Runs whose record and log this process keeps.
    runs_in_memory: int = 0
    #: Bytes of events kept for resume, over those runs.
    run_log_bytes: int = 0
    #: The broker's own counts for the metrics (with Redis: lease renewals, fencing).
    counts: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RunQuota:
    """The answer to reserving a run start against a user's limits."""

    #: Names the reservation when granted; None when a limit refused it.
    token: str | None
    #: When refused for the active-runs limit: the user's runs going or being started.
    active: int = 0
    #: When refused for the per-window limit: seconds until a start is allowed.
    wait_s: float = 0.0


@dataclass(slots=True)
class RunRecord:
    """What the registry knows of a run; the answer of the status route."""

    run_id: str
    thread_id: str
    owner: str
    agent: str
    status: str
    created_at: float
    updated_at: float
    last_seq: int = 0
    error_code: str | None = None
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def ended(self) -> bool:
        return is_terminal(self.status)

    def copy(self) -> RunRecord:
        """A copy, as :func:`dataclasses.replace` makes (``extra`` shared), at a fifth
        of its cost: records are copied several times per run start."""
        return RunRecord(
            self.run_id,
            self.thread_id,
            self.owner,
            self.agent,
            self.status,
            self.created_at,
            self.updated_at,
            self.last_seq,
            self.error_code,
            self.extra,
        )

    def public(self) -> dict[str, object]:
        return {
            "run_id": self.run_id,
            "thread_id": self.thread_id,
            "agent": self.agent,
            "status": self.status,
            "last_seq": self.last_seq,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "error_code": self.error_code,
        }


class RunController(Protocol):
    """The side of a run that its agent's process owns: lifecycle and attachment."""

    async def apply(self, action: str) -> str:
        """Apply ``stop``, ``start`` or ``cancel``; return the status after it.

        Raises an error whose ``code`` is ``conflict`` for an illegal transition.
        """
        ...

    def watchers_changed(self, count: int) -> None:
        """The number of attached watchers of the run changed to ``count``."""
        ...

    def answer(self, chars: int) -> str:
        """The first ``chars`` characters of the run's answer (its chunks' texts in order)."""
        ...

    async def respond(self, request_id: str, payload: Mapping[str, Any]) -> str:
        """Answer the run's input request ``request_id``; return the status it leads to.

        Raises an error whose ``code`` is ``not_found`` (no such request), ``conflict``
        (already resolved) or ``bad_message`` (the answer does not fit the request).
        """
        ...

    def lost(self) -> None:
        """The broker ended the run without it: stop, publishing and recording nothing more.

        Called when this process may no longer write the run (another process ended
        it ``node_lost``) or could not reach the broker for too long.
        """
        ...


class Watch(Protocol):
    """A reader's cursor into one run's log."""

    run_id: str
    #: ``seq`` of the last event read.
    cursor: int

    async def read(self, limit: int) -> list[Event]:
        """Read up to ``limit`` events after the cursor and advance it.

        Raises:
            ResumeUnavailable: the next event the cursor needs was dropped.
        """
        ...

    def lag_bytes(self) -> int:
        """Bytes published to the run that this reader has not read yet."""
        ...

    @property
    def finished(self) -> bool:
        """True once the reader has read the run's ``agent_completed``."""
        ...

    def close(self) -> None:
        """Detach; the wake-up is never called again."""
        ...


#: Told of a run the broker ended without its agent (its process was lost, or the
#: broker was out of reach too long), with the record as it ended.
RunLost = Callable[["RunRecord"], Awaitable[None]]


class Broker(Protocol):
    """Run registry, event logs and lifecycle commands, shared by every session."""

    name: str
    #: Whether other processes share the runs: when False, a run is this process's
    #: alone and whatever the last process left unfinished died with it.
    shared: bool
    #: Called for each run the broker ended itself (a broker that never does, never calls it).
    on_run_lost: RunLost | None

    def stats(self) -> BrokerStats:
        """What the broker holds in this process's memory."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    # Registry -----------------------------------------------------------------
    async def create_run(self, record: RunRecord, controller: RunController) -> None:
        """Register a new run, its empty log, and the controller that executes commands."""
        ...

    async def get_run(self, run_id: str) -> RunRecord | None:
        """A copy of the run's record, or None when it is unknown or expired."""
        ...

    async def set_status(self, run_id: str, status: str, error_code: str | None = None) -> None:
        """Record the run's new status."""
        ...

    async def active_runs(self, owner: str) -> int:
        """How many of the owner's runs have not ended."""
        ...

    async def healthy(self) -> bool:
        """Whether the broker can be used right now."""
        ...

    # Per-user limits, counted wherever the broker's processes are ------------------
    async def connection_opened(self, user: str, limit: int) -> bool:
        """Count a connection of ``user``; False (and not counted) when it would pass ``limit``."""
        ...

    async def connection_closed(self, user: str) -> None: ...

    async def reserve_run(
        self, user: str, *, max_active: int, per_window: int, window_s: float
    ) -> RunQuota:
        """Check ``user``'s run limits and count one run start against them, atomically.

        The reservation counts as an active run until :meth:`release_run`, and as a
        start in the window unless released with ``started=False``.
        """
        ...

    async def release_run(self, user: str, token: str, *, started: bool) -> None:
        """End a reservation: the run was created (it counts by itself now) or refused."""
        ...

    # Threads: their runs not ended, and new runs announced to followers -----------
    async def thread_runs(self, thread_id: str) -> list[str]:
        """Ids of the thread's runs not ended, oldest first."""
        ...

    async def follow_thread(self, thread_id: str, announce: RunAnnounced) -> ThreadFollow:
        """Call ``announce`` with the id of every run of the thread created from now on,
        by any process, once the run exists (its events may be watched from seq 0)."""
        ...

    # Idempotency keys, claimed once wherever the broker's processes are ----------
    async def claim_key(self, user: str, key: str, value: str, ttl_s: float) -> str | None:
        """Claim ``user``'s ``key`` with ``value`` for ``ttl_s``, atomically.

        Returns None when this call claimed it, else the value of the claim already
        held (by any process).
        """
        ...

    async def release_key(self, user: str, key: str, value: str) -> None:
        """Give up a claim made with ``value`` (a claim since taken by another stays)."""
        ...

    # Event logs ---------------------------------------------------------------
    async def publish(self, event: Event) -> None:
        """Append the run's next event to its log and wake its watchers."""
        ...

    async def watch(self, run_id: str, after_seq: int, wake: Wake) -> Watch:
        """Attach a reader at ``after_seq``.

        Raises:
            RunNotFound: no such run.
            CursorAhead: ``after_seq`` is beyond the run's last event.
            ResumeUnavailable: events after ``after_seq`` were dropped.
        """
        ...

    # Lifecycle ----------------------------------------------------------------
    async def command(self, run_id: str, action: str) -> str:
        """Deliver a lifecycle command to the run's controller; return its new status."""
        ...

    async def respond(self, run_id: str, request_id: str, payload: Mapping[str, Any]) -> str:
        """Deliver an answer to one of the run's input requests to its controller, in
        whichever process executes it; return the status it leads to."""
        ...

"""The in-memory broker: one process, no external service."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Mapping
from typing import Any

from bridge.broker import (
    BrokerStats,
    Followers,
    RunAnnounced,
    RunController,
    RunLost,
    RunQuota,
    RunRecord,
    ThreadFollow,
    Wake,
)
from bridge.errors import CursorAhead, RunNotFound
from bridge.events import Event
from bridge.limits import SlidingWindow
from bridge.log import RunLog
from bridge.retention import Retention


class _Slot:
    __slots__ = ("controller", "expiry", "log", "record", "watchers")

    def __init__(self, record: RunRecord, log: RunLog, controller: RunController) -> None:
        self.record = record
        self.log = log
        self.controller = controller
        self.watchers: set[_MemoryWatch] = set()
        self.expiry: asyncio.TimerHandle | None = None


class _MemoryWatch:
    __slots__ = ("_closed", "_slot", "cursor", "run_id", "wake")

    def __init__(self, slot: _Slot, cursor: int, wake: Wake) -> None:
        self._slot = slot
        self.run_id = slot.record.run_id
        self.cursor = cursor
        self.wake = wake
        self._closed = False

    async def read(self, limit: int) -> list[Event]:
        return self.read_now(limit)

    def read_now(self, limit: int) -> list[Event]:
        """:meth:`read` without a coroutine: the log is in this process's memory."""
        events = self._slot.log.read(self.cursor, limit)
        if events:
            self.cursor = events[-1].seq or self.cursor
        return events

    def lag_bytes(self) -> int:
        return self._slot.log.lag_bytes(self.cursor)

    @property
    def finished(self) -> bool:
        log = self._slot.log
        return log.closed and self.cursor >= log.last_seq

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        slot = self._slot
        slot.watchers.discard(self)
        slot.controller.watchers_changed(len(slot.watchers))


class InMemoryBroker:
    """Registry, logs and commands held in this process's memory.

    Finished runs stay for ``resume_window_s`` after their ``agent_completed``,
    then their record and log are forgotten; earlier when the finished runs of their
    owner hold more than ``user_log_max_bytes`` together (the oldest first, see
    :class:`~bridge.retention.Retention`).
    """

    name = "memory"
    shared = False

    def __init__(
        self,
        *,
        run_log_max_bytes: int,
        resume_window_s: float,
        user_log_max_bytes: int = 1 << 62,
    ) -> None:
        #: Never called: runs in memory end only by their agents.
        self.on_run_lost: RunLost | None = None
        self._max_bytes = run_log_max_bytes
        self._window = resume_window_s
        self._runs: dict[str, _Slot] = {}
        self._active: dict[str, set[str]] = {}
        self._connections: dict[str, int] = {}
        self._rate: SlidingWindow | None = None
        self._reserved: dict[str, int] = {}  # run starts under way, per user
        self._reservations: dict[str, tuple[str, float]] = {}  # token: (user, hit time)
        self._claims: dict[tuple[str, str], tuple[str, float]] = {}  # (user, key): (value, until)
        self._thread_runs: dict[str, list[str]] = {}  # thread: its runs not ended, oldest first
        self._followers = Followers()
        self._retention = Retention(user_log_max_bytes)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        for slot in self._runs.values():
            if slot.expiry is not None:
                slot.expiry.cancel()
        self._runs.clear()

    # Registry -----------------------------------------------------------------

    async def create_run(self, record: RunRecord, controller: RunController) -> None:
        if record.run_id in self._runs:
            raise ValueError(f"run {record.run_id} exists already")
        self._runs[record.run_id] = _Slot(
            record.copy(), RunLog(record.run_id, self._max_bytes), controller
        )
        if not record.ended:
            self._active.setdefault(record.owner, set()).add(record.run_id)
            self._thread_runs.setdefault(record.thread_id, []).append(record.run_id)
            self._followers.announce(record.thread_id, record.run_id)

    async def get_run(self, run_id: str) -> RunRecord | None:
        slot = self._runs.get(run_id)
        return None if slot is None else slot.record.copy()

    def live_runs(self) -> list[tuple[RunRecord, int]]:
        """Every run not ended, with its number of watchers (the operator's view)."""
        return [
            (slot.record.copy(), len(slot.watchers))
            for slot in self._runs.values()
            if not slot.record.ended
        ]

    async def set_status(self, run_id: str, status: str, error_code: str | None = None) -> None:
        slot = self._slot(run_id)
        record = slot.record
        record.status = status
        record.updated_at = time.time()
        if error_code is not None:
            record.error_code = error_code
        if record.ended:
            active = self._active.get(record.owner)
            if active is not None:
                active.discard(run_id)
                if not active:
                    del self._active[record.owner]
            going = self._thread_runs.get(record.thread_id)
            if going is not None and run_id in going:
                going.remove(run_id)
                if not going:
                    del self._thread_runs[record.thread_id]

    async def active_runs(self, owner: str) -> int:
        return len(self._active.get(owner, ()))

    async def healthy(self) -> bool:
        return True

    async def thread_runs(self, thread_id: str) -> list[str]:
        return list(self._thread_runs.get(thread_id, ()))

    async def follow_thread(self, thread_id: str, announce: RunAnnounced) -> ThreadFollow:
        return self._followers.follow(thread_id, announce)

    async def connection_opened(self, user: str, limit: int) -> bool:
        count = self._connections.get(user, 0)
        if count >= limit:
            return False
        self._connections[user] = count + 1
        return True

    async def connection_closed(self, user: str) -> None:
        count = self._connections.get(user, 0) - 1
        if count > 0:
            self._connections[user] = count
        else:
            self._connections.pop(user, None)

    async def reserve_run(
        self, user: str, *, max_active: int, per_window: int, window_s: float
    ) -> RunQuota:
        # Nothing awaits between the checks and the counts: atomic within the process.
        active = len(self._active.get(user, ())) + self._reserved.get(user, 0)
        if active >= max_active:
            return RunQuota(None, active=active)
        window = self._window_for(per_window, window_s)
        now = time.monotonic()
        if not window.allows(user, now):
            return RunQuota(None, wait_s=max(window.retry_after(user, now), 0.001))
        window.hit(user, now)
        if len(window) > 10_000:
            window.forget_idle(now)
        self._reserved[user] = self._reserved.get(user, 0) + 1
        token = secrets.token_hex(8)
        self._reservations[token] = (user, now)
        return RunQuota(token)

    async def release_run(self, user: str, token: str, *, started: bool) -> None:
        reservation = self._reservations.pop(token, None)
        if reservation is None:
            return
        left = self._reserved.get(user, 0) - 1
        if left > 0:
            self._reserved[user] = left
        else:
            self._reserved.pop(user, None)
        if not started and self._rate is not None:
            self._rate.forget(user, reservation[1])

    async def claim_key(self, user: str, key: str, value: str, ttl_s: float) -> str | None:
        now = time.monotonic()
        held = self._claims.get((user, key))
        if held is not None and held[1] > now:
            return held[0]
        if len(self._claims) > 10_000:
            self._claims = {k: v for k, v in self._claims.items() if v[1] > now}
        self._claims[(user, key)] = (value, now + ttl_s)
        return None

    async def release_key(self, user: str, key: str, value: str) -> None:
        held = self._claims.get((user, key))
        if held is not None and held[0] == value:
            del self._claims[(user, key)]

    def _window_for(self, limit: int, window_s: float) -> SlidingWindow:
        if self._rate is None or self._rate.limit != limit or self._rate.window_s != window_s:
            self._rate = SlidingWindow(limit, window_s)
        return self._rate

    def stats(self) -> BrokerStats:
        return BrokerStats(
            runs_in_memory=len(self._runs),
            run_log_bytes=sum(slot.log.held_bytes for slot in self._runs.values()),
        )

    # Event logs ---------------------------------------------------------------

    async def publish(self, event: Event) -> None:
        self.publish_now(event)

    def publish_now(self, event: Event) -> None:
        """:meth:`publish` without a coroutine: this broker never waits to publish."""
        run_id = event.run_id
        if run_id is None:
            raise ValueError(f"{event.type} is not a run event")
        slot = self._runs.get(run_id)
        if slot is None:
            raise RunNotFound(f"no run {run_id}")
        log = slot.log
        log.append(event)
        record = slot.record
        record.last_seq = event.seq or 0
        record.updated_at = event.ts
        for watcher in slot.watchers:
            watcher.wake()
        if log.closed:
            loop = asyncio.get_running_loop()
            slot.expiry = loop.call_later(self._window, self._expire, run_id)
            for older in self._retention.finished(record.owner, run_id, log.held_bytes):
                self._forget_early(older)

    async def watch(self, run_id: str, after_seq: int, wake: Wake) -> _MemoryWatch:
        slot = self._slot(run_id)
        if after_seq > slot.log.last_seq:
            raise CursorAhead(
                f"after_seq {after_seq} is beyond the run's last seq {slot.log.last_seq}"
            )
        slot.log.read(after_seq, 0)  # raises ResumeUnavailable when the events are gone
        watch = _MemoryWatch(slot, after_seq, wake)
        slot.watchers.add(watch)
        slot.controller.watchers_changed(len(slot.watchers))
        return watch

    def _expire(self, run_id: str) -> None:
        slot = self._runs.pop(run_id, None)
        if slot is not None:
            # Readers still attached keep their slot and can finish reading.
            slot.expiry = None
            self._retention.forgotten(slot.record.owner, run_id)

    def _forget_early(self, run_id: str) -> None:
        """A finished run forgotten before its window ends (its owner's runs keep too much)."""
        slot = self._runs.get(run_id)
        if slot is not None and slot.expiry is not None:
            slot.expiry.cancel()
        self._expire(run_id)

    # Lifecycle ----------------------------------------------------------------

    async def command(self, run_id: str, action: str) -> str:
        return await self._slot(run_id).controller.apply(action)

    async def respond(self, run_id: str, request_id: str, payload: Mapping[str, Any]) -> str:
        return await self._slot(run_id).controller.respond(request_id, payload)

    def _slot(self, run_id: str) -> _Slot:
        slot = self._runs.get(run_id)
        if slot is None:
            raise RunNotFound(f"no run {run_id}")
        return slot

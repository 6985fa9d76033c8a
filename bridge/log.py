"""The per-run event log: ordered, gap-free, bounded in bytes.

A plain object with no I/O and no clock.  It keeps a run's events for resume,
checks that ``seq`` starts at 1 and grows by exactly 1, and drops the oldest
events first once the bytes it holds pass ``max_bytes``.  A read that asks for
events already dropped raises :class:`ResumeUnavailable` instead of returning
a partial replay.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from bridge.errors import ResumeUnavailable
from bridge.events import Event

#: What keeping one event costs beyond its encoded text (the record, its fields,
#: the string header, the log's own entries), measured on CPython 3.11.  Counted
#: against ``max_bytes`` so that the bound is close to the memory really held.
EVENT_OVERHEAD: Final = 240


class RunLog:
    """Events of one run, for readers that each keep their own cursor (``after_seq``)."""

    __slots__ = (
        "_compacted",
        "_compacted_bytes",
        "_ends",
        "_events",
        "_head",
        "_held",
        "closed",
        "max_bytes",
        "run_id",
        "total",
    )

    def __init__(self, run_id: str, max_bytes: int, *, first_seq: int = 1) -> None:
        """A log whose first event will be ``first_seq`` (1 for a run's own log; a
        mirror of a run kept elsewhere may start later)."""
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        if first_seq < 1:
            raise ValueError(f"first_seq must be >= 1, got {first_seq}")
        self.run_id = run_id
        self.max_bytes = max_bytes
        # Events live in a list whose first ``_head`` slots are already dropped;
        # the list is compacted when half of it is dead, so reads stay O(k).
        self._events: list[Event] = []
        self._ends: list[int] = []  # cumulative bytes up to and including each event
        self._head = 0
        self._compacted = first_seq - 1  # events before the list: compacted or never held
        self._compacted_bytes = 0  # bytes of the compacted events
        self._held = 0  # bytes of the events still kept
        self.total = 0  # bytes of every event ever appended
        self.closed = False  # True once ``agent_completed`` was appended

    @property
    def last_seq(self) -> int:
        """``seq`` of the newest event, 0 before the first."""
        return self._compacted + len(self._events)

    @property
    def first_kept_seq(self) -> int:
        """``seq`` of the oldest event still kept (``last_seq + 1`` when none is)."""
        return self._compacted + self._head + 1

    @property
    def held_bytes(self) -> int:
        return self._held

    def __len__(self) -> int:
        return len(self._events) - self._head

    def append(self, event: Event) -> None:
        """Add the next event of the run.

        Raises:
            ValueError: the event is not of this run, its ``seq`` is not the next one,
                or the run already ended.
        """
        if event.run_id != self.run_id:
            raise ValueError(f"event of run {event.run_id!r} appended to log of {self.run_id!r}")
        if self.closed:
            raise ValueError(f"run {self.run_id} already ended; {event.type} cannot follow")
        events = self._events
        expected = self._compacted + len(events) + 1
        if event.seq != expected:
            raise ValueError(f"run {self.run_id}: expected seq {expected}, got {event.seq}")
        size = event.size
        events.append(event)
        self.total = total = self.total + size
        self._ends.append(total)
        self._held = held = self._held + size + EVENT_OVERHEAD
        if event.type == "agent_completed":
            self.closed = True
        if held > self.max_bytes:
            head = self._head
            drop, self._held = trim(
                held, self.max_bytes, len(events) - head, lambda i: kept_size(events[head + i])
            )
            self._head = head + drop
            if self._head > 64 and self._head * 2 > len(events):
                self._compacted_bytes = self._ends[self._head - 1]
                del events[: self._head]
                del self._ends[: self._head]
                self._compacted += self._head
                self._head = 0

    def read(self, after_seq: int, limit: int = 1 << 30) -> list[Event]:
        """Events with ``seq > after_seq``, oldest first, at most ``limit`` of them.

        Raises:
            ValueError: ``after_seq`` is negative.
            ResumeUnavailable: some of the events asked for were dropped.
        """
        if after_seq < 0:
            raise ValueError(f"after_seq must be >= 0, got {after_seq}")
        if after_seq + 1 < self.first_kept_seq:
            raise ResumeUnavailable(
                f"run {self.run_id}: events after seq {after_seq} are no longer kept "
                f"(oldest kept is {self.first_kept_seq})"
            )
        start = self._head + (after_seq + 1 - self.first_kept_seq)
        return self._events[start : start + limit]

    def lag_bytes(self, after_seq: int) -> int:
        """Bytes of the events a reader at ``after_seq`` has still to read."""
        if after_seq >= self.last_seq:
            return 0
        index = after_seq - self._compacted
        if index <= 0:
            return self.total - self._compacted_bytes
        return self.total - self._ends[index - 1]


def kept_size(event: Event) -> int:
    """What an event counts against a log's bound: its encoded size and the overhead."""
    return event.size + EVENT_OVERHEAD


def trim(held: int, max_bytes: int, count: int, size_of: Callable[[int], int]) -> tuple[int, int]:
    """The one trim policy of a run's log, in memory (:class:`RunLog`) or in Redis: drop
    the oldest of ``count`` events while the bytes ``held`` pass ``max_bytes``, always
    keeping the newest.  ``size_of(i)`` is what the ``i``-th oldest counts.

    Returns how many of the oldest to drop, and the bytes held after.
    """
    drop = 0
    while held > max_bytes and count - drop > 1:
        held -= size_of(drop)
        drop += 1
    return drop, held

"""The per-run event log: ordered, gap-free, bounded in bytes.

A plain object with no I/O and no clock.  It keeps a run's events for resume,
checks that ``seq`` starts at 1 and grows by exactly 1, and drops the oldest
events first once the bytes it holds pass ``max_bytes``.  A read that asks for
events already dropped raises :class:`ResumeUnavailable` instead of returning
a partial replay.

What it keeps, it keeps out of the way of CPython's cyclic garbage collector,
whose every full collection would otherwise visit each kept event (with 1,500
runs of 400 events in memory: pauses of 70 to 150 ms, each time the tracked
objects grew by a quarter).  Each event is kept as a plain tuple of its fields
(``Row``), which the collector stops tracking after its first collection; the
rows sit in exact tuples of ``BLOCK`` (untracked too, once full), and the
cumulative sizes in an ``array``; so a full collection visits a few blocks per
run instead of every event.  The newest ``RECENT`` events are also kept as
records, so that the readers keeping up with a run (the usual case, however
many watch it) share the one record each event was made as; older ones are
made again from their rows when read (a resume).
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Callable
from typing import Final

from bridge.errors import ResumeUnavailable
from bridge.events import Event, EventType

#: What keeping one event costs beyond its encoded text (the record, its fields,
#: the string header, the log's own entries), measured on CPython 3.11.  Counted
#: against ``max_bytes`` so that the bound is close to the memory really held.
EVENT_OVERHEAD: Final = 240
#: The newest events a log also keeps as records, shared by every reader.
RECENT: Final = 16

#: Rows per block of a log's rows.
BLOCK: Final = 64

#: An event as a log keeps it: ``(type, run_id, thread_id, seq, ts, text, size)``.
Row = tuple[EventType, str | None, str | None, int | None, float, str, int]


class Rows:
    """A sequence of rows that the garbage collector does not scan: full blocks of
    ``BLOCK`` rows as exact tuples, the newest rows in a short list."""

    __slots__ = ("_blocks", "_tail")

    def __init__(self) -> None:
        self._blocks: list[tuple[Row, ...]] = []
        self._tail: list[Row] = []

    def __len__(self) -> int:
        return len(self._blocks) * BLOCK + len(self._tail)

    def append(self, row: Row) -> None:
        tail = self._tail
        tail.append(row)
        if len(tail) == BLOCK:
            self._blocks.append(tuple(tail))
            tail.clear()

    def __getitem__(self, index: int) -> Row:
        block, offset = divmod(index, BLOCK)
        if block < len(self._blocks):
            return self._blocks[block][offset]
        return self._tail[offset]

    def slice(self, start: int, stop: int) -> list[Row]:
        """Rows ``start`` to ``stop`` (excluded), both within the sequence."""
        out: list[Row] = []
        blocks = self._blocks
        while start < stop:
            block, offset = divmod(start, BLOCK)
            source = blocks[block] if block < len(blocks) else self._tail
            take = min(stop - start, BLOCK - offset)
            out += source[offset : offset + take]
            start += take
        return out

    def drop_blocks(self, count: int) -> None:
        """Forget the oldest ``count`` blocks."""
        del self._blocks[:count]


class RunLog:
    """Events of one run, for readers that each keep their own cursor (``after_seq``)."""

    __slots__ = (
        "_compacted",
        "_compacted_bytes",
        "_ends",
        "_events",
        "_head",
        "_held",
        "_recent",
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
        # Events live in rows whose first ``_head`` are already dropped; whole
        # blocks are forgotten when half of the rows are dead, so reads stay O(k).
        self._events = Rows()
        self._recent: deque[Event] = deque(maxlen=RECENT)  # the newest, as records
        self._ends: array[int] = array("q")  # cumulative bytes up to and including each event
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
        events.append(
            (event.type, event.run_id, event.thread_id, expected, event.ts, event.text, size)
        )
        self._recent.append(event)
        self.total = total = self.total + size
        self._ends.append(total)
        self._held = held = self._held + size + EVENT_OVERHEAD
        if event.type == "agent_completed":
            self.closed = True
        if held > self.max_bytes:
            head = self._head
            drop, self._held = trim(
                held,
                self.max_bytes,
                len(events) - head,
                lambda i: events[head + i][6] + EVENT_OVERHEAD,
            )
            self._head = head + drop
            if self._head > BLOCK and self._head * 2 > len(events):
                blocks = self._head // BLOCK
                dead = blocks * BLOCK
                self._compacted_bytes = self._ends[dead - 1]
                events.drop_blocks(blocks)
                del self._ends[:dead]
                self._compacted += dead
                self._head -= dead

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
        stop = min(len(self._events), start + limit)
        if start >= stop:
            return []
        recent = self._recent
        first_recent = len(self._events) - len(recent)  # index of the oldest record kept
        if start >= first_recent:
            if stop - start == 1:
                return [recent[start - first_recent]]
            return list(recent)[start - first_recent : stop - first_recent]
        rows = self._events
        if stop <= first_recent:
            return [Event(*row) for row in rows.slice(start, stop)]
        out = [Event(*row) for row in rows.slice(start, first_recent)]
        out += list(recent)[: stop - first_recent]
        return out

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

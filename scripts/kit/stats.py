"""What a load client measures: latencies as percentiles, and each run checked by its ``seq``.

:class:`Stats` is shared by every client of one event loop; each message sent
is a :class:`Run` that its events are accounted to (lost, duplicated or
reordered events are found from ``seq``, and a run of the ``load`` agent from
its expected event count).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import secrets
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import orjson

from bridge.wire import is_terminal
from scripts.kit.sse import SseMessage

if TYPE_CHECKING:  # at run time imported by load_spec, when first needed
    from agents.load import LoadSpec

#: Values kept for percentiles per measure; beyond, a uniform sample of this size.
SAMPLE_SIZE: Final = 200_000


class Sample:
    """Values for percentiles: every value up to ``cap``, then a uniform sample of ``cap``."""

    __slots__ = ("_rng", "cap", "count", "total", "values", "worst")

    def __init__(self, cap: int = SAMPLE_SIZE) -> None:
        self.cap = cap
        self.values: list[float] = []
        self.count = 0
        self.total = 0.0
        self.worst = -math.inf
        self._rng = random.Random(7)

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        if value > self.worst:
            self.worst = value
        if len(self.values) < self.cap:
            self.values.append(value)
        else:
            j = self._rng.randrange(self.count)
            if j < self.cap:
                self.values[j] = value

    def summary(self) -> dict[str, float | int | None]:
        return summarize(self.values, self.count, self.total, self.worst)


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of sorted values, by linear interpolation."""
    if not ordered:
        raise ValueError("no values")
    k = (len(ordered) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarize(
    values: Sequence[float],
    count: int | None = None,
    total: float | None = None,
    worst: float | None = None,
) -> dict[str, float | int | None]:
    """``n``, ``mean``, ``p50``, ``p95``, ``p99``, ``max`` (None when there is no value)."""
    n = len(values) if count is None else count
    if not values:
        return {"n": n, "mean": None, "p50": None, "p95": None, "p99": None, "max": None}
    ordered = sorted(values)
    mean = (sum(values) if total is None else total) / (n or 1)
    return {
        "n": n,
        "mean": round(mean, 3),
        "p50": round(percentile(ordered, 50), 3),
        "p95": round(percentile(ordered, 95), 3),
        "p99": round(percentile(ordered, 99), 3),
        "max": round(ordered[-1] if worst is None else worst, 3),
    }


def load_spec(agent: str | None, message: str) -> LoadSpec | None:
    """What the ``load`` agent makes of ``message``; None for other agents, or a message
    that is not a load spec."""
    if agent != "load":
        return None
    from agents.load import LoadSpec

    try:
        return LoadSpec.parse(message)
    except Exception:
        return None


def expected_events(agent: str | None, message: str) -> int | None:
    """Events of one run of the ``load`` agent for ``message``; None for other agents."""
    spec = load_spec(agent, message)
    if spec is None:  # not a load message: the count is unknown
        return None
    # user_message, agent_started, thinking, tool calls, chunks, [apology],
    # response_complete, agent_completed
    apology = 4 if spec.fail else 0
    return 2 + spec.thinking + 2 * spec.tools + spec.chunks + apology + 2


def chunk_delay_s(agent: str | None, message: str) -> float | None:
    """The pause between the ``load`` agent's chunks for ``message``, in seconds; None
    when it has none (or the message is not a load spec)."""
    spec = load_spec(agent, message)
    if spec is None or not spec.delay_ms:
        return None
    return spec.delay_ms / 1000


_NONCE: Final = secrets.token_hex(4)
_REFS = itertools.count()


def new_ref(prefix: str) -> str:
    """A message id no other message of this process (or, likely, of another) uses: the
    gateway starts one run per id and user within its idempotency window."""
    return f"{prefix}{next(_REFS)}-{_NONCE}"


class Run:
    """One message sent and what came back for its run."""

    __slots__ = (
        "chunk0_ts",
        "completed_at",
        "done",
        "events",
        "first_at",
        "missing",
        "next_seq",
        "ref",
        "run_id",
        "sent_at",
        "started_at",
        "status",
    )

    def __init__(self, ref: str | None, done: asyncio.Future[str] | None = None) -> None:
        self.ref = ref
        self.run_id: str | None = None
        self.sent_at = 0.0
        self.first_at: float | None = None
        self.started_at: float | None = None
        self.completed_at: float | None = None
        self.next_seq = 1
        self.missing: set[int] = set()
        self.events = 0
        self.status: str | None = None
        self.done = done
        self.chunk0_ts: float | None = None


class Stats:
    """Everything the clients measured, shared by all of them (one event loop)."""

    def __init__(
        self, expected_per_run: int | None = None, chunk_delay_s: float | None = None
    ) -> None:
        self.expected_per_run = expected_per_run
        #: The pause between a run's chunks on the model's clock (``load`` agent): with
        #: it, each chunk's delivery is also measured against its due time.
        self.chunk_delay_s = chunk_delay_s
        self.schedule_ms = Sample()
        self.connect_ms = Sample()
        self.first_event_ms = Sample()
        self.started_ms = Sample()
        self.completed_ms = Sample()
        self.latency_ms = Sample()
        self.events = 0
        self.bytes = 0
        self.by_type: Counter[str] = Counter()
        self.clients_connected = 0
        self.runs_sent = 0
        self.runs_ended = 0
        self.statuses: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.close_codes: Counter[str] = Counter()
        self.lost = 0
        self.duplicated = 0
        self.reordered = 0
        self.wrong_count = 0
        self.after_end = 0
        self.first_send: float | None = None
        self.last_end: float | None = None
        #: CPU seconds this process used over the test, and the test's wall time.
        self.client_cpu_s = 0.0
        self.test_wall_s = 0.0

    # Per event --------------------------------------------------------------------

    def sent(self, run: Run, now: float) -> None:
        run.sent_at = now
        self.runs_sent += 1
        if self.first_send is None:
            self.first_send = now

    def event(self, run: Run, message: dict[str, Any], now: float) -> None:
        """Account one run event of ``run`` received at ``now`` (Unix seconds)."""
        kind = message.get("type")
        seq = message.get("seq")
        self.events += 1
        self.by_type[kind] += 1  # type: ignore[index]
        ts = message.get("ts")
        if isinstance(ts, float):
            self.latency_ms.add((now - ts) * 1000)
            if kind == "response_chunk" and self.chunk_delay_s is not None:
                self.chunk_due(run, message, ts, now)
        if run.completed_at is not None:
            self.after_end += 1
        run.events += 1
        if run.first_at is None:
            run.first_at = now
            self.first_event_ms.add((now - run.sent_at) * 1000)
        if seq == run.next_seq:
            run.next_seq += 1
        elif isinstance(seq, int) and seq > run.next_seq:
            run.missing.update(range(run.next_seq, seq))
            run.next_seq = seq + 1
        elif seq in run.missing:
            run.missing.discard(seq)
            self.reordered += 1
        else:
            self.duplicated += 1
        if kind == "agent_started":
            run.started_at = now
            self.started_ms.add((now - run.sent_at) * 1000)
        elif kind == "agent_completed" and run.completed_at is None:
            data = message.get("data")
            status = data.get("status") if isinstance(data, dict) else None
            self.end(run, str(status), now)

    def chunk_due(self, run: Run, message: dict[str, Any], ts: float, now: float) -> None:
        """Chunk ``index`` is due ``index`` pauses after chunk 0 was sent (its ``ts``),
        whenever chunk ``index - 1`` went out: receipt against that is what a reader
        sees of the gateway's delay, agents' timers firing late included."""
        data = message.get("data")
        index = data.get("index") if isinstance(data, dict) else None
        if not isinstance(index, int):
            return
        if index == 0:
            run.chunk0_ts = ts
        if run.chunk0_ts is not None and self.chunk_delay_s is not None:
            due = run.chunk0_ts + index * self.chunk_delay_s
            self.schedule_ms.add((now - due) * 1000)

    def end(self, run: Run, status: str, now: float) -> None:
        """The run ended: ``completed``/``cancelled``/``failed`` or a client-side reason."""
        if run.status is not None:
            return
        run.status = status
        self.runs_ended += 1
        self.statuses[status] += 1
        if run.first_at is not None:
            run.completed_at = now
            if is_terminal(status):
                self.completed_ms.add((now - run.sent_at) * 1000)
                self.last_end = now if self.last_end is None else max(self.last_end, now)
        self.lost += len(run.missing)
        expected = self.expected_per_run
        if expected is not None and status == "completed" and run.next_seq - 1 != expected:
            self.wrong_count += 1
        run.missing = set()
        if run.done is not None and not run.done.done():
            run.done.set_result(status)

    # Results -------------------------------------------------------------------------

    @property
    def wall_s(self) -> float | None:
        if self.first_send is None or self.last_end is None:
            return None
        return max(self.last_end - self.first_send, 1e-9)

    @property
    def events_per_s(self) -> float | None:
        wall = self.wall_s
        return None if wall is None else self.events / wall

    @property
    def problems(self) -> int:
        incomplete = self.runs_sent - self.statuses.get("completed", 0)
        return (
            sum(self.errors.values())
            + incomplete
            + self.lost
            + self.duplicated
            + self.reordered
            + self.wrong_count
            + self.after_end
        )

    def report(self) -> dict[str, Any]:
        eps = self.events_per_s
        return {
            "clients_connected": self.clients_connected,
            "runs": {
                "sent": self.runs_sent,
                "ended": self.runs_ended,
                "completed": self.statuses.get("completed", 0),
                "by_status": dict(sorted(self.statuses.items())),
            },
            "events": {
                "total": self.events,
                "bytes": self.bytes,
                "per_s": None if eps is None else round(eps, 1),
                "wall_s": None if self.wall_s is None else round(self.wall_s, 4),
                "expected_per_run": self.expected_per_run,
                "by_type": dict(sorted(self.by_type.items())),
            },
            "connect_ms": self.connect_ms.summary(),
            "first_event_ms": self.first_event_ms.summary(),
            "agent_started_ms": self.started_ms.summary(),
            "agent_completed_ms": self.completed_ms.summary(),
            "event_latency_ms": self.latency_ms.summary(),
            "chunk_due_latency_ms": self.schedule_ms.summary(),
            "seq": {
                "lost": self.lost,
                "duplicated": self.duplicated,
                "reordered": self.reordered,
                "wrong_count_runs": self.wrong_count,
                "after_agent_completed": self.after_end,
            },
            "errors": dict(sorted(self.errors.items())),
            "close_codes": dict(sorted(self.close_codes.items())),
            "client_cpu_share": round(self.client_cpu_s / max(self.test_wall_s, 1e-9), 3),
            "ok": self.problems == 0,
        }


def sse_event(message: SseMessage, run: Run, stats: Stats, now: float) -> None:
    """Account one SSE message of the gateway's ``POST /api/chat/stream`` to ``run``."""
    data = message.data
    if not data:
        return
    event = message.event
    if event == b"stream_start":
        run.run_id = orjson.loads(data).get("run_id")
    elif event == b"stream_end":
        if run.status is None:
            status = orjson.loads(data).get("status")
            stats.errors[f"stream_end before agent_completed ({status})"] += 1
            stats.end(run, f"stream_end {status}", now)
    elif event == b"error":
        code = orjson.loads(data).get("code")
        stats.errors[f"error {code}"] += 1
    else:
        payload = orjson.loads(data)
        if isinstance(payload, dict) and payload.get("seq") is not None:
            stats.event(run, payload, now)

"""The outbound side of one client, with no I/O: what to send next, and when to cut it.

Every transport (the WebSocket writer, the SSE stream) owns one :class:`Outbox`
and only pumps it: it asks :meth:`Outbox.take` for what is ready, frames each
event its own way, sends it, and asks :meth:`Outbox.verdict` now and then
whether the client must be cut.  The outbox holds

- the connection's own messages (``ack``, ``error``, ``pong``) in a bounded
  control queue: a reader that finds it full stops reading until the writer has
  taken what is in it, so a client's burst is answered at the client's pace;
- the watches of the runs the client follows, each a cursor into its run's log,
  with the backlog a ``resume`` asked for (which is allowed on top of the bound);
- the connection's state, an enum whose transitions are checked.

It knows no socket and no clock: the pump says when a send is under way
(``in_send``) and when one has completed (``sends``), and passes the time to
:meth:`Outbox.verdict`.  A client is cut

- when its token has expired (``expires_at``, on the clock the pump passes);
- when one send has been stuck for ``send_timeout_s`` (the transport applies
  flow control: a send waits only while the peer leaves the transport's buffer
  full, so a send that waits is the client's doing, never the server's);
- when a send is stuck across two verdicts and the bytes not yet taken from its
  runs' logs pass ``send_buffer_bytes``.  What a run publishes while the writer
  waits for its turn is not counted against the client: a fast reader of a
  bursty run is never cut, only one that has stopped taking bytes.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from bridge import events
from bridge.broker import Watch
from bridge.errors import ResumeUnavailable
from bridge.events import Event
from bridge.wire import CloseCode
from server.errors import wire_error

#: Events read from one run per take before the others get their turn.
BATCH: Final = 256
#: Connection messages (acks, errors, pongs) that may wait for the writer.
MAX_CONTROL_QUEUE: Final = 1024

CLOSE_NORMAL: Final = CloseCode.NORMAL
CLOSE_UNAUTHORIZED: Final = CloseCode.UNAUTHORIZED
CLOSE_SLOW: Final = CloseCode.SLOW_CONSUMER


class State(enum.Enum):
    """Where a connection's outbound side is."""

    #: Sending whatever is ready.
    OPEN = "open"
    #: Closing: what is ready is still sent, then the connection ends.
    DRAINING = "draining"
    #: Cut: nothing more is sent but the close itself.
    ABORTED = "aborted"
    #: Ended; nothing is sent any more.
    CLOSED = "closed"


_NEXT: Final[dict[State, frozenset[State]]] = {
    State.OPEN: frozenset({State.DRAINING, State.ABORTED, State.CLOSED}),
    State.DRAINING: frozenset({State.ABORTED, State.CLOSED}),
    State.ABORTED: frozenset({State.CLOSED}),
    State.CLOSED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A pump asked the outbox for a state change its state does not allow."""


@dataclass(frozen=True, slots=True)
class Cut:
    """Why a client must be cut, for every framing: a close code and reason for the
    WebSocket, an ``error`` code and message for SSE."""

    code: int
    reason: str
    error_code: str
    #: Whether what is ready may still be sent first.
    drain: bool


EXPIRED: Final = Cut(CLOSE_UNAUTHORIZED, "token expired", "unauthorized", drain=True)
STALLED: Final = Cut(CLOSE_SLOW, "slow consumer: send stalled", "slow_consumer", drain=False)
OVERFLOW: Final = Cut(
    CLOSE_SLOW, "slow consumer: send buffer overflow", "slow_consumer", drain=False
)
CONTROL_OVERFLOW: Final = Cut(
    CLOSE_SLOW, "slow consumer: too many unsent messages", "slow_consumer", drain=False
)


@dataclass(frozen=True, slots=True)
class Policy:
    """The limits one client is held to (``CHAT_SEND_BUFFER_BYTES``, ``CHAT_SEND_TIMEOUT_S``)."""

    send_buffer_bytes: int
    send_timeout_s: float
    max_control: int = MAX_CONTROL_QUEUE
    batch: int = BATCH


#: A watch's read that does not wait (a log in this process's memory).
ReadNow = Callable[[int], list[Event]]


@dataclass(slots=True)
class _Watched:
    watch: Watch
    #: Bytes of backlog the client asked for at once (a resume's replay), allowed on top.
    allowance: int
    #: The watch's ``read_now``, when it has one.
    read_now: ReadNow | None


class Outbox:
    """One client's outbound queue, watches and state; see the module docstring."""

    def __init__(self, policy: Policy, *, expires_at: float | None = None) -> None:
        self.policy = policy
        #: When the client's token expires, on the clock :meth:`verdict` is given.
        self.expires_at = expires_at
        self._state = State.OPEN
        # A list, not a deque: appended to and cleared whole, and an empty list is
        # 56 bytes where an empty deque is 624 (one per connection).
        self._control: list[Event] = []
        self._watches: dict[str, _Watched] = {}
        self._holds = 0
        self._waiting_reads = 0  # watches with no ``read_now``
        self.close_code: int | None = None
        self.close_reason = ""
        self.error_code: str | None = None
        #: Set by the pump while it awaits a send, cleared when the send returns.
        self.in_send = False
        #: Sends completed; the pump counts them.
        self.sends = 0
        self._stuck: tuple[int, float] | None = None  # (sends, first seen stuck at)

    # State ------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    def _move(self, to: State) -> None:
        if to not in _NEXT[self._state]:
            raise IllegalTransition(
                f'Unexpected outbox transition from "{self._state.value}" to "{to.value}".'
            )
        self._state = to

    def close(self, code: int, reason: str, *, drain: bool = True, error_code: str = "") -> bool:
        """Close after what is ready to send when ``drain``, else at once.

        The first close asked wins, except that closing at once overrides a drain.
        Returns whether this call changed anything.
        """
        state = self._state
        if state is State.CLOSED or state is State.ABORTED:
            return False
        if state is State.DRAINING and drain:
            return False
        self._move(State.DRAINING if drain else State.ABORTED)
        self.close_code = code
        self.close_reason = reason
        self.error_code = error_code or None
        return True

    def cut(self, cut: Cut) -> bool:
        return self.close(cut.code, cut.reason, drain=cut.drain, error_code=cut.error_code)

    def finish(self) -> None:
        """The connection has ended: nothing is sent any more."""
        if self._state is not State.CLOSED:
            self._move(State.CLOSED)
        self.detach_all()

    @property
    def aborted(self) -> bool:
        return self._state is State.ABORTED

    @property
    def closing(self) -> bool:
        """Closing or closed: no more runs are to be started or watched."""
        return self._state is not State.OPEN

    # Control queue ------------------------------------------------------------------

    def offer(self, event: Event) -> bool:
        """Queue a connection message; False (and the client cut) when the queue is full.

        A reader that waits while :attr:`control_full` never gets here with a full queue.
        """
        if self._state is State.CLOSED or self._state is State.ABORTED:
            return False
        if len(self._control) >= self.policy.max_control:
            self.cut(CONTROL_OVERFLOW)
            return False
        self._control.append(event)
        return True

    @property
    def control_full(self) -> bool:
        return len(self._control) >= self.policy.max_control

    def hold(self) -> None:
        """A command is in flight: run events wait, so that its ``ack`` goes out first."""
        self._holds += 1

    def release(self) -> None:
        self._holds -= 1

    # Watches ------------------------------------------------------------------------

    def watch(self, watch: Watch, allowance: int = 0) -> None:
        self.unwatch(watch.run_id)
        read_now = getattr(watch, "read_now", None)
        self._watches[watch.run_id] = _Watched(watch, allowance, read_now)
        if read_now is None:
            self._waiting_reads += 1

    def unwatch(self, run_id: str) -> None:
        watched = self._watches.pop(run_id, None)
        if watched is not None:
            if watched.read_now is None:
                self._waiting_reads -= 1
            watched.watch.close()

    def detach_all(self) -> None:
        for run_id in list(self._watches):
            self.unwatch(run_id)

    @property
    def reads_now(self) -> bool:
        """Whether every watched run's log can be read without waiting (``read_now``)."""
        return not self._waiting_reads

    @property
    def watching(self) -> list[str]:
        return list(self._watches)

    def buffered_bytes(self) -> int:
        """Bytes published to the watched runs that this client has not been sent yet."""
        return sum(w.watch.lag_bytes() for w in self._watches.values())

    def unread_bytes(self) -> int:
        """:meth:`buffered_bytes` less the backlogs the client asked for."""
        return sum(max(0, w.watch.lag_bytes() - w.allowance) for w in self._watches.values())

    # What to send ---------------------------------------------------------------------

    @property
    def has_control(self) -> bool:
        return bool(self._control)

    @property
    def idle(self) -> bool:
        """Nothing queued, no command in flight: a draining connection may end."""
        return not self._control and not self._holds

    async def take(self) -> tuple[list[Event], bool]:
        """What may be sent now, in order, and whether more is ready after it.

        Connection messages first; then, unless a command is in flight, up to
        ``batch`` events of each watched run.  A run whose next events were dropped
        from its log gives an ``error`` (``resume_unavailable``, naming the run) and
        is no longer watched; a run whose ``agent_completed`` was read is let go.
        Nothing is taken once the client is cut.
        """
        if self._state is State.ABORTED or self._state is State.CLOSED:
            return [], False
        ready = list(self._control)
        self._control.clear()
        if self._holds:
            return ready, False
        more = False
        limit = self.policy.batch
        for run_id, watched in list(self._watches.items()):
            watch = watched.watch
            try:
                batch = await watch.read(limit)
            except ResumeUnavailable as exc:
                # The client fell behind what the run's log keeps: say which run.
                self.unwatch(run_id)
                code, message, _ = wire_error(exc)
                ready.append(events.error(code, message, run_id=run_id))
                continue
            ready += batch
            if len(batch) == limit:
                more = True
            elif watch.finished:
                self.unwatch(run_id)
        return ready, more or bool(self._control)

    def take_now(self) -> tuple[list[Event], bool] | None:
        """:meth:`take` without waiting, or None when it cannot be done so: only while
        open with no connection message queued and no command in flight, and when
        every watched run's log can be read at once (``read_now``).  None leaves
        everything as it was, for the pump's :meth:`take`."""
        if self._state is not State.OPEN or self._control or self._holds:
            return None
        if self._waiting_reads:
            return None
        watches = self._watches
        ready: list[Event] = []
        more = False
        limit = self.policy.batch
        for run_id, watched in list(watches.items()):
            read_now = watched.read_now
            assert read_now is not None
            try:
                batch = read_now(limit)
            except ResumeUnavailable as exc:
                self.unwatch(run_id)
                code, message, _ = wire_error(exc)
                ready.append(events.error(code, message, run_id=run_id))
                continue
            ready += batch
            if len(batch) == limit:
                more = True
            elif watched.watch.finished:
                self.unwatch(run_id)
        return ready, more

    # Policy -------------------------------------------------------------------------

    def verdict(self, now: float) -> Cut | None:
        """Whether the client must be cut now, and why; ask it every ``check_every_s``."""
        if self._state is State.ABORTED or self._state is State.CLOSED:
            return None
        if self.expires_at is not None and now >= self.expires_at:
            return EXPIRED if self._state is State.OPEN else None
        if not self.in_send:
            self._stuck = None
            return None
        stuck = self._stuck
        if stuck is None or stuck[0] != self.sends:
            self._stuck = (self.sends, now)  # first seen stuck in this send
            return None
        if now - stuck[1] >= self.policy.send_timeout_s:
            return STALLED
        if self.unread_bytes() > self.policy.send_buffer_bytes:
            return OVERFLOW
        return None

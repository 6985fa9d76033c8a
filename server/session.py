"""One WebSocket connection: one session, one reader, one writer.

The reader parses client frames into commands and acts on them; it never writes
to the socket.  The writer is the only task that sends: it pumps the session's
:class:`~server.outbox.Outbox`, which holds the session's own messages
(``connection_ready``, ``ack``, ``error``, ``pong``) in a bounded queue and, for
each run the session watches, a cursor into that run's log.  Nothing is copied
per session: a watch is a cursor, and publishing a run's event only marks the
session for the loop's :class:`Flusher` (which, while the writer is parked with
nothing taken, writes what is ready in one write per loop turn) or wakes the
writer.  While the queue is full the reader stops reading (the client's TCP
then holds its frames), so every frame gets its answer at the client's pace.

The outbox decides when the session must be cut (slow consumer 4408, token
expired 4401); the session only acts on it.  The client resumes from its last seq.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Final

from bridge import events, tracing
from bridge.broker import ThreadFollow
from bridge.events import Event, Ref
from bridge.wire import CloseCode
from server.auth import Principal
from server.commands import (
    Command,
    Control,
    Ping,
    Respond,
    Resume,
    UserMessage,
    WatchThread,
    parse_command,
)
from server.errors import ProtocolError, wire_error
from server.flags import Flag
from server.gateway import Gateway
from server.outbox import CLOSE_NORMAL, CLOSE_SLOW, CLOSE_UNAUTHORIZED, Cut, Outbox, Policy
from server.protocols import SEND_BATCH, direct_writer

log = logging.getLogger("chat.ws")

#: Runs a session remembers having watched from their start (its own and its
#: threads'), so that no run is watched twice from seq 0; the oldest are forgotten.
SEEN_RUNS: Final = 4096

__all__ = [
    "CLOSE_FORBIDDEN",
    "CLOSE_NORMAL",
    "CLOSE_RESTART",
    "CLOSE_SLOW",
    "CLOSE_TOO_BIG",
    "CLOSE_TOO_MANY",
    "CLOSE_UNAUTHORIZED",
    "Session",
]

CLOSE_TOO_BIG: Final = CloseCode.TOO_BIG
CLOSE_RESTART: Final = CloseCode.RESTART
CLOSE_FORBIDDEN: Final = CloseCode.FORBIDDEN
CLOSE_TOO_MANY: Final = CloseCode.TOO_MANY

#: The ASGI ``send`` of the connection: frames go straight to the server, one message each.
Send = Callable[[dict[str, Any]], Awaitable[None]]
Close = Callable[[int, str], Awaitable[None]]


class Flusher:
    """Writes what woken sessions have ready, once per turn of the event loop.

    A run's event wakes each session watching it.  A session whose writer is
    parked with nothing of its own to send is not woken (an ``asyncio.Event``
    set, a task step, an ASGI send per event): it is marked here, and one
    callback on the loop's next turn writes, for every session marked, what its
    outbox has ready straight to its socket.  What cannot be written so (a
    connection message, a command in flight, a closing session, a peer not
    taking what it is sent, a watch that must wait to read) wakes the writer,
    which sends it as before.  Between two turns the loop polls its sockets, so
    accepts and handshakes are served between batches, not behind every event.
    """

    __slots__ = ("_loop", "_marked")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._marked: list[Session] = []

    def mark(self, session: Session) -> None:
        marked = self._marked
        marked.append(session)
        if len(marked) == 1:
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        marked, self._marked = self._marked, []
        for session in marked:
            try:
                session.flush_now()
            except Exception as exc:  # its writer meets the same and ends the session
                log.debug("session %s: direct write failed: %r", session.id, exc)
                session.wake()


_flushers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Flusher] = (
    weakref.WeakKeyDictionary()
)


def flusher() -> Flusher:
    """The running loop's :class:`Flusher`."""
    loop = asyncio.get_running_loop()
    found = _flushers.get(loop)
    if found is None:
        found = _flushers[loop] = Flusher(loop)
    return found


def policy_of(gateway: Gateway) -> Policy:
    settings = gateway.settings
    return Policy(settings.send_buffer_bytes, settings.send_timeout_s)


class Session:
    transport = "ws"
    #: Whether the server takes frames ready together in one send
    #: (:data:`server.protocols.SEND_BATCH`); set by the endpoint from the scope.
    send_batch = False

    def __init__(
        self,
        gateway: Gateway,
        user: Principal,
        session_id: str,
        send: Send,
        close: Close,
        *,
        expires_at: float | None = None,
    ) -> None:
        self.gateway = gateway
        self.user = user
        self.user_id = user.user_id
        self.id = session_id
        self._send_raw = send
        #: The socket's protocol when frames can be written without an ASGI send.
        self._direct = direct_writer(send)
        self._flusher = flusher() if self._direct is not None else None
        #: Whether the writer waits for a wake-up with nothing taken (the flusher may
        #: then write for it), and whether the flusher has the session marked.
        self._parked = False
        self._marked = False
        #: Turns of the writer's loop, and writes made for it by the flusher.
        self.writer_turns = 0
        self.direct_writes = 0
        self._close = close
        #: What to send and when to cut; ``expires_at`` is on the event loop's clock.
        self.box = Outbox(policy_of(gateway), expires_at=expires_at)
        # Flags, not asyncio.Events: an idle session holds four (see server.flags).
        self._wake = Flag()
        self._room = Flag()  # set while the control queue has room
        self._room.set()
        #: Set when the session must end now, without draining (slow consumer).
        self.aborted = Flag()
        self._closed = Flag()
        #: The threads the session follows (``watch_thread``).
        self._threads: dict[str, ThreadFollow] = {}
        self._seen: dict[str, None] = {}  # runs watched from their start, oldest first
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def closed(self) -> Flag:
        """Set once the writer has stopped; the socket is closed or being closed."""
        return self._closed

    @property
    def close_code(self) -> int | None:
        return self.box.close_code

    # Outbound -------------------------------------------------------------------

    def enqueue(self, event: Event) -> None:
        box = self.box
        if not box.offer(event) and box.aborted:
            self.aborted.set()
        if box.control_full:
            self._room.clear()
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def notify(self) -> None:
        """A watched run published: mark the session for the flusher while its writer
        is parked, else wake the writer."""
        if self._parked and self._flusher is not None and self.box.reads_now:
            if not self._marked:
                self._marked = True
                self._flusher.mark(self)
        else:
            self._wake.set()

    def flush_now(self) -> None:
        """Write what is ready straight to the socket, if the writer is parked and
        nothing stands in the way; else wake the writer (see :class:`Flusher`)."""
        self._marked = False
        direct = self._direct
        box = self.box
        if not self._parked or direct is None or not direct.can_write_now():
            self._wake.set()
            return
        taken = box.take_now()
        if taken is None:
            self._wake.set()
            return
        ready, more = taken
        if ready:
            direct.write_now([e.text for e in ready])
            box.sends += 1
            self.direct_writes += 1
            self.gateway.counters.events_delivered += sum(1 for e in ready if e.seq is not None)
        if more:
            self._wake.set()

    async def room_for_control(self) -> None:
        """Wait until the control queue has room (the reader's backpressure)."""
        while self.box.control_full and not self.box.closing:
            await self._room.wait()

    def close(self, code: int, reason: str, *, drain: bool = True) -> None:
        """Close the session: after what is ready to send when ``drain``, else at once.

        The first close asked wins, except that closing at once overrides a drain.
        """
        if self.box.close(code, reason, drain=drain) and not drain:
            self.aborted.set()
        self._room.set()
        self._wake.set()

    def check(self, now: float) -> None:
        """Cut the session if its outbox says so (asked by the gateway's watchdog)."""
        cut: Cut | None = self.box.verdict(now)
        if cut is not None:
            self.close(cut.code, cut.reason, drain=cut.drain)

    def expire(self) -> None:
        """The token's expiry is due: ask the outbox's verdict now (a loop timer)."""
        expires_at = self.box.expires_at
        if expires_at is not None:
            self.check(max(asyncio.get_running_loop().time(), expires_at))

    def buffered_bytes(self) -> int:
        return self.box.buffered_bytes()

    async def close_now(self) -> None:
        """Send the close frame of an aborted session; the writer must be stopped first."""
        await self._close(self.box.close_code or CLOSE_NORMAL, self.box.close_reason)

    async def write_loop(self) -> None:
        """The only code that writes to the socket."""
        box = self.box
        wake = self._wake
        send = self._send_raw
        counters = self.gateway.counters
        try:
            while True:
                if not wake.is_set():
                    self._parked = True
                    await wake.wait()
                self._parked = False
                wake.clear()
                self.writer_turns += 1
                if box.aborted:
                    return
                ready, more = await box.take()
                self._room.set()
                runs = 0
                if self.send_batch and ready:
                    # Frames ready together: one ASGI send, one socket write.
                    box.in_send = True
                    await send({"type": SEND_BATCH, "texts": [e.text for e in ready]})
                    box.sends += 1
                    box.in_send = False
                    runs = sum(1 for e in ready if e.seq is not None)
                else:
                    for event in ready:
                        box.in_send = True
                        await send({"type": "websocket.send", "text": event.text})
                        box.sends += 1
                        box.in_send = False
                        if event.seq is not None:
                            runs += 1
                counters.events_delivered += runs
                if more:
                    wake.set()
                elif box.closing and box.idle:
                    break  # (a command in flight still has events to let through)
            with contextlib.suppress(Exception):
                await self._close(box.close_code or CLOSE_NORMAL, box.close_reason)
        except Exception as exc:  # the peer went away while we wrote
            log.debug("session %s: writer stopped: %r", self.id, exc)
        finally:
            self._parked = False
            box.in_send = False
            self.detach_all()
            self._closed.set()

    def _unwatch(self, run_id: str) -> None:
        self.box.unwatch(run_id)

    def detach_all(self) -> None:
        for follow in self._threads.values():
            follow.close()
        self._threads.clear()
        for task in self._tasks:
            task.cancel()
        self.box.detach_all()

    # Inbound --------------------------------------------------------------------

    async def handle_frame(self, frame: str) -> None:
        try:
            command = parse_command(frame)
        except ProtocolError as exc:
            self.enqueue(events.error(exc.code, str(exc), exc.ref))
            return
        await self.handle(command)

    async def handle(self, command: Command) -> None:
        ref = command.id
        # While a command is in flight, run events wait: its ack goes out first.
        self.box.hold()
        try:
            if isinstance(command, UserMessage):
                await self._user_message(command)
            elif isinstance(command, Control):
                status = await self.gateway.control(self.user, command.run_id, command.action)
                self.enqueue(events.ack(ref, command.action, command.run_id, status))
            elif isinstance(command, Resume):
                await self._resume(command, ref)
            elif isinstance(command, Ping):
                self.enqueue(events.pong(ref))
            elif isinstance(command, WatchThread):
                await self._watch_thread(command)
            elif isinstance(command, Respond):
                status = await self.gateway.respond(
                    self.user, command.run_id, command.request_id, command.payload
                )
                self.enqueue(events.ack(ref, "respond", command.run_id, status))
        except Exception as exc:
            code, message, _ = wire_error(exc)
            if code == "internal":
                log.exception("session %s: %s failed", self.id, command.type)
            self.enqueue(events.error(code, message, ref))
        finally:
            self.box.release()
            self._answer_now()

    def _answer_now(self) -> None:
        """What the command made ready (a run's first events, its answer) goes out now,
        from this task, while the writer is parked: not one turn of the loop later,
        behind whatever else the command started (the run's own task)."""
        if not self._parked:
            self._wake.set()
            return
        try:
            self.flush_now()  # wakes the writer for what it cannot write
        except Exception as exc:  # the writer meets the same and ends the session
            log.debug("session %s: direct write failed: %r", self.id, exc)
            self._wake.set()

    async def _user_message(self, command: UserMessage) -> None:
        tracing.incoming(command.traceparent)
        sent = await self.gateway.send(
            self.user,
            command.content,
            thread_id=command.thread_id,
            agent=command.agent,
            ref=command.id,
            key=command.id,
            on_active=command.on_active,
        )
        record = sent.record
        if sent.duplicate:
            # Started by an earlier send of this id: the client resumes it if it wants.
            self.enqueue(
                events.ack(
                    command.id,
                    "user_message",
                    record.run_id,
                    record.status,
                    thread_id=record.thread_id,
                    duplicate=True,
                )
            )
            return
        if self._first_sight(record.run_id):
            await self._watch(record.run_id, 0)

    # Threads ----------------------------------------------------------------------

    def _first_sight(self, run_id: str) -> bool:
        """True the first time a run is to be watched from its start by this session."""
        if run_id in self._seen:
            return False
        self._seen[run_id] = None
        if len(self._seen) > SEEN_RUNS:
            del self._seen[next(iter(self._seen))]
        return True

    async def _watch_thread(self, command: WatchThread) -> None:
        thread_id = command.thread_id
        if not command.watch:
            await self.gateway.own_thread(self.user, thread_id)
            follow = self._threads.pop(thread_id, None)
            if follow is not None:
                follow.close()
            self.enqueue(events.ack(command.id, "unwatch_thread", None, None, thread_id=thread_id))
            return
        old = self._threads.pop(thread_id, None)
        if old is not None:
            old.close()
        follow, going = await self.gateway.follow_thread(self.user, thread_id, self._announced)
        self._threads[thread_id] = follow
        self.enqueue(
            events.ack(
                command.id,
                "watch_thread",
                None,
                None,
                thread_id=thread_id,
                active_run_ids=going,
            )
        )
        for run_id in going:
            if self._first_sight(run_id):
                await self._follow_run(run_id)

    def _announced(self, run_id: str) -> None:
        """A new run of a followed thread: watch it from its first event."""
        if self.box.closing or not self._first_sight(run_id):
            return
        task = asyncio.get_running_loop().create_task(self._follow_run(run_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _follow_run(self, run_id: str) -> None:
        try:
            await self._watch(run_id, 0)
        except Exception as exc:  # ended and forgotten meanwhile: nothing to follow
            log.debug("session %s: run %s not followed: %r", self.id, run_id, exc)
        self._wake.set()

    async def _resume(self, command: Resume, ref: Ref) -> None:
        record = await self.gateway.find_run(self.user, command.run_id)
        self._unwatch(command.run_id)
        await self._watch(
            command.run_id,
            command.after_seq,
            before=lambda: self.enqueue(
                events.ack(ref, "resume", command.run_id, record.status, last_seq=record.last_seq)
            ),
            resume=True,
        )

    async def _watch(
        self,
        run_id: str,
        after_seq: int,
        before: Callable[[], None] | None = None,
        *,
        resume: bool = False,
    ) -> None:
        watch = await self.gateway.watch(self.user, run_id, after_seq, self.notify, resume=resume)
        if before is not None:
            before()
        # A resume's replay backlog is allowed on top of the send buffer: the
        # client asked for it all at once.
        self.box.watch(watch, allowance=watch.lag_bytes())

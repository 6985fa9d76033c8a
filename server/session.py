"""One WebSocket connection: one session, one reader, one writer.

The reader parses client frames into commands and acts on them; it never writes
to the socket.  The writer is the only task that sends: first the session's own
messages (``connection_ready``, ``ack``, ``error``, ``pong``) from a bounded
queue, then, for each run the session watches, whatever that run's log holds
past the session's cursor.  Nothing is copied per session: a watch is a cursor,
and publishing a run's event only wakes the writer.

A session whose unsent bytes pass ``CHAT_SEND_BUFFER_BYTES`` is a slow consumer:
it is closed with 4408 and its runs go on; the client resumes from its last seq.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final

from bridge import events
from bridge.broker import Watch
from bridge.errors import ResumeUnavailable
from bridge.events import Event, Ref
from server.auth import Principal
from server.commands import Command, Control, Ping, Resume, UserMessage, parse_command
from server.errors import ProtocolError, wire_error
from server.gateway import Gateway

log = logging.getLogger("chat.ws")

#: Events read from one run per writer turn before the writer looks at the others.
BATCH: Final = 256
#: While the writer is behind, how often (in events) its lag is measured; a power of 2.
LAG_CHECK_EVERY: Final = 16
#: Session messages (acks, errors, pongs) that may wait for the writer.
MAX_CONTROL_QUEUE: Final = 1024

CLOSE_NORMAL: Final = 1000
CLOSE_TOO_BIG: Final = 1009
CLOSE_RESTART: Final = 1012
CLOSE_UNAUTHORIZED: Final = 4401
CLOSE_FORBIDDEN: Final = 4403
CLOSE_SLOW: Final = 4408
CLOSE_TOO_MANY: Final = 4429

#: The ASGI ``send`` of the connection: frames go straight to the server, one message each.
Send = Callable[[dict[str, Any]], Awaitable[None]]
Close = Callable[[int, str], Awaitable[None]]


class Session:
    def __init__(
        self, gateway: Gateway, user: Principal, session_id: str, send: Send, close: Close
    ) -> None:
        self.gateway = gateway
        self.user = user
        self.user_id = user.user_id
        self.id = session_id
        self._send_raw = send
        self._close = close
        self._control: deque[Event] = deque()
        self._watches: dict[str, Watch] = {}
        self._wake = asyncio.Event()
        self._holds = 0
        self._close_code: int | None = None
        self._close_reason = ""
        self._drain_before_close = True
        #: Set when the session must end now, without draining (slow consumer).
        self.aborted = asyncio.Event()
        #: Loop time at which the send under way started, None when none is.
        self.sending_since: float | None = None
        self._closed = asyncio.Event()

    @property
    def closed(self) -> asyncio.Event:
        """Set once the writer has stopped; the socket is closed or being closed."""
        return self._closed

    @property
    def close_code(self) -> int | None:
        return self._close_code

    # Outbound -------------------------------------------------------------------

    def enqueue(self, event: Event) -> None:
        if len(self._control) >= MAX_CONTROL_QUEUE:
            self.close(CLOSE_SLOW, "slow consumer: too many unsent messages", drain=False)
            return
        self._control.append(event)
        self._wake.set()

    def close(self, code: int, reason: str, *, drain: bool = True) -> None:
        """Close the session: after what is ready to send when ``drain``, else at once.

        The first close asked wins, except that closing at once overrides a drain.
        """
        if self._close_code is not None and (drain or not self._drain_before_close):
            return
        self._close_code = code
        self._close_reason = reason
        self._drain_before_close = drain
        if not drain:
            self.aborted.set()
        self._wake.set()

    def _watch_woken(self, watch: Watch, backlog: int) -> None:
        """The writer is behind on ``watch``'s run: is it too far behind?"""
        # Unsent bytes past the send buffer make a slow consumer; a resume's replay
        # backlog is allowed on top, since the reader asked for it all at once.
        if watch.lag_bytes() > self.gateway.settings.send_buffer_bytes + backlog:
            self.close(CLOSE_SLOW, "slow consumer: send buffer overflow", drain=False)

    async def _send(self, text: str) -> None:
        await self._send_raw({"type": "websocket.send", "text": text})

    async def close_now(self) -> None:
        """Send the close frame of an aborted session; the writer must be stopped first."""
        await self._close(self._close_code or CLOSE_NORMAL, self._close_reason)

    async def write_loop(self) -> None:
        """The only code that writes to the socket."""
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self.aborted.is_set():
                    return
                more = await self._write_ready()
                if more:
                    self._wake.set()
                elif self._close_code is not None and not self._holds:
                    break  # (a command in flight still has events to let through)
            if self._drain_before_close:
                with contextlib.suppress(Exception):
                    await self._close(self._close_code or CLOSE_NORMAL, self._close_reason)
        except Exception as exc:  # the peer went away while we wrote
            log.debug("session %s: writer stopped: %r", self.id, exc)
        finally:
            self.detach_all()
            self._closed.set()

    async def _write_ready(self) -> bool:
        """Send what is ready; True when more is waiting."""
        # What is sent in one turn counts as one send for stall detection.
        self.sending_since = asyncio.get_running_loop().time()
        try:
            return await self._write_turn()
        finally:
            self.sending_since = None

    async def _write_turn(self) -> bool:
        control = self._control
        while control:
            await self._send(control.popleft().text)
        if self._holds:
            return False
        more = False
        for run_id, watch in list(self._watches.items()):
            try:
                batch = await watch.read(BATCH)
            except ResumeUnavailable as exc:
                # The reader fell behind what the run's log keeps: say which run.
                self._unwatch(run_id)
                code, message, _ = wire_error(exc)
                await self._send(events.error(code, message, run_id=run_id).text)
                continue
            send = self._send_raw
            for event in batch:
                await send({"type": "websocket.send", "text": event.text})
            self.gateway.counters.events_delivered += len(batch)
            if len(batch) == BATCH:
                more = True
            elif watch.finished:
                self._unwatch(run_id)
        return more or bool(control)

    def _unwatch(self, run_id: str) -> None:
        watch = self._watches.pop(run_id, None)
        if watch is not None:
            watch.close()

    def detach_all(self) -> None:
        for run_id in list(self._watches):
            self._unwatch(run_id)

    @property
    def watching(self) -> list[str]:
        return list(self._watches)

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
        self._holds += 1
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
        except Exception as exc:
            code, message, _ = wire_error(exc)
            if code == "internal":
                log.exception("session %s: %s failed", self.id, command.type)
            self.enqueue(events.error(code, message, ref))
        finally:
            self._holds -= 1
            self._wake.set()

    async def _user_message(self, command: UserMessage) -> None:
        record = await self.gateway.start_run(
            self.user,
            command.content,
            thread_id=command.thread_id,
            agent=command.agent,
            ref=command.id,
        )
        await self._watch(record.run_id, 0)

    async def _resume(self, command: Resume, ref: Ref) -> None:
        record = await self.gateway.find_run(self.user, command.run_id)
        self._unwatch(command.run_id)
        await self._watch(
            command.run_id,
            command.after_seq,
            before=lambda: self.enqueue(
                events.ack(ref, "resume", command.run_id, record.status, last_seq=record.last_seq)
            ),
        )

    async def _watch(
        self, run_id: str, after_seq: int, before: Callable[[], None] | None = None
    ) -> None:
        holder: list[tuple[Watch, int]] = []
        woken = self._wake
        behind = 0

        def wake() -> None:  # called for every event the run publishes
            nonlocal behind
            if not woken.is_set():
                woken.set()  # the writer had caught up: nothing more to check
                behind = 0
                return
            behind += 1
            if behind & (LAG_CHECK_EVERY - 1) == 0 and holder:
                self._watch_woken(*holder[0])

        watch = await self.gateway.watch(self.user, run_id, after_seq, wake)
        holder.append((watch, watch.lag_bytes()))
        if before is not None:
            before()
        self._watches[run_id] = watch

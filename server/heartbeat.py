"""One timer for the keepalive pings of every WebSocket of an event loop.

uvicorn's WebSocket protocol keeps two loop timers per connection for its
keepalive: one to send the next ping, one for its pong's deadline; every ping
arms one and every pong cancels one and arms the other.  With 10,000 idle
connections that is 20,000 timer handles and 1,300 timer operations a second,
besides the pings themselves.  A :class:`Wheel` holds instead, per tick, the
set of connections due then (a ping to send, or a pong's deadline), and one
loop timer, armed only while a connection is registered, that goes through the
sets as their ticks come.  A connection is pinged at most one tick later than
its interval says, and found gone at most one tick after its pong's deadline;
a tick is a quarter of the interval, at most one second.
"""

from __future__ import annotations

import asyncio
import logging
import math
import weakref
from typing import Final, Protocol

log = logging.getLogger("chat.ws")

#: The longest tick, whatever the interval.
MAX_TICK_S: Final = 1.0


class Beating(Protocol):
    """A connection the wheel keeps alive."""

    def heartbeat_due(self, now: float) -> None:
        """Its time has come: send the ping, or give up on the pong."""
        ...


class Wheel:
    """The connections of one event loop with the same keepalive interval, by the
    tick they are next due at.  No I/O of its own: it calls the connections."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval_s: float) -> None:
        self.loop = loop
        self.tick_s = min(MAX_TICK_S, interval_s / 4)
        self._slots: dict[int, set[Beating]] = {}
        self._slot_of: dict[Beating, int] = {}
        #: Ticks up to this one have been gone through.
        self._done = math.floor(loop.time() / self.tick_s)
        self._timer: asyncio.TimerHandle | None = None
        self._ticking = False

    def __len__(self) -> int:
        return len(self._slot_of)

    def schedule(self, conn: Beating, at: float) -> None:
        """Call ``conn.heartbeat_due`` at the first tick not before ``at`` (loop time)."""
        idle = self._timer is None and not self._ticking
        if idle:  # nothing registered: the ticks since the last one need no going through
            self._done = max(self._done, math.floor(self.loop.time() / self.tick_s))
        self.discard(conn)
        slot = max(math.ceil(at / self.tick_s), self._done + 1)
        members = self._slots.get(slot)
        if members is None:
            self._slots[slot] = {conn}
        else:
            members.add(conn)
        self._slot_of[conn] = slot
        if idle:
            self._arm()

    def discard(self, conn: Beating) -> None:
        slot = self._slot_of.pop(conn, None)
        if slot is None:
            return
        members = self._slots[slot]
        members.discard(conn)
        if not members:
            del self._slots[slot]

    def _arm(self) -> None:
        self._timer = self.loop.call_at((self._done + 1) * self.tick_s, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._ticking = True
        try:
            now = self.loop.time()
            slots = self._slots
            slot_of = self._slot_of
            for slot in range(self._done + 1, math.floor(now / self.tick_s) + 1):
                self._done = slot
                members = slots.pop(slot, None)
                if members is None:
                    continue
                for conn in members:
                    del slot_of[conn]
                for conn in members:
                    try:
                        conn.heartbeat_due(now)
                    except Exception:  # one connection's failure must not stop the others'
                        log.exception("keepalive of a connection failed")
        finally:
            self._ticking = False
            if self._slot_of:
                self._arm()


_wheels: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[float, Wheel]] = (
    weakref.WeakKeyDictionary()
)


def wheel_for(interval_s: float) -> Wheel:
    """The running loop's wheel for connections pinged every ``interval_s``."""
    loop = asyncio.get_running_loop()
    by_interval = _wheels.get(loop)
    if by_interval is None:
        by_interval = _wheels[loop] = {}
    wheel = by_interval.get(interval_s)
    if wheel is None:
        wheel = by_interval[interval_s] = Wheel(loop, interval_s)
    return wheel

"""server.flags and server.heartbeat without a server: the semantics the sessions and
the WebSocket protocol rely on (asyncio.Event's and asyncio.Queue's, for their uses)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from server.flags import Flag, MessageQueue
from server.heartbeat import Wheel


async def test_flag_wakes_every_waiter_and_survives_cancelled_ones() -> None:
    flag = Flag()
    assert not flag.is_set()
    waiters = [asyncio.create_task(flag.wait()) for _ in range(3)]
    cancelled = asyncio.create_task(flag.wait())
    await asyncio.sleep(0)
    cancelled.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await cancelled
    flag.set()
    assert await asyncio.gather(*waiters) == [True, True, True]
    assert flag.is_set() and await flag.wait()  # set: no wait at all
    flag.clear()
    later = asyncio.create_task(flag.wait())
    await asyncio.sleep(0)
    assert not later.done()
    flag.set()
    assert await later


async def test_flag_waiter_is_a_future_for_asyncio_wait() -> None:
    flag = Flag()
    fut = flag.waiter()
    assert not fut.done()
    flag.set()
    await asyncio.wait({fut}, timeout=1)
    assert fut.done() and flag.waiter().done()


async def test_message_queue_keeps_order_and_wakes_its_consumer() -> None:
    queue: MessageQueue[int] = MessageQueue()
    assert queue.empty() and queue.qsize() == 0
    with pytest.raises(asyncio.QueueEmpty):
        queue.get_nowait()
    getter = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    queue.put_nowait(1)
    queue.put_nowait(2)
    assert await getter == 1
    assert queue.qsize() == 1 and await queue.get() == 2 and queue.empty()
    # A cancelled get leaves nothing behind.
    cancelled = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    cancelled.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await cancelled
    queue.put_nowait(3)
    assert await asyncio.wait_for(queue.get(), 1) == 3


class Beat:
    def __init__(self, wheel: Wheel, log: list[tuple[str, float]], name: str) -> None:
        self.wheel, self.log, self.name = wheel, log, name

    def heartbeat_due(self, now: float) -> None:
        self.log.append((self.name, now))


async def test_the_wheel_calls_each_connection_once_its_tick_has_come() -> None:
    loop = asyncio.get_running_loop()
    wheel = Wheel(loop, 0.2)  # ticks of 0.05 s
    log: list[tuple[str, float]] = []
    a, b, gone = Beat(wheel, log, "a"), Beat(wheel, log, "b"), Beat(wheel, log, "gone")
    start = loop.time()
    wheel.schedule(a, start + 0.1)
    wheel.schedule(b, start + 0.2)
    wheel.schedule(gone, start + 0.1)
    wheel.discard(gone)
    wheel.schedule(b, start + 0.15)  # rescheduled: only the later time counts
    assert len(wheel) == 2
    await asyncio.sleep(0.4)
    assert [name for name, _ in log] == ["a", "b"]
    assert log[0][1] >= start + 0.1 and log[1][1] >= start + 0.15
    assert len(wheel) == 0 and wheel._timer is None  # no timer while nothing is registered

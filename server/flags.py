"""Small per-connection synchronisation objects, sized for 10,000 idle connections.

:class:`asyncio.Event` and :class:`asyncio.Queue` allocate a ``collections.deque``
for their waiters when they are made (a deque's first block is 64 slots: about
760 bytes with the object), and a queue holds four of them.  A connection keeps
several for its whole life and almost never has a waiter on most of them.
:class:`Flag` and :class:`MessageQueue` behave the same for the uses here but
hold a waiter list only while someone waits: an idle connection's flag is one
small object.
"""

from __future__ import annotations

import asyncio
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")


class Flag:
    """:class:`asyncio.Event`'s ``set``/``clear``/``is_set``/``wait``, with ``__slots__``
    and no waiter list until one is needed; bound to the running loop on first wait."""

    __slots__ = ("_value", "_waiters")

    def __init__(self) -> None:
        self._value = False
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._value

    def set(self) -> None:
        if self._value:
            return
        self._value = True
        waiters = self._waiters
        if waiters is not None:
            self._waiters = None
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    def clear(self) -> None:
        self._value = False

    async def wait(self) -> bool:
        if self._value:
            return True
        await self.waiter()
        return True

    def waiter(self) -> asyncio.Future[None]:
        """A future done once the flag is set (at once if it is): for ``asyncio.wait``
        without a task of its own."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._value:
            fut.set_result(None)
            return fut
        if self._waiters is None:
            self._waiters = [fut]
        else:
            # A cancelled wait leaves its future behind: drop those first.
            self._waiters = [w for w in self._waiters if not w.done()]
            self._waiters.append(fut)
        return fut

    def __repr__(self) -> str:
        waiting = len(self._waiters) if self._waiters else 0
        return f"<Flag {'set' if self._value else 'unset'}, {waiting} waiting>"


class MessageQueue(Generic[T]):
    """An unbounded queue with one consumer: :class:`asyncio.Queue`'s ``put_nowait``,
    ``get``, ``get_nowait``, ``empty`` and ``qsize``, holding a list only while
    messages wait and a future only while the consumer does."""

    __slots__ = ("_getter", "_items")

    def __init__(self) -> None:
        self._items: list[T] | None = None
        self._getter: asyncio.Future[None] | None = None

    def qsize(self) -> int:
        return len(self._items) if self._items else 0

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: T) -> None:
        if self._items is None:
            self._items = [item]
        else:
            self._items.append(item)
        getter = self._getter
        if getter is not None:
            self._getter = None
            if not getter.done():
                getter.set_result(None)

    def get_nowait(self) -> T:
        items = self._items
        if not items:
            raise asyncio.QueueEmpty
        item = items.pop(0)
        if not items:
            self._items = None
        return item

    async def get(self) -> T:
        while not self._items:
            getter = self._getter
            if getter is None or getter.done():
                getter = self._getter = asyncio.get_running_loop().create_future()
            await getter
        return self.get_nowait()


class Waitable(Protocol):
    """What waiting for a connection to end needs: a :class:`Flag` or an :class:`asyncio.Event`."""

    def is_set(self) -> bool: ...

    async def wait(self) -> bool: ...

"""The ``load`` agent: deterministic output for tests and load scripts.

Its message is ``key=value`` words; in this order it emits ``thinking`` thinking
events, ``tools`` calls of the ``sleep`` tool lasting ``tool_ms`` each, then
exactly ``chunks`` response chunks of ``chunk_chars`` characters with
``delay_ms`` between them; with ``fail=1`` it then raises, so the fallback path
runs.

The chunks keep a model's clock (:class:`Pacer`): chunk ``i`` is due ``i`` ×
``delay_ms`` after the first, whenever the previous one went out.  A model streams
at its own pace whatever the gateway does; its tokens wait in the upstream socket
while the gateway is busy, they do not slow the model down.  So a busy gateway
sends its chunks late (by their due time, which load clients measure), not a
longer answer.

Its answer is held to the run's bound like any agent's (``CHAT_MAX_ANSWER_BYTES``):
a spec whose ``chunks`` × ``chunk_chars`` is larger ends the run ``failed`` with
``answer_too_large`` after the chunks that fit.  Parameters outside their bounds
below are refused (``bad_input``), never clamped.
"""

from __future__ import annotations

import asyncio
import math
import string
import weakref
from dataclasses import dataclass
from typing import Final

from agents.base import RunContext
from agents.errors import AgentInputError

#: Each parameter's default and its inclusive bounds.
PARAMS: Final[dict[str, tuple[int, int, int]]] = {
    "chunks": (20, 0, 1_000_000),
    "chunk_chars": (8, 1, 65_536),
    "delay_ms": (0, 0, 60_000),
    "thinking": (1, 0, 10_000),
    "tools": (0, 0, 1_000),
    "tool_ms": (0, 0, 600_000),
    "fail": (0, 0, 1),
}

_ALPHABET: Final = string.ascii_lowercase


@dataclass(frozen=True, slots=True)
class LoadSpec:
    chunks: int = 20
    chunk_chars: int = 8
    delay_ms: int = 0
    thinking: int = 1
    tools: int = 0
    tool_ms: int = 0
    fail: int = 0

    @classmethod
    def parse(cls, message: str) -> LoadSpec:
        """Parse ``key=value`` words; unknown keys and bad values are an input error."""
        values: dict[str, int] = {}
        for word in message.split():
            key, sep, raw = word.partition("=")
            if not sep or key not in PARAMS:
                known = ", ".join(PARAMS)
                raise AgentInputError(
                    f"load agent: expected key=value with keys {known}; got {word!r}"
                )
            _, low, high = PARAMS[key]
            try:
                value = int(raw)
            except ValueError:
                raise AgentInputError(
                    f"load agent: {key} must be an integer, got {raw!r}"
                ) from None
            if not low <= value <= high:
                raise AgentInputError(f"load agent: {key} must be in [{low}, {high}], got {value}")
            values[key] = value
        return cls(**values)


def chunk_text(index: int, chars: int) -> str:
    """The ``index``-th chunk: one letter repeated, cycling through the alphabet."""
    return _ALPHABET[index % 26] * chars


class Pacer:
    """Waits on a fixed schedule: each pause ends ``delay`` after the previous one's due
    time, not after the caller came back; a caller that is late does not wait at all
    (beyond one turn of the loop) until it has caught up.

    The pacers of a loop share its clock (:class:`Ticks`): one timer per millisecond
    wakes every pacer due in it, as a model's tokens arriving together would."""

    __slots__ = ("_due",)

    def __init__(self) -> None:
        self._due: float | None = None

    def pause(self, now: float, delay: float) -> float:
        """How long to wait at ``now`` for the pause of ``delay`` that comes next."""
        due = (now if self._due is None else self._due) + delay
        self._due = due
        return max(0.0, due - now)

    async def wait(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self.pause(now, delay) <= 0.0:
            await asyncio.sleep(0)
            return
        assert self._due is not None
        await Ticks.of(loop).wait(self._due)


class Ticks:
    """One loop's clock for its pacers: the waits due within the same millisecond share
    one timer, instead of a timer (and a heap entry) each."""

    __slots__ = ("_loop", "_waiting")

    _clocks: Final[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Ticks]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Not the loop itself: the loop is this clock's key, which a value holding it
        # would keep alive for good.
        self._loop = weakref.ref(loop)
        self._waiting: dict[int, list[asyncio.Future[None]]] = {}

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> Ticks:
        clock = cls._clocks.get(loop)
        if clock is None:
            clock = cls._clocks[loop] = cls(loop)
        return clock

    def wait(self, due: float) -> asyncio.Future[None]:
        """A future done at the first millisecond at or after ``due`` (loop time)."""
        loop = self._loop()
        assert loop is not None  # waited on from the loop itself
        tick = math.ceil(due * 1000)
        future: asyncio.Future[None] = loop.create_future()
        waiters = self._waiting.get(tick)
        if waiters is None:
            self._waiting[tick] = waiters = []
            loop.call_at(tick / 1000, self._fire, tick)
        waiters.append(future)
        return future

    def _fire(self, tick: int) -> None:
        for future in self._waiting.pop(tick, ()):
            if not future.done():  # a waiter cancelled meanwhile is done already
                future.set_result(None)


class LoadAgent:
    name = "load"
    description = "Deterministic agent for tests and load scripts (key=value message)."

    async def run(self, ctx: RunContext) -> None:
        spec = LoadSpec.parse(ctx.message)
        for i in range(spec.thinking):
            await ctx.emit.thinking(f"thinking {i + 1} of {spec.thinking}")
        for _ in range(spec.tools):
            await ctx.call_tool("sleep", {"ms": spec.tool_ms})
        delay = spec.delay_ms / 1000
        pacer = Pacer()
        for i in range(spec.chunks):
            if i and delay:
                await pacer.wait(delay)
            await ctx.emit.chunk(chunk_text(i, spec.chunk_chars))
        if spec.fail:
            raise RuntimeError("load agent failing on purpose (fail=1)")

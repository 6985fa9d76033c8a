"""Running the load clients' event loop."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


#: Allocations between the load client's young collections, as the gateway's default
#: (``CHAT_GC_THRESHOLD``): with CPython's 700, a client holding hundreds of streams
#: paused 100 ms at a time for a full collection, which its latencies counted.
GC_THRESHOLD = 50_000


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on uvloop when it is installed, else on asyncio's default loop, with
    the collector set up as a serving gateway sets it (the client's own pauses are not
    the server's latency)."""
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD, older, oldest)
    gc.freeze()
    factory: Callable[[], asyncio.AbstractEventLoop] | None
    try:
        import uvloop
    except ImportError:
        factory = None
    else:
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)

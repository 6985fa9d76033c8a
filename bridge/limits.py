"""Per-user limits as plain objects: the clock is passed in, nothing here sleeps."""

from __future__ import annotations

import contextlib
from collections import deque


class SlidingWindow:
    """At most ``limit`` events per key in any ``window_s`` seconds."""

    def __init__(self, limit: int, window_s: float = 60.0) -> None:
        if limit < 1 or window_s <= 0:
            raise ValueError("a sliding window needs limit >= 1 and window_s > 0")
        self.limit = limit
        self.window_s = window_s
        self._hits: dict[str, deque[float]] = {}

    def allows(self, key: str, now: float) -> bool:
        """Whether one more event for ``key`` at ``now`` is within the limit."""
        hits = self._hits.get(key)
        if not hits:
            return True
        horizon = now - self.window_s
        while hits and hits[0] <= horizon:
            hits.popleft()
        return len(hits) < self.limit

    def hit(self, key: str, now: float) -> None:
        """Count one event for ``key`` at ``now``."""
        self._hits.setdefault(key, deque()).append(now)

    def forget(self, key: str, at: float) -> None:
        """Uncount one event of ``key`` counted at ``at`` (a start that did not happen)."""
        hits = self._hits.get(key)
        if hits is not None:
            with contextlib.suppress(ValueError):
                hits.remove(at)

    def retry_after(self, key: str, now: float) -> float:
        """Seconds until ``key`` may act again (0 when it may now)."""
        hits = self._hits.get(key)
        if not hits or len(hits) < self.limit:
            return 0.0
        return max(0.0, hits[0] + self.window_s - now)

    def forget_idle(self, now: float) -> None:
        """Drop keys with no event inside the window (keeps memory bounded by active users)."""
        horizon = now - self.window_s
        for key in [k for k, hits in self._hits.items() if not hits or hits[-1] <= horizon]:
            del self._hits[key]

    def __len__(self) -> int:
        return len(self._hits)

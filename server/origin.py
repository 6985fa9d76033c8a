"""Per-user limits as plain objects: the clock is passed in, nothing here sleeps."""

from __future__ import annotations

from collections import deque


class SlidingWindow:
    """At most ``limit`` events per key in any ``window_s`` seconds."""

    def __init__(self, limit: int, window_s: float = 60.0) -> None:
        if limit < 1 or window_s <= 0:
            raise ValueError("a sliding window needs limit >= 1 and window_s > 0")
        self.limit = limit
        self.window_s = window_s
        self._hits: dict[str, deque[float]] = {}

    def allow(self, key: str, now: float) -> bool:
        """Count one event for ``key`` at ``now`` if the limit allows it."""
        hits = self._hits.get(key)
        if hits is None:
            hits = self._hits[key] = deque()
        horizon = now - self.window_s
        while hits and hits[0] <= horizon:
            hits.popleft()
        if len(hits) >= self.limit:
            return False
        hits.append(now)
        return True

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


def origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a WebSocket handshake's ``Origin`` may open a session.

    No ``Origin`` (not a browser): allowed.  The server's own origin, whose host and
    port are those of the ``Host`` header (the scheme is not compared, so a TLS
    proxy in front changes nothing): allowed.  Otherwise only an origin listed in
    ``allowed``, or any when ``allowed`` holds ``*``.
    """
    if origin is None:
        return True
    origin = origin.strip().rstrip("/").lower()
    if "*" in allowed or origin in {a.strip().rstrip("/").lower() for a in allowed}:
        return True
    scheme, sep, netloc = origin.partition("://")
    if not sep or not host or origin == "null":
        return False
    default = {"http": ":80", "https": ":443"}.get(scheme)
    if default is not None and netloc.endswith(default):
        netloc = netloc[: -len(default)]
    return netloc == host.strip().lower()

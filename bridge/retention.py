"""How much of one user's finished runs a broker keeps for resume (pure logic).

Each run's log is bounded (``CHAT_RUN_LOG_MAX_BYTES``) and a finished run's is kept for
the resume window; but a user who starts runs as fast as the rate limit lets, each
filling its log, would make a process keep the window's worth of them: with the
defaults, about 60 finished runs of 32 MiB each.  :class:`Retention` bounds what one
user's finished runs hold together (``CHAT_USER_LOG_MAX_BYTES``): past it, the oldest
of that user's finished runs are forgotten before their window ends (a resume of one
answers as for any run past its window; its stored messages stay in the thread).
The newest finished run is always kept, so that a client that just saw a run end can
still read its end.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class _Kept:
    #: Finished runs, oldest first, and the bytes each holds.
    runs: dict[str, int] = field(default_factory=dict)
    held: int = 0


class Retention:
    """Per user, the finished runs kept and the bytes they hold."""

    __slots__ = ("_users", "max_bytes")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._users: dict[str, _Kept] = {}

    def finished(self, owner: str, run_id: str, held_bytes: int) -> list[str]:
        """Count a run that just finished; the ids of the owner's older finished runs to
        forget now, oldest first, so that the rest hold at most ``max_bytes``."""
        kept = self._users.setdefault(owner, _Kept())
        kept.held += held_bytes - kept.runs.pop(run_id, 0)
        kept.runs[run_id] = held_bytes
        dropped: list[str] = []
        while kept.held > self.max_bytes and len(kept.runs) > 1:
            oldest = next(iter(kept.runs))
            kept.held -= kept.runs.pop(oldest)
            dropped.append(oldest)
        return dropped

    def forgotten(self, owner: str, run_id: str) -> None:
        """A finished run left the broker (its window ended)."""
        kept = self._users.get(owner)
        if kept is None or run_id not in kept.runs:
            return
        kept.held -= kept.runs.pop(run_id)
        if not kept.runs:
            del self._users[owner]

    def held(self, owner: str) -> int:
        """Bytes the owner's finished runs hold."""
        kept = self._users.get(owner)
        return 0 if kept is None else kept.held

    def __len__(self) -> int:
        """Users with finished runs kept."""
        return len(self._users)

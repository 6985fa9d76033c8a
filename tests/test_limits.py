"""The per-user limits as plain objects: the sliding window and the in-memory broker's
reservations of run starts (no socket, no clock but the one passed in)."""

from __future__ import annotations

from bridge.broker import RunRecord
from bridge.limits import SlidingWindow
from bridge.memory import InMemoryBroker


class _Controller:
    async def apply(self, action: str) -> str:
        return action

    def watchers_changed(self, count: int) -> None:
        return None

    def answer(self, chars: int) -> str:
        return ""

    def lost(self) -> None:
        return None


def test_a_forgotten_hit_no_longer_counts() -> None:
    window = SlidingWindow(2, 60.0)
    window.hit("u", 1.0)
    window.hit("u", 2.0)
    assert not window.allows("u", 3.0)
    window.forget("u", 2.0)
    assert window.allows("u", 3.0)
    window.forget("u", 99.0)  # never counted: nothing changes
    window.forget("nobody", 1.0)
    assert window.retry_after("u", 3.0) == 0.0


async def test_reservations_count_until_released() -> None:
    broker = InMemoryBroker(run_log_max_bytes=1 << 20, resume_window_s=5)
    first = await broker.reserve_run("u", max_active=2, per_window=10, window_s=60)
    second = await broker.reserve_run("u", max_active=2, per_window=10, window_s=60)
    assert first.token is not None and second.token is not None
    refused = await broker.reserve_run("u", max_active=2, per_window=10, window_s=60)
    assert (refused.token, refused.active) == (None, 2)
    # Another user is not affected.
    assert (await broker.reserve_run("v", max_active=2, per_window=10, window_s=60)).token
    # A start that was refused later frees its place and its hit in the window.
    await broker.release_run("u", first.token, started=False)
    again = await broker.reserve_run("u", max_active=2, per_window=10, window_s=60)
    assert again.token is not None
    # A start that became a run: the run counts instead.
    record = RunRecord("r_1", "t_1", "u", "load", "running", 0.0, 0.0)
    await broker.create_run(record, _Controller())
    await broker.release_run("u", second.token, started=True)
    assert (await broker.reserve_run("u", max_active=2, per_window=10, window_s=60)).token is None
    await broker.release_run("u", second.token, started=True)  # twice: no effect
    assert await broker.active_runs("u") == 1


async def test_the_window_counts_reserved_starts() -> None:
    broker = InMemoryBroker(run_log_max_bytes=1 << 20, resume_window_s=5)
    tokens = [
        (await broker.reserve_run("u", max_active=100, per_window=3, window_s=60)).token
        for _ in range(3)
    ]
    assert all(tokens)
    refused = await broker.reserve_run("u", max_active=100, per_window=3, window_s=60)
    assert refused.token is None and 0 < refused.wait_s <= 60
    for token in tokens:
        assert token is not None
        await broker.release_run("u", token, started=True)
    # Released as started: still in the window.
    assert (await broker.reserve_run("u", max_active=100, per_window=3, window_s=60)).token is None

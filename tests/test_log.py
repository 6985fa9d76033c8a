from __future__ import annotations

import pytest

from bridge.errors import ResumeUnavailable
from bridge.events import make_event
from bridge.log import EVENT_OVERHEAD, RunLog, trim


def ev(seq: int, text: str = "x", run_id: str = "r_1"):  # type: ignore[no-untyped-def]
    return make_event("response_chunk", {"text": text}, run_id=run_id, thread_id="t", seq=seq)


def test_appends_in_order_and_reads_after_a_seq() -> None:
    log = RunLog("r_1", 1 << 20)
    for seq in range(1, 6):
        log.append(ev(seq))
    assert log.last_seq == 5
    assert [e.seq for e in log.read(0)] == [1, 2, 3, 4, 5]
    assert [e.seq for e in log.read(3)] == [4, 5]
    assert [e.seq for e in log.read(1, limit=2)] == [2, 3]
    assert log.read(5) == []


def test_rejects_gaps_repeats_other_runs_and_events_after_the_end() -> None:
    log = RunLog("r_1", 1 << 20)
    log.append(ev(1))
    with pytest.raises(ValueError, match="expected seq 2"):
        log.append(ev(3))
    with pytest.raises(ValueError, match="expected seq 2"):
        log.append(ev(1))
    with pytest.raises(ValueError, match="appended to log"):
        log.append(ev(2, run_id="r_2"))
    log.append(make_event("agent_completed", {}, run_id="r_1", seq=2))
    assert log.closed
    with pytest.raises(ValueError, match="already ended"):
        log.append(ev(3))


def test_drops_oldest_past_the_byte_bound_and_refuses_partial_replay() -> None:
    one = ev(1, "a" * 100).size + EVENT_OVERHEAD
    log = RunLog("r_1", max_bytes=one * 10 + one // 2)
    for seq in range(1, 101):
        log.append(ev(seq, "a" * 100))
    assert len(log) == 10
    assert log.held_bytes <= log.max_bytes
    assert log.first_kept_seq == 91
    assert [e.seq for e in log.read(90)] == list(range(91, 101))
    with pytest.raises(ResumeUnavailable):
        log.read(89)
    with pytest.raises(ResumeUnavailable):
        log.read(0)


def test_memory_stays_bounded_over_many_events() -> None:
    log = RunLog("r_1", max_bytes=100_000)
    for seq in range(1, 200_001):
        log.append(ev(seq))
    assert log.held_bytes <= 100_000
    # Compaction keeps the list itself near the kept size, not the run's length.
    assert len(log._events) < 3 * len(log) + 128
    assert [e.seq for e in log.read(199_998)] == [199_999, 200_000]


def test_keeps_the_newest_event_even_when_it_alone_is_over_the_bound() -> None:
    log = RunLog("r_1", max_bytes=10)
    log.append(ev(1, "a" * 50))
    log.append(ev(2, "b" * 50))
    assert len(log) == 1
    assert [e.seq for e in log.read(1)] == [2]
    assert log.first_kept_seq == 2


def test_lag_counts_unread_bytes() -> None:
    log = RunLog("r_1", 1 << 20)
    events = [ev(seq) for seq in range(1, 4)]
    for event in events:
        log.append(event)
    assert log.lag_bytes(3) == 0
    assert log.lag_bytes(2) == events[2].size
    assert log.lag_bytes(0) == sum(e.size for e in events)


def test_negative_after_seq_is_an_error() -> None:
    with pytest.raises(ValueError):
        RunLog("r_1", 100).read(-1)


def test_one_trim_policy_drops_the_oldest_and_keeps_the_newest() -> None:
    sizes = [40, 30, 20, 10]
    assert trim(100, 100, 4, sizes.__getitem__) == (0, 100)
    assert trim(100, 50, 4, sizes.__getitem__) == (2, 30)
    # However large the newest is, it stays.
    assert trim(100, 1, 4, sizes.__getitem__) == (3, 10)
    assert trim(500, 1, 1, sizes.__getitem__) == (0, 500)


def test_kept_events_are_out_of_the_garbage_collectors_scans() -> None:
    import gc

    from bridge.log import BLOCK, RECENT

    log = RunLog("r_1", 1 << 24)
    for seq in range(1, 10 * BLOCK + 8):
        log.append(ev(seq, "abcdef"))
    gc.collect()
    gc.collect()
    # Every full block is one untracked tuple of untracked rows; the sizes an array.
    blocks = log._events._blocks
    assert len(blocks) == 10
    assert not any(gc.is_tracked(block) for block in blocks)
    assert not any(gc.is_tracked(row) for block in blocks for row in block)
    assert len(gc.get_referents(log._ends)) <= 1  # its type: the sizes are not objects
    # What a full collection still visits for the log: its few containers and the
    # newest events kept as records, not one object per event.
    tracked = [o for o in gc.get_referents(*gc.get_referents(log)) if gc.is_tracked(o)]
    assert len(tracked) <= RECENT + 8


def test_reads_across_blocks_the_recent_records_and_a_compaction_agree() -> None:
    from bridge.log import BLOCK, RECENT

    made = [ev(seq, f"t{seq}") for seq in range(1, 5 * BLOCK + 3)]
    log = RunLog("r_1", 1 << 24)
    for event in made:
        log.append(event)
    last = len(made)
    for after in (
        0,
        1,
        BLOCK - 1,
        BLOCK,
        2 * BLOCK + 5,
        last - RECENT - 1,
        last - RECENT,
        last - 1,
    ):
        for limit in (1, 3, BLOCK, 1 << 30):
            got = log.read(after, limit)
            assert got == made[after : after + limit], (after, limit)
    # The newest events are the very records appended; older ones equal them.
    assert log.read(last - 1)[0] is made[-1]
    assert log.read(0, 1)[0] == made[0] and log.read(0, 1)[0] is not made[0]
    # A log trimmed by bytes forgets whole blocks and still reads what it keeps.
    one = made[0].size + EVENT_OVERHEAD
    small = RunLog("r_1", one * (BLOCK + 10))
    for event in made:
        small.append(event)
    kept = small.first_kept_seq
    assert len(small._events) < 3 * len(small) + 2 * BLOCK
    assert small.read(kept - 1) == made[kept - 1 :]
    with pytest.raises(ResumeUnavailable):
        small.read(kept - 2)

"""The outbox without a socket: recording fake watches, a clock passed by hand."""

from __future__ import annotations

import pytest

from bridge import events
from bridge.errors import ResumeUnavailable
from bridge.events import Event, make_event
from server.outbox import (
    CLOSE_SLOW,
    CLOSE_UNAUTHORIZED,
    IllegalTransition,
    Outbox,
    Policy,
    State,
)


def run_event(seq: int, size: int = 100, type: str = "response_chunk") -> Event:
    return make_event(type, {"text": "x" * size}, run_id="r1", thread_id="t1", seq=seq)  # type: ignore[arg-type]


class FakeWatch:
    """A cursor over a list of events, recording what was asked of it."""

    def __init__(self, run_id: str = "r1", *, ended: bool = False) -> None:
        self.run_id = run_id
        self.cursor = 0
        self.log: list[Event] = []
        self.ended = ended
        self.reads: list[int] = []
        self.closed = False
        self.gone = False

    def publish(self, n: int, size: int = 100) -> None:
        start = len(self.log)
        self.log += [run_event(start + i + 1, size) for i in range(n)]

    async def read(self, limit: int) -> list[Event]:
        self.reads.append(limit)
        if self.gone:
            raise ResumeUnavailable("the events after seq 0 were dropped")
        batch = self.log[self.cursor : self.cursor + limit]
        self.cursor += len(batch)
        return batch

    def lag_bytes(self) -> int:
        return sum(e.size for e in self.log[self.cursor :])

    @property
    def finished(self) -> bool:
        return self.ended and self.cursor >= len(self.log)

    def close(self) -> None:
        self.closed = True


def box(**kw: object) -> Outbox:
    policy = Policy(send_buffer_bytes=1000, send_timeout_s=10.0, max_control=4, batch=8)
    return Outbox(policy, **kw)  # type: ignore[arg-type]


async def test_control_first_then_each_run_in_batches() -> None:
    out = box()
    watch = FakeWatch()
    out.watch(watch)
    watch.publish(10)
    assert out.offer(events.pong("p"))
    ready, more = await out.take()
    assert [e.type for e in ready] == ["pong"] + ["response_chunk"] * 8
    assert more and watch.reads == [8]
    ready, more = await out.take()
    assert [e.seq for e in ready] == [9, 10] and not more


async def test_a_command_in_flight_holds_run_events_back() -> None:
    out = box()
    watch = FakeWatch()
    out.watch(watch)
    watch.publish(3)
    out.hold()
    out.offer(events.ack("a", "resume", "r1", "running"))
    ready, _ = await out.take()
    assert [e.type for e in ready] == ["ack"] and watch.reads == []
    assert not out.idle
    out.release()
    ready, _ = await out.take()
    assert [e.seq for e in ready] == [1, 2, 3] and out.idle


async def test_finished_and_lost_runs_are_let_go() -> None:
    out = box()
    done, lost = FakeWatch("done", ended=True), FakeWatch("lost")
    lost.gone = True
    out.watch(done)
    out.watch(lost)
    done.publish(2)
    ready, _ = await out.take()
    assert out.watching == [] and done.closed and lost.closed
    error = ready[-1]
    assert error.type == "error" and error.data["code"] == "resume_unavailable"
    assert error.data["run_id"] == "lost"


def test_full_control_queue_is_reported_and_overflow_cuts() -> None:
    out = box()
    for i in range(4):
        assert out.offer(events.pong(i))
    assert out.control_full
    assert not out.offer(events.pong("one too many"))
    assert out.state is State.ABORTED and out.close_code == CLOSE_SLOW


def test_state_transitions_are_guarded_with_exact_messages() -> None:
    out = box()
    assert out.close(1000, "bye")  # OPEN -> DRAINING
    assert not out.close(1012, "later drain loses")  # the first close wins
    assert out.close_code == 1000
    assert out.close(4408, "abort overrides a drain", drain=False)
    assert out.state is State.ABORTED
    assert not out.close(1000, "nothing after an abort")
    out.finish()
    assert out.state is State.CLOSED
    with pytest.raises(IllegalTransition) as info:
        out._move(State.OPEN)
    assert str(info.value) == 'Unexpected outbox transition from "closed" to "open".'


async def test_nothing_is_taken_once_cut() -> None:
    out = box()
    watch = FakeWatch()
    out.watch(watch)
    watch.publish(3)
    out.close(4408, "cut", drain=False)
    assert await out.take() == ([], False)
    assert watch.reads == []


def test_a_burst_while_the_writer_waits_for_its_turn_is_not_the_clients_fault() -> None:
    out = box()
    watch = FakeWatch()
    out.watch(watch)
    watch.publish(100)  # 10x the buffer arrived between two writer turns
    assert out.unread_bytes() > out.policy.send_buffer_bytes
    for now in (0.0, 1.0, 2.0, 30.0):  # no send is stuck: never cut
        assert out.verdict(now) is None


def test_a_send_stuck_across_two_verdicts_with_too_much_unread_is_cut() -> None:
    out = box()
    watch = FakeWatch()
    out.watch(watch)
    watch.publish(100)
    out.in_send = True
    assert out.verdict(0.0) is None  # first seen stuck: not yet
    cut = out.verdict(1.0)
    assert cut is not None and cut.code == CLOSE_SLOW and "overflow" in cut.reason
    assert not cut.drain and cut.error_code == "slow_consumer"


def test_progress_between_verdicts_is_not_stuck() -> None:
    out = box()
    watch = FakeWatch()
    out.watch(watch)
    watch.publish(100)
    out.in_send = True
    for step in range(5):  # a slow but steady reader: each look finds a new send
        assert out.verdict(float(step)) is None
        out.sends += 1


def test_a_stall_is_cut_even_with_little_unread() -> None:
    out = box()
    out.in_send = True
    assert out.verdict(0.0) is None
    assert out.verdict(9.9) is None
    cut = out.verdict(10.0)
    assert cut is not None and cut.reason == "slow consumer: send stalled"


def test_a_resume_backlog_is_allowed_on_top() -> None:
    out = box()
    watch = FakeWatch()
    watch.publish(100)
    out.watch(watch, allowance=watch.lag_bytes())
    out.in_send = True
    out.verdict(0.0)
    assert out.verdict(1.0) is None
    watch.publish(11)  # over the buffer beyond what was asked for
    cut = out.verdict(2.0)
    assert cut is not None and cut.code == CLOSE_SLOW


def test_token_expiry_drains_then_closes_4401() -> None:
    out = box(expires_at=100.0)
    assert out.verdict(99.9) is None
    cut = out.verdict(100.0)
    assert cut is not None and cut.code == CLOSE_UNAUTHORIZED and cut.drain
    assert cut.reason == "token expired" and cut.error_code == "unauthorized"
    out.cut(cut)
    assert out.state is State.DRAINING and out.verdict(101.0) is None


def test_buffered_bytes_is_what_cursors_still_hold() -> None:
    out = box()
    a, b = FakeWatch("a"), FakeWatch("b")
    out.watch(a)
    out.watch(b)
    a.publish(3, 50)
    b.publish(2, 50)
    assert out.buffered_bytes() == a.lag_bytes() + b.lag_bytes() > 0
    out.detach_all()
    assert out.buffered_bytes() == 0 and a.closed and b.closed

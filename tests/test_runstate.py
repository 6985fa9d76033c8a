"""The run state, without a socket: events checked, replayed, and endings answered."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.errors import InvariantBroken
from bridge.events import Event, make_event
from bridge.runstate import AgentCompleted, ResponseChunk, ResponseComplete, RunState, ToolFailed
from bridge.wire import RunStatus


def run(*steps: tuple[str, dict[str, Any]]) -> list[Event]:
    return [
        make_event(kind, data, run_id="r_1", thread_id="t_1", seq=i)  # type: ignore[arg-type]
        for i, (kind, data) in enumerate(steps, 1)
    ]


CALL = {"call_id": "c1", "tool": "calculator", "args": {"expression": "1+1"}}
DONE = {"call_id": "c1", "tool": "calculator", "ok": True, "duration_ms": 1.0, "result": 2}


def test_a_whole_run_replays_to_its_end() -> None:
    events = run(
        ("user_message", {"content": "hi"}),
        ("agent_started", {"agent": "demo"}),
        ("tool_executing", CALL),
        ("tool_completed", DONE),
        ("response_chunk", {"text": "Two", "index": 0}),
        ("response_chunk", {"text": " é", "index": 1}),
        (
            "response_complete",
            {"message_id": "m_1", "content": "Two é", "fallback": False, "stored": True},
        ),
        ("agent_completed", {"status": "completed", "duration_ms": 3.0}),
    )
    state = RunState.replay(events)
    assert state.seq == 8 and state.completed and state.status is RunStatus.COMPLETED
    assert state.responded and state.open_calls == {}
    assert (state.chunks, state.content, state.chars, state.answer_bytes) == (2, "Two é", 5, 6)


@pytest.mark.parametrize(
    ("steps", "why"),
    [
        ([("tool_completed", DONE)], "never announced"),
        ([("tool_executing", CALL), ("tool_executing", CALL)], "already open"),
        (
            [("tool_executing", CALL), ("agent_completed", {"status": "failed"})],
            "still open",
        ),
        ([("response_chunk", {"text": "a", "index": 1})], "index"),
        ([("response_chunk", {"text": "", "index": 0})], "non-empty"),
        (
            [
                ("response_chunk", {"text": "a", "index": 0}),
                ("response_complete", {"content": "b"}),
            ],
            "content",
        ),
        (
            [
                ("agent_completed", {"status": "completed", "duration_ms": 1}),
                ("agent_thinking", {"text": "late"}),
            ],
            "cannot follow",
        ),
    ],
)
def test_a_broken_invariant_is_refused(steps: list[tuple[str, dict[str, Any]]], why: str) -> None:
    with pytest.raises(InvariantBroken, match=why):
        RunState.replay(run(*steps))


def test_a_gap_in_seq_is_refused() -> None:
    state = RunState()
    state.feed("user_message", {"content": "hi"}, 1)
    with pytest.raises(InvariantBroken, match="seq 3"):
        state.feed("agent_started", {"agent": "demo"}, 3)


def test_check_changes_nothing_and_numbers_chunks() -> None:
    state = RunState()
    assert state.check("response_chunk", {"text": "x"}) == {"text": "x", "index": 0}
    assert state.chunks == 0 and state.content == ""


def test_a_lost_run_is_closed_from_what_it_left_open() -> None:
    state = RunState.replay(
        run(
            ("user_message", {"content": "hi"}),
            ("tool_executing", CALL),
            ("response_chunk", {"text": "So far", "index": 0}),
        )
    )
    ending = state.lost(
        code="node_lost", message="lost", apology="Sorry.", message_id="m_x", duration_ms=5.0
    )
    assert ending == [
        ToolFailed("c1", "calculator", "node_lost"),
        ResponseChunk("\n\nSorry.", 1),
        ResponseComplete("m_x", "So far\n\nSorry.", True, False),
        AgentCompleted(RunStatus.FAILED, 5.0, {"code": "node_lost", "message": "lost"}),
    ]
    # The closing events keep the invariants: fed after the run, it ends cleanly.
    for seq, item in enumerate(ending, state.seq + 1):
        state.feed(item.type, item.data(), seq)
    assert state.completed and state.status is RunStatus.FAILED and not state.open_calls


def test_an_answered_run_is_closed_without_a_second_answer() -> None:
    state = RunState.resumed(
        seq=9, open_calls={}, chunks=3, responded=True, content="the whole answer"
    )
    ending = state.lost(code="c", message="m", apology="Sorry.", message_id="m", duration_ms=1)
    assert [item.type for item in ending] == ["agent_completed"]
    assert ending[0].data() == {
        "status": "failed",
        "duration_ms": 1,
        "error": {"code": "c", "message": "m"},
    }


def test_completed_carries_no_error_and_failed_calls_carry_their_durations() -> None:
    assert AgentCompleted(RunStatus.COMPLETED, 1.23456, {"code": "x", "message": "y"}).data() == {
        "status": "completed",
        "duration_ms": 1.235,
    }
    state = RunState()
    state.feed("tool_executing", CALL, 1)
    assert state.failed_calls("cancelled", {"c1": 12.3456})[0].data() == {
        "call_id": "c1",
        "tool": "calculator",
        "ok": False,
        "error": "cancelled",
        "duration_ms": 12.346,
    }

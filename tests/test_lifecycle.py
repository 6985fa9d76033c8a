from __future__ import annotations

import pytest

from agents.errors import LifecycleConflict
from agents.lifecycle import Action, Lifecycle, RunStatus

S = RunStatus


@pytest.mark.parametrize(
    ("start", "action", "after"),
    [
        (S.RUNNING, "stop", S.PAUSED),
        (S.QUEUED, "stop", S.PAUSED),
        (S.PAUSED, "start", S.RUNNING),
        (S.QUEUED, "start", S.RUNNING),
        (S.RUNNING, "cancel", S.CANCELLED),
        (S.PAUSED, "cancel", S.CANCELLED),
        (S.QUEUED, "cancel", S.CANCELLED),
    ],
)
def test_allowed_transitions(start: RunStatus, action: str, after: RunStatus) -> None:
    lc = Lifecycle("r_1", start)
    transition = lc.apply(action)
    assert transition.changed and transition.after is after and lc.status is after


@pytest.mark.parametrize(
    ("start", "action"),
    [(S.PAUSED, "stop"), (S.RUNNING, "start"), (S.CANCELLED, "cancel")],
)
def test_noops_answer_the_current_status(start: RunStatus, action: str) -> None:
    lc = Lifecycle("r_1", start)
    transition = lc.apply(action)
    assert not transition.changed and lc.status is start


@pytest.mark.parametrize(
    ("start", "action"),
    [
        (S.COMPLETED, "stop"),
        (S.FAILED, "stop"),
        (S.CANCELLED, "stop"),
        (S.COMPLETED, "start"),
        (S.CANCELLED, "start"),
        (S.COMPLETED, "cancel"),
        (S.FAILED, "cancel"),
    ],
)
def test_terminal_statuses_conflict(start: RunStatus, action: str) -> None:
    lc = Lifecycle("r_1", start)
    with pytest.raises(LifecycleConflict, match=f"cannot {action} run r_1: it is {start}"):
        lc.apply(action)
    assert lc.status is start


def test_unknown_action() -> None:
    with pytest.raises(ValueError):
        Lifecycle("r_1").apply("explode")


def test_begin_and_finish() -> None:
    lc = Lifecycle("r_1")
    assert lc.begin().after is S.RUNNING
    assert lc.finish(S.COMPLETED).after is S.COMPLETED
    assert lc.status.terminal
    paused = Lifecycle("r_2", S.PAUSED)
    assert not paused.begin().changed
    with pytest.raises(LifecycleConflict):
        paused.finish(S.COMPLETED)
    with pytest.raises(ValueError):
        Lifecycle("r_3", S.RUNNING).finish(S.CANCELLED)
    assert Action("stop") is Action.STOP

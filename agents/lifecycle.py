"""The run lifecycle of the contract, as a plain state machine.

::

    queued ──begin──▶ running ──finish──▶ completed | failed
      │  ▲              │  ▲
      │  └───start──────┼──┘ (start: paused|queued → running)
      └──stop──▶ paused ◀┘   (stop: running|queued → paused)
    cancel: queued | running | paused | waiting → cancelled
    running ──wait──▶ waiting ──resolved──▶ running   (an input request, section 6.4)
    stop: waiting → paused; start: paused → waiting while an input request is open

A no-op (stop a paused run, start a running one, cancel a cancelled one)
answers the current status and changes nothing; any other move from a terminal
status is a :class:`LifecycleConflict`.
"""

from __future__ import annotations

from dataclasses import dataclass

from agents.errors import LifecycleConflict
from bridge.wire import Action, RunStatus

__all__ = ["Action", "Lifecycle", "RunStatus", "Transition"]


@dataclass(frozen=True, slots=True)
class _Rule:
    sources: frozenset[RunStatus]
    target: RunStatus


_RULES: dict[Action, _Rule] = {
    Action.STOP: _Rule(
        frozenset({RunStatus.RUNNING, RunStatus.QUEUED, RunStatus.WAITING}), RunStatus.PAUSED
    ),
    Action.START: _Rule(frozenset({RunStatus.PAUSED, RunStatus.QUEUED}), RunStatus.RUNNING),
    Action.CANCEL: _Rule(
        frozenset({RunStatus.RUNNING, RunStatus.PAUSED, RunStatus.QUEUED, RunStatus.WAITING}),
        RunStatus.CANCELLED,
    ),
}


@dataclass(frozen=True, slots=True)
class Transition:
    before: RunStatus
    after: RunStatus

    @property
    def changed(self) -> bool:
        return self.before is not self.after


class Lifecycle:
    """The status of one run and the only way to change it."""

    __slots__ = ("awaiting", "run_id", "status")

    def __init__(self, run_id: str, status: RunStatus = RunStatus.QUEUED) -> None:
        self.run_id = run_id
        self.status = status
        #: Input requests of the run still open: a start makes it ``waiting``, not running.
        self.awaiting = 0

    def apply(self, action: Action | str) -> Transition:
        """Apply a client's ``stop``, ``start`` or ``cancel``.

        Raises:
            ValueError: ``action`` is not one of the three.
            LifecycleConflict: the run's status does not allow it.
        """
        act = Action(action)
        rule = _RULES[act]
        before = self.status
        if act is Action.START and before is RunStatus.WAITING:
            return Transition(before, before)  # not paused: nothing to start
        if act is Action.START and self.awaiting and before in rule.sources:
            self.status = RunStatus.WAITING
            return Transition(before, RunStatus.WAITING)
        if before is rule.target:
            return Transition(before, before)
        if before not in rule.sources:
            raise LifecycleConflict(f"cannot {act} run {self.run_id}: it is {before}")
        self.status = rule.target
        return Transition(before, rule.target)

    def begin(self) -> Transition:
        """The run's task started: a queued run is now running (a paused one stays paused)."""
        before = self.status
        if before is RunStatus.QUEUED:
            self.status = RunStatus.RUNNING
        elif before not in (RunStatus.PAUSED, RunStatus.CANCELLED):
            raise LifecycleConflict(f"cannot begin run {self.run_id}: it is {before}")
        return Transition(before, self.status)

    def wait(self) -> Transition:
        """An input request was made: a running run is now ``waiting`` (a paused one
        stays paused, and waits once started)."""
        before = self.status
        if before is RunStatus.RUNNING:
            self.status = RunStatus.WAITING
        return Transition(before, self.status)

    def resolved(self) -> Transition:
        """The resolution was announced: a waiting run with no request open runs again."""
        before = self.status
        if before is RunStatus.WAITING and not self.awaiting:
            self.status = RunStatus.RUNNING
        return Transition(before, self.status)

    def finish(self, status: RunStatus) -> Transition:
        """The run ended by itself, ``completed`` or ``failed``; only a running run can."""
        if status not in (RunStatus.COMPLETED, RunStatus.FAILED):
            raise ValueError(f"a run finishes completed or failed, not {status}")
        before = self.status
        if before is not RunStatus.RUNNING:
            raise LifecycleConflict(f"cannot finish run {self.run_id} as {status}: it is {before}")
        self.status = status
        return Transition(before, status)

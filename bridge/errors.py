"""Errors raised by the bridge.

The whole tree, under one root::

    BridgeError
    ├── BridgeNotAttached   an agent emitted with no run bound to its adapter
    ├── RunGone             an agent emitted into a run whose clients are gone for good
    ├── RunClosed           an event was emitted after the run's ``agent_completed``
    ├── InvariantBroken     an event would break the run's invariants (also a ValueError)
    ├── RunNotFound         no such run (or not one the caller may see)
    ├── RunConflict         a lifecycle command the run's status does not allow
    ├── ResumeUnavailable   the events asked for are no longer kept
    ├── CursorAhead         a watch asked for events after ones the run has not made
    ├── AnswerTooLarge      a response chunk would make the answer larger than allowed
    ├── BrokerUnavailable   the shared broker (Redis) cannot be reached
    └── RemoteCommandError  the process running a run answered a command with an error

Each error knows the ``error.code`` it has on the wire; the root derives from
:class:`bridge.wire.WireError`, as every package's root does.
"""

from __future__ import annotations

from bridge.wire import WireError


class BridgeError(WireError):
    """Root of the bridge's errors."""

    code = "internal"


class BridgeNotAttached(BridgeError):
    """An adapter was used to emit before a run was bound to it, or after it was unbound."""

    code = "internal"


class RunGone(BridgeError):
    """The run was cancelled because no client came back within the detach grace."""

    code = "client_gone"


class RunClosed(BridgeError):
    """The run has already sent its ``agent_completed``; nothing may follow it."""

    code = "internal"


class InvariantBroken(BridgeError, ValueError):
    """An event that would break its run's invariants (an unknown call completed, …)."""

    code = "internal"


class RunNotFound(BridgeError):
    """No such run, or a run that belongs to someone else."""

    code = "not_found"


class ResumeUnavailable(BridgeError):
    """The events after the asked ``seq`` were dropped from the run's log."""

    code = "resume_unavailable"


class CursorAhead(BridgeError):
    """A watch's ``after_seq`` is beyond the run's last ``seq``: a cursor of no such run."""

    code = "bad_message"


class AnswerTooLarge(BridgeError):
    """A response chunk would make the run's answer larger than its bound; the run fails."""

    code = "answer_too_large"


class RunConflict(BridgeError):
    """A lifecycle command that the run's status does not allow."""

    code = "conflict"


class BrokerUnavailable(BridgeError):
    """The shared broker cannot be reached; nothing was done."""

    code = "internal"
    http_status = 503
    #: Its message is meant for clients (it names no secret).
    public = True


class RemoteCommandError(BridgeError):
    """An error the process running the run answered a lifecycle command with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

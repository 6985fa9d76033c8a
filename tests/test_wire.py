"""The wire's vocabulary: one error base, codes with their HTTP status, close codes."""

from __future__ import annotations

import pytest

from agents.errors import AgentError, LifecycleConflict, ToolError
from agents.lifecycle import Action as LifecycleAction
from agents.lifecycle import RunStatus as LifecycleStatus
from bridge import bus
from bridge.errors import (
    BridgeError,
    BrokerUnavailable,
    RemoteCommandError,
    ResumeUnavailable,
    RunNotFound,
)
from bridge.wire import TERMINAL, Action, CloseCode, ErrorCode, RunStatus, WireError, is_terminal
from server.errors import (
    BodyTooLarge,
    GatewayError,
    ProtocolError,
    ShuttingDown,
    StorageUnavailable,
    StoreError,
    wire_error,
)


def test_every_root_derives_from_the_wire_base() -> None:
    for root in (BridgeError, AgentError, GatewayError, StoreError):
        assert issubclass(root, WireError)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (RunNotFound("no run r_1"), ("not_found", "no run r_1", 404)),
        (ResumeUnavailable("gone"), ("resume_unavailable", "gone", 410)),
        (LifecycleConflict("cannot stop"), ("conflict", "cannot stop", 409)),
        (RemoteCommandError("conflict", "it is completed"), ("conflict", "it is completed", 409)),
        (ProtocolError("bad_json", "not JSON"), ("bad_json", "not JSON", 400)),
        (
            BodyTooLarge("body larger than 10 bytes"),
            ("too_large", "body larger than 10 bytes", 413),
        ),
        (ShuttingDown("shutting down"), ("internal", "shutting down", 503)),
        (StorageUnavailable("store down"), ("internal", "store down", 503)),
        (BrokerUnavailable("redis down"), ("internal", "redis down", 503)),
        # Codes a client never sees as such, and errors whose text must stay in the log.
        (ToolError("bad args"), ("internal", "internal error", 500)),
        (StoreError("password=hunter2"), ("internal", "internal error", 500)),
        (RemoteCommandError("internal", "trace"), ("internal", "internal error", 500)),
        (KeyError("secret"), ("internal", "internal error", 500)),
    ],
)
def test_wire_error_maps_each_error_once(
    exc: BaseException, expected: tuple[str, str, int]
) -> None:
    code, message, status = wire_error(exc)
    assert (code, message, status) == expected
    assert type(code) is str


def test_codes_statuses_and_actions() -> None:
    assert ErrorCode.RATE_LIMITED.http_status == 429
    assert all(isinstance(code.http_status, int) for code in ErrorCode)
    assert {int(c) for c in CloseCode} >= {1000, 1009, 1012, 1013, 4401, 4403, 4408, 4429}
    assert CloseCode.SLOW_CONSUMER == 4408
    assert {RunStatus.COMPLETED, RunStatus.CANCELLED, RunStatus.FAILED} == TERMINAL
    assert is_terminal("failed") and not is_terminal("paused") and not is_terminal("bogus")
    assert [s for s in RunStatus if s.terminal] == ["completed", "cancelled", "failed"]
    # The agents' lifecycle speaks the same vocabulary, not a copy of it.
    assert LifecycleStatus is RunStatus and LifecycleAction is Action


def test_bus_messages_round_trip_and_strays_are_dropped() -> None:
    for message in (
        bus.command("q1", "r_1", "cancel", "node-a"),
        bus.reply("q1", "cancelled"),
        bus.failed("q1", "conflict", "it is completed"),
        bus.watchers("r_1", 3),
    ):
        assert bus.decode(bus.encode(message)) == message
    for stray in (b"not json", b"[1]", b'{"kind": "cmd"}', b'{"kind": "other"}'):
        assert bus.decode(stray) is None

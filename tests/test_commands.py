from __future__ import annotations

import pytest

from server.commands import Control, Ping, Resume, UserMessage, parse_command
from server.errors import ProtocolError


def code_of(frame: str | bytes) -> str:
    with pytest.raises(ProtocolError) as info:
        parse_command(frame)
    return info.value.code


def test_user_message_with_all_fields() -> None:
    cmd = parse_command(
        '{"type": "user_message", "content": "hi", "id": "c1", "thread_id": "t_1", "agent": "load"}'
    )
    assert cmd == UserMessage(content="hi", id="c1", thread_id="t_1", agent="load")


def test_controls_resume_and_ping() -> None:
    assert parse_command('{"type": "stop", "run_id": "r_1", "id": 7}') == Control(
        action="stop", run_id="r_1", id=7
    )
    assert parse_command('{"type": "cancel", "run_id": "r_1"}') == Control("cancel", "r_1")
    assert parse_command('{"type": "resume", "run_id": "r_1", "after_seq": 0}') == Resume("r_1", 0)
    assert parse_command('{"type": "ping", "id": "p"}') == Ping(id="p")


@pytest.mark.parametrize(
    "frame",
    ["", "{", "nope", '{"type": "ping"', b"\xff\xfe", '"\\ud800"', '{"a": "\\udc00"}'],
)
def test_not_json_is_bad_json(frame: str | bytes) -> None:
    assert code_of(frame) == "bad_json"


@pytest.mark.parametrize(
    "frame",
    [
        "[]",
        "1",
        '"ping"',
        "null",
        "{}",
        '{"type": 5}',
        '{"type": "user_message"}',
        '{"type": "user_message", "content": ""}',
        '{"type": "user_message", "content": "   "}',
        '{"type": "user_message", "content": 3}',
        '{"type": "user_message", "content": "x", "thread_id": 4}',
        '{"type": "user_message", "content": "x", "agent": ""}',
        '{"type": "stop"}',
        '{"type": "start", "run_id": ""}',
        '{"type": "resume", "run_id": "r"}',
        '{"type": "resume", "run_id": "r", "after_seq": -1}',
        '{"type": "resume", "run_id": "r", "after_seq": "3"}',
        '{"type": "resume", "run_id": "r", "after_seq": true}',
        '{"type": "resume", "run_id": "r", "after_seq": 1.5}',
        '{"type": "ping", "id": {"a": 1}}',
        '{"type": "ping", "id": true}',
    ],
)
def test_wrong_fields_are_bad_message(frame: str) -> None:
    assert code_of(frame) == "bad_message"


def test_unknown_type_keeps_ref() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_command('{"type": "dance", "id": "x1"}')
    assert info.value.code == "unknown_type"
    assert info.value.ref == "x1"
    assert "dance" in str(info.value)


def test_extra_fields_are_allowed() -> None:
    assert parse_command('{"type": "ping", "extra": [1, 2]}') == Ping()

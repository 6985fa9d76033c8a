"""Integers in query strings, headers and cursors: the strict parser, and the routes that
use it against a real gateway (each malformed value is 400 ``bad_message``, never a 500
or a logged traceback)."""

from __future__ import annotations

import base64
import logging

import orjson
import pytest

from server.errors import ProtocolError
from server.params import INT64_MAX, check_int, parse_int
from tests.support import LiveServer, http_client, ws_client


@pytest.mark.parametrize(
    ("raw", "value"), [("0", 0), (" 42 ", 42), ("007", 7), (str(INT64_MAX), INT64_MAX)]
)
def test_parse_int_reads_ascii_digits(raw: str, value: int) -> None:
    assert parse_int(raw, "n") == value


@pytest.mark.parametrize(
    "raw",
    [
        "",
        " ",
        "²",  # str.isdigit() says yes, int() raises
        "1²",
        "١٢",  # Arabic-Indic digits: int() would accept them
        "１",  # fullwidth
        "+1",
        "-1",
        "1_000",
        "1.0",
        "0x10",
        "1e3",
        str(INT64_MAX + 1),
        "1" * 20,
        "1" * 5_000,  # past int()'s 4,300 digits
    ],
)
def test_parse_int_refuses_everything_else(raw: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_int(raw, "after_seq")
    assert info.value.code == "bad_message"
    assert str(info.value).startswith("after_seq must be an integer from 0 to ")
    assert len(str(info.value)) < 120  # a bad value is quoted short


def test_parse_int_range_and_check_int() -> None:
    assert parse_int("100", "limit", minimum=1, maximum=100) == 100
    for raw in ("0", "101"):
        with pytest.raises(ProtocolError):
            parse_int(raw, "limit", minimum=1, maximum=100)
    assert check_int(INT64_MAX, "cursor") == INT64_MAX
    for value in (True, 1.0, "1", None, -1, INT64_MAX + 1, 2**64 - 1, 10**5000):
        with pytest.raises(ProtocolError):
            check_int(value, "cursor")


def _cursor(value: object) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(value)).decode().rstrip("=")


async def test_malformed_integers_are_400_never_500(
    server: LiveServer, user: str, caplog: pytest.LogCaptureFixture
) -> None:
    headers = server.headers(user)
    async with ws_client(server, user) as client:
        events = await client.run("What is 12 * 7?")
        run_id, thread_id = events[0]["run_id"], events[0]["thread_id"]
        huge = 2**64 - 1  # orjson reads it; SQLite overflowed on it
        await client.send(type="resume", run_id=run_id, after_seq=huge, id="r1")
        error = await client.recv()
        assert error["type"] == "error" and error["data"]["code"] == "bad_message", error
    events_url = f"/api/chat/runs/{run_id}/events"
    messages_url = f"/api/threads/{thread_id}/messages"
    bad: list[tuple[str, dict[str, str | bytes]]] = [
        (f"{events_url}?after_seq=%C2%B2", {}),
        (f"{events_url}?after_seq=%D9%A1", {}),
        (f"{events_url}?after_seq={'1' * 5_000}", {}),
        (f"{events_url}?after_seq={2**63}", {}),
        (f"{events_url}?after_seq=-1", {}),
        (events_url, {"Last-Event-ID": b"\xb2"}),
        (events_url, {"Last-Event-ID": "1" * 5_000}),
        (f"/api/threads?limit={'1' * 5_000}", {}),
        ("/api/threads?limit=%C2%B2", {}),
        ("/api/threads?limit=0", {}),
        (f"/api/threads?cursor={_cursor([1.5, 't' * 200])}", {}),
        (f"/api/threads?cursor={_cursor([True, 't_x'])}", {}),
        (f"{messages_url}?limit={'9' * 5_000}", {}),
        (f"{messages_url}?cursor={_cursor(huge)}", {}),
        (f"{messages_url}?cursor={_cursor(2**63)}", {}),
        (f"{messages_url}?cursor={_cursor(-1)}", {}),
        (f"{messages_url}?cursor={_cursor(1.5)}", {}),
        (f"{messages_url}?cursor={_cursor(True)}", {}),
    ]
    caplog.set_level(logging.WARNING)
    async with http_client(server) as http:
        for url, extra in bad:
            resp = await http.get(url, headers={**headers, **extra})
            assert resp.status_code == 400, (url[:80], extra, resp.text[:200])
            assert resp.json()["error"]["code"] == "bad_message", url[:80]
        # The largest values that fit are answered, not refused.
        resp = await http.get(f"{messages_url}?cursor={_cursor(INT64_MAX)}", headers=headers)
        assert resp.status_code == 200 and resp.json()["messages"] == []
        resp = await http.get(f"{events_url}?after_seq=0", headers=headers)
        assert resp.status_code == 200
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not failures, [r.getMessage() for r in failures]

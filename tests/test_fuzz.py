"""Property-based tests: arbitrary and mutated frames, against the parser and a live socket."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.commands import Control, Ping, Resume, UserMessage, parse_command
from server.errors import CLIENT_CODES, ProtocolError
from tests.support import LiveServer, run_server, ws_client

TYPES = ["user_message", "stop", "start", "cancel", "resume", "ping"]

json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)

# Frames close to valid ones: a known or odd type, and fields that are right, wrong or missing.
mutated = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(TYPES) | st.text(max_size=12) | json_values,
        "content": st.text(max_size=60) | json_values,
        "run_id": st.sampled_from(["r_unknown", ""]) | json_values,
        "after_seq": st.integers(min_value=-3, max_value=10**12) | json_values,
        "id": st.text(max_size=20) | st.integers() | json_values,
        "thread_id": st.text(max_size=20) | json_values,
        "agent": st.sampled_from(["load", "demo", "nobody"]) | json_values,
    },
)
frames = (
    st.text(max_size=200)
    | st.binary(max_size=200).map(lambda b: b.decode("latin-1"))
    | json_values.map(json.dumps)
    | mutated.map(json.dumps)
)


@settings(max_examples=600, deadline=None)
@given(frame=frames | st.binary(max_size=200))
def test_parser_answers_a_command_or_a_contract_error(frame: str | bytes) -> None:
    try:
        command = parse_command(frame)
    except ProtocolError as exc:
        assert exc.code in {"bad_json", "bad_message", "unknown_type"}
    else:
        assert isinstance(command, UserMessage | Control | Resume | Ping)


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[LiveServer]:
    with run_server(rate_limit_per_minute=100_000, max_active_runs_per_user=100_000) as live:
        yield live


async def exchange(server: LiveServer, batch: list[str]) -> None:
    """Send the frames, then a ping; every frame gets exactly one answer, the socket lives."""
    async with ws_client(server, "fuzzer") as client:
        for frame in batch:
            await client.ws.send(frame)
        await client.send(type="ping", id="end-of-batch")
        answers = 0
        ended = False
        async with asyncio.timeout(30):
            while True:
                try:
                    # After the batch's last pong, what is still coming is run events:
                    # session messages may overtake them (only an ack is ordered).
                    message = await client.recv(timeout=0.2 if ended else 30)
                except TimeoutError:
                    break
                assert set(message) >= {"type", "run_id", "thread_id", "seq", "ts", "data"}
                kind = message["type"]
                if kind == "error":
                    assert message["data"]["code"] in CLIENT_CODES, message
                    answers += 1
                elif kind in ("ack",) or (kind == "user_message" and message["seq"] == 1):
                    answers += 1
                elif kind == "pong":
                    if message["data"]["ref"] == "end-of-batch":
                        ended = True
                    else:
                        answers += 1
        assert answers == len(batch)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(frames, min_size=1, max_size=12))
def test_live_socket_survives_arbitrary_frames(fuzz_server: LiveServer, batch: list[str]) -> None:
    # Frames a browser could not send (lone surrogates) are sent as JSON escapes instead.
    safe = [f.encode("utf-8", "surrogatepass").decode("utf-8", "replace") for f in batch]
    asyncio.run(exchange(fuzz_server, safe))


def test_every_answer_kind_is_reached(fuzz_server: LiveServer) -> None:
    """The property above is not vacuous: a fixed batch hits each kind of answer."""
    batch = [
        "{",
        "[]",
        '{"type": "nope"}',
        '{"type": "ping", "id": 1}',
        '{"type": "user_message", "content": "chunks=1", "agent": "load"}',
        '{"type": "stop", "run_id": "r_unknown"}',
    ]
    asyncio.run(exchange(fuzz_server, batch))

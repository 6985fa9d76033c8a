from __future__ import annotations

import pytest

from agents.base import split_words
from agents.demo import find_expression, find_zone
from agents.errors import AgentInputError, ToolError
from agents.load import LoadSpec, chunk_text
from agents.tools import CALCULATOR, CLOCK, SLEEP, resolve_zone


@pytest.mark.parametrize(
    ("message", "expression"),
    [
        ("What is 12 * 7?", "12 * 7"),
        ("what's (3 + 4) * 2?", "(3 + 4) * 2"),
        ("Compute 2^10 please", "2^10"),
        ("How much is 6 times 7", "6 * 7"),
        ("10 divided by 4", "10 / 4"),
        ("hello", None),
        ("I have 3 cats", None),
        ("What time is it?", None),
    ],
)
def test_finds_arithmetic(message: str, expression: str | None) -> None:
    assert find_expression(message) == expression


@pytest.mark.parametrize(
    ("message", "zone"),
    [
        ("What time is it in Europe/Paris?", "Europe/Paris"),
        ("What time is it in Tokyo?", "Tokyo"),
        ("What's the date in UTC", "UTC"),
        ("What time is it in New York right now?", "New York"),
        ("What time is it?", None),
    ],
)
def test_finds_zones(message: str, zone: str | None) -> None:
    assert find_zone(message) == zone


def test_resolve_zone() -> None:
    assert resolve_zone("Tokyo").key == "Asia/Tokyo"
    assert resolve_zone("new york").key == "America/New_York"
    for bad in ("Mars/Olympus", "../../etc/passwd", "/etc/localtime", ""):
        with pytest.raises(ToolError):
            resolve_zone(bad)


async def test_clock_tool() -> None:
    result = await CLOCK.fn(CLOCK.check_args({"timezone": "Europe/Paris"}))
    assert result["timezone"] == "Europe/Paris"
    assert result["utc_offset"] in ("+01:00", "+02:00")
    assert len(result["date"]) == 10 and result["weekday"]


def test_tool_argument_checks() -> None:
    assert CALCULATOR.check_args({"expression": "1+1"}) == {"expression": "1+1"}
    for args, message in [
        ([], "must be a JSON object"),
        ({}, "missing required argument 'expression'"),
        ({"expression": 5}, "must be of type string"),
        ({"expression": "1", "more": 1}, "unexpected argument 'more'"),
    ]:
        with pytest.raises(ToolError, match=message):
            CALCULATOR.check_args(args)
    with pytest.raises(ToolError, match="must be in"):
        SLEEP.check_args({"ms": -1})
    with pytest.raises(ToolError, match="must be of type integer"):
        SLEEP.check_args({"ms": True})
    assert CALCULATOR.schema()["function"]["name"] == "calculator"


def test_load_spec() -> None:
    assert LoadSpec.parse("") == LoadSpec()
    spec = LoadSpec.parse("chunks=3 chunk_chars=2 delay_ms=5 thinking=0 tools=2 tool_ms=7 fail=1")
    assert spec == LoadSpec(3, 2, 5, 0, 2, 7, 1)
    for bad in ("chunks", "chunks=x", "chunks=-1", "colour=red", "fail=2"):
        with pytest.raises(AgentInputError):
            LoadSpec.parse(bad)
    assert chunk_text(0, 3) == "aaa" and chunk_text(27, 2) == "bb"


def test_split_words_keeps_the_text() -> None:
    for text in ["Hello world.", "  lead", "trail  ", "a\nb  c", "", "   "]:
        assert "".join(split_words(text)) == text

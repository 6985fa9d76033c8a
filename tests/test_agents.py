from __future__ import annotations

import asyncio
import math
import random
import re
import time

import pytest

from agents.base import split_words
from agents.demo import _OPERATOR, _WORD_OPS, MAX_PLACE_WORDS, find_expression, find_zone
from agents.errors import AgentInputError, ToolError
from agents.load import LoadSpec, Pacer, Ticks, chunk_text
from agents.tools import CALCULATOR, CLOCK, SLEEP, is_zone_name, resolve_zone


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


def test_the_pacer_keeps_the_models_clock_when_its_caller_is_late() -> None:
    """Each pause ends a fixed step after the previous one's due time: a caller back
    late waits less, or not at all, and the schedule does not drift."""
    pacer = Pacer()
    assert pacer.pause(10.0, 0.02) == pytest.approx(0.02)  # due 10.02
    assert pacer.pause(10.021, 0.02) == pytest.approx(0.019)  # due 10.04
    assert pacer.pause(10.1, 0.02) == 0.0  # due 10.06: 40 ms late, no wait
    assert pacer.pause(10.1, 0.02) == 0.0  # due 10.08
    assert pacer.pause(10.1, 0.02) == pytest.approx(0.0)  # due 10.10
    assert pacer.pause(10.1, 0.02) == pytest.approx(0.02)  # due 10.12: caught up


async def test_the_pacers_of_a_loop_share_one_timer_per_millisecond() -> None:
    """Waits due within the same millisecond are woken by one timer, together, none
    before its due time; a waiter cancelled meanwhile leaves the others be."""
    loop = asyncio.get_running_loop()
    clock = Ticks.of(loop)
    assert Ticks.of(loop) is clock
    base = math.ceil((loop.time() + 0.02) * 1000) / 1000  # a millisecond's start
    dues = [base + 0.0001 * k for k in range(1, 10)]  # all within the next millisecond
    futures = [clock.wait(due) for due in dues]
    assert len(clock._waiting) == 1
    futures[0].cancel()
    await asyncio.gather(*futures[1:])
    assert loop.time() >= max(dues)
    assert not clock._waiting


def test_a_closed_loops_clock_goes_with_it() -> None:
    """The clocks are kept per loop, weakly: a loop that is done is not kept alive."""
    import gc

    async def paced() -> None:
        await Pacer().wait(0.001)
        await Pacer().wait(0.001)

    before = len(Ticks._clocks)
    for _ in range(3):
        asyncio.run(paced())
    gc.collect()
    assert len(Ticks._clocks) <= before


async def test_a_late_pacer_does_not_wait_and_an_early_one_waits_for_its_due_time() -> None:
    loop = asyncio.get_running_loop()
    pacer = Pacer()
    began = loop.time()
    await pacer.wait(0.02)
    assert loop.time() >= began + 0.02
    time.sleep(0.05)  # noqa: ASYNC251 (the caller comes back 50 ms late)
    await pacer.wait(0.02)  # was due 30 ms ago: one turn of the loop
    await pacer.wait(0.02)  # was due 10 ms ago
    assert pacer._due is not None and pacer._due == pytest.approx(began + 0.06, abs=0.002)
    await pacer.wait(0.02)  # due 10 ms ahead: waits for it
    assert loop.time() >= pacer._due


def test_split_words_keeps_the_text() -> None:
    for text in ["Hello world.", "  lead", "trail  ", "a\nb  c", "", "   "]:
        assert "".join(split_words(text)) == text


# Linear in the message, whatever it holds ----------------------------------------------
# Each of these inputs took seconds (up to 30 s) of the event loop before.

_OLD_EXPRESSION = re.compile(r"[-+(]*\s*\d[\d\s.+\-*/×÷^%()]*")


def reference_find_expression(message: str) -> str | None:
    """The search as first written (quadratic on long runs): the meaning to keep."""
    text = message
    for pattern, op in _WORD_OPS:
        text = pattern.sub(f" {op} ", text)
    best: str | None = None
    for match in _OLD_EXPRESSION.finditer(text):
        candidate = match.group().strip().rstrip(".").strip()
        while candidate.endswith(")") and candidate.count(")") > candidate.count("("):
            candidate = candidate[:-1].rstrip()
        candidate = " ".join(candidate.split())
        if _OPERATOR.search(candidate) and (best is None or len(candidate) > len(best)):
            best = candidate
    return best


def test_find_expression_means_what_it_meant() -> None:
    rng = random.Random(11)
    alphabet = "12 (()) +-*/.^%x times ab?"
    for _ in range(20_000):
        message = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        assert find_expression(message) == reference_find_expression(message), repr(message)


@pytest.mark.parametrize(
    ("message", "expression"),
    [
        ("1+1" + ")" * 64_000, "1+1"),
        ("(" * 64_000, None),
        ("+" * 64_000, None),
        ("-(" * 32_000, None),
        ("1" + "+" * 64_000, None),
        (
            "What is " + "(" * 20_000 + "2+3" + ")" * 20_001 + "?",
            "(" * 20_000 + "2+3" + ")" * 20_000,
        ),
        ("2 * 3 " + "a " * 30_000 + "4 - 1", "2 * 3"),
    ],
)
def test_find_expression_on_huge_messages(message: str, expression: str | None) -> None:
    assert find_expression(message) == expression


def test_find_zone_tries_a_few_places_however_many_words(monkeypatch: pytest.MonkeyPatch) -> None:
    import agents.demo

    tried: list[str] = []

    def counting(name: str) -> bool:
        tried.append(name)
        return is_zone_name(name)

    monkeypatch.setattr(agents.demo, "is_zone_name", counting)
    assert find_zone("what time is it in " + "Ab " * 21_000) is None
    assert len(tried) == MAX_PLACE_WORDS
    tried.clear()
    assert find_zone("what time is it in New York " + "Ab " * 21_000) == "New York"
    assert tried[-1] == "New York" and len(tried) == MAX_PLACE_WORDS - 1
    tried.clear()
    assert find_zone("time " + "in Ab " * 10_000) is None
    assert len(tried) == 10_000  # one place per "in": linear in the message
    # Still the longest known place first, and every city of the table is found.
    assert find_zone("What time is it in Ho Chi Minh City now?") == "Ho Chi Minh"
    assert find_zone("What time is it in Buenos_Aires?") == "Buenos_Aires"


def test_zone_names_are_checked_without_the_disk() -> None:
    assert is_zone_name("Europe/Paris") and is_zone_name("tokyo") and is_zone_name("UTC")
    assert not is_zone_name("Ab" * 30_000) and not is_zone_name("") and not is_zone_name("Ab")


def test_split_words_on_huge_texts() -> None:
    assert split_words(" " * 64_000) == [" " * 64_000]
    words = split_words("word " * 20_000)
    assert len(words) == 20_000 and "".join(words) == "word " * 20_000

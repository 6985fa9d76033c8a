"""The ``demo`` agent: offline, with real tools.

Arithmetic goes through the ``calculator`` tool, a question about the time or the
date through the ``clock`` tool; anything else gets a reply that says what the
agent can do.
"""

from __future__ import annotations

import re
from typing import Final

from agents.base import RunContext
from agents.tools import is_zone_name, resolve_zone

_WORD_OPS: Final = (
    (re.compile(r"\b(?:times|multiplied by|x)\b", re.I), "*"),
    (re.compile(r"\b(?:plus|added to)\b", re.I), "+"),
    (re.compile(r"\bminus\b", re.I), "-"),
    (re.compile(r"\b(?:divided by|over)\b", re.I), "/"),
    (re.compile(r"\b(?:to the power of)\b", re.I), "**"),
)
#: A run of the characters an expression is made of.  Matched as one character class,
#: so that finding every run is one pass (a pattern with a prefix before its first
#: digit, such as ``[-+(]*\s*\d``, backtracks over each long run of "(" or "+": quadratic).
_EXPRESSION_RUN: Final = re.compile(r"[\d\s.+\-*/×÷^%()]+")
_DIGIT: Final = re.compile(r"\d")
_LEADING: Final = frozenset("-+(")
_OPERATOR: Final = re.compile(r"\d\s*\)*\s*(?:\*\*|[+\-*/×÷^%])\s*\(*\s*[-+]?\d")
_TIME: Final = re.compile(
    r"\b(?:time|date|day|today|clock|hour|weekday|what year|which year|month)\b", re.I
)
_ZONE_NAME: Final = re.compile(r"\b(UTC|[A-Z][A-Za-z]+(?:/[A-Za-z_\-]+){1,2})\b")
_IN_PLACE: Final = re.compile(r"\bin ([A-Z][A-Za-z]+(?:[ _][A-Z][A-Za-z]+)*)")

#: The most words of a place ``find_zone`` tries after "in" (city names of the time
#: zone database have at most 3: "Ho Chi Minh").
MAX_PLACE_WORDS: Final = 4

CAPABILITIES: Final = (
    "I'm the demo agent, and I work offline with real tools. Ask me arithmetic, such as "
    '"What is 12 * 7?", and I will work it out with the calculator tool. Ask me the time '
    'or the date, optionally somewhere ("What time is it in Tokyo?"), and I will read the '
    "clock tool. Everything I do streams to you as it happens: my thinking, each tool "
    "call with its result, and this answer, word by word."
)


def find_expression(message: str) -> str | None:
    """The longest arithmetic expression in the message, if there is one."""
    text = message
    for pattern, op in _WORD_OPS:
        text = pattern.sub(f" {op} ", text)
    best: str | None = None
    for match in _EXPRESSION_RUN.finditer(text):
        candidate = _from_first_number(match.group())
        if candidate is None:
            continue
        candidate = _balance(candidate.strip().rstrip(".").strip())
        if _OPERATOR.search(candidate) and (best is None or len(candidate) > len(best)):
            best = candidate
    return best


def _from_first_number(run: str) -> str | None:
    """The run from its first number on, with the signs, "(" and spaces right before it."""
    digit = _DIGIT.search(run)
    if digit is None:
        return None
    start = digit.start()
    while start and run[start - 1].isspace():
        start -= 1
    while start and run[start - 1] in _LEADING:
        start -= 1
    return run[start:]


def _balance(text: str) -> str:
    """Drop unmatched closing parentheses at the end (e.g. "(2 + 3))?"), in one pass."""
    excess = text.count(")") - text.count("(")
    end = len(text)
    while excess > 0 and end and text[end - 1] == ")":
        end -= 1
        excess -= 1
        while end and text[end - 1].isspace():
            end -= 1
    return " ".join(text[:end].split())


def find_zone(message: str) -> str | None:
    """A time zone the message names: an IANA name, ``UTC``, or ``in <City>``."""
    for match in _ZONE_NAME.finditer(message):
        name = match.group(1)
        if name == "UTC" or "/" in name:
            return name
    for match in _IN_PLACE.finditer(message):
        # No place has more than a few words: only that many are tried, so that a long
        # run of capitalised words costs one pass, not one lookup per prefix.
        words = match.group(1).split(maxsplit=MAX_PLACE_WORDS)[:MAX_PLACE_WORDS]
        # Try the longest run of capitalised words first: "in New York City" → "New York".
        for end in range(len(words), 0, -1):
            place = " ".join(words[:end])
            if not is_zone_name(place):
                continue
            try:
                resolve_zone(place)
            except Exception:
                continue
            return place
    return None


class DemoAgent:
    name = "demo"
    description = "Offline agent with a calculator and a clock."

    def __init__(self) -> None:
        # The time zone tables are read from disk once, now, rather than on the event
        # loop in the middle of the first question about the time.
        is_zone_name("UTC")

    async def run(self, ctx: RunContext) -> None:
        message = ctx.message
        expression = find_expression(message)
        if expression is not None:
            await ctx.emit.thinking(
                f"This is arithmetic: {expression}. I'll work it out with the calculator tool."
            )
            outcome = await ctx.call_tool("calculator", {"expression": expression})
            if outcome.ok:
                # The expression that ran: its approval may have edited it.
                ran = (outcome.args or {}).get("expression", expression)
                await ctx.say(f"{ran} = {outcome.result}.")
            else:
                await ctx.say(f"I couldn't work out {expression}: {outcome.error}.")
            return
        if _TIME.search(message):
            zone = find_zone(message)
            args = {"timezone": zone} if zone else {}
            where = f" in {zone}" if zone else " (UTC)"
            await ctx.emit.thinking(
                f"You asked about the time or date{where}. I'll read the clock tool."
            )
            outcome = await ctx.call_tool("clock", args)
            if outcome.ok:
                now = outcome.result
                await ctx.say(
                    f"It is {now['time'][:5]} on {now['weekday']}, {now['date']} "
                    f"({now['timezone']}, UTC{now['utc_offset']})."
                )
            else:
                await ctx.say(f"I couldn't read the clock: {outcome.error}.")
            return
        await ctx.emit.thinking("No arithmetic and no question about the time: I'll say what I do.")
        await ctx.say(CAPABILITIES)

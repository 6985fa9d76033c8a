"""The ``demo`` agent: offline, with real tools.

Arithmetic goes through the ``calculator`` tool, a question about the time or the
date through the ``clock`` tool; anything else gets a reply that says what the
agent can do.
"""

from __future__ import annotations

import re
from typing import Final

from agents.base import RunContext
from agents.tools import resolve_zone

_WORD_OPS: Final = (
    (re.compile(r"\b(?:times|multiplied by|x)\b", re.I), "*"),
    (re.compile(r"\b(?:plus|added to)\b", re.I), "+"),
    (re.compile(r"\bminus\b", re.I), "-"),
    (re.compile(r"\b(?:divided by|over)\b", re.I), "/"),
    (re.compile(r"\b(?:to the power of)\b", re.I), "**"),
)
_EXPRESSION: Final = re.compile(r"[-+(]*\s*\d[\d\s.+\-*/×÷^%()]*")
_OPERATOR: Final = re.compile(r"\d\s*\)*\s*(?:\*\*|[+\-*/×÷^%])\s*\(*\s*[-+]?\d")
_TIME: Final = re.compile(
    r"\b(?:time|date|day|today|clock|hour|weekday|what year|which year|month)\b", re.I
)
_ZONE_NAME: Final = re.compile(r"\b(UTC|[A-Z][A-Za-z]+(?:/[A-Za-z_\-]+){1,2})\b")
_IN_PLACE: Final = re.compile(r"\bin ([A-Z][A-Za-z]+(?:[ _][A-Z][A-Za-z]+)*)")

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
    for match in _EXPRESSION.finditer(text):
        candidate = match.group().strip().rstrip(".").strip()
        candidate = _balance(candidate)
        if _OPERATOR.search(candidate) and (best is None or len(candidate) > len(best)):
            best = candidate
    return best


def _balance(text: str) -> str:
    # Drop unmatched closing parentheses at the end (e.g. "(2 + 3))?").
    while text.endswith(")") and text.count(")") > text.count("("):
        text = text[:-1].rstrip()
    return " ".join(text.split())


def find_zone(message: str) -> str | None:
    """A time zone the message names: an IANA name, ``UTC``, or ``in <City>``."""
    for match in _ZONE_NAME.finditer(message):
        name = match.group(1)
        if name == "UTC" or "/" in name:
            return name
    for match in _IN_PLACE.finditer(message):
        words = match.group(1).split()
        # Try the longest run of capitalised words first: "in New York City" → "New York".
        for end in range(len(words), 0, -1):
            place = " ".join(words[:end])
            try:
                resolve_zone(place)
            except Exception:
                continue
            return place
    return None


class DemoAgent:
    name = "demo"
    description = "Offline agent with a calculator and a clock."

    async def run(self, ctx: RunContext) -> None:
        message = ctx.message
        expression = find_expression(message)
        if expression is not None:
            await ctx.emit.thinking(
                f"This is arithmetic: {expression}. I'll work it out with the calculator tool."
            )
            outcome = await ctx.call_tool("calculator", {"expression": expression})
            if outcome.ok:
                await ctx.say(f"{expression} = {outcome.result}.")
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

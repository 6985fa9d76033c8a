"""Agents and non-agents for the plug-in tests, named in ``CHAT_AGENTS`` as
``tests.plugin_agents:<attribute>``."""

from __future__ import annotations

from typing import Any

from agents.base import RunContext
from agents.tools import Tool


class Greeter:
    """A class whose constructor takes the settings."""

    name = "greeter"
    description = "Greets, and says how many earlier messages the thread has."

    def __init__(self, settings: Any) -> None:
        self.settings = settings

    async def run(self, ctx: RunContext) -> None:
        await ctx.emit.thinking("Greeting.", kind="status")
        await ctx.say(f"Hello {ctx.user_id}, after {len(ctx.history)} messages.")


class Plain:
    """A class with no constructor arguments, and no name of its own."""

    description = "Answers plainly."

    async def run(self, ctx: RunContext) -> None:
        outcome = await ctx.call_tool("calculator", {"expression": "6 * 7"})
        await ctx.say(f"It is {outcome.result}.")


greeter_instance = Greeter(None)


def make_plain(settings: Any) -> Plain:
    """A factory given the settings."""
    assert settings.jwt_secret is not None
    return Plain()


def broken_factory() -> Plain:
    raise RuntimeError("the factory's database is down")


class NotAnAgent:
    def run(self, ctx: RunContext) -> None:  # not async
        return None


not_an_agent = NotAnAgent()


async def _echo(args: Any) -> Any:
    return args["text"]


def tools(settings: Any) -> list[Tool]:
    """A tool factory given the settings."""
    return [
        Tool(
            name="echo",
            description="Echo the text.",
            parameters={"type": "object", "properties": {"text": {"type": "string"}}},
            fn=_echo,
        )
    ]


CLOCK_AGAIN = Tool(name="clock", description="", parameters={"type": "object"}, fn=_echo)
NO_SCHEMA = Tool(name="bad", description="", parameters={"type": "string"}, fn=_echo)


class Asker:
    """Asks its owner a question (with choices when the message is ``choices``), then
    asks to approve a calculation, and answers with both."""

    name = "asker"
    description = "Asks the user, through RunContext.ask and RunContext.approve."

    async def run(self, ctx: RunContext) -> None:
        choices = ["red", "blue"] if ctx.message == "choices" else None
        answer = await ctx.ask("Which colour?", choices)
        await ctx.say(f"You said {answer!r}. ")
        if ctx.message == "approve":
            verdict = await ctx.approve("launch", {"target": "moon"})
            await ctx.say(f"Launch {'approved' if verdict.approved else 'denied'} ({verdict.by}).")

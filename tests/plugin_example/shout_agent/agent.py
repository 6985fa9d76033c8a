"""The agent: thinks out loud, calls a tool, and streams its answer."""

from __future__ import annotations

from typing import Any

from agents.base import RunContext
from agents.errors import AgentInputError


class ShoutAgent:
    """Repeats the message in capitals, with its word count and how long the thread is."""

    name = "shout"
    description = "Repeats your message in capitals (an example plug-in agent)."

    def __init__(self, settings: Any) -> None:
        # A class is called with the gateway's settings when its constructor takes them.
        self.max_words = 200 if settings is None else settings.history_messages * 4

    async def run(self, ctx: RunContext) -> None:
        if not ctx.message.strip():
            raise AgentInputError("there is nothing to shout")
        await ctx.emit.thinking("I will count the words first.", kind="status")
        outcome = await ctx.call_tool("word_count", {"text": ctx.message})
        if not outcome.ok:
            await ctx.say(f"I could not count the words: {outcome.error}")
            return
        words = outcome.result["words"]
        if words > self.max_words:
            raise AgentInputError(f"{words} words is more than I shout ({self.max_words})")
        earlier = len(ctx.history)
        await ctx.say(f"{ctx.message.upper()} ({words} words; {earlier} earlier messages)")

"""A tool of this package, offered to every agent of the gateway."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agents.tools import Tool


async def _word_count(args: Mapping[str, Any]) -> dict[str, int]:
    text = args["text"]
    return {"words": len(text.split()), "characters": len(text)}


WORD_COUNT = Tool(
    name="word_count",
    description="Count the words and characters of a text.",
    parameters={
        "type": "object",
        "properties": {"text": {"type": "string", "description": "the text to count"}},
        "required": ["text"],
        "additionalProperties": False,
    },
    fn=_word_count,
    timeout_s=2.0,
)

"""The tool registry and the built-in tools: ``calculator``, ``clock`` and ``sleep``.

A tool is a name, a description, a JSON-schema object for its arguments, an
async function and a timeout.  The registry checks arguments against the schema
(the subset tools here use: object, required, property types, no extra keys)
before a tool runs.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import zoneinfo
from collections.abc import Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from typing import Any, Final

from agents.calculator import evaluate
from agents.errors import ToolError

ToolFn = Callable[[Mapping[str, Any]], Awaitable[Any]]

_JSON_TYPES: Final[dict[str, tuple[type, ...]]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str
    parameters: Mapping[str, Any]
    fn: ToolFn
    timeout_s: float = 10.0

    def schema(self) -> dict[str, Any]:
        """The tool as an OpenAI-style function declaration."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": dict(self.parameters),
            },
        }

    def check_args(self, args: Any) -> dict[str, Any]:
        """Check ``args`` against the tool's schema.

        Raises:
            ToolError: with a message that says which argument is wrong and how.
        """
        if not isinstance(args, dict):
            raise ToolError(f"{self.name}: arguments must be a JSON object")
        props: Mapping[str, Any] = self.parameters.get("properties", {})
        for name in self.parameters.get("required", ()):
            if name not in args:
                raise ToolError(f"{self.name}: missing required argument {name!r}")
        for name, value in args.items():
            spec = props.get(name)
            if spec is None:
                if self.parameters.get("additionalProperties", True) is False:
                    raise ToolError(f"{self.name}: unexpected argument {name!r}")
                continue
            want = spec.get("type")
            types = _JSON_TYPES.get(want, (object,)) if isinstance(want, str) else (object,)
            if isinstance(value, bool) and bool not in types:
                types = ()
            if not isinstance(value, types):
                raise ToolError(f"{self.name}: argument {name!r} must be of type {want}")
            if isinstance(value, int | float):
                low, high = spec.get("minimum"), spec.get("maximum")
                if (low is not None and value < low) or (high is not None and value > high):
                    raise ToolError(
                        f"{self.name}: argument {name!r} must be in [{low}, {high}], got {value}"
                    )
        return dict(args)


class ToolRegistry:
    """Tools by name."""

    def __init__(self, tools: list[Tool] | None = None) -> None:
        self._tools: dict[str, Tool] = {}
        for tool in tools or ():
            self.register(tool)

    def register(self, tool: Tool) -> None:
        if tool.name in self._tools:
            raise ValueError(f"a tool named {tool.name!r} is registered already")
        self._tools[tool.name] = tool

    def get(self, name: str) -> Tool:
        try:
            return self._tools[name]
        except KeyError:
            raise ToolError(f"no tool named {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())

    def schemas(self) -> list[dict[str, Any]]:
        return [tool.schema() for tool in self._tools.values()]


# Built-in tools -----------------------------------------------------------------


#: Where CPU-bound tool work runs, off the event loop: a few threads, so that tool
#: calls cannot take every thread of the process either.
_CPU_WORKERS: Final = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tools")
#: Integers beyond this are answered as their decimal text: JSON numbers past 2**53
#: lose digits in most clients (and the event encoder refuses ints past 64 bits).
MAX_EXACT_INT: Final = 2**53


async def _calculator(args: Mapping[str, Any]) -> int | float | str:
    value = await asyncio.get_running_loop().run_in_executor(
        _CPU_WORKERS, evaluate, args["expression"]
    )
    if isinstance(value, int) and abs(value) > MAX_EXACT_INT:
        return str(value)
    return value


@cache
def _zones_by_city() -> dict[str, str]:
    zones: dict[str, str] = {}
    for name in sorted(zoneinfo.available_timezones()):
        city = name.rsplit("/", 1)[-1].replace("_", " ").lower()
        zones.setdefault(city, name)
    return zones


@cache
def _zone_names() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


@cache
def _longest_zone_name() -> int:
    return max(max(map(len, _zone_names()), default=0), max(map(len, _zones_by_city())))


def is_zone_name(name: str) -> bool:
    """Whether ``name`` is a time zone's IANA name or city, without touching the disk;
    time linear in its length."""
    text = name.strip()
    if not text or len(text) > _longest_zone_name():
        return False
    return text in _zone_names() or text.replace("_", " ").lower() in _zones_by_city()


def resolve_zone(name: str) -> zoneinfo.ZoneInfo:
    """A time zone by IANA name (``Europe/Paris``), ``UTC``, or city (``Tokyo``)."""
    text = name.strip()
    candidates = [text, _zones_by_city().get(text.replace("_", " ").lower(), "")]
    for candidate in candidates:
        if not candidate or ".." in candidate or candidate.startswith("/"):
            continue
        try:
            return zoneinfo.ZoneInfo(candidate)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
            continue
    raise ToolError(f"unknown time zone {name!r}; use an IANA name such as 'Europe/Paris'")


async def _clock(args: Mapping[str, Any]) -> dict[str, Any]:
    zone = resolve_zone(args.get("timezone") or "UTC")
    now = dt.datetime.now(zone)
    offset = now.strftime("%z")
    return {
        "timezone": str(zone.key),
        "iso": now.isoformat(timespec="seconds"),
        "date": now.date().isoformat(),
        "time": now.strftime("%H:%M:%S"),
        "weekday": now.strftime("%A"),
        "utc_offset": f"{offset[:3]}:{offset[3:]}",
    }


MAX_SLEEP_MS: Final = 600_000


async def _sleep(args: Mapping[str, Any]) -> dict[str, Any]:
    ms = args["ms"]
    await asyncio.sleep(ms / 1000)
    return {"slept_ms": ms}


CALCULATOR = Tool(
    name="calculator",
    description=(
        "Evaluate an arithmetic expression exactly: numbers, + - * / // % and ** (or ^), "
        "and parentheses."
    ),
    parameters={
        "type": "object",
        "properties": {"expression": {"type": "string", "description": "e.g. '12 * 7'"}},
        "required": ["expression"],
        "additionalProperties": False,
    },
    fn=_calculator,
    timeout_s=5.0,
)

CLOCK = Tool(
    name="clock",
    description="The current date and time, in UTC or in a time zone given by IANA name or city.",
    parameters={
        "type": "object",
        "properties": {
            "timezone": {"type": "string", "description": "e.g. 'Europe/Paris' or 'Tokyo'"}
        },
        "additionalProperties": False,
    },
    fn=_clock,
    timeout_s=5.0,
)

SLEEP = Tool(
    name="sleep",
    description="Wait for a number of milliseconds, then answer how long it waited.",
    parameters={
        "type": "object",
        "properties": {"ms": {"type": "integer", "minimum": 0, "maximum": MAX_SLEEP_MS}},
        "required": ["ms"],
        "additionalProperties": False,
    },
    fn=_sleep,
    timeout_s=MAX_SLEEP_MS / 1000 + 5,
)


def builtin_tools() -> ToolRegistry:
    return ToolRegistry([CALCULATOR, CLOCK, SLEEP])

"""Building the agent and tool tables: the built-in ones, ``CHAT_AGENTS``, and plug-ins.

An agent comes from one of three places:

- built in: ``demo``, ``load``, and ``llm`` when a model endpoint is configured;
- ``CHAT_AGENTS``: ``name=target`` pairs, where a target is ``module:attribute`` (an
  agent instance, an agent class, or a factory given the settings) or an ``http(s)://``
  URL, which is an AG-UI endpoint (:mod:`agents.agui`);
- an installed package's entry point in the group ``chat_gateway.agents``, whose name
  is the agent's name and whose value is, again, an instance, a class or a factory.

Tools come from the built-in set and from the entry-point group ``chat_gateway.tools``:
a :class:`~agents.tools.Tool` (with its JSON schema), or a factory given the settings
that returns one or a list of them.

Anything wrong is found at start-up, with a :class:`~agents.errors.PluginError` that
names the spec and what is wrong with it: it does not import, it is not an agent, or
its name is taken.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any, Final

from agents.base import Agent, AgentRegistry, RunContext
from agents.demo import DemoAgent
from agents.errors import PluginError
from agents.llm import LLMAgent, LLMConfig
from agents.load import LoadAgent
from agents.tools import Tool, ToolRegistry, builtin_tools

if TYPE_CHECKING:
    from server.settings import Settings

AGENTS_GROUP: Final = "chat_gateway.agents"
TOOLS_GROUP: Final = "chat_gateway.tools"
BUILTIN_AGENTS: Final = ("demo", "load", "llm")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HEADER = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")


def llm_agent(settings: Settings) -> LLMAgent | None:
    """The ``llm`` agent when an endpoint and a model are configured.

    Raises:
        RuntimeError: they are, but the ``openai`` package is not installed.
    """
    if not (settings.llm_base_url and settings.llm_model):
        return None
    return LLMAgent(
        LLMConfig(
            base_url=settings.llm_base_url,
            model=settings.llm_model,
            api_key=settings.llm_api_key,
            max_steps=settings.llm_max_steps,
            retries=settings.llm_retries,
            max_history=settings.llm_max_history,
            system_prompt=settings.llm_system_prompt,
            timeout_s=settings.llm_timeout_s,
            retry_backoff_s=settings.llm_retry_backoff_s,
            include_usage=settings.llm_usage == "on",
        )
    )


@dataclass(frozen=True, slots=True)
class AgentSpec:
    """One agent asked for by name: where it comes from, and what it points at."""

    name: str
    target: str
    source: str  # "CHAT_AGENTS" or "entry point <dist>"

    @property
    def is_url(self) -> bool:
        return self.target.startswith(("http://", "https://"))


def parse_agent_specs(items: Iterable[str]) -> list[AgentSpec]:
    """``CHAT_AGENTS`` entries (``name=target``) as specs.

    Raises:
        PluginError: an entry is not ``name=target``, or its name is not usable.
    """
    specs: list[AgentSpec] = []
    for item in items:
        name, sep, target = item.partition("=")
        name, target = name.strip(), target.strip()
        if not sep or not name or not target:
            raise PluginError(f"CHAT_AGENTS: {item!r} is not name=module:attribute or name=URL")
        check_name(name, f"CHAT_AGENTS entry {item!r}")
        if not target.startswith(("http://", "https://")) and ":" not in target:
            raise PluginError(
                f"CHAT_AGENTS: agent {name!r}: {target!r} is neither module:attribute nor a URL"
            )
        specs.append(AgentSpec(name, target, "CHAT_AGENTS"))
    return specs


def parse_agent_headers(items: Iterable[str]) -> dict[str, dict[str, str]]:
    """``CHAT_AGENT_HEADERS`` entries (``agent.Header-Name=value``) by agent.

    Raises:
        PluginError: an entry is malformed (the message never shows its value).
    """
    headers: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        agent, dot, header = key.strip().partition(".")
        if not sep or not dot or not agent or not _HEADER.match(header):
            raise PluginError(
                f"CHAT_AGENT_HEADERS: an entry for {key.strip()!r} is not agent.Header-Name=value"
            )
        headers.setdefault(agent, {})[header] = value.strip()
    return headers


def check_name(name: str, where: str) -> None:
    if not _NAME.match(name):
        raise PluginError(
            f"{where}: agent name {name!r} must be 1-64 letters, digits, '_', '.' or '-'"
        )


def load_object(target: str, what: str) -> Any:
    """Import ``module:attribute`` (the attribute may be dotted).

    Raises:
        PluginError: the module does not import, or has no such attribute.
    """
    module_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise PluginError(
            f"{what}: {target!r} does not import: {type(exc).__name__}: {exc}"
        ) from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PluginError(f"{what}: module {module_name!r} has no attribute {attr!r}") from None
    return obj


def _takes_settings(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` can be called with one positional argument (the settings)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    try:
        signature.bind(object())
    except TypeError:
        return False
    return True


def _made(value: Any, settings: Settings, what: str) -> Any:
    """An instance as it is; a class or a factory called (with the settings if it takes them)."""
    if is_agent(value) or not callable(value):
        return value
    try:
        return value(settings) if _takes_settings(value) else value()
    except PluginError:
        raise
    except Exception as exc:
        raise PluginError(f"{what}: creating it failed: {type(exc).__name__}: {exc}") from exc


def is_agent(obj: Any) -> bool:
    """Whether ``obj`` is an agent instance: it has an async ``run(ctx)`` method."""
    return not inspect.isclass(obj) and inspect.iscoroutinefunction(getattr(obj, "run", None))


class NamedAgent:
    """An agent under the name its configuration gives it."""

    def __init__(self, name: str, agent: Any, description: str) -> None:
        self.name = name
        self.description = description
        self.inner = agent

    async def run(self, ctx: RunContext) -> None:
        await self.inner.run(ctx)


def make_agent(value: Any, name: str, settings: Settings, what: str) -> Agent:
    """The agent ``value`` stands for (an instance, a class or a factory), named ``name``.

    The configured name is the agent's name; an agent's own ``name`` attribute may be
    missing or different.

    Raises:
        PluginError: it is not an agent, or making it failed.
    """
    made = _made(value, settings, what)
    if not is_agent(made):
        raise PluginError(
            f"{what}: {type(made).__name__} is not an agent (it needs an async run(ctx) method)"
        )
    description = getattr(made, "description", "")
    if not isinstance(description, str):
        raise PluginError(f"{what}: its description is not a string")
    if getattr(made, "name", None) == name and hasattr(made, "description"):
        agent: Agent = made
        return agent
    return NamedAgent(name, made, description)


def discovered(group: str) -> list[EntryPoint]:
    """The installed packages' entry points of ``group``, in a stable order."""
    # A distribution found twice on the path (installed, and a copy on PYTHONPATH)
    # declares the same entry point twice: that is one, not a clash.
    unique = {(ep.name, ep.value): ep for ep in entry_points(group=group)}
    return [unique[key] for key in sorted(unique)]


def _entry_source(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    label = f"{dist.name} {dist.version}" if dist is not None else ep.value
    return f"entry point {ep.name!r} of {label}"


def build_agents(settings: Settings) -> AgentRegistry:
    """Every agent: built in, from ``CHAT_AGENTS``, and from entry points.

    A URL target is an AG-UI endpoint (:func:`agents.agui.remote_agent`); an AG-UI agent
    made in process takes the limits it was not given from the settings.

    Raises:
        PluginError: a spec does not import, is not an agent, or clashes with a name.
        RuntimeError: the ``llm`` agent is configured but its SDK is missing.
    """
    agents: dict[str, tuple[Agent, str]] = {}

    def add(agent: Agent, source: str) -> None:
        if agent.name in agents:
            _, first = agents[agent.name]
            raise PluginError(
                f"agent name {agent.name!r} is taken twice: by {first} and by {source}"
            )
        agents[agent.name] = (agent, source)

    add(DemoAgent(), "the built-in agents")
    if settings.load_agent == "on":
        add(LoadAgent(), "the built-in agents")
    llm = llm_agent(settings)
    if llm is not None:
        add(llm, "the built-in agents")
    headers = parse_agent_headers(settings.agent_headers)
    specs = parse_agent_specs(settings.agents)
    if settings.entry_points == "on":
        for ep in discovered(AGENTS_GROUP):
            check_name(ep.name, _entry_source(ep))
            specs.append(AgentSpec(ep.name, ep.value, _entry_source(ep)))
    for spec in specs:
        if spec.name in BUILTIN_AGENTS or spec.name in agents:
            first = agents[spec.name][1] if spec.name in agents else "the built-in agents"
            raise PluginError(
                f"agent name {spec.name!r} is taken twice: by {first} and by {spec.source}"
            )
        what = f"agent {spec.name!r} ({spec.source})"
        if spec.is_url:
            from agents.agui_http import remote_agent

            agent: Agent = remote_agent(
                spec.name,
                spec.target,
                headers.pop(spec.name, {}),
                max_steps=settings.llm_max_steps,
                timeout_s=settings.agent_timeout_s,
            )
        else:
            agent = make_agent(load_object(spec.target, what), spec.name, settings, what)
            _configure(agent, settings)
        add(agent, spec.source)
    if headers:
        unknown = ", ".join(sorted(headers))
        raise PluginError(f"CHAT_AGENT_HEADERS names agents that are not AG-UI URLs: {unknown}")
    default = settings.default_agent or ("llm" if llm is not None else "demo")
    if default not in agents:
        known = ", ".join(sorted(agents))
        raise PluginError(f"CHAT_DEFAULT_AGENT {default!r} is not an agent; available: {known}")
    return AgentRegistry([agent for agent, _ in agents.values()], default=default)


def _configure(agent: Agent, settings: Settings) -> None:
    from agents.agui import AGUIAgent

    inner = agent.inner if isinstance(agent, NamedAgent) else agent
    if isinstance(inner, AGUIAgent):
        inner.configure(max_steps=settings.llm_max_steps, timeout_s=settings.agent_timeout_s)


def _tools_of(value: Any, settings: Settings, what: str) -> list[Tool]:
    if callable(value) and not isinstance(value, Tool):
        try:
            value = value(settings) if _takes_settings(value) else value()
        except Exception as exc:
            raise PluginError(f"{what}: creating it failed: {type(exc).__name__}: {exc}") from exc
    items = [value] if isinstance(value, Tool) else value
    if not isinstance(items, list | tuple) or not all(isinstance(t, Tool) for t in items):
        raise PluginError(
            f"{what}: {type(value).__name__} is not a Tool, a list of Tools, or a factory of them"
        )
    for tool in items:
        check_tool(tool, what)
    return list(items)


def check_tool(tool: Tool, what: str) -> None:
    """A tool's name and JSON schema are usable by every agent.

    Raises:
        PluginError: they are not.
    """
    if not _NAME.match(tool.name) or "." in tool.name:
        raise PluginError(f"{what}: tool name {tool.name!r} must be letters, digits, '_' or '-'")
    params = tool.parameters
    if not isinstance(params, Mapping) or params.get("type") != "object":
        raise PluginError(
            f"{what}: tool {tool.name!r} needs a JSON schema of type object as its parameters"
        )
    if not isinstance(params.get("properties", {}), Mapping):
        raise PluginError(f"{what}: tool {tool.name!r}: its schema's properties is not an object")
    if not callable(tool.fn):
        raise PluginError(f"{what}: tool {tool.name!r}: fn is not callable")


def build_tools(settings: Settings) -> ToolRegistry:
    """The built-in tools and those of the ``chat_gateway.tools`` entry points.

    Raises:
        PluginError: a tool does not import, is not a tool, or clashes with a name.
    """
    registry = builtin_tools()
    if settings.entry_points != "on":
        return registry
    for ep in discovered(TOOLS_GROUP):
        what = f"tool {_entry_source(ep)}"
        for tool in _tools_of(load_object(ep.value, what), settings, what):
            if tool.name in registry:
                raise PluginError(f"{what}: a tool named {tool.name!r} is registered already")
            registry.register(tool)
    return registry

"""The agent interface and what an agent is given for one run."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from agents.errors import AgentInputError, ToolError, UnknownAgent
from agents.inputs import InputKind, Resolution
from agents.tools import ToolRegistry
from bridge import tracing
from bridge.bridge import EventAdapter


@dataclass(frozen=True, slots=True)
class Message:
    """One earlier message of the thread, as context for the agent."""

    role: str  # "user" or "assistant"
    content: str


@dataclass(frozen=True, slots=True)
class ClientTool:
    """A tool the client offers (AG-UI's front-end tools): the agent may call it, and
    the client runs it and answers the call in its next request."""

    name: str
    description: str = ""
    #: The arguments' JSON schema.
    parameters: Mapping[str, Any] = field(default_factory=dict)

    def schema(self) -> dict[str, Any]:
        """The tool as an OpenAI-style function, as the gateway's tools give theirs."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": dict(self.parameters) or {"type": "object", "properties": {}},
            },
        }


@dataclass(frozen=True, slots=True)
class ClientToolResult:
    """The client's answer to a client tool call that the thread's previous run left
    open: the call as it was made, and what the client's tool returned."""

    call_id: str
    name: str
    args: Mapping[str, Any]
    content: str
    error: str | None = None


#: The error of a ``tool_completed`` that leaves a call to the client (``pending``).
LEFT_TO_CLIENT = "left to the client"


@dataclass(frozen=True, slots=True)
class ToolOutcome:
    call_id: str
    ok: bool
    result: Any = None
    error: str | None = None
    #: The arguments the call ran with (an approval may have edited them).
    args: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens a run's model requests used, as the model's server reported them."""

    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    model: str | None = None

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.total_tokens + other.total_tokens,
            other.model or self.model,
        )

    def wire(self) -> dict[str, object]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.total_tokens,
            "model": self.model,
        }


class InputPort(Protocol):
    """Where a run asks its owner (the run's controller): ``input_requested``, then the
    run waits (status ``waiting``) for the :class:`Resolution`, announced by
    ``input_resolved`` before this returns."""

    async def request_input(self, kind: InputKind, fields: Mapping[str, Any]) -> Resolution: ...


#: The tool the ``llm`` agent's model calls to ask the user a question.
ASK_USER_TOOL = "ask_user"


@dataclass(slots=True)
class RunContext:
    """Everything an agent gets for one run.  Every event goes out through ``emit``."""

    run_id: str
    thread_id: str
    user_id: str
    message: str
    emit: EventAdapter
    tools: ToolRegistry
    history: Sequence[Message] = ()
    typing_delay_s: float = 0.0
    #: Where to ask the run's owner (None: nobody to ask, as in a bare context).
    inputs: InputPort | None = None
    #: Tools whose calls wait for the owner's approval (``*``: every tool).
    approval_tools: frozenset[str] = frozenset()
    #: Tools the client offers for this run, to be left for it to run (see
    #: :meth:`leave_to_client`).
    client_tools: Sequence[ClientTool] = ()
    #: The client's answers to the client tool calls the thread's previous run left
    #: open: this run continues from them (its ``message`` is their text).
    tool_results: Sequence[ClientToolResult] = ()
    _call_ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    #: The tokens reported so far (:meth:`report_usage`), by model.
    _usage: dict[str, Usage] = field(default_factory=dict)

    def report_usage(self, usage: Usage) -> None:
        """Add a model request's tokens to the run's; ``agent_completed`` carries the sum."""
        key = usage.model or ""
        earlier = self._usage.get(key)
        self._usage[key] = usage if earlier is None else earlier + usage

    def usage_by_model(self) -> list[Usage]:
        """The tokens reported, one entry per model (in the order first reported)."""
        return list(self._usage.values())

    @property
    def usage(self) -> Usage | None:
        """The run's tokens summed over its models (``model`` names them all, joined
        with ``+``), or None if none were reported."""
        entries = self.usage_by_model()
        if not entries:
            return None
        total = Usage()
        for entry in entries:
            total = total + entry
        models = [entry.model for entry in entries if entry.model]
        return dataclasses.replace(total, model="+".join(models) or None)

    def new_call_id(self) -> str:
        """The next tool call id of this run (``call_1``, ``call_2``, …)."""
        return f"call_{next(self._call_ids)}"

    def needs_approval(self, tool: str) -> bool:
        """Whether a call of ``tool`` waits for the owner's approval (``CHAT_APPROVAL_TOOLS``)."""
        return "*" in self.approval_tools or tool in self.approval_tools

    async def ask(self, question: str, choices: Sequence[str] | None = None) -> str:
        """Ask the run's owner a question and wait for the answer (``""`` when none
        came within the input timeout, or the request was otherwise resolved empty).

        Raises:
            AgentInputError: the run has nobody to ask.
        """
        fields: dict[str, Any] = {"question": question}
        if choices is not None:
            fields["choices"] = [str(choice) for choice in choices]
        resolution = await self._port().request_input("question", fields)
        return resolution.answer or ""

    async def approve(
        self, tool: str, args: Mapping[str, Any], *, call_id: str | None = None
    ) -> Resolution:
        """Ask the run's owner to approve a call of ``tool`` with ``args`` and wait.

        The answer says ``approved``; its ``args``, when set, replace the call's.  A
        request no one answered in time is denied (``by: timeout``).  ``call_id`` names
        the call's ``tool_executing`` when one was announced.

        Raises:
            AgentInputError: the run has nobody to ask.
        """
        fields: dict[str, Any] = {"call_id": call_id, "tool": tool, "args": dict(args)}
        return await self._port().request_input("tool_approval", fields)

    def _port(self) -> InputPort:
        if self.inputs is None:
            raise AgentInputError("this run has nobody to ask for input")
        return self.inputs

    async def refuse_tool(self, name: str, error: str) -> ToolOutcome:
        """Announce a call that cannot run (bad arguments from a model, an unknown tool)
        and answer it failed at once, so that whoever asked sees why."""
        call_id = self.new_call_id()
        await self.emit.tool_executing(call_id, name, {})
        await self.emit.tool_completed(call_id, name, ok=False, error=error, duration_ms=0.0)
        return ToolOutcome(call_id, False, error=error)

    def client_tool(self, name: str) -> ClientTool | None:
        """The client tool of that name, if the client offered one."""
        return next((tool for tool in self.client_tools if tool.name == name), None)

    async def leave_to_client(self, call_id: str, name: str) -> ToolOutcome:
        """Answer a call of a client tool, already announced with ``tool_executing``, as
        left to the client: ``tool_completed`` with ``pending`` (``ok`` false, ``error``
        :data:`LEFT_TO_CLIENT`), so the run's invariants hold.  The agent should end
        its run then: the client answers the call in its next request, which starts
        the run that goes on (with :attr:`tool_results`)."""
        await self.emit.tool_completed(
            call_id, name, ok=False, error=LEFT_TO_CLIENT, duration_ms=0.0, pending=True
        )
        return ToolOutcome(call_id, False, error=LEFT_TO_CLIENT)

    async def call_tool(self, name: str, args: Mapping[str, Any]) -> ToolOutcome:
        """Announce, run and answer one tool call.

        ``tool_executing`` goes out first; a tool that needs approval then waits for
        the owner's answer (denied: ``tool_completed`` fails with the denial; approved:
        it runs with the approved, possibly edited, arguments); then the tool runs with
        its timeout, and ``tool_completed`` answers it, ``ok`` or with the error.  A tool's failure
        (bad arguments, timeout, exception) is the call's result, not the run's.
        """
        call_id = self.new_call_id()
        await self.emit.tool_executing(call_id, name, args)
        if self.needs_approval(name):
            started = time.perf_counter()
            resolution = await self.approve(name, args, call_id=call_id)
            if not resolution.approved:
                error = resolution.denial(name)
                await self.emit.tool_completed(
                    call_id,
                    name,
                    ok=False,
                    error=error,
                    duration_ms=(time.perf_counter() - started) * 1000,
                )
                return ToolOutcome(call_id, False, error=error)
            if resolution.args is not None:
                args = resolution.args
        return await self.answer_tool(call_id, name, args)

    async def answer_tool(self, call_id: str, name: str, args: Mapping[str, Any]) -> ToolOutcome:
        """Run a call already announced with ``tool_executing`` (by an agent whose calls
        are made elsewhere, such as an AG-UI agent's client-side tools) and answer it."""
        started = time.perf_counter()
        with tracing.tool_call(name, call_id) as span:
            span.content("gen_ai.tool.call.arguments", args)
            try:
                tool = self.tools.get(name)
                checked = tool.check_args(args)
                async with asyncio.timeout(tool.timeout_s):
                    result = await tool.fn(checked)
            except ToolError as exc:
                outcome = ToolOutcome(call_id, False, error=str(exc))
            except TimeoutError:
                outcome = ToolOutcome(call_id, False, error=f"{name} timed out")
            except Exception as exc:  # a tool's bug is its call's failure, not the run's
                error = f"{name} failed: {type(exc).__name__}"
                outcome = ToolOutcome(call_id, False, error=error)
            else:
                outcome = ToolOutcome(call_id, True, result=result, args=dict(args))
                span.content("gen_ai.tool.call.result", result)
            if not outcome.ok:
                span.failed("tool_error")
                span.content("chat.tool.error", outcome.error)
            await self.emit.tool_completed(
                call_id,
                name,
                ok=outcome.ok,
                result=outcome.result,
                error=outcome.error,
                duration_ms=(time.perf_counter() - started) * 1000,
            )
        return outcome

    async def say(self, text: str) -> None:
        """Stream ``text`` as response chunks, a word at a time, paced by the typing delay."""
        for piece in split_words(text):
            await self.emit.chunk(piece)
            if self.typing_delay_s > 0:
                await asyncio.sleep(self.typing_delay_s)


_WORD = re.compile(r"\s*\S+\s*")


def split_words(text: str) -> list[str]:
    """Split text into word-sized pieces whose concatenation is the text."""
    if text.isspace() or not text:
        # No word at all: the pattern would try every position (quadratic).
        return [text] if text else []
    pieces = _WORD.findall(text)
    if "".join(pieces) != text:  # leading/trailing whitespace only: keep it whole
        return [text] if text else []
    return pieces


class Agent(Protocol):
    """An agent: given a run's context, it emits what it does until it returns.

    Returning ends the run ``completed``; raising ends it ``failed`` (the apology is
    streamed for it); being cancelled ends it ``cancelled``.  ``agent_started``,
    ``response_complete`` and ``agent_completed`` are emitted around ``run``.
    """

    name: str
    description: str

    async def run(self, ctx: RunContext) -> None: ...


class AgentRegistry:
    """Agents by name, and the one that answers when a message names none."""

    def __init__(self, agents: Iterable[Agent], default: str) -> None:
        self._agents = {agent.name: agent for agent in agents}
        if default not in self._agents:
            raise ValueError(f"default agent {default!r} is not registered")
        self.default = default

    def get(self, name: str | None) -> Agent:
        key = name or self.default
        try:
            return self._agents[key]
        except KeyError:
            known = ", ".join(sorted(self._agents))
            raise UnknownAgent(f"unknown agent {key!r}; available: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._agents)

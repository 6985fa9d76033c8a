"""Errors raised by agents, tools and the run supervisor.

The whole tree, under one root::

    AgentError
    ├── LifecycleConflict   an illegal lifecycle transition (stop a completed run, …)
    ├── UnknownAgent        no agent of that name
    ├── AgentInputError     an agent cannot work with the message it was given
    ├── LLMError            the language model's endpoint failed or could not be reached
    ├── PluginError         an agent or tool named in settings or by a package cannot be used
    ├── RemoteAgentError    an AG-UI agent failed, or its stream broke the protocol
    ├── ToolError           a tool refused its arguments or failed
    │   └── CalculatorError the calculator could not evaluate an expression
    ├── InputNotFound       an answer to an input request the run never made
    ├── InputConflict       an answer to an input request already resolved
    └── BadResponse         an answer whose fields do not fit its request

Each error knows the ``error.code`` it has on the wire.
"""

from __future__ import annotations

from bridge.wire import WireError


class AgentError(WireError):
    """Root of the agents' errors."""

    code = "agent_error"


class LifecycleConflict(AgentError):
    code = "conflict"


class UnknownAgent(AgentError):
    code = "bad_message"


class AgentInputError(AgentError):
    code = "bad_input"


class LLMError(AgentError):
    """The model's endpoint failed; the message is short and safe to show to clients."""

    code = "llm_error"


class PluginError(AgentError, ValueError):
    """Found at start-up: the message names the spec and what is wrong with it."""

    code = "plugin_error"


class RemoteAgentError(AgentError):
    """An AG-UI agent reported an error, or its stream could not be used.

    The message is short and safe to show to clients: it never carries a header.
    """

    code = "agent_error"


class ToolError(AgentError):
    code = "tool_error"


class CalculatorError(ToolError):
    code = "tool_error"


class InputNotFound(AgentError):
    """An answer to an input request the run never made."""

    code = "not_found"


class InputConflict(AgentError):
    """An answer to an input request that is already resolved."""

    code = "conflict"


class BadResponse(AgentError):
    """An answer whose fields do not fit its request (``approved`` for a question, …)."""

    code = "bad_message"

"""The ``llm`` agent: any OpenAI-compatible chat-completions endpoint, streamed.

OpenAI itself, vLLM, Ollama, llama.cpp's server and LM Studio all speak the same
``POST {base_url}/chat/completions`` with ``stream=true``.  A run is a loop of
*turns*; each turn streams one completion, given the thread's context and the
registry's tools:

* every content delta becomes a ``response_chunk`` as it arrives;
* reasoning (``reasoning_content`` or ``reasoning`` deltas, or a leading
  ``<think>…</think>`` block in the content) becomes ``agent_thinking``, a
  paragraph at a time, and never part of the answer;
* a turn that streams no reasoning is announced by a short ``agent_thinking`` of
  ``kind`` ``status`` (which model is asked, after which tool results) before its
  first answer text or tool call, so every turn shows what is going on;
* ``tool_calls`` deltas are assembled (several calls, arguments split across
  chunks).  When the turn ends with calls, each one is run through
  :meth:`RunContext.call_tool` and its result goes back to the model as a
  ``tool`` message, and the next turn starts.

The loop ends when the model answers without tools, or after ``max_steps``
turns.  Connection errors, timeouts, 408, 429 and 5xx are retried with
exponential backoff as long as the turn has produced nothing; after that, and
for any other error, the run fails with :class:`LLMError` (``llm_error``): the
provider's message goes to the log (the API key redacted), a short one to the
client.  Cancelling the run closes the upstream HTTP stream at once; pausing it
blocks the agent at its next event, so it stops reading from upstream.

The parsing and assembling of a stream is pure (:func:`parse_chunk`,
:class:`TurnAssembler` and its parts); :class:`LLMAgent` only does the I/O.  The
``openai`` package is an optional extra, imported when the agent is built.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, cast
from urllib.parse import urlsplit

from agents.base import ASK_USER_TOOL, ClientToolResult, Message, RunContext, ToolOutcome, Usage
from agents.errors import LLMError
from bridge import tracing

if TYPE_CHECKING:
    from openai import AsyncOpenAI

log = logging.getLogger("chat.llm")

INSTALL_HINT: Final = "pip install 'chat-gateway[llm]'"
#: HTTP statuses worth another try, besides every 5xx.
RETRY_STATUSES: Final = frozenset({408, 429})
#: A ``Retry-After`` longer than this is not waited for: the run fails instead.
MAX_RETRY_AFTER_S: Final = 20.0
#: Reasoning without a paragraph break is cut into thoughts of about this size.
THOUGHT_MAX_CHARS: Final = 600
#: How much of malformed tool arguments an error message quotes.
ARGS_EXCERPT_CHARS: Final = 200

Kind = Literal["thinking", "answer"]
Output = tuple[Kind, str]


@dataclass(frozen=True, slots=True)
class LLMConfig:
    """Where the model is and how the agent drives it."""

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    max_steps: int = 6
    retries: int = 2
    max_history: int = 20
    system_prompt: str | None = None
    timeout_s: float = 60.0
    retry_backoff_s: float = 0.5
    #: Ask the server for the tokens used (``stream_options.include_usage``).
    include_usage: bool = True

    def __post_init__(self) -> None:
        if not self.base_url or not self.model:
            raise ValueError("the llm agent needs a base URL and a model")
        if self.max_steps < 1:
            raise ValueError("max_steps must be at least 1")
        if self.retries < 0 or self.max_history < 0 or self.retry_backoff_s < 0:
            raise ValueError("retries, max_history and retry_backoff_s must not be negative")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be positive")


# Parsing a stream ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """One fragment of a streamed tool call; every field but the first may be absent."""

    index: int | None = None
    id: str | None = None
    name: str | None = None
    arguments: str | None = None


@dataclass(frozen=True, slots=True)
class Delta:
    """What one ``chat.completion.chunk`` adds to the turn."""

    content: str = ""
    reasoning: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()
    finish_reason: str | None = None


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def parse_chunk(chunk: Mapping[str, Any]) -> Delta:
    """The first choice's delta of a ``chat.completion.chunk`` (as JSON-like data).

    Reasoning is read from ``reasoning_content`` (vLLM, DeepSeek) or, when that
    is empty, ``reasoning`` (Ollama, newer vLLM, OpenRouter); servers that send
    both send the same text.  Chunks without choices (usage) add nothing.
    """
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
        return Delta()
    choice: Mapping[str, Any] = choices[0]
    delta = choice.get("delta")
    if not isinstance(delta, Mapping):
        delta = {}
    calls: list[ToolCallDelta] = []
    for raw in delta.get("tool_calls") or ():
        if not isinstance(raw, Mapping):
            continue
        function = raw.get("function")
        if not isinstance(function, Mapping):
            function = {}
        index = raw.get("index")
        calls.append(
            ToolCallDelta(
                index=index if isinstance(index, int) and not isinstance(index, bool) else None,
                id=_text(raw.get("id")) or None,
                name=_text(function.get("name")) or None,
                arguments=_text(function.get("arguments")) or None,
            )
        )
    finish = choice.get("finish_reason")
    return Delta(
        content=_text(delta.get("content")),
        reasoning=_text(delta.get("reasoning_content")) or _text(delta.get("reasoning")),
        tool_calls=tuple(calls),
        finish_reason=finish if isinstance(finish, str) else None,
    )


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def parse_usage(chunk: Mapping[str, Any], model: str) -> Usage | None:
    """The usage a chunk reports (the last one, when ``stream_options.include_usage``
    asked for it), or None.  The model is the one the server names, else ``model``."""
    usage = chunk.get("usage")
    if not isinstance(usage, Mapping):
        return None
    prompt = _count(usage.get("prompt_tokens"))
    completion = _count(usage.get("completion_tokens"))
    total = _count(usage.get("total_tokens")) or prompt + completion
    named = chunk.get("model")
    return Usage(prompt, completion, total, named if isinstance(named, str) and named else model)


@dataclass(frozen=True, slots=True)
class ToolCallRequest:
    """A tool call the model made, assembled; ``arguments`` is the raw JSON text."""

    id: str
    name: str
    arguments: str


@dataclass(slots=True)
class _PartialCall:
    index: int | None
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class ToolCallAssembler:
    """Assembles streamed ``tool_calls`` fragments into whole calls, in order.

    Fragments are matched by ``index``, as OpenAI sends them: the first fragment
    of a call carries its id and name, the next ones pieces of its arguments.
    A fragment with a new id at an index already in use starts another call
    (servers that number every call 0), and a fragment without an index
    continues the last call unless its id is new.
    """

    def __init__(self) -> None:
        self._calls: list[_PartialCall] = []
        self._by_index: dict[int, _PartialCall] = {}

    def __bool__(self) -> bool:
        return bool(self._calls)

    def feed(self, fragments: Sequence[ToolCallDelta]) -> None:
        for fragment in fragments:
            call = self._slot(fragment)
            if fragment.id and not call.id:
                call.id = fragment.id
            if fragment.name and fragment.name != call.name:
                call.name = fragment.name if not call.name else call.name + fragment.name
            if fragment.arguments:
                call.arguments.append(fragment.arguments)

    def _slot(self, fragment: ToolCallDelta) -> _PartialCall:
        if fragment.index is not None:
            call = self._by_index.get(fragment.index)
            if call is not None and not (fragment.id and call.id and fragment.id != call.id):
                return call
        elif self._calls:
            last = self._calls[-1]
            if not (fragment.id and last.id and fragment.id != last.id):
                return last
        call = _PartialCall(fragment.index)
        self._calls.append(call)
        if fragment.index is not None:
            self._by_index[fragment.index] = call
        return call

    def calls(self, id_prefix: str = "call") -> list[ToolCallRequest]:
        """The calls so far; a call the server gave no id gets ``<id_prefix>_<n>``."""
        return [
            ToolCallRequest(call.id or f"{id_prefix}_{n}", call.name, "".join(call.arguments))
            for n, call in enumerate(self._calls, 1)
        ]


class ThinkSplitter:
    """Splits a turn's streamed content into a leading ``<think>…</think>`` block and
    the answer, without holding back more than a tag's length of text.

    Only a block that opens the content counts (after whitespace); ``<think>``
    later in an answer is answer text.  Whitespace right after ``</think>`` is
    dropped.  A block still open when the stream ends is all thinking.
    """

    OPEN: Final = "<think>"
    CLOSE: Final = "</think>"

    def __init__(self) -> None:
        self._state: Literal["start", "think", "after", "answer"] = "start"
        self._pending = ""

    def feed(self, text: str) -> list[Output]:
        out: list[Output] = []
        self._pending += text
        while self._pending:
            if self._state == "start":
                head = self._pending.lstrip()
                if not head or (len(head) < len(self.OPEN) and self.OPEN.startswith(head)):
                    break  # could still become "<think>"
                if head.startswith(self.OPEN):
                    self._state = "think"
                    self._pending = head[len(self.OPEN) :]
                else:
                    self._state = "answer"
            elif self._state == "think":
                end = self._pending.find(self.CLOSE)
                if end >= 0:
                    self._add(out, "thinking", self._pending[:end])
                    self._pending = self._pending[end + len(self.CLOSE) :]
                    self._state = "after"
                    continue
                keep = _partial_suffix(self._pending, self.CLOSE)
                self._add(out, "thinking", self._pending[: len(self._pending) - keep])
                self._pending = self._pending[len(self._pending) - keep :]
                break
            elif self._state == "after":
                self._pending = self._pending.lstrip()
                if self._pending:
                    self._state = "answer"
            else:
                self._add(out, "answer", self._pending)
                self._pending = ""
        return out

    def flush(self) -> list[Output]:
        """What is still held when the stream ends."""
        out: list[Output] = []
        if self._state == "think":
            self._add(out, "thinking", self._pending)
        elif self._state == "start" and self._pending.strip():
            self._add(out, "answer", self._pending)
        self._pending = ""
        return out

    @staticmethod
    def _add(out: list[Output], kind: Kind, text: str) -> None:
        if text:
            out.append((kind, text))


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that is a proper start of ``tag``."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


class ThoughtBuffer:
    """Turns streamed reasoning into thoughts: one per paragraph, at most about
    ``max_chars`` each (cut at whitespace), stripped, never empty."""

    def __init__(self, max_chars: int = THOUGHT_MAX_CHARS) -> None:
        self._max = max_chars
        self._pending = ""

    def feed(self, text: str) -> list[str]:
        out: list[str] = []
        self._pending += text
        while True:
            head, sep, rest = self._pending.partition("\n\n")
            if not sep:
                break
            self._take(out, head)
            self._pending = rest
        while len(self._pending) > self._max:
            cut = max(
                self._pending.rfind(" ", 0, self._max), self._pending.rfind("\n", 0, self._max)
            )
            if cut <= 0:
                cut = self._max
            self._take(out, self._pending[:cut])
            self._pending = self._pending[cut:]
        return out

    def flush(self) -> list[str]:
        out: list[str] = []
        self._take(out, self._pending)
        self._pending = ""
        return out

    @staticmethod
    def _take(out: list[str], text: str) -> None:
        text = text.strip()
        if text:
            out.append(text)


class TurnAssembler:
    """One turn's stream, delta by delta: what to emit now, and what the turn was.

    ``lead`` is put before the turn's first answer text (a paragraph break when
    an earlier turn already answered something).
    """

    def __init__(self, lead: str = "") -> None:
        self._lead = lead
        self._think = ThinkSplitter()
        self._thoughts = ThoughtBuffer()
        self._calls = ToolCallAssembler()
        self._answer: list[str] = []
        #: Something of substance arrived: content, reasoning or a tool call.
        self.started = False
        self.finish_reason: str | None = None

    @property
    def text(self) -> str:
        """The turn's answer text, without any reasoning."""
        return "".join(self._answer)

    def calls(self, id_prefix: str = "call") -> list[ToolCallRequest]:
        return self._calls.calls(id_prefix)

    @property
    def has_calls(self) -> bool:
        """A tool call has started to arrive."""
        return bool(self._calls)

    def feed(self, delta: Delta) -> list[Output]:
        out: list[Output] = []
        if delta.reasoning:
            self.started = True
            out.extend(("thinking", t) for t in self._thoughts.feed(delta.reasoning))
        if delta.content:
            self.started = True
            for kind, text in self._think.feed(delta.content):
                self._route(out, kind, text)
        if delta.tool_calls:
            self.started = True
            self._flush_thoughts(out)
            self._calls.feed(delta.tool_calls)
        if delta.finish_reason:
            self.finish_reason = delta.finish_reason
        return out

    def finish(self) -> list[Output]:
        """What is still held when the turn's stream ends."""
        out: list[Output] = []
        for kind, text in self._think.flush():
            self._route(out, kind, text)
        self._flush_thoughts(out)
        return out

    def _route(self, out: list[Output], kind: Kind, text: str) -> None:
        if kind == "thinking":
            out.extend(("thinking", t) for t in self._thoughts.feed(text))
            return
        self._flush_thoughts(out)
        if not self._answer:
            out.append(("answer", self._lead + text))
        else:
            out.append(("answer", text))
        self._answer.append(text)

    def _flush_thoughts(self, out: list[Output]) -> None:
        out.extend(("thinking", t) for t in self._thoughts.flush())


# Messages for the model -------------------------------------------------------------


def build_messages(
    history: Sequence[Message],
    message: str,
    *,
    system_prompt: str | None = None,
    max_history: int = 20,
) -> list[dict[str, Any]]:
    """The request's opening messages: the system prompt, the last ``max_history``
    earlier messages of the thread (starting with a user message, as strict chat
    templates want), then the new message."""
    messages: list[dict[str, Any]] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    earlier = [m for m in history if m.role in ("user", "assistant") and m.content]
    earlier = earlier[-max_history:] if max_history > 0 else []
    while earlier and earlier[0].role != "user":
        earlier.pop(0)
    messages.extend({"role": m.role, "content": m.content} for m in earlier)
    messages.append({"role": "user", "content": message})
    return messages


def continued_messages(
    history: Sequence[Message],
    results: Sequence[ClientToolResult],
    *,
    system_prompt: str | None = None,
    max_history: int = 20,
) -> list[dict[str, Any]]:
    """The opening messages of a run that goes on from the client's answers to tool
    calls the previous run left to it: the thread up to the user message that led to
    the calls, the model's turn that made them (its text is the previous run's stored
    answer), and a ``tool`` message for each."""
    earlier = list(history)
    text = ""
    if earlier and earlier[-1].role == "assistant":
        text = earlier.pop().content
    last_user = max((i for i, m in enumerate(earlier) if m.role == "user"), default=None)
    if last_user is None:  # no user message left in the history window
        messages = build_messages([], "", system_prompt=system_prompt, max_history=0)[:-1]
    else:
        messages = build_messages(
            earlier[:last_user],
            earlier[last_user].content,
            system_prompt=system_prompt,
            max_history=max_history,
        )
    calls = [
        {
            "id": r.call_id,
            "type": "function",
            "function": {"name": r.name, "arguments": json.dumps(dict(r.args), ensure_ascii=False)},
        }
        for r in results
    ]
    messages.append({"role": "assistant", "content": text or None, "tool_calls": calls})
    for r in results:
        content = r.content
        if r.error is not None:
            content = json.dumps({"error": r.error, "content": r.content}, ensure_ascii=False)
        messages.append({"role": "tool", "tool_call_id": r.call_id, "content": content})
    return messages


def parse_arguments(text: str) -> dict[str, Any]:
    """A tool call's arguments as an object; empty text is no arguments.

    Raises:
        ValueError: the text is not JSON, or not a JSON object.
    """
    if not text.strip():
        return {}
    excerpt = text[:ARGS_EXCERPT_CHARS] + ("…" if len(text) > ARGS_EXCERPT_CHARS else "")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the arguments are not valid JSON ({exc.msg}): {excerpt!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"the arguments must be a JSON object, got {excerpt!r}")
    return value


def assistant_message(text: str, calls: Sequence[ToolCallRequest]) -> dict[str, Any]:
    """The model's turn as it goes back to it: its answer text and its tool calls.

    Arguments that are not a JSON object go back as ``{}``: some servers parse
    them to render their chat template and refuse the request otherwise.
    """
    wire_calls = []
    for call in calls:
        try:
            parse_arguments(call.arguments)
            arguments = call.arguments if call.arguments.strip() else "{}"
        except ValueError:
            arguments = "{}"
        wire_calls.append(
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": arguments},
            }
        )
    return {"role": "assistant", "content": text or None, "tool_calls": wire_calls}


def tool_message(call: ToolCallRequest, outcome: ToolOutcome) -> dict[str, Any]:
    """A tool call's outcome for the model: the result, or ``{"error": …}``, as JSON."""
    body = outcome.result if outcome.ok else {"error": outcome.error or "failed"}
    content = json.dumps(body, ensure_ascii=False, default=str)
    return {"role": "tool", "tool_call_id": call.id, "content": content}


# Upstream errors ------------------------------------------------------------------


def _status(exc: BaseException) -> int | None:
    status = getattr(exc, "status_code", None)
    return status if isinstance(status, int) else None


def is_retryable(exc: BaseException) -> bool:
    """Connection errors, timeouts, 408, 429 (but not an exhausted quota) and 5xx."""
    import openai

    if isinstance(exc, openai.APIConnectionError):  # timeouts included
        return True
    status = _status(exc)
    if status is None:
        # An error event inside a stream: retry what the server calls a 5xx.
        body = getattr(exc, "body", None)
        code = body.get("code") if isinstance(body, Mapping) else None
        return isinstance(code, int) and code >= 500
    if status == 429 and getattr(exc, "code", None) == "insufficient_quota":
        return False
    return status in RETRY_STATUSES or status >= 500


def public_message(exc: BaseException, *, started: bool) -> str:
    """A short message for clients: what failed, never the provider's text."""
    import openai

    status = _status(exc)
    if status is not None:
        return f"the language model's endpoint answered HTTP {status}"
    if isinstance(exc, openai.APITimeoutError):
        return "the language model's endpoint timed out"
    if isinstance(exc, openai.APIConnectionError):
        if started:
            return "the language model's stream broke off"
        return "the language model's endpoint could not be reached"
    if isinstance(exc, json.JSONDecodeError):
        return "the language model's endpoint sent a malformed stream"
    return "the language model's endpoint reported an error"


def retry_after_s(exc: BaseException) -> float | None:
    """The seconds a ``Retry-After`` header asks for, when it gives a number."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    raw = headers.get("retry-after") if headers is not None else None
    try:
        value = float(raw) if raw is not None else None
    except ValueError:
        return None
    return value if value is not None and value >= 0 else None


def backoff_s(attempt: int, base_s: float, exc: BaseException | None = None) -> float:
    """Exponential backoff with jitter; a short ``Retry-After`` is honoured."""
    delay = base_s * 2.0**attempt * random.uniform(0.8, 1.2)
    wanted = retry_after_s(exc) if exc is not None else None
    if wanted is not None and wanted <= MAX_RETRY_AFTER_S:
        delay = max(delay, wanted)
    return delay


def load_sdk() -> None:
    """Fail early, and say how to fix it, when the ``openai`` package is missing."""
    try:
        import openai  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            f"the llm agent needs the openai package; install it with: {INSTALL_HINT}"
        ) from exc


# The agent ------------------------------------------------------------------------


class LLMAgent:
    """Answers with a model behind an OpenAI-compatible endpoint, using the tools."""

    name = "llm"

    def __init__(self, config: LLMConfig) -> None:
        load_sdk()
        self.config = config
        self.description = f"Model {config.model} over an OpenAI-compatible endpoint, with tools."

    def _client(self) -> AsyncOpenAI:
        from openai import AsyncOpenAI

        # One client per run: its connections belong to the run's event loop and
        # are closed with the run.  The key is always passed, so the SDK never
        # falls back on OPENAI_API_KEY and sends it to another server.
        return AsyncOpenAI(
            base_url=self.config.base_url,
            api_key=self.config.api_key or "unused",
            timeout=self.config.timeout_s,
            max_retries=0,
        )

    async def run(self, ctx: RunContext) -> None:
        config = self.config
        if ctx.tool_results:
            messages = continued_messages(
                ctx.history,
                ctx.tool_results,
                system_prompt=config.system_prompt,
                max_history=config.max_history,
            )
        else:
            messages = build_messages(
                ctx.history,
                ctx.message,
                system_prompt=config.system_prompt,
                max_history=config.max_history,
            )
        # The client's tools beside the gateway's (a gateway tool of the same name wins).
        tools = ctx.tools.schemas()
        if ctx.inputs is not None:
            tools = [*tools, ASK_USER_SCHEMA]
        tools += [t.schema() for t in ctx.client_tools if t.name not in ctx.tools]
        answered = ""  # the last answer text so far, to separate the turns' answers
        results: list[tuple[str, bool]] = []  # the last turn's tool calls: name, ok
        async with self._client() as client:
            for step in range(1, config.max_steps + 1):
                lead = "\n\n" if answered and not answered[-1].isspace() else ""
                status = TurnStatus(status_line(config.model, step, results))
                turn = await self._turn(client, ctx, messages, tools, lead, step, status)
                answered = turn.text or answered
                calls = turn.calls(id_prefix=f"call_{step}")
                if turn.finish_reason in ("length", "content_filter"):
                    await ctx.emit.thinking(
                        f"The model stopped early ({turn.finish_reason}).", kind="status"
                    )
                if not calls:
                    return
                if step == config.max_steps:
                    names = ", ".join(sorted({call.name for call in calls}))
                    await ctx.emit.thinking(
                        f"The model still asked for tools ({names}) after {step} steps, "
                        "the most allowed; they were not run.",
                        kind="status",
                    )
                    lead = "\n\n" if answered and not answered[-1].isspace() else ""
                    await ctx.emit.chunk(f"{lead}I could not finish within {step} steps.")
                    return
                messages.append(assistant_message(turn.text, calls))
                results = []
                left = False
                for call in calls:
                    if call.name not in ctx.tools and ctx.client_tool(call.name) is not None:
                        # The client runs it: announced, left open for its next request.
                        refused = await self._leave_to_client(ctx, call)
                        if refused is None:
                            left = True
                            continue
                        outcome = refused
                    else:
                        outcome = await self._call_tool(ctx, call)
                    messages.append(tool_message(call, outcome))
                    results.append((call.name or "unnamed", outcome.ok))
                if left:
                    return

    async def _turn(
        self,
        client: AsyncOpenAI,
        ctx: RunContext,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        lead: str,
        step: int,
        status: TurnStatus,
    ) -> TurnAssembler:
        """Stream one completion, retrying while it has produced nothing."""
        import openai

        attempt = 0
        while True:
            turn = TurnAssembler(lead)
            try:
                await self._stream(client, ctx, messages, tools, turn, status)
                return turn
            except (openai.OpenAIError, json.JSONDecodeError) as exc:
                detail = self._detail(exc)
                if turn.started or attempt >= self.config.retries or not is_retryable(exc):
                    log.warning(
                        "run %s: the model's endpoint failed (step %d, attempt %d): %s",
                        ctx.run_id,
                        step,
                        attempt + 1,
                        detail,
                    )
                    raise LLMError(public_message(exc, started=turn.started)) from exc
                delay = backoff_s(attempt, self.config.retry_backoff_s, exc)
                log.info(
                    "run %s: the model's endpoint failed (step %d, attempt %d), "
                    "retrying in %.2f s: %s",
                    ctx.run_id,
                    step,
                    attempt + 1,
                    delay,
                    detail,
                )
                attempt += 1
                await asyncio.sleep(delay)

    async def _stream(
        self,
        client: AsyncOpenAI,
        ctx: RunContext,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        turn: TurnAssembler,
        status: TurnStatus,
    ) -> None:
        extra: dict[str, Any] = {"tools": tools} if tools else {}
        if self.config.include_usage:
            extra["stream_options"] = {"include_usage": True}
        server = urlsplit(self.config.base_url).hostname
        with tracing.model_request("openai", self.config.model, server) as span:
            span.content("gen_ai.input.messages", messages)
            stream = await client.chat.completions.create(
                model=self.config.model,
                messages=cast(Any, messages),
                stream=True,
                **extra,
            )
            try:
                async for chunk in stream:
                    data = chunk.to_dict()
                    usage = parse_usage(data, self.config.model)
                    if usage is not None:
                        ctx.report_usage(usage)
                        span.usage(usage.input_tokens, usage.output_tokens)
                    delta = parse_chunk(data)
                    if delta.content or delta.reasoning or delta.tool_calls:
                        span.first_token()
                    await status.emit(ctx, turn.feed(delta), turn)
            finally:
                # On cancel too: closing the response closes the connection, and the
                # server stops generating.
                await stream.close()
            span.finish(turn.finish_reason)
            span.content("gen_ai.output.messages", turn.text)
        await status.emit(ctx, turn.finish(), turn)
        await status.close(ctx)

    async def _call_tool(self, ctx: RunContext, call: ToolCallRequest) -> ToolOutcome:
        try:
            args = parse_arguments(call.arguments)
        except ValueError as exc:
            name = call.name or "unnamed"
            return await ctx.refuse_tool(name, f"{name}: {exc}")
        if call.name == ASK_USER_TOOL and ctx.inputs is not None:
            return await ask_user(ctx, args)
        return await ctx.call_tool(call.name, args)

    async def _leave_to_client(self, ctx: RunContext, call: ToolCallRequest) -> ToolOutcome | None:
        """Announce a client tool's call and leave it open; a call whose arguments are
        no JSON object is refused instead (its outcome), for the model to try again."""
        try:
            args = parse_arguments(call.arguments)
        except ValueError as exc:
            return await ctx.refuse_tool(call.name, f"{call.name}: {exc}")
        call_id = ctx.new_call_id()
        await ctx.emit.tool_executing(call_id, call.name, args)
        await ctx.leave_to_client(call_id, call.name)
        return None

    def _detail(self, exc: BaseException) -> str:
        """The provider's side of an error, for the log, with the API key redacted."""
        status = _status(exc)
        text = f"HTTP {status}: {exc}" if status is not None else f"{type(exc).__name__}: {exc}"
        cause = exc.__cause__
        if cause is not None and status is None:
            text += f" ({type(cause).__name__}: {cause})"
        return redact(text, self.config.api_key)


#: The tool the model calls to ask the user (the run waits for the answer).
ASK_USER_SCHEMA: Final[dict[str, Any]] = {
    "type": "function",
    "function": {
        "name": ASK_USER_TOOL,
        "description": (
            "Ask the user a question and wait for the answer, when you need something "
            "only they can tell you. Give choices when the answer is one of a few."
        ),
        "parameters": {
            "type": "object",
            "properties": {
                "question": {"type": "string", "description": "the question to ask"},
                "choices": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "possible answers, if the answer is one of them",
                },
            },
            "required": ["question"],
        },
    },
}


async def ask_user(ctx: RunContext, args: Mapping[str, Any]) -> ToolOutcome:
    """The model's ``ask_user`` call: announced as a tool call, asked as a question
    (``input_requested``), answered with ``{"answer": …}`` for the model."""
    call_id = ctx.new_call_id()
    await ctx.emit.tool_executing(call_id, ASK_USER_TOOL, args)
    started = time.perf_counter()
    question = args.get("question")
    raw_choices = args.get("choices")
    if not isinstance(question, str) or not question.strip():
        error = "ask_user: 'question' must be a non-empty string"
        await ctx.emit.tool_completed(call_id, ASK_USER_TOOL, ok=False, error=error, duration_ms=0)
        return ToolOutcome(call_id, False, error=error)
    choices = [str(c) for c in raw_choices] if isinstance(raw_choices, list) else None
    answer = await ctx.ask(question, choices)
    result = {"answer": answer}
    await ctx.emit.tool_completed(
        call_id,
        ASK_USER_TOOL,
        ok=True,
        result=result,
        duration_ms=(time.perf_counter() - started) * 1000,
    )
    return ToolOutcome(call_id, True, result=result)


def redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "[redacted]") if secret else text


def status_line(model: str, step: int, results: Sequence[tuple[str, bool]]) -> str:
    """The progress line of a turn that streams no reasoning: which model is asked, and
    after which tool results."""
    if step == 1 or not results:
        return f"Asking {model}."
    names = [name if ok else f"{name} (failed)" for name, ok in results]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    noun = "result" if len(names) == 1 else "results"
    return f"Asking {model} again, with the {noun} of {listed}."


class TurnStatus:
    """Sees to it that a turn shows an ``agent_thinking`` before its answer or its calls:
    the model's reasoning when it streams any, else the status line, once."""

    def __init__(self, line: str) -> None:
        self.line = line
        self.shown = False

    async def emit(self, ctx: RunContext, outputs: Sequence[Output], turn: TurnAssembler) -> None:
        for kind, text in outputs:
            if kind == "thinking":
                self.shown = True
                await ctx.emit.thinking(text, kind="reasoning")
            else:
                await self.close(ctx)
                await ctx.emit.chunk(text)
        if turn.has_calls:
            await self.close(ctx)

    async def close(self, ctx: RunContext) -> None:
        """The status line, unless the turn already showed something of its thinking."""
        if not self.shown:
            self.shown = True
            await ctx.emit.thinking(self.line, kind="status")

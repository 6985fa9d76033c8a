"""AG-UI agents over HTTP: a ``RunAgentInput`` POSTed, the answer read as an event stream.

The transport alone: :class:`HTTPEventSource` is an event source for
:class:`agents.agui.AGUIAgent`, which maps the events onto the run.  The stream is
parsed by :class:`SSEParser` (the event-stream format of the HTML standard, sans I/O).
Failures of the connection and of the answer become :class:`RemoteAgentError` with a
short message; the details go to the log, never the agent's headers.
"""

from __future__ import annotations

import codecs
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from ag_ui.core import BaseEvent, RunAgentInput

from agents.agui import AGUIAgent, parse_event
from agents.errors import RemoteAgentError
from bridge import tracing

log = logging.getLogger("chat.agui")

#: Bytes of an upstream body quoted in a log line.
EXCERPT_CHARS: Final = 200

# The event stream ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SSEMessage:
    event: str
    data: str
    id: str | None = None


class SSEParser:
    """The event-stream format of the HTML standard, fed text as it arrives.

    Lines end with CR LF, LF or CR; ``data`` lines of one message are joined with LF;
    comments and empty messages are dropped; a leading BOM is ignored.
    """

    def __init__(self) -> None:
        self._buffer = ""
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self._started = False
        self._after_cr = False  # the last piece ended with a CR

    def feed(self, text: str) -> list[SSEMessage]:
        if not self._started and text:
            self._started = True
            text = text.removeprefix("\ufeff")
        if self._after_cr and text.startswith("\n"):
            text = text[1:]  # the LF of a CR LF cut in two
        self._after_cr = False
        self._buffer += text
        out: list[SSEMessage] = []
        start = 0
        buffer = self._buffer
        for i, ch in enumerate(buffer):
            if ch == "\r" and i + 1 < len(buffer) and buffer[i + 1] == "\n":
                continue  # the CR of a CR LF: the LF ends the line
            if ch in "\r\n":
                line = buffer[start : i - 1] if ch == "\n" and i and buffer[i - 1] == "\r" else None
                message = self._line(buffer[start:i] if line is None else line)
                if message is not None:
                    out.append(message)
                start = i + 1
                self._after_cr = ch == "\r"
        self._buffer = buffer[start:]
        if self._buffer:
            self._after_cr = False
        return out

    def _line(self, line: str) -> SSEMessage | None:
        if not line:
            if not self._data:
                self._event = ""
                return None
            message = SSEMessage(self._event or "message", "\n".join(self._data), self._id)
            self._data, self._event = [], ""
            return message
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return None


# The agent -------------------------------------------------------------------------------


def public_url(url: str) -> str:
    """The URL without credentials, query or fragment: what logs and messages may show."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class HTTPEventSource:
    """POSTs a ``RunAgentInput`` to an AG-UI endpoint and yields the events of its answer.

    The headers (a bearer token for the agent service) go with every request and
    appear in no message and no log line.
    """

    def __init__(
        self, url: str, headers: Mapping[str, str], connect_timeout_s: float, agent: str = ""
    ) -> None:
        self.url = url
        self.agent = agent
        self.headers = dict(headers)
        self.connect_timeout_s = connect_timeout_s
        self.where = public_url(url)

    def __call__(self, run_input: RunAgentInput) -> AsyncIterator[BaseEvent]:
        return self._events(run_input)

    async def _events(self, run_input: RunAgentInput) -> AsyncIterator[BaseEvent]:
        import httpx

        body = run_input.model_dump_json(by_alias=True, exclude_none=True)
        headers = {
            **self.headers,
            "Accept": "text/event-stream",
            "Content-Type": "application/json",
        }
        timeout = httpx.Timeout(self.connect_timeout_s, read=None)
        # The request's span names itself in the request's traceparent: the agent's own
        # spans join the run's trace.
        span = tracing.agent_request(self.agent or self.where, self.where)
        span.inject(headers)
        try:
            async with (
                httpx.AsyncClient(timeout=timeout, trust_env=False) as client,
                client.stream("POST", self.url, content=body, headers=headers) as response,
            ):
                await self._check(response)
                parser = SSEParser()
                # An event stream is UTF-8 whatever its headers say (HTML standard).
                decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
                async for data in response.aiter_bytes():
                    for message in parser.feed(decoder.decode(data)):
                        yield parse_event(message.data)
        except httpx.HTTPError as exc:
            span.failed(type(exc).__name__)
            raise self._failed(exc) from None
        except GeneratorExit:
            raise  # the agent stopped reading: its run goes on
        except BaseException as exc:
            span.failed(type(exc).__name__)
            raise
        finally:
            span.end()

    async def _check(self, response: Any) -> None:
        if not 200 <= response.status_code < 300:
            excerpt = (await response.aread())[:EXCERPT_CHARS]
            log.warning(
                "AG-UI agent %s answered HTTP %d: %r", self.where, response.status_code, excerpt
            )
            raise RemoteAgentError(f"the agent answered HTTP {response.status_code}")
        kind = response.headers.get("content-type", "")
        if kind.split(";")[0].strip().lower() != "text/event-stream":
            log.warning("AG-UI agent %s answered with %r, not an event stream", self.where, kind)
            raise RemoteAgentError(
                f"the agent answered {kind or 'without a content type'}, not text/event-stream"
            )

    def _failed(self, exc: Exception) -> RemoteAgentError:
        import httpx

        log.warning("AG-UI agent %s failed: %s", self.where, type(exc).__name__)
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return RemoteAgentError("the agent could not be reached")
        if isinstance(exc, httpx.TimeoutException):
            return RemoteAgentError("the agent timed out")
        return RemoteAgentError("the agent's stream broke off")


def remote_agent(
    name: str,
    url: str,
    headers: Mapping[str, str],
    *,
    max_steps: int,
    timeout_s: float,
) -> AGUIAgent:
    """The agent of an AG-UI endpoint named in ``CHAT_AGENTS``."""
    where = public_url(url)
    return AGUIAgent(
        name,
        HTTPEventSource(url, headers, timeout_s, agent=name),
        description=f"AG-UI agent at {where}",
        max_steps=max_steps,
        timeout_s=timeout_s,
        label=f"agent {name}",
    )

"""A command-line chat client for the gateway's WebSocket ``/ws`` (protocol chat.v1).

Usage (from the project root, with the gateway running, e.g. ``make run``)::

    python scripts/chat.py "What is 12 * 7?"
    python scripts/chat.py "chunks=3 delay_ms=50" --agent load --json
    python scripts/chat.py --resume r_abc123 --after 4

Options:
    --url URL        the gateway's WebSocket endpoint (default ws://127.0.0.1:8000/ws)
    --token JWT      the token; else the environment variable CHAT_TOKEN; else a token
                     minted for --user (default ``dev``) with CHAT_JWT_SECRET or the
                     dev-mode secret file var/dev_secret
    --agent NAME     the agent to ask (default: the gateway's default agent)
    --thread ID      the thread to post in (default: a new thread)
    --resume RUN_ID  replay and follow an existing run instead of sending a message
    --after N        with --resume: only the events with seq > N (default 0)
    --json           print every message received as one JSON line, as received
    --timeout S      bound on the whole exchange, in seconds (default 120)

The token is sent as the subprotocol pair ``chat.v1``, ``bearer.<jwt>``.  The
client waits for ``connection_ready``, sends its ``user_message`` (or ``resume``),
prints the run's events as they arrive and exits after its ``agent_completed``.

Exit status: 0 when the run completed; 1 when it ended ``failed`` or
``cancelled``, or the server answered the request with an ``error``; 2 for usage,
connection and authentication errors (the close code and reason are printed,
e.g. 4401), and when ``--timeout`` runs out; 130 on Ctrl-C (the run goes on in
the gateway and can be resumed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.typing import Subprotocol

from scripts.kit.args import non_negative_int, positive
from scripts.kit.tokens import NoSecretError, env_claim, mint, resolve_secret

PROTOCOL = "chat.v1"
DEFAULT_URL = "ws://127.0.0.1:8000/ws"
DEFAULT_USER = "dev"
DEFAULT_TIMEOUT_S = 120.0
#: Lifetime of a token this client mints for itself.
MINTED_TTL_S = 3600
#: Longest tool result shown in human output.
MAX_RESULT_CHARS = 300

EXIT_OK = 0
EXIT_RUN_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

TERMINAL_STATUSES = frozenset({"completed", "cancelled", "failed"})


class ClientError(Exception):
    """A usage, connection or authentication problem: exit status 2."""


# Output ------------------------------------------------------------------------------


def format_ms(ms: Any) -> str:
    """``0.077`` -> ``0.1 ms``; ``2500`` -> ``2.50 s``."""
    if isinstance(ms, bool) or not isinstance(ms, int | float):
        return "? ms"
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    return f"{ms:.1f} ms"


def format_value(value: Any, limit: int = MAX_RESULT_CHARS) -> str:
    """A tool's argument or result on one line: strings as they are, the rest as JSON."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = " ".join(text.splitlines())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


class HumanPrinter:
    """Readable output: chunks inline as they stream, every other event on its own line."""

    def __init__(self, out: TextIO, err: TextIO) -> None:
        self.out = out
        self.err = err
        #: True while the cursor is not at the start of a line (a chunk line is open).
        self.line_open = False

    def chunk(self, text: str) -> None:
        if not text:
            return
        self.out.write(text)
        self.out.flush()
        self.line_open = not text.endswith("\n")

    def line(self, text: str, *, stderr: bool = False) -> None:
        self.end_line()
        stream = self.err if stderr else self.out
        stream.write(text + "\n")
        stream.flush()

    def end_line(self) -> None:
        if self.line_open:
            self.out.write("\n")
            self.out.flush()
            self.line_open = False

    def message(self, message: dict[str, Any], raw: str) -> None:
        kind = message.get("type")
        data = message.get("data")
        if not isinstance(data, dict):
            data = {}
        if kind == "response_chunk":
            self.chunk(str(data.get("text", "")))
        elif kind == "user_message":
            self.line(f"[run] {message.get('run_id')} (thread {message.get('thread_id')})")
        elif kind == "agent_started":
            self.line(f"[agent] {data.get('agent')}")
        elif kind == "agent_thinking":
            self.line(f"[thinking] {data.get('text', '')}")
        elif kind == "tool_executing":
            args = json.dumps(data.get("args", {}), ensure_ascii=False)
            self.line(f"[tool] {data.get('tool')} {args}")
        elif kind == "tool_completed":
            took = format_ms(data.get("duration_ms"))
            if data.get("ok"):
                result = format_value(data.get("result"))
                self.line(f"[tool] {data.get('tool')} -> {result} ({took})")
            else:
                error = format_value(data.get("error"))
                self.line(f"[tool] {data.get('tool')} failed: {error} ({took})")
        elif kind == "run_status":
            self.line(f"[status] {data.get('status')}")
        elif kind == "response_complete":
            self.end_line()
            if data.get("fallback"):
                self.line("[fallback] the agent failed; the reply is a fallback message")
        elif kind == "agent_completed":
            status = data.get("status")
            text = f"[done] {status} in {format_ms(data.get('duration_ms'))}"
            failure = data.get("error")
            if isinstance(failure, dict):
                text += f": {failure.get('code')}: {failure.get('message')}"
            self.line(text)
        elif kind == "ack":
            self.line(f"[{data.get('action')}] {data.get('run_id')} is {data.get('status')}")
        elif kind == "error":
            self.line(f"[error] {data.get('code')}: {data.get('message')}", stderr=True)
        elif kind in ("connection_ready", "pong"):
            pass
        else:
            self.line(f"[{kind}] {format_value(data)}")

    def note(self, text: str) -> None:
        """A client-side remark (never a server message), on stderr."""
        self.line(text, stderr=True)


class JsonPrinter:
    """Machine-readable output: every message received, one JSON text per line."""

    def __init__(self, out: TextIO, err: TextIO) -> None:
        self.out = out
        self.err = err

    def message(self, message: dict[str, Any], raw: str) -> None:
        if "\n" in raw or "\r" in raw:
            # Keep one message per line even if a server pretty-prints its frames.
            raw = json.dumps(message, ensure_ascii=False, separators=(",", ":"))
        self.out.write(raw + "\n")
        self.out.flush()

    def note(self, text: str) -> None:
        self.err.write(text + "\n")
        self.err.flush()


Printer = HumanPrinter | JsonPrinter


# The exchange ------------------------------------------------------------------------


@dataclass
class Request:
    """What to ask the gateway: a new message, or the resume of a run."""

    content: str | None = None
    agent: str | None = None
    thread_id: str | None = None
    resume_run_id: str | None = None
    after_seq: int = 0
    id: str = field(default_factory=lambda: f"cli-{secrets.token_hex(4)}")

    def frame(self) -> dict[str, Any]:
        if self.resume_run_id is not None:
            return {
                "type": "resume",
                "id": self.id,
                "run_id": self.resume_run_id,
                "after_seq": self.after_seq,
            }
        frame: dict[str, Any] = {"type": "user_message", "id": self.id, "content": self.content}
        if self.agent is not None:
            frame["agent"] = self.agent
        if self.thread_id is not None:
            frame["thread_id"] = self.thread_id
        return frame


@dataclass
class RunState:
    """What the client learned so far; read after an interruption, too."""

    run_id: str | None = None
    last_seq: int | None = None
    status: str | None = None
    #: Run events received since the resume ``ack``.
    events_since_ack: int = 0


def describe_close(exc: ConnectionClosed) -> str:
    frame = exc.rcvd
    if frame is None:
        return "the connection closed without a close frame"
    reason = f" {frame.reason}" if frame.reason else ""
    return f"the server closed the connection: {frame.code}{reason}"


async def _recv(ws: ClientConnection) -> tuple[dict[str, Any], str]:
    data = await ws.recv()
    raw = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    try:
        message = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ClientError(f"the server sent a frame that is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ClientError("the server sent a frame that is not a JSON object")
    return message, raw


async def exchange(
    url: str,
    token: str,
    request: Request,
    printer: Printer,
    state: RunState,
    timeout_s: float,
) -> int:
    """Connect, send the request, print the run's events until it ends; the exit status.

    Raises:
        ClientError: usage, connection or authentication problems (exit status 2).
        TimeoutError: ``timeout_s`` ran out.
    """
    if request.resume_run_id is not None:
        state.run_id = request.resume_run_id
        state.last_seq = request.after_seq
    subprotocols = [Subprotocol(PROTOCOL), Subprotocol(f"bearer.{token}")]
    async with asyncio.timeout(timeout_s):
        try:
            async with connect(
                url, subprotocols=subprotocols, open_timeout=timeout_s, max_size=None
            ) as ws:
                ready, raw = await _recv(ws)
                if ready.get("type") != "connection_ready":
                    printer.message(ready, raw)
                    raise ClientError(f"expected connection_ready, got {ready.get('type')!r}")
                printer.message(ready, raw)
                await ws.send(json.dumps(request.frame()))
                return await _follow(ws, request, printer, state)
        except ConnectionClosed as exc:
            raise ClientError(describe_close(exc)) from None
        except InvalidStatus as exc:
            raise ClientError(
                f"the server refused the WebSocket upgrade: HTTP {exc.response.status_code}"
            ) from None
        except WebSocketException as exc:
            raise ClientError(f"WebSocket error: {exc}") from None
        except TimeoutError:
            raise
        except OSError as exc:
            raise ClientError(f"cannot connect to {url}: {exc.strerror or exc}") from None


async def _follow(ws: ClientConnection, request: Request, printer: Printer, state: RunState) -> int:
    ping_id = f"{request.id}-end"
    while True:
        message, raw = await _recv(ws)
        printer.message(message, raw)
        kind = message.get("type")
        data = message.get("data")
        if not isinstance(data, dict):
            data = {}
        if kind == "error":
            if data.get("ref") in (request.id, None):
                return EXIT_RUN_FAILED
            continue
        if kind == "ack" and data.get("ref") == request.id:
            state.status = data.get("status")
            state.events_since_ack = 0
            if state.status in TERMINAL_STATUSES:
                # A finished run replays what is left right after the ack; when nothing
                # is left, nothing more comes. The pong to a ping sent now follows the
                # replay's first events, so a pong with no run event before it means the
                # run has no event after --after.
                await ws.send(json.dumps({"type": "ping", "id": ping_id}))
            continue
        if kind == "pong" and data.get("ref") == ping_id:
            if state.events_since_ack == 0:
                printer.note(
                    f"run {state.run_id} is {state.status}; it has no events after "
                    f"seq {request.after_seq}"
                )
                return EXIT_OK if state.status == "completed" else EXIT_RUN_FAILED
            continue
        run_id = message.get("run_id")
        if run_id is None:
            continue
        if state.run_id is None and kind == "user_message" and data.get("ref") == request.id:
            state.run_id = run_id
        if run_id != state.run_id:
            continue
        state.events_since_ack += 1
        seq = message.get("seq")
        if isinstance(seq, int):
            state.last_seq = seq
        if kind == "run_status":
            state.status = data.get("status")
        elif kind == "agent_completed":
            state.status = data.get("status")
            return EXIT_OK if state.status == "completed" else EXIT_RUN_FAILED


# Command line ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chat.py",
        description="Send a message to the gateway over WebSocket (chat.v1) and stream the run.",
        epilog="Exit status: 0 completed; 1 failed, cancelled or an error answer; "
        "2 usage, connection, authentication or timeout.",
    )
    parser.add_argument("message", nargs="?", help="the message to send")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"WebSocket URL ({DEFAULT_URL})")
    parser.add_argument(
        "--token",
        default=None,
        help="JWT (default: CHAT_TOKEN, else minted with CHAT_JWT_SECRET or var/dev_secret)",
    )
    parser.add_argument(
        "--user",
        default=DEFAULT_USER,
        help=f"user of a token minted by this client (default {DEFAULT_USER})",
    )
    parser.add_argument("--agent", default=None, help="agent to ask (default: the gateway's)")
    parser.add_argument("--thread", default=None, metavar="ID", help="thread id to post in")
    parser.add_argument(
        "--resume", default=None, metavar="RUN_ID", help="follow an existing run instead"
    )
    parser.add_argument(
        "--after",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="with --resume: only events with seq > N (default 0)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print each message received as one JSON line"
    )
    parser.add_argument(
        "--timeout",
        type=positive,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"bound on the whole exchange (default {DEFAULT_TIMEOUT_S:g})",
    )
    return parser


def request_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Request:
    """Check the combination of arguments; exits with status 2 on a usage error."""
    if args.resume is not None:
        if args.message is not None:
            parser.error("give either a message or --resume RUN_ID, not both")
        if args.agent is not None or args.thread is not None:
            parser.error("--agent and --thread apply to a new message, not to --resume")
        return Request(resume_run_id=args.resume, after_seq=args.after or 0)
    if args.after is not None:
        parser.error("--after needs --resume RUN_ID")
    if args.message is None or not args.message.strip():
        parser.error("a non-empty message (or --resume RUN_ID) is required")
    return Request(content=args.message, agent=args.agent, thread_id=args.thread)


def token_from(args: argparse.Namespace) -> str:
    """``--token``, else ``CHAT_TOKEN``, else a token minted for ``--user``."""
    if args.token:
        return str(args.token)
    from_env = os.environ.get("CHAT_TOKEN", "").strip()
    if from_env:
        return from_env
    try:
        secret, _source = resolve_secret()
    except NoSecretError as exc:
        raise ClientError(
            f"no token: pass --token or set CHAT_TOKEN; minting failed: {exc}"
        ) from None
    return mint(
        args.user,
        secret,
        MINTED_TTL_S,
        audience=env_claim(None, "CHAT_JWT_AUDIENCE"),
        issuer=env_claim(None, "CHAT_JWT_ISSUER"),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        request = request_from(args, parser)
    except SystemExit as exc:  # --help, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    printer: Printer = (
        JsonPrinter(sys.stdout, sys.stderr) if args.json else HumanPrinter(sys.stdout, sys.stderr)
    )
    state = RunState()
    try:
        token = token_from(args)
        return asyncio.run(exchange(args.url, token, request, printer, state, args.timeout))
    except ClientError as exc:
        printer.note(f"{parser.prog}: error: {exc}")
        return EXIT_USAGE
    except TimeoutError:
        where = f" (run {state.run_id}, last seq {state.last_seq})" if state.run_id else ""
        printer.note(f"{parser.prog}: error: timed out after {args.timeout:g} s{where}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        if state.run_id is not None:
            printer.note(
                f"interrupted; run {state.run_id} goes on in the gateway. Follow it with: "
                f"python scripts/chat.py --resume {state.run_id} --after {state.last_seq or 0}"
            )
        else:
            printer.note("interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

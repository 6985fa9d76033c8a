"""Load test for the gateway: N concurrent clients, each sending M messages to an agent.

Usage (from the project root, with the gateway running, e.g. ``make run``)::

    python scripts/loadtest.py --clients 20 --messages 5
    python scripts/loadtest.py --clients 50 --ramp-s 5 --duration-s 30 --message 'chunks=200'
    python scripts/loadtest.py --sse --clients 10 --messages 3 --json

Each client opens one WebSocket (``--sse``: one keep-alive HTTP connection) at
its turn in the ramp, waits for ``connection_ready``, then sends its messages one
after the other: the next one once the previous run's ``agent_completed`` came.
The ``load`` agent is the default, so the agent's own cost is known (protocol
chat.v1, section 5: ``chunks=N chunk_chars=C delay_ms=D thinking=T tools=K
tool_ms=M``); with it the client also knows how many events each run must bring.

Measured: connect time (WebSocket: TCP connect to ``connection_ready``; SSE: the
POST to its response headers), time from sending a message to its run's first
event, to ``agent_started`` and to ``agent_completed`` (p50, p95, p99), the
latency of every event from the server's ``ts`` to its arrival (both clocks are
this machine's), events per second (every run event over the wall time from the
first message sent to the last ``agent_completed``), errors and close codes by
kind, and events lost, duplicated or reordered, found from each run's ``seq``.

The WebSocket client is a small one of this script's own (no compression
offered, frames handled as they arrive, one event loop, uvloop when installed),
so that one process can drive many fast streams; ``--sse`` uses httpx, which
costs more per event: the report gives the share of a core the client used, and
near 100% the client, not the server, is what limits the figures.

Tokens: ``--token`` is used by every client as is; otherwise each client gets a
token of its own user (``load-0000``, ``load-0001``, …) minted with ``--secret``,
else ``CHAT_JWT_SECRET``, else the dev-mode file ``var/dev_secret``.  The
gateway's per-user defaults are 30 new runs a minute, 5 runs at once and 20
connections: one client per user keeps the last two out of the way, but a client
sending more than 30 messages a minute gets ``rate_limited``.  For heavy runs
start the gateway with higher limits, e.g.::

    CHAT_RATE_LIMIT_PER_MINUTE=100000 CHAT_MAX_ACTIVE_RUNS_PER_USER=1000 \\
    CHAT_MAX_CONNECTIONS_PER_USER=1000 chat-gateway

Only loopback targets are accepted (127.0.0.0/8, ::1, localhost).  Every loop is
bounded: messages per client by ``--messages``, each run by ``--run-timeout-s``,
the whole test by ``--timeout-s``.

Exit status: 0 when every run completed with no error and no lost, duplicated or
reordered event; 1 otherwise; 2 for usage errors.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import ipaddress
import math
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO
from urllib.parse import urlsplit

import orjson

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_URL: Final = "ws://127.0.0.1:8000/ws"
DEFAULT_MESSAGE: Final = "chunks=50 delay_ms=0"
SSE_PATH: Final = "/api/chat/stream"
PROTOCOL: Final = "chat.v1"
#: Runs a client sends at most when only ``--duration-s`` bounds it.
MAX_MESSAGES_PER_CLIENT: Final = 1_000_000
#: Values kept for percentiles per measure; beyond, a uniform sample of this size.
SAMPLE_SIZE: Final = 200_000
#: Largest frame the client accepts.
MAX_FRAME_BYTES: Final = 64 * 1024 * 1024

EXIT_OK: Final = 0
EXIT_PROBLEMS: Final = 1
EXIT_USAGE: Final = 2


class UsageError(Exception):
    """A bad option or a target this tool refuses: exit status 2."""


# Targets --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int
    path: str  # with the query string

    @property
    def ws_url(self) -> str:
        return f"ws://{self.netloc}{self.path}"

    @property
    def http_url(self) -> str:
        return f"http://{self.netloc}{self.path}"

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def loopback_target(url: str, *, sse: bool = False) -> Target:
    """The target of ``url``, refusing anything but plain ws/http to a loopback address.

    With ``sse``, a WebSocket URL (or one with no path) stands for the same
    server's ``POST /api/chat/stream``.

    Raises:
        UsageError: not a ws:// or http:// URL, or not a loopback host.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "http"):
        raise UsageError(
            f"--url must be a ws:// or http:// URL (TLS is not needed on loopback), got {url!r}"
        )
    host = parts.hostname or ""
    if not is_loopback(host):
        raise UsageError(
            f"refusing to load-test {host or url!r}: only loopback targets are allowed "
            "(127.0.0.0/8, ::1, localhost)"
        )
    if host.lower() == "localhost":
        host = "127.0.0.1"
    port = parts.port or 80
    path = parts.path or "/"
    if sse and (parts.scheme == "ws" or path in ("", "/")):
        path = SSE_PATH
    if parts.query:
        path += "?" + parts.query
    return Target(host, port, path)


# Figures ----------------------------------------------------------------------------------


class Sample:
    """Values for percentiles: every value up to ``cap``, then a uniform sample of ``cap``."""

    __slots__ = ("_rng", "cap", "count", "total", "values", "worst")

    def __init__(self, cap: int = SAMPLE_SIZE) -> None:
        self.cap = cap
        self.values: list[float] = []
        self.count = 0
        self.total = 0.0
        self.worst = -math.inf
        self._rng = random.Random(7)

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        if value > self.worst:
            self.worst = value
        if len(self.values) < self.cap:
            self.values.append(value)
        else:
            j = self._rng.randrange(self.count)
            if j < self.cap:
                self.values[j] = value

    def summary(self) -> dict[str, float | int | None]:
        return summarize(self.values, self.count, self.total, self.worst)


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of sorted values, by linear interpolation."""
    if not ordered:
        raise ValueError("no values")
    k = (len(ordered) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarize(
    values: Sequence[float],
    count: int | None = None,
    total: float | None = None,
    worst: float | None = None,
) -> dict[str, float | int | None]:
    """``n``, ``mean``, ``p50``, ``p95``, ``p99``, ``max`` (None when there is no value)."""
    n = len(values) if count is None else count
    if not values:
        return {"n": n, "mean": None, "p50": None, "p95": None, "p99": None, "max": None}
    ordered = sorted(values)
    mean = (sum(values) if total is None else total) / (n or 1)
    return {
        "n": n,
        "mean": round(mean, 3),
        "p50": round(percentile(ordered, 50), 3),
        "p95": round(percentile(ordered, 95), 3),
        "p99": round(percentile(ordered, 99), 3),
        "max": round(ordered[-1] if worst is None else worst, 3),
    }


def expected_events(agent: str | None, message: str) -> int | None:
    """Events of one run of the ``load`` agent for ``message``; None for other agents."""
    if agent != "load":
        return None
    from agents.load import LoadSpec

    try:
        spec = LoadSpec.parse(message)
    except Exception:  # not a load message: the count is unknown
        return None
    # user_message, agent_started, thinking, tool calls, chunks, [apology],
    # response_complete, agent_completed
    apology = 4 if spec.fail else 0
    return 2 + spec.thinking + 2 * spec.tools + spec.chunks + apology + 2


class Run:
    """One message sent and what came back for its run."""

    __slots__ = (
        "completed_at",
        "done",
        "events",
        "first_at",
        "missing",
        "next_seq",
        "ref",
        "run_id",
        "sent_at",
        "started_at",
        "status",
    )

    def __init__(self, ref: str | None, done: asyncio.Future[str] | None = None) -> None:
        self.ref = ref
        self.run_id: str | None = None
        self.sent_at = 0.0
        self.first_at: float | None = None
        self.started_at: float | None = None
        self.completed_at: float | None = None
        self.next_seq = 1
        self.missing: set[int] = set()
        self.events = 0
        self.status: str | None = None
        self.done = done


class Stats:
    """Everything the clients measured, shared by all of them (one event loop)."""

    def __init__(self, expected_per_run: int | None = None) -> None:
        self.expected_per_run = expected_per_run
        self.connect_ms = Sample()
        self.first_event_ms = Sample()
        self.started_ms = Sample()
        self.completed_ms = Sample()
        self.latency_ms = Sample()
        self.events = 0
        self.bytes = 0
        self.by_type: Counter[str] = Counter()
        self.clients_connected = 0
        self.runs_sent = 0
        self.runs_ended = 0
        self.statuses: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.close_codes: Counter[str] = Counter()
        self.lost = 0
        self.duplicated = 0
        self.reordered = 0
        self.wrong_count = 0
        self.after_end = 0
        self.first_send: float | None = None
        self.last_end: float | None = None
        #: CPU seconds this process used over the test, and the test's wall time.
        self.client_cpu_s = 0.0
        self.test_wall_s = 0.0

    # Per event --------------------------------------------------------------------

    def sent(self, run: Run, now: float) -> None:
        run.sent_at = now
        self.runs_sent += 1
        if self.first_send is None:
            self.first_send = now

    def event(self, run: Run, message: dict[str, Any], now: float) -> None:
        """Account one run event of ``run`` received at ``now`` (Unix seconds)."""
        kind = message.get("type")
        seq = message.get("seq")
        self.events += 1
        self.by_type[kind] += 1  # type: ignore[index]
        ts = message.get("ts")
        if isinstance(ts, float):
            self.latency_ms.add((now - ts) * 1000)
        if run.completed_at is not None:
            self.after_end += 1
        run.events += 1
        if run.first_at is None:
            run.first_at = now
            self.first_event_ms.add((now - run.sent_at) * 1000)
        if seq == run.next_seq:
            run.next_seq += 1
        elif isinstance(seq, int) and seq > run.next_seq:
            run.missing.update(range(run.next_seq, seq))
            run.next_seq = seq + 1
        elif seq in run.missing:
            run.missing.discard(seq)
            self.reordered += 1
        else:
            self.duplicated += 1
        if kind == "agent_started":
            run.started_at = now
            self.started_ms.add((now - run.sent_at) * 1000)
        elif kind == "agent_completed" and run.completed_at is None:
            data = message.get("data")
            status = data.get("status") if isinstance(data, dict) else None
            self.end(run, str(status), now)

    def end(self, run: Run, status: str, now: float) -> None:
        """The run ended: ``completed``/``cancelled``/``failed`` or a client-side reason."""
        if run.status is not None:
            return
        run.status = status
        self.runs_ended += 1
        self.statuses[status] += 1
        if run.first_at is not None:
            run.completed_at = now
            if status in ("completed", "cancelled", "failed"):
                self.completed_ms.add((now - run.sent_at) * 1000)
                self.last_end = now if self.last_end is None else max(self.last_end, now)
        self.lost += len(run.missing)
        expected = self.expected_per_run
        if expected is not None and status == "completed" and run.next_seq - 1 != expected:
            self.wrong_count += 1
        run.missing = set()
        if run.done is not None and not run.done.done():
            run.done.set_result(status)

    # Results -------------------------------------------------------------------------

    @property
    def wall_s(self) -> float | None:
        if self.first_send is None or self.last_end is None:
            return None
        return max(self.last_end - self.first_send, 1e-9)

    @property
    def events_per_s(self) -> float | None:
        wall = self.wall_s
        return None if wall is None else self.events / wall

    @property
    def problems(self) -> int:
        incomplete = self.runs_sent - self.statuses.get("completed", 0)
        return (
            sum(self.errors.values())
            + incomplete
            + self.lost
            + self.duplicated
            + self.reordered
            + self.wrong_count
            + self.after_end
        )

    def report(self) -> dict[str, Any]:
        eps = self.events_per_s
        return {
            "clients_connected": self.clients_connected,
            "runs": {
                "sent": self.runs_sent,
                "ended": self.runs_ended,
                "completed": self.statuses.get("completed", 0),
                "by_status": dict(sorted(self.statuses.items())),
            },
            "events": {
                "total": self.events,
                "bytes": self.bytes,
                "per_s": None if eps is None else round(eps, 1),
                "wall_s": None if self.wall_s is None else round(self.wall_s, 4),
                "expected_per_run": self.expected_per_run,
                "by_type": dict(sorted(self.by_type.items())),
            },
            "connect_ms": self.connect_ms.summary(),
            "first_event_ms": self.first_event_ms.summary(),
            "agent_started_ms": self.started_ms.summary(),
            "agent_completed_ms": self.completed_ms.summary(),
            "event_latency_ms": self.latency_ms.summary(),
            "seq": {
                "lost": self.lost,
                "duplicated": self.duplicated,
                "reordered": self.reordered,
                "wrong_count_runs": self.wrong_count,
                "after_agent_completed": self.after_end,
            },
            "errors": dict(sorted(self.errors.items())),
            "close_codes": dict(sorted(self.close_codes.items())),
            "client_cpu_share": round(self.client_cpu_s / max(self.test_wall_s, 1e-9), 3),
            "ok": self.problems == 0,
        }


# A small WebSocket client ----------------------------------------------------------------

try:
    from websockets.speedups import apply_mask as _apply_mask
except ImportError:  # the pure-Python fallback, for small client frames

    def _apply_mask(data: bytes, mask: bytes) -> bytes:
        n = len(data)
        key = (mask * (n // 4 + 1))[:n]
        return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OnText = Callable[[bytes, float], None]
OnClose = Callable[[int, str], None]


class HandshakeError(Exception):
    """The server did not switch protocols."""

    def __init__(self, status: int, detail: str = "") -> None:
        super().__init__(f"HTTP {status} {detail}".strip())
        self.status = status


class WsClient(asyncio.Protocol):
    """A minimal RFC 6455 client: text frames, ping/pong and close, no extensions.

    Frames are handed to ``on_text(payload, received_at)`` from ``data_received``,
    with no queue and no task switch, so that one event loop can keep up with many
    fast streams.  ``received_at`` is ``time.time()`` when the bytes arrived.
    No compression is offered: every server is measured sending plain frames.
    """

    def __init__(self, on_text: OnText, on_close: OnClose | None = None) -> None:
        self.on_text = on_text
        self.on_close = on_close
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.handshake: asyncio.Future[bytes] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.close_code: int | None = None
        self.close_reason = ""
        self.subprotocol: str | None = None
        self._open = False
        self._buf = bytearray()
        self._fragments: bytearray | None = None
        self._close_sent = False

    # asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        now = time.time()
        buf = self._buf
        buf += data
        if not self._open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > 65536:
                    self._fail_handshake(ConnectionError("handshake response too large"))
                return
            head = bytes(buf[:end])
            del buf[: end + 4]
            if not self.handshake.done():
                self.handshake.set_result(head)
            if not head.startswith((b"HTTP/1.1 101 ", b"HTTP/1.0 101 ")):
                buf.clear()  # an HTTP refusal: its body is no WebSocket frame
                return
            self._open = True
        if self._open:
            self._parse(now)

    def _parse(self, now: float) -> None:
        buf = self._buf
        n = len(buf)
        pos = 0
        while n - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            length = b1 & 0x7F
            head = 2
            if length == 126:
                if n - pos < 4:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                head = 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
                if length > MAX_FRAME_BYTES:
                    self._protocol_error(1009, "frame too large")
                    return
            mask = None
            if b1 & 0x80:  # servers must not mask; accept it anyway
                mask = bytes(buf[pos + head : pos + head + 4])
                head += 4
            end = pos + head + length
            if end > n:
                break
            payload = buf[pos + head : end]
            pos = end
            if mask is not None:
                payload = bytearray(_apply_mask(bytes(payload), mask))
            opcode = b0 & 0x0F
            if opcode in (1, 2):
                if b0 & 0x80:
                    self.on_text(payload, now)
                else:
                    self._fragments = payload
            elif opcode == 0:
                if self._fragments is None:
                    self._protocol_error(1002, "continuation with no first fragment")
                    return
                self._fragments += payload
                if b0 & 0x80:
                    whole, self._fragments = self._fragments, None
                    self.on_text(whole, now)
            elif opcode == 8:
                self._closing(bytes(payload))
                del buf[:pos]
                return
            elif opcode == 9:
                self._write(0x8A, bytes(payload))
            # opcode 10 (pong) and unknown opcodes are ignored
        if pos:
            del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.close_code is None:
            self.close_code = 1006
            self.close_reason = str(exc) if exc else "connection lost"
        self._fail_handshake(ConnectionError(f"connection closed ({self.close_code})"))
        if not self.closed.done():
            self.closed.set_result(None)
        if self.on_close is not None:
            callback, self.on_close = self.on_close, None
            callback(self.close_code, self.close_reason)

    # Sending -------------------------------------------------------------------------

    def _write(self, opcode_byte: int, payload: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        n = len(payload)
        if n < 126:
            head = bytes((opcode_byte, 0x80 | n))
        elif n < 65536:
            head = bytes((opcode_byte, 0x80 | 126)) + n.to_bytes(2, "big")
        else:
            head = bytes((opcode_byte, 0x80 | 127)) + n.to_bytes(8, "big")
        mask = os.urandom(4)
        transport.write(head + mask + _apply_mask(payload, mask))

    def send_text(self, text: str | bytes) -> None:
        """Send one text frame (``bytes`` must be UTF-8 already)."""
        self._write(0x81, text.encode() if isinstance(text, str) else text)

    @property
    def is_open(self) -> bool:
        return self._open and self.close_code is None and not self._close_sent

    async def close(self, code: int = 1000, reason: str = "", timeout: float = 2.0) -> None:
        """Close cleanly: send a close frame, wait for the server's, then drop the socket."""
        if not self._close_sent and self.close_code is None:
            self._close_sent = True
            self._write(0x88, code.to_bytes(2, "big") + reason.encode()[:120])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.closed), timeout)
        if self.transport is not None and not self.closed.done():
            self.transport.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # Closing -------------------------------------------------------------------------

    def _closing(self, payload: bytes) -> None:
        code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
        if self.close_code is None:
            self.close_code = code
            self.close_reason = payload[2:].decode("utf-8", "replace")
        if not self._close_sent:
            self._close_sent = True
            self._write(0x88, payload[:2])
        if self.transport is not None:
            self.transport.close()

    def _protocol_error(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
        if self.transport is not None:
            self.transport.abort()

    def _fail_handshake(self, exc: Exception) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(exc)
            self.handshake.exception()  # retrieved: a failed connect reports it itself


async def ws_connect(
    url: str,
    on_text: OnText,
    *,
    on_close: OnClose | None = None,
    subprotocols: Sequence[str] = (),
    headers: Sequence[tuple[str, str]] = (),
    timeout: float = 10.0,
) -> WsClient:
    """Open a WebSocket to a loopback ``ws://`` URL.

    Raises:
        UsageError: the URL is not loopback.
        HandshakeError: the server answered the upgrade with another status.
        OSError, TimeoutError, ConnectionError: the connection failed.
    """
    target = loopback_target(url)
    loop = asyncio.get_running_loop()
    key = base64.b64encode(os.urandom(16))
    lines = [
        f"GET {target.path} HTTP/1.1",
        f"Host: {target.netloc}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key.decode()}",
        "Sec-WebSocket-Version: 13",
    ]
    if subprotocols:
        lines.append("Sec-WebSocket-Protocol: " + ", ".join(subprotocols))
    lines.extend(f"{name}: {value}" for name, value in headers)
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    async with asyncio.timeout(timeout):
        _, proto = await loop.create_connection(
            lambda: WsClient(on_text, on_close), target.host, target.port
        )
        try:
            assert proto.transport is not None
            proto.transport.write(request)
            head = await proto.handshake
        except BaseException:
            proto.abort()
            raise
    status_line, _, rest = head.decode("latin-1").partition("\r\n")
    parts = status_line.split(" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    fields: dict[str, str] = {}
    for line in rest.split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            fields[name.strip().lower()] = value.strip()
    if status != 101:
        proto.abort()
        raise HandshakeError(status, parts[2] if len(parts) > 2 else "")
    accept = base64.b64encode(hashlib.sha1(key + _GUID).digest()).decode()
    if fields.get("sec-websocket-accept") != accept:
        proto.abort()
        raise HandshakeError(status, "bad Sec-WebSocket-Accept")
    proto.subprotocol = fields.get("sec-websocket-protocol")
    return proto


# The load clients ------------------------------------------------------------------------


@dataclass
class Config:
    target: Target
    clients: int = 10
    messages: int = 5
    ramp_s: float = 0.0
    duration_s: float | None = None
    agent: str | None = "load"
    message: str = DEFAULT_MESSAGE
    sse: bool = False
    run_timeout_s: float = 60.0
    connect_timeout_s: float = 10.0
    timeout_s: float = 300.0
    tokens: Callable[[int], str] | None = None
    progress: bool = False
    out: TextIO = field(default_factory=lambda: sys.stderr)


def error_kind(exc: BaseException) -> str:
    if isinstance(exc, HandshakeError):
        return f"handshake HTTP {exc.status}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return type(exc).__name__


class WsSession:
    """One WebSocket client's state; frames arrive through :meth:`on_text`."""

    def __init__(self, stats: Stats, index: int) -> None:
        self.stats = stats
        self.index = index
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.ready: asyncio.Future[None] = loop.create_future()
        self.pending: Run | None = None
        self.runs: dict[str, Run] = {}
        self.client_closing = False

    def on_text(self, payload: bytes, now: float) -> None:
        stats = self.stats
        stats.bytes += len(payload)
        try:
            message = orjson.loads(payload)
            run_id = message.get("run_id")
        except (orjson.JSONDecodeError, AttributeError):
            stats.errors["frame not a JSON object"] += 1
            return
        if run_id is not None:
            run = self.runs.get(run_id)
            if run is None:
                pending = self.pending
                data = message.get("data")
                ref = data.get("ref") if isinstance(data, dict) else None
                if pending is None or message.get("type") != "user_message" or ref != pending.ref:
                    stats.errors["event of an unknown run"] += 1
                    return
                run = pending
                run.run_id = run_id
                self.runs[run_id] = run
                self.pending = None
            stats.event(run, message, now)
            return
        kind = message.get("type")
        if kind == "connection_ready":
            if not self.ready.done():
                self.ready.set_result(None)
        elif kind == "error":
            data = message.get("data") or {}
            stats.errors[f"error {data.get('code')}"] += 1
            pending = self.pending
            if pending is not None and data.get("ref") == pending.ref:
                self.pending = None
                stats.end(pending, f"error {data.get('code')}", now)

    def on_close(self, code: int, reason: str) -> None:
        if not self.client_closing:
            self.stats.close_codes[str(code)] += 1
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed with {code} {reason}".strip()))
            self.ready.exception()
        now = time.time()
        for run in [self.pending, *self.runs.values()]:
            if run is not None and run.status is None:
                self.stats.end(run, f"closed {code}", now)


async def ws_load_client(index: int, cfg: Config, stats: Stats, deadline: float) -> None:
    session = WsSession(stats, index)
    token = cfg.tokens(index) if cfg.tokens is not None else None
    subprotocols = [PROTOCOL, f"bearer.{token}"] if token else [PROTOCOL]
    began = time.time()
    try:
        client = await ws_connect(
            cfg.target.ws_url,
            session.on_text,
            on_close=session.on_close,
            subprotocols=subprotocols,
            timeout=cfg.connect_timeout_s,
        )
    except (OSError, TimeoutError, HandshakeError) as exc:
        stats.errors[f"connect: {error_kind(exc)}"] += 1
        return
    try:
        try:
            await asyncio.wait_for(asyncio.shield(session.ready), cfg.connect_timeout_s)
        except (ConnectionError, TimeoutError) as exc:
            stats.errors[f"connect: no connection_ready ({error_kind(exc)})"] += 1
            return
        stats.connect_ms.add((time.time() - began) * 1000)
        stats.clients_connected += 1
        agent = {"agent": cfg.agent} if cfg.agent else {}
        for m in range(cfg.messages):
            if time.monotonic() >= deadline or not client.is_open:
                break
            ref = f"c{index}-{m}"
            run = Run(ref, session.loop.create_future())
            session.pending = run
            frame = {"type": "user_message", "id": ref, "content": cfg.message, **agent}
            stats.sent(run, time.time())
            client.send_text(orjson.dumps(frame))
            try:
                await asyncio.wait_for(asyncio.shield(run.done), cfg.run_timeout_s)  # type: ignore[arg-type]
            except TimeoutError:
                stats.errors["run timeout"] += 1
                stats.end(run, "timeout", time.time())
                break
    finally:
        session.client_closing = True
        await client.close()


async def sse_load_client(index: int, cfg: Config, stats: Stats, deadline: float) -> None:
    import httpx

    token = cfg.tokens(index) if cfg.tokens is not None else None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body: dict[str, Any] = {"message": cfg.message}
    if cfg.agent:
        body["agent"] = cfg.agent
    timeout = httpx.Timeout(cfg.run_timeout_s, connect=cfg.connect_timeout_s)
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    loop = asyncio.get_running_loop()
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as http:
        connected = False
        for _ in range(cfg.messages):
            if time.monotonic() >= deadline:
                break
            run = Run(None, loop.create_future())
            stats.sent(run, time.time())
            try:
                async with asyncio.timeout(cfg.run_timeout_s):
                    await _sse_run(http, cfg, stats, run, headers, body)
            except TimeoutError:
                stats.errors["run timeout"] += 1
                stats.end(run, "timeout", time.time())
            except httpx.HTTPError as exc:
                stats.errors[f"http: {type(exc).__name__}"] += 1
                stats.end(run, "http error", time.time())
            if run.status is None:
                stats.errors["stream ended before agent_completed"] += 1
                stats.end(run, "incomplete", time.time())
            if not connected and run.first_at is not None:
                connected = True
                stats.clients_connected += 1


async def _sse_run(
    http: Any, cfg: Config, stats: Stats, run: Run, headers: dict[str, str], body: dict[str, Any]
) -> None:
    async with http.stream("POST", cfg.target.http_url, json=body, headers=headers) as response:
        stats.connect_ms.add((time.time() - run.sent_at) * 1000)
        if response.status_code != 200:
            raw = await response.aread()
            try:
                code = orjson.loads(raw)["error"]["code"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                code = "?"
            stats.errors[f"http {response.status_code} {code}"] += 1
            stats.end(run, f"http {response.status_code}", time.time())
            return
        buf = b""
        async for chunk in response.aiter_raw():
            now = time.time()
            stats.bytes += len(chunk)
            buf = buf + chunk if buf else chunk
            if b"\r" in buf:
                buf = buf.replace(b"\r\n", b"\n")
            blocks = buf.split(b"\n\n")
            buf = blocks.pop()
            for block in blocks:
                sse_block(block, run, stats, now)


def sse_block(block: bytes, run: Run, stats: Stats, now: float) -> None:
    """Account one SSE message (``event:``/``data:`` lines) of ``run``."""
    event = b"message"
    data = b""
    for line in block.split(b"\n"):
        if line.startswith(b"data:"):
            data = line[5:].lstrip(b" ") if not data else data + b"\n" + line[5:].lstrip(b" ")
        elif line.startswith(b"event:"):
            event = line[6:].strip()
    if not data:
        return  # a comment such as ": ping"
    if event == b"stream_start":
        run.run_id = orjson.loads(data).get("run_id")
    elif event == b"stream_end":
        if run.status is None:
            status = orjson.loads(data).get("status")
            stats.errors[f"stream_end before agent_completed ({status})"] += 1
            stats.end(run, f"stream_end {status}", now)
    elif event == b"error":
        code = orjson.loads(data).get("code")
        stats.errors[f"error {code}"] += 1
    else:
        message = orjson.loads(data)
        if isinstance(message, dict) and message.get("seq") is not None:
            stats.event(run, message, now)


# Running ------------------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on a terminal, redrawn with ``\\r``."""

    WIDTH: Final = 24

    def __init__(self, cfg: Config, stats: Stats, began: float) -> None:
        self.cfg = cfg
        self.stats = stats
        self.began = began
        self.shown = False

    def line(self) -> str:
        cfg, stats = self.cfg, self.stats
        elapsed = time.monotonic() - self.began
        if cfg.duration_s is not None:
            fraction = min(1.0, elapsed / max(cfg.ramp_s + cfg.duration_s, 1e-9))
            what = f"{elapsed:5.1f}/{cfg.ramp_s + cfg.duration_s:g} s"
        else:
            total = cfg.clients * cfg.messages
            fraction = stats.runs_ended / total if total else 1.0
            what = f"runs {stats.runs_ended}/{total}"
        filled = round(fraction * self.WIDTH)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        rate = stats.events / elapsed if elapsed > 0 else 0.0
        errors = sum(stats.errors.values())
        return (
            f"[{bar}] {fraction:4.0%} {what} | clients {stats.clients_connected}/{cfg.clients}"
            f" | events {stats.events:,} ({rate:,.0f}/s) | errors {errors}"
        )

    async def run(self, interval: float = 0.25) -> None:
        # Bounded: at most the test's own time limit, in steps of ``interval``.
        for _ in range(int(self.cfg.timeout_s / interval) + 1):
            self.draw()
            await asyncio.sleep(interval)

    def draw(self) -> None:
        self.cfg.out.write("\r" + self.line() + "\x1b[K")
        self.cfg.out.flush()
        self.shown = True

    def finish(self) -> None:
        if self.shown:
            self.draw()
            self.cfg.out.write("\n")
            self.cfg.out.flush()


async def run_load(cfg: Config) -> Stats:
    """Run the whole test; bounded by ``cfg.timeout_s``."""
    stats = Stats(expected_events(cfg.agent, cfg.message))
    began = time.monotonic()
    end = began + cfg.ramp_s + (cfg.duration_s if cfg.duration_s is not None else cfg.timeout_s)
    client = sse_load_client if cfg.sse else ws_load_client
    step = cfg.ramp_s / cfg.clients if cfg.clients else 0.0

    async def one(index: int) -> None:
        await asyncio.sleep(index * step)
        try:
            await client(index, cfg, stats, end)
        except Exception as exc:  # a bug in the client must not hide the others' figures
            stats.errors[f"client failed: {type(exc).__name__}: {exc}"] += 1

    progress = Progress(cfg, stats, began)
    drawer = asyncio.create_task(progress.run()) if cfg.progress else None
    cpu0 = time.process_time()
    tasks = [asyncio.create_task(one(i)) for i in range(cfg.clients)]
    try:
        async with asyncio.timeout(cfg.timeout_s):
            await asyncio.gather(*tasks)
    except TimeoutError:
        stats.errors["test timeout (--timeout-s)"] += 1
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        stats.client_cpu_s = time.process_time() - cpu0
        stats.test_wall_s = time.monotonic() - began
        if drawer is not None:
            drawer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drawer
            progress.finish()
    return stats


def run_async(coro: Any) -> Any:
    """Run ``coro`` on uvloop when it is installed, else on asyncio's default loop."""
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


# Output ---------------------------------------------------------------------------------------


def render(report: dict[str, Any]) -> str:
    """The human summary of a report."""
    cfg = report["config"]
    runs = report["runs"]
    events = report["events"]
    seq = report["seq"]
    transport = "SSE" if cfg["sse"] else "WebSocket"
    lines = [
        f"loadtest: {cfg['clients']} clients x {cfg['messages_per_client']} messages over "
        f"{transport} to {cfg['url']} (agent {cfg['agent']}: {cfg['message']!r})",
        f"  clients   {report['clients_connected']} connected of {cfg['clients']}",
        f"  runs      {runs['sent']} sent, {runs['completed']} completed"
        + (f"  {runs['by_status']}" if set(runs["by_status"]) - {"completed"} else ""),
    ]
    wall = events["wall_s"]
    rate = events["per_s"]
    expected = events["expected_per_run"]
    lines.append(
        f"  events    {events['total']:,} ({events['bytes'] / 1e6:.2f} MB)"
        + (f", {expected} per run expected" if expected is not None else "")
        + (f", in {wall:.3f} s: {rate:,.0f} events/s" if wall else "")
    )
    lines.append(
        f"  seq       lost {seq['lost']}, duplicated {seq['duplicated']}, reordered "
        f"{seq['reordered']}, runs with a wrong count {seq['wrong_count_runs']}, "
        f"after agent_completed {seq['after_agent_completed']}"
    )
    lines.append("")
    lines.append(f"  {'(ms)':<28}{'n':>9}{'mean':>10}{'p50':>10}{'p95':>10}{'p99':>10}{'max':>10}")
    rows = [
        ("connect", "connect_ms"),
        ("message -> first event", "first_event_ms"),
        ("message -> agent_started", "agent_started_ms"),
        ("message -> agent_completed", "agent_completed_ms"),
        ("event latency (server ts)", "event_latency_ms"),
    ]
    for label, key in rows:
        s = report[key]

        def cell(v: float | None) -> str:
            return f"{v:>10.2f}" if v is not None else f"{'-':>10}"

        lines.append(
            f"  {label:<28}{s['n']:>9}"
            + "".join(cell(s[k]) for k in ("mean", "p50", "p95", "p99", "max"))
        )
    lines.append("")
    errors = report["errors"]
    lines.append(
        "  errors    " + (", ".join(f"{k}: {v}" for k, v in errors.items()) if errors else "none")
    )
    codes = report["close_codes"]
    lines.append(
        "  closed by the server  "
        + (", ".join(f"{k}: {v}" for k, v in codes.items()) if codes else "none")
    )
    share = report["client_cpu_share"]
    lines.append(
        f"  client    {share:.0%} of one core"
        + (" (the client may be what limits these figures)" if share >= 0.85 else "")
    )
    lines.append("  result    " + ("ok" if report["ok"] else "PROBLEMS (see above)"))
    return "\n".join(lines)


def token_source(args: argparse.Namespace, ttl_s: int) -> Callable[[int], str] | None:
    """Each client's token: ``--token`` for all, else one minted per client user."""
    if args.token:
        token: str = args.token
        return lambda _index: token
    from scripts.mint_token import NoSecretError, env_claim, resolve_secret
    from server.auth import Authenticator
    from server.settings import Settings

    try:
        secret, _ = resolve_secret(args.secret)
    except NoSecretError as exc:
        raise UsageError(str(exc)) from None
    settings = Settings(
        jwt_secret=secret,
        jwt_audience=env_claim(None, "CHAT_JWT_AUDIENCE"),
        jwt_issuer=env_claim(None, "CHAT_JWT_ISSUER"),
    )
    auth = Authenticator(settings)
    prefix = args.user_prefix
    return lambda index: auth.mint(f"{prefix}-{index:04d}", ttl_s)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _positive(text: str) -> float:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loadtest.py",
        description=(
            "Load-test the gateway (loopback only): N clients over WebSocket or SSE, each "
            "sending M messages to an agent, with latency percentiles, events per second, "
            "errors, close codes and lost/duplicated/reordered events."
        ),
        epilog=(
            "Per-user limits: clients get users of their own (PREFIX-0000, PREFIX-0001, ...), "
            "but the gateway's defaults still allow only 30 new runs a minute per user, 5 runs "
            "at once and 20 connections. For heavy runs start the gateway with e.g. "
            "CHAT_RATE_LIMIT_PER_MINUTE=100000 CHAT_MAX_ACTIVE_RUNS_PER_USER=1000 "
            "CHAT_MAX_CONNECTIONS_PER_USER=1000. With --token every client is the same user. "
            "Exit status: 0 when every run completed cleanly, 1 when anything went wrong, "
            "2 for usage errors."
        ),
    )
    parser.add_argument(
        "--url", default=DEFAULT_URL, help=f"the gateway's WebSocket URL ({DEFAULT_URL})"
    )
    parser.add_argument(
        "--sse",
        action="store_true",
        help=f"use SSE (POST {SSE_PATH} on the same host and port) instead of WebSocket",
    )
    parser.add_argument(
        "--clients", type=_positive_int, default=10, metavar="N", help="concurrent clients (10)"
    )
    parser.add_argument(
        "--messages",
        type=_positive_int,
        default=None,
        metavar="M",
        help="messages per client, one after the other (default 5; with --duration-s: "
        f"as many as fit, at most {MAX_MESSAGES_PER_CLIENT:,})",
    )
    parser.add_argument(
        "--ramp-s",
        type=_non_negative,
        default=0.0,
        metavar="S",
        help="spread the clients' starts evenly over S seconds (0)",
    )
    parser.add_argument(
        "--duration-s",
        type=_positive,
        default=None,
        metavar="S",
        help="after the ramp, send new messages for S seconds (runs under way finish)",
    )
    parser.add_argument("--agent", default="load", help="the agent to ask (load)")
    parser.add_argument(
        "--message", default=DEFAULT_MESSAGE, help=f"the message text ({DEFAULT_MESSAGE!r})"
    )
    parser.add_argument("--token", default=None, help="one JWT for every client")
    parser.add_argument(
        "--secret",
        default=None,
        help="HS256 secret to mint per-client tokens (default: CHAT_JWT_SECRET, else "
        "var/dev_secret)",
    )
    parser.add_argument(
        "--user-prefix", default="load", metavar="PREFIX", help="per-client users (load)"
    )
    parser.add_argument(
        "--run-timeout-s",
        type=_positive,
        default=60.0,
        metavar="S",
        help="a run not ended after S seconds counts as an error (60)",
    )
    parser.add_argument(
        "--connect-timeout-s",
        type=_positive,
        default=10.0,
        metavar="S",
        help="bound on connecting and on waiting for connection_ready (10)",
    )
    parser.add_argument(
        "--timeout-s",
        type=_positive,
        default=None,
        metavar="S",
        help="hard limit on the whole test (default: ramp + duration + run timeout + 30, "
        "or 600 with no duration)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    progress = parser.add_mutually_exclusive_group()
    progress.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="show the progress bar on stderr (default: when stderr is a terminal)",
    )
    progress.add_argument("--no-progress", dest="progress", action="store_false")
    return parser


def config_from(args: argparse.Namespace) -> Config:
    target = loopback_target(args.url, sse=args.sse)
    if args.messages is None:
        args.messages = MAX_MESSAGES_PER_CLIENT if args.duration_s is not None else 5
    if args.timeout_s is None:
        if args.duration_s is not None:
            args.timeout_s = args.ramp_s + args.duration_s + args.run_timeout_s + 30
        else:
            args.timeout_s = 600.0
    ttl = int(args.timeout_s + 3600)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    return Config(
        target=target,
        clients=args.clients,
        messages=args.messages,
        ramp_s=args.ramp_s,
        duration_s=args.duration_s,
        agent=args.agent or None,
        message=args.message,
        sse=args.sse,
        run_timeout_s=args.run_timeout_s,
        connect_timeout_s=args.connect_timeout_s,
        timeout_s=args.timeout_s,
        tokens=token_source(args, ttl),
        progress=progress,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        cfg = config_from(args)
    except UsageError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    stats = run_async(run_load(cfg))
    report = {
        "config": {
            "url": cfg.target.http_url if cfg.sse else cfg.target.ws_url,
            "sse": cfg.sse,
            "clients": cfg.clients,
            "messages_per_client": cfg.messages,
            "ramp_s": cfg.ramp_s,
            "duration_s": cfg.duration_s,
            "agent": cfg.agent,
            "message": cfg.message,
        },
        **stats.report(),
    }
    if args.json:
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(render(report))
    return EXIT_OK if report["ok"] else EXIT_PROBLEMS


if __name__ == "__main__":
    sys.exit(main())

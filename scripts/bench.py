"""Side-by-side benchmark: the gateway against the limit of its stack and against its peers.

Usage (from the project root; needs the ``bench`` extra: python-socketio, sse-starlette)::

    python scripts/bench.py                 # the full run (about 2 minutes on 2 cores)
    python scripts/bench.py --quick         # a smoke run (about 15 seconds)
    python scripts/bench.py --json          # the report as JSON on stdout
    python scripts/bench.py --markdown      # the figures as Markdown tables
    python scripts/bench.py --profile DIR   # also profile the gateway with py-spy
    python scripts/bench.py --gateway-src DIR   # the gateway of another source tree

Processs, each a process of its own on a free loopback port, served by uvicorn
with the same settings (uvicorn's defaults: the uvloop loop, the httptools HTTP
parser, the websockets "sansio" WebSocket implementation; frame limit 64 KiB,
pings every 15 s, no access log):

* ``bare``: a bare Starlette WebSocket endpoint sending ready-made frames, and a
  bare echo endpoint (``scripts/bench_apps.py bare``): the limit of this stack;
* ``gateway``: ``python -m server`` with ``CHAT_JWT_SECRET`` set and the per-user
  limits raised out of the way, every other setting at its default;
* ``socketio``: python-socketio's ASGI server emitting the same events;
* ``gateway-sse`` and ``sse-starlette``: the gateway's ``POST /api/chat/stream``
  against sse-starlette streaming the same events.

Every server sends, for the same ``load`` message, the same events with the same
envelope and sizes (python-socketio adds its own framing: ``42["type",…]``).
One client process drives them all, over one uvloop event loop, with the load
kit's WebSocket client and keep-alive HTTP/1.1 SSE client (``scripts/kit/``) so
that the client spends little per event; no compression is offered.

Scenarios, each on a fresh server process (``--quick``: one process per server):
time to first event (``user_message`` sent to ``agent_started`` received, one
run at a time) against a bare echo round trip of a frame of the same size; one
fast stream; 20 and 200 concurrent streams (throughput: every run event over the
wall time from the first message sent to the last ``agent_completed``); one run
watched by 50 sessions (the starter and 49 that ``resume`` it during its tool
call; deliveries per second from the end of the tool call); 5,000 idle
connections (the server's VmRSS before and after).  Each throughput figure is
the median of a few repetitions after a warm-up.  CPU time of the server
(``/proc/<pid>/task/*/schedstat``) and of the client (``time.process_time``)
over each measurement tells which side was the bottleneck.

The client raises its own open-file limit (``RLIMIT_NOFILE``) up to the hard
limit when the idle scenario needs more descriptors; the servers inherit it.
Every loop is bounded in count and time; all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import platform
import random
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import orjson

from scripts.kit.launcher import (
    HOST,
    LaunchError,
    Process,
    clean_env,
    free_port,
    gateway_argv,
    launch,
    tcp_ready,
)
from scripts.kit.loop import run_async
from scripts.kit.sse import SseConn, SseMessage, open_sse
from scripts.kit.stats import Run, Stats, expected_events, sse_event, summarize
from scripts.kit.tokens import TokenCache
from scripts.kit.ws import HandshakeError, WsClient, ws_connect

ROOT = Path(__file__).resolve().parents[1]
SECRET: Final = "bench-secret-0123456789-0123456789-0123"

GATEWAY_ENV: Final = {
    "CHAT_JWT_SECRET": SECRET,
    "CHAT_LOG_LEVEL": "warning",
    "CHAT_RATE_LIMIT_PER_MINUTE": "10000000",
    "CHAT_MAX_ACTIVE_RUNS_PER_USER": "100000",
    "CHAT_MAX_CONNECTIONS_PER_USER": "100000",
}

WS_SERVERS: Final = ("bare", "gateway", "socketio")
SSE_SERVERS: Final = ("gateway-sse", "sse-starlette")
#: The message of the time-to-first-event runs (one run at a time).
TTFE_MESSAGE: Final = "chunks=1 thinking=1"


@dataclass(frozen=True)
class Sizes:
    """How big each scenario is; ``FULL`` for the record, ``QUICK`` for a smoke run."""

    one_stream_chunks: int
    one_stream_reps: int
    streams20_chunks: int
    streams200_chunks: int
    streams200_clients: int
    streams_reps: int
    fanout_sessions: int
    fanout_chunks: int
    fanout_pause_ms: int
    fanout_reps: int
    ttfe_runs: int
    echo_runs: int
    idle_connections: int
    idle_hold_s: float
    #: A fresh server process for each scenario (else one per server for all of them).
    fresh_per_scenario: bool


FULL: Final = Sizes(
    one_stream_chunks=20_000,
    one_stream_reps=5,
    streams20_chunks=1_000,
    streams200_chunks=100,
    streams200_clients=200,
    streams_reps=5,
    fanout_sessions=50,
    fanout_chunks=1_000,
    fanout_pause_ms=500,
    fanout_reps=3,
    ttfe_runs=300,
    echo_runs=500,
    idle_connections=5_000,
    idle_hold_s=5.0,
    fresh_per_scenario=True,
)
QUICK: Final = Sizes(
    one_stream_chunks=1_000,
    one_stream_reps=2,
    streams20_chunks=50,
    streams200_chunks=10,
    streams200_clients=50,
    streams_reps=2,
    fanout_sessions=10,
    fanout_chunks=100,
    fanout_pause_ms=300,
    fanout_reps=1,
    ttfe_runs=20,
    echo_runs=50,
    idle_connections=100,
    idle_hold_s=0.5,
    fresh_per_scenario=False,
)


class BenchError(Exception):
    """A server or a scenario failed in a way that makes its figures meaningless."""


# Processes --------------------------------------------------------------------------------


def server_command(kind: str, port: int) -> list[str]:
    if kind in ("gateway", "gateway-sse"):
        return gateway_argv(port)
    app = {"bare": "bare", "socketio": "socketio", "sse-starlette": "sse"}[kind]
    return [sys.executable, str(ROOT / "scripts" / "bench_apps.py"), app, "--port", str(port)]


@contextlib.contextmanager
def serve(kind: str, workdir: Path, gateway_src: Path = ROOT) -> Iterator[Process]:
    """Start one server process and wait until it accepts connections (at most 30 s).

    The gateway runs from ``gateway_src`` (a checkout of this project; by default
    this one), so that two versions can be compared with the same comparison apps.
    """
    port = free_port()
    env = clean_env(PYTHONPATH=str(gateway_src if kind.startswith("gateway") else ROOT))
    if kind.startswith("gateway"):
        env.update(GATEWAY_ENV)
    with launch(
        server_command(kind, port),
        port=port,
        ready=tcp_ready(port),
        name=kind,
        env=env,
        cwd=workdir,
        log_path=workdir / f"{kind}-{port}.log",
        stop_timeout_s=20,
    ) as server:
        yield server


def raise_nofile(needed: int) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to ``needed`` if the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft, hard


@dataclass
class Cpu:
    """CPU use of the server and of this client over one measurement."""

    server: Process
    wall0: float = 0.0
    server0: float = 0.0
    client0: float = 0.0
    server_s: float = 0.0
    client_s: float = 0.0
    wall_s: float = 0.0

    def __enter__(self) -> Cpu:
        self.wall0 = time.perf_counter()
        self.server0 = self.server.cpu_s()
        self.client0 = time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.perf_counter() - self.wall0
        self.server_s = self.server.cpu_s() - self.server0
        self.client_s = time.process_time() - self.client0

    def shares(self) -> dict[str, float]:
        wall = max(self.wall_s, 1e-9)
        return {"server": self.server_s / wall, "client": self.client_s / wall}


def bound_side(shares: dict[str, float]) -> str:
    """Which side held the figure back: the one that used (nearly) a whole core."""
    server, client = shares["server"], shares["client"]
    if server >= 0.85 and server >= client:
        return "server"
    if client >= 0.85:
        return "client"
    return "neither"


# Client connections --------------------------------------------------------------------------


class Conn:
    """One WebSocket session, speaking chat.v1 (``bare``, ``gateway``) or Socket.IO."""

    def __init__(self, socketio: bool) -> None:
        self.socketio = socketio
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.ws: WsClient | None = None
        self._unsent: list[bytes] = []
        #: Payload bytes received, framing of the protocol included (not the WebSocket's).
        self.bytes = 0
        #: Called with every message that is not ``connection_ready``.
        self.handler: Callable[[dict[str, Any], float], None] | None = None
        self.run: Run | None = None
        #: Set by the first ``pong``.
        self.pong: asyncio.Future[None] = loop.create_future()

    def on_text(self, payload: bytes, now: float) -> None:
        self.bytes += len(payload)
        if self.socketio:
            if payload[:2] == b"42":
                message = orjson.loads(payload[2:])[1]
            elif payload == b"2":
                self.send_raw(b"3")
                return
            elif payload[:1] == b"0":
                self.send_raw(b"40")
                return
            else:  # "40{sid}" (namespace joined) and other control packets
                return
        else:
            message = orjson.loads(payload)
        kind = message.get("type")
        if kind == "connection_ready":
            if not self.ready.done():
                self.ready.set_result(None)
            return
        if kind == "pong" and not self.pong.done():
            self.pong.set_result(None)
        if self.handler is not None:
            self.handler(message, now)

    def on_close(self, code: int, reason: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed with {code} {reason}".strip()))
            self.ready.exception()
        run = self.run
        if run is not None and run.done is not None and not run.done.done():
            run.done.set_result(f"closed {code}")

    def send_raw(self, data: bytes) -> None:
        if self.ws is None:  # a frame that came with the handshake answered before it returned
            self._unsent.append(data)
        else:
            self.ws.send_text(data)

    def opened(self, ws: WsClient) -> None:
        self.ws = ws
        unsent, self._unsent = self._unsent, []
        for data in unsent:
            ws.send_text(data)

    def send(self, kind: str, **fields: Any) -> None:
        if self.socketio:
            self.send_raw(b"42" + orjson.dumps([kind, {"type": kind, **fields}]))
        else:
            self.send_raw(orjson.dumps({"type": kind, **fields}))

    @property
    def is_open(self) -> bool:
        return self.ws is not None and self.ws.is_open


def ws_url(kind: str, port: int) -> str:
    if kind == "socketio":
        return f"ws://{HOST}:{port}/socket.io/?EIO=4&transport=websocket"
    return f"ws://{HOST}:{port}/ws"


def bench_tokens() -> TokenCache:
    """Tokens minted once per user, signed with the gateway's secret."""
    return TokenCache(SECRET, 3 * 3600)


async def open_conn(kind: str, port: int, token: str, timeout: float = 15.0) -> Conn:
    conn = Conn(kind == "socketio")
    protocols = () if kind == "socketio" else ("chat.v1", f"bearer.{token}")
    ws = await ws_connect(
        ws_url(kind, port),
        conn.on_text,
        on_close=conn.on_close,
        subprotocols=protocols,
        timeout=timeout,
    )
    conn.opened(ws)
    try:
        await asyncio.wait_for(asyncio.shield(conn.ready), timeout)
    except BaseException:
        ws.abort()
        raise
    return conn


async def open_many(
    kind: str, port: int, users: Sequence[str], tokens: TokenCache, parallel: int = 100
) -> tuple[list[Conn], dict[str, int]]:
    """Open one connection per user, ``parallel`` at a time; the failures by kind."""
    gate = asyncio.Semaphore(parallel)
    failures: dict[str, int] = {}

    async def one(user: str) -> Conn | None:
        async with gate:
            try:
                return await open_conn(kind, port, tokens(user))
            except (OSError, TimeoutError, HandshakeError, ConnectionError) as exc:
                key = type(exc).__name__
                failures[key] = failures.get(key, 0) + 1
                return None

    opened = await asyncio.gather(*(one(u) for u in users))
    return [c for c in opened if c is not None], failures


async def close_all(conns: Sequence[Conn], timeout: float = 10.0) -> None:
    clients = [c.ws for c in conns if c.ws is not None]
    if clients:
        await asyncio.wait(
            [asyncio.create_task(c.close(timeout=timeout)) for c in clients], timeout=timeout + 1
        )


# Scenarios ------------------------------------------------------------------------------------


@dataclass
class Figure:
    """One measured figure: the median of the repetitions, with what went with it."""

    value: float | None
    unit: str
    reps: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    bound: str = ""
    detail: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def json(self) -> dict[str, Any]:
        return {
            "value": None if self.value is None else round(self.value, 4),
            "unit": self.unit,
            "reps": [round(r, 4) for r in self.reps],
            "best": None if not self.reps else round(max(self.reps), 4),
            "cpu_share": {k: round(v, 3) for k, v in self.cpu.items()},
            "bound": self.bound,
            **({"detail": self.detail} if self.detail else {}),
            **({"problems": self.problems} if self.problems else {}),
        }


def check_stats(stats: Stats, runs: int) -> list[str]:
    """What went wrong in a measurement, as text (empty when nothing did)."""
    problems = []
    completed = stats.statuses.get("completed", 0)
    if completed != runs:
        problems.append(f"{completed} of {runs} runs completed ({dict(stats.statuses)})")
    for name in ("lost", "duplicated", "reordered", "wrong_count", "after_end"):
        if getattr(stats, name):
            problems.append(f"{name}: {getattr(stats, name)}")
    if stats.errors:
        problems.append(f"errors: {dict(stats.errors)}")
    return problems


def median_figure(
    runs: list[tuple[float, Cpu, Stats, int]], unit: str, detail: dict[str, Any] | None = None
) -> Figure:
    """The median of the repetitions; ``runs[0]`` is the warm-up, checked but not counted."""
    reps = runs[1:]
    values = [r[0] for r in reps]
    mid = sorted(range(len(reps)), key=lambda i: values[i])[len(reps) // 2]
    cpu = reps[mid][1].shares()
    detail = dict(detail or {})
    stats = reps[mid][2]
    if stats.events:
        detail["events_per_rep"] = stats.events
        detail["bytes_per_event"] = round(stats.bytes / stats.events, 1)
    problems: list[str] = []
    for _, _, stats, count in runs:
        problems.extend(check_stats(stats, count))
    return Figure(
        statistics.median(values),
        unit,
        values,
        cpu,
        bound_side(cpu),
        detail,
        sorted(set(problems)),
    )


def run_handler(stats: Stats, run: Run) -> Callable[[dict[str, Any], float], None]:
    """A connection's handler that accounts run events, and an ``error`` answer, to ``run``."""

    def handler(message: dict[str, Any], now: float) -> None:
        if message.get("seq") is not None:
            stats.event(run, message, now)
        elif message.get("type") == "error":
            stats.errors[str(message.get("data"))] += 1
            stats.end(run, "error", now)

    return handler


async def ws_streams(
    server: Process, conns: Sequence[Conn], content: str, timeout: float = 120.0
) -> tuple[float, Cpu, Stats, int]:
    """Every connection sends one message at once; run events per second of wall time."""
    loop = asyncio.get_running_loop()
    stats = Stats(expected_events("load", content))
    for i, conn in enumerate(conns):
        run = Run(f"b{i}", loop.create_future())
        conn.run = run
        conn.handler = run_handler(stats, run)
    bytes0 = sum(c.bytes for c in conns)
    with Cpu(server) as cpu:
        now = time.time()
        for conn in conns:
            assert conn.run is not None
            stats.sent(conn.run, now)
            conn.send("user_message", id=conn.run.ref, content=content, agent="load")
        futures = [c.run.done for c in conns if c.run is not None and c.run.done is not None]
        _, pending = await asyncio.wait(futures, timeout=timeout)
    for conn in conns:
        conn.handler = None
    if pending:
        stats.errors[f"{len(pending)} runs timed out"] += 1
    stats.bytes = sum(c.bytes for c in conns) - bytes0
    eps = stats.events_per_s or 0.0
    return eps, cpu, stats, len(conns)


async def ws_fanout(
    server: Process, conns: Sequence[Conn], content: str, timeout: float = 120.0
) -> tuple[float, Cpu, Stats, int]:
    """One run, started by the first session and resumed by the others during its tool call.

    The figure is deliveries per second from the first ``tool_completed`` received
    to the last ``agent_completed``: the events after the pause, over all sessions.
    """
    loop = asyncio.get_running_loop()
    stats = Stats(expected_events("load", content))
    started: asyncio.Future[str] = loop.create_future()
    acks: list[asyncio.Future[None]] = []
    window = {"start": float("inf"), "after": 0}
    # CPU is measured over the fast part only: from the first tool_completed on.
    cpu = Cpu(server)
    for i, conn in enumerate(conns):
        run = Run(f"f{i}", loop.create_future())
        conn.run = run
        ack: asyncio.Future[None] = loop.create_future()
        acks.append(ack)
        marks = {"tool": False}

        def handler(
            message: dict[str, Any],
            now: float,
            run: Run = run,
            ack: asyncio.Future[None] = ack,
            marks: dict[str, bool] = marks,
        ) -> None:
            kind_ = message.get("type")
            if message.get("seq") is not None:
                stats.event(run, message, now)
                # The others resume once the run is in its tool call: every server then
                # has the same backlog to replay and the same live events to fan out.
                if kind_ == "tool_executing" and not started.done():
                    started.set_result(message["run_id"])
                if marks["tool"]:
                    window["after"] += 1
                elif kind_ == "tool_completed":
                    marks["tool"] = True
                    if window["start"] == float("inf"):
                        window["start"] = now
                        cpu.__enter__()
            elif kind_ == "ack" and not ack.done():
                ack.set_result(None)
            elif kind_ == "error":
                stats.errors[str(message.get("data"))] += 1
                stats.end(run, "error", now)

        conn.handler = handler
    bytes0 = sum(c.bytes for c in conns)
    first = conns[0]
    assert first.run is not None
    stats.sent(first.run, time.time())
    first.send("user_message", id=first.run.ref, content=content, agent="load")
    acks[0].set_result(None)
    run_id = await asyncio.wait_for(started, 10)
    now = time.time()
    for conn in conns[1:]:
        assert conn.run is not None
        stats.sent(conn.run, now)
        conn.send("resume", id=conn.run.ref, run_id=run_id, after_seq=0)
    await asyncio.wait_for(asyncio.gather(*acks), 10)
    attached = time.time()
    futures = [c.run.done for c in conns if c.run is not None and c.run.done is not None]
    _, pending = await asyncio.wait(futures, timeout=timeout)
    if cpu.wall0:
        cpu.__exit__()
    for conn in conns:
        conn.handler = None
    if pending:
        stats.errors[f"{len(pending)} sessions timed out"] += 1
    stats.bytes = sum(c.bytes for c in conns) - bytes0
    if attached > window["start"]:
        stats.errors["a session attached after the tool call ended"] += 1
    end = stats.last_end or window["start"]
    rate = window["after"] / max(end - window["start"], 1e-9)
    return rate, cpu, stats, len(conns)


async def one_at_a_time(
    server: Process, runs: int, warmup: int, once: Callable[[int, Stats], Awaitable[None]]
) -> tuple[dict[str, Any], Cpu, Stats]:
    """``warmup`` runs, then ``runs`` measured ones, one at a time; ``agent_started`` latency."""
    stats = Stats(expected_events("load", TTFE_MESSAGE))
    cpu = Cpu(server)
    for i in range(warmup + runs):
        if i == warmup:
            stats = Stats(expected_events("load", TTFE_MESSAGE))
            cpu.__enter__()
        await once(i, stats)
    cpu.__exit__()
    return stats.started_ms.summary(), cpu, stats


async def ws_ttfe(
    server: Process, conn: Conn, runs: int, warmup: int
) -> tuple[dict[str, Any], Cpu, Stats]:
    """One run at a time: ``user_message`` sent to ``agent_started`` received."""
    loop = asyncio.get_running_loop()

    async def once(i: int, stats: Stats) -> None:
        run = Run(f"t{i}", loop.create_future())
        conn.run = run
        conn.handler = run_handler(stats, run)
        stats.sent(run, time.time())
        conn.send("user_message", id=run.ref, content=TTFE_MESSAGE, agent="load")
        assert run.done is not None
        await asyncio.wait_for(run.done, 10)

    try:
        return await one_at_a_time(server, runs, warmup, once)
    finally:
        conn.handler = None


async def echo_rtt(port: int, runs: int, warmup: int, size: int) -> dict[str, Any]:
    """Round trips of a frame of ``size`` bytes through the bare echo endpoint."""
    loop = asyncio.get_running_loop()
    waiting: list[asyncio.Future[float]] = []

    def on_text(payload: bytes, now: float) -> None:
        if waiting and not waiting[0].done():
            waiting[0].set_result(now)

    client = await ws_connect(f"ws://{HOST}:{port}/echo", on_text)
    empty = len(orjson.dumps({"type": "user_message", "id": "e", "content": ""}))
    frame = orjson.dumps({"type": "user_message", "id": "e", "content": "x" * max(size - empty, 1)})
    rtts: list[float] = []
    try:
        for i in range(warmup + runs):
            waiting[:] = [loop.create_future()]
            sent = time.time()
            client.send_text(frame)
            got = await asyncio.wait_for(waiting[0], 10)
            if i >= warmup:
                rtts.append((got - sent) * 1000)
    finally:
        await client.close()
    return summarize(rtts)


async def sse_streams(
    server: Process, conns: Sequence[SseConn], content: str, token: str, timeout: float = 120.0
) -> tuple[float, Cpu, Stats, int]:
    """Every connection posts one message at once; run events per second of wall time."""
    loop = asyncio.get_running_loop()
    stats = Stats(expected_events("load", content))
    body = orjson.dumps({"message": content, "agent": "load"})
    headers = [f"Authorization: Bearer {token}"]
    runs = []
    for conn in conns:
        run = Run(None, loop.create_future())
        runs.append(run)

        def on_message(message: SseMessage, now: float, run: Run = run) -> None:
            sse_event(message, run, stats, now)

        conn.on_message = on_message
    bytes0 = sum(c.bytes for c in conns)
    with Cpu(server) as cpu:
        now = time.time()
        for conn, run in zip(conns, runs, strict=True):
            stats.sent(run, now)
            conn.request("/api/chat/stream", f"{HOST}:{server.port}", body, headers)
        dones = [c.done for c in conns if c.done is not None]
        _, pending = await asyncio.wait(dones, timeout=timeout)
    for conn, run in zip(conns, runs, strict=True):
        conn.on_message = None
        if conn.done is not None and conn.done.done() and not conn.done.exception():
            status = conn.done.result()
            if status != 200:
                stats.errors[f"HTTP {status}"] += 1
        if run.status is None:
            stats.end(run, "incomplete", time.time())
    if pending:
        stats.errors[f"{len(pending)} streams timed out"] += 1
    stats.bytes = sum(c.bytes for c in conns) - bytes0
    return stats.events_per_s or 0.0, cpu, stats, len(conns)


async def sse_ttfe(
    server: Process, conn: SseConn, token: str, runs: int, warmup: int
) -> tuple[dict[str, Any], Cpu, Stats]:
    """One stream at a time: the ``POST`` sent to ``agent_started`` received."""

    async def once(i: int, stats: Stats) -> None:
        _, _, s, _ = await sse_streams(server, [conn], TTFE_MESSAGE, token, timeout=10)
        for name in ("events", "lost", "duplicated", "reordered", "wrong_count", "after_end"):
            setattr(stats, name, getattr(stats, name) + getattr(s, name))
        stats.statuses.update(s.statuses)
        stats.errors.update(s.errors)
        for value in s.started_ms.values:
            stats.started_ms.add(value)

    return await one_at_a_time(server, runs, warmup, once)


async def idle(
    kind: str, server: Process, tokens: TokenCache, count: int, hold_s: float
) -> dict[str, Any]:
    """Open ``count`` idle connections; the server's memory and CPU while it holds them."""
    warm, _ = await open_many(kind, server.port, [f"idle-warm-{i}" for i in range(20)], tokens)
    await close_all(warm)
    await asyncio.sleep(1.0)
    before = server.rss_kib()
    began = time.perf_counter()
    conns, failures = await open_many(
        kind, server.port, [f"idle-{i:05d}" for i in range(count)], tokens
    )
    open_s = time.perf_counter() - began
    await asyncio.sleep(1.0)
    with Cpu(server) as cpu:
        await asyncio.sleep(hold_s)
    after = server.rss_kib()
    held = sum(1 for c in conns if c.is_open)
    sample = random.Random(3).sample(conns, min(20, len(conns)))
    for conn in sample:
        conn.send("ping", id="p")
    if sample:
        await asyncio.wait([c.pong for c in sample], timeout=10)
    answered = sum(1 for c in sample if c.pong.done())
    await close_all(conns)
    per_conn = (after - before) / len(conns) if conns else None
    return {
        "connections": count,
        "opened": len(conns),
        "held": held,
        "ping_answered": f"{answered}/{len(sample)}",
        "failures": failures,
        "open_s": round(open_s, 2),
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_connection": None if per_conn is None else round(per_conn, 2),
        "idle_server_cpu_share": round(cpu.shares()["server"], 4),
    }


# The run --------------------------------------------------------------------------------------


@dataclass
class Bench:
    sizes: Sizes
    workdir: Path
    tokens: TokenCache
    profile_dir: Path | None
    log: Callable[[str], None]
    gateway_src: Path = ROOT
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    profiles: dict[str, Any] = field(default_factory=dict)
    shared: Process | None = None

    def put(self, server: str, scenario: str, value: Any) -> None:
        self.results.setdefault(server, {})[scenario] = value
        shown = value.json() if isinstance(value, Figure) else value
        if isinstance(shown, dict) and "value" in shown:
            v = shown["value"]
            extra = f"  cpu {shown['cpu_share']} -> {shown['bound']}-bound"
            if shown.get("problems"):
                extra += f"  PROBLEMS {shown['problems']}"
            self.log(
                f"  {server:<14} {scenario:<22} {v if v is None else round(v, 3)} "
                f"{shown['unit']}{extra}"
            )
        else:
            self.log(f"  {server:<14} {scenario:<22} {shown}")

    async def repeat(
        self, reps: int, once: Callable[[], Awaitable[tuple[float, Cpu, Stats, int]]]
    ) -> list[tuple[float, Cpu, Stats, int]]:
        """A warm-up, then ``reps`` measured repetitions (the warm-up comes first)."""
        return [await once() for _ in range(reps + 1)]

    @contextlib.asynccontextmanager
    async def server(self, kind: str) -> AsyncIterator[Process]:
        """A fresh server process per scenario (full run), or one shared by all (quick)."""
        if self.shared is not None and self.shared.name == kind:
            yield self.shared
            return
        with serve(kind, self.workdir, self.gateway_src) as server:
            if not self.sizes.fresh_per_scenario:
                self.shared = server
            try:
                yield server
            finally:
                self.shared = None if self.shared is server else self.shared

    async def connect(self, kind: str, server: Process, users: Sequence[str]) -> list[Conn]:
        conns, failures = await open_many(kind, server.port, users, self.tokens)
        if failures:
            await close_all(conns)
            raise BenchError(f"{kind}: could not connect {sum(failures.values())}: {failures}")
        return conns

    async def ws_server(self, kind: str) -> None:
        s = self.sizes
        async with contextlib.AsyncExitStack() as stack:
            if not s.fresh_per_scenario:
                await stack.enter_async_context(self.server(kind))

            # Time to first event first, before any other load has left state behind.
            async with self.server(kind) as server:
                conns = await self.connect(kind, server, ["bench-ttfe"])
                summary, cpu, stats = await ws_ttfe(server, conns[0], s.ttfe_runs, 20)
                figure = Figure(summary["p50"], "ms", [], cpu.shares(), bound_side(cpu.shares()))
                figure.detail = {"started_ms": summary}
                figure.problems = check_stats(stats, s.ttfe_runs)
                self.put(kind, "ttfe", figure)
                await close_all(conns)
                if kind == "bare":
                    size = len(
                        orjson.dumps(
                            {
                                "type": "user_message",
                                "id": "t1",
                                "content": TTFE_MESSAGE,
                                "agent": "load",
                            }
                        )
                    )
                    summary = await echo_rtt(server.port, s.echo_runs, 50, size)
                    self.put(kind, "echo_rtt", Figure(summary["p50"], "ms", detail=summary))

            one = f"chunks={s.one_stream_chunks} chunk_chars=8 thinking=1"
            many = f"chunks={s.streams20_chunks} chunk_chars=8 thinking=1"
            small = f"chunks={s.streams200_chunks} chunk_chars=8 thinking=1"
            for name, users, content, reps in (
                ("one_stream", ["bench-0000"], one, s.one_stream_reps),
                ("streams_20", [f"bench-{i:04d}" for i in range(20)], many, s.streams_reps),
                (
                    "streams_200",
                    [f"bench-{i:04d}" for i in range(s.streams200_clients)],
                    small,
                    s.streams_reps,
                ),
            ):
                async with self.server(kind) as server:
                    conns = await self.connect(kind, server, users)
                    results = await self.repeat(
                        reps, functools.partial(ws_streams, server, conns, content)
                    )
                    detail = {"message": content, "clients": len(users)}
                    self.put(kind, name, median_figure(results, "events/s", detail))
                    await close_all(conns)

            fan = (
                f"chunks={s.fanout_chunks} chunk_chars=8 thinking=1 tools=1 "
                f"tool_ms={s.fanout_pause_ms}"
            )
            async with self.server(kind) as server:
                conns = await self.connect(kind, server, ["bench-fanout"] * s.fanout_sessions)
                results = await self.repeat(s.fanout_reps, lambda: ws_fanout(server, conns, fan))
                detail = {"message": fan, "sessions": s.fanout_sessions}
                self.put(kind, "fanout", median_figure(results, "deliveries/s", detail))
                await close_all(conns)

            async with self.server(kind) as server:
                result = await idle(kind, server, self.tokens, s.idle_connections, s.idle_hold_s)
                self.put(kind, "idle", result)

        if kind == "gateway" and self.profile_dir is not None:
            async with self.server(kind) as server:
                await self.profile(server, one, many)

    async def sse_server(self, kind: str) -> None:
        s = self.sizes
        token = self.tokens("bench-sse")
        async with contextlib.AsyncExitStack() as stack:
            if not s.fresh_per_scenario:
                await stack.enter_async_context(self.server(kind))

            async with self.server(kind) as server:
                conn = await open_sse(server.port)
                summary, cpu, stats = await sse_ttfe(server, conn, token, s.ttfe_runs, 20)
                figure = Figure(summary["p50"], "ms", [], cpu.shares(), bound_side(cpu.shares()))
                figure.detail = {"started_ms": summary}
                figure.problems = check_stats(stats, s.ttfe_runs)
                self.put(kind, "ttfe", figure)
                conn.close()

            for name, clients, chunks, reps in (
                ("one_stream", 1, s.one_stream_chunks, s.one_stream_reps),
                ("streams_20", 20, s.streams20_chunks, s.streams_reps),
                ("streams_200", s.streams200_clients, s.streams200_chunks, s.streams_reps),
            ):
                content = f"chunks={chunks} chunk_chars=8 thinking=1"
                async with self.server(kind) as server:
                    conns = [await open_sse(server.port) for _ in range(clients)]
                    results = await self.repeat(
                        reps, functools.partial(sse_streams, server, conns, content, token)
                    )
                    detail = {"message": content, "clients": clients}
                    self.put(kind, name, median_figure(results, "events/s", detail))
                    for conn in conns:
                        conn.close()

    async def profile(self, server: Process, one: str, many: str) -> None:
        """py-spy against the gateway during extra one-stream, 20-stream and TTFE runs."""
        assert self.profile_dir is not None
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        pyspy = Path(sys.executable).parent / "py-spy"
        if not pyspy.exists():
            self.profiles["error"] = f"py-spy not found at {pyspy} (pip install py-spy)"
            self.log("  profile: " + self.profiles["error"])
            return
        runs = self.sizes.ttfe_runs
        for name, users, work in (
            (
                "one_stream",
                ["bench-0000"],
                lambda conns: self.times(12, lambda: ws_streams(server, conns, one)),
            ),
            (
                "streams_20",
                [f"bench-{i:04d}" for i in range(20)],
                lambda conns: self.times(12, lambda: ws_streams(server, conns, many)),
            ),
            ("ttfe", ["bench-ttfe"], lambda conns: ws_ttfe(server, conns[0], 4 * runs, 0)),
        ):
            out = self.profile_dir / f"gateway-{name}.speedscope.json"
            conns = await self.connect("gateway", server, users)
            spy = await asyncio.create_subprocess_exec(
                str(pyspy),
                "record",
                "--pid",
                str(server.pid),
                "--rate",
                "400",
                "--format",
                "speedscope",
                "--output",
                str(out),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
            await asyncio.sleep(1.0)
            try:
                await work(conns)
            finally:
                spy.send_signal(signal.SIGINT)
                try:
                    _, err = await asyncio.wait_for(spy.communicate(), 30)
                except TimeoutError:
                    spy.kill()
                    _, err = await spy.communicate()
                await close_all(conns)
            if not out.exists():
                self.profiles[name] = {"error": err.decode(errors="replace")[-2000:]}
            else:
                self.profiles[name] = {"file": str(out), **hot_spots(out, src=self.gateway_src)}
            self.log(f"  profile {name}: {self.profiles[name].get('file') or self.profiles[name]}")

    @staticmethod
    async def times(n: int, once: Callable[[], Awaitable[object]]) -> None:
        for _ in range(n):
            await once()


def hot_spots(path: Path, top: int = 15, src: Path = ROOT) -> dict[str, Any]:
    """Where the event loop's thread spent its samples, from a py-spy speedscope file.

    ``self``: samples in the function itself (a line that calls into C, such as a
    socket write, counts for the function); ``total``: samples with the function
    anywhere on the stack (the frames above ``Server.run``, on every sample, are
    left out); ``lines``: the hottest lines by self samples.
    """
    doc = orjson.loads(path.read_bytes())
    frames = doc["shared"]["frames"]
    profiles = [p for p in doc["profiles"] if "MainThread" in str(p.get("name"))]
    others = [p for p in doc["profiles"] if p not in profiles]
    profiles = profiles or doc["profiles"]

    def where(i: int) -> tuple[str, str, int]:
        f = frames[i]
        file = str(f.get("file", ""))
        for marker in ("site-packages/", str(src) + "/", str(ROOT) + "/", "lib/python3."):
            if marker in file:
                file = file.split(marker, 1)[1]
                if marker == "lib/python3.":
                    file = "stdlib/" + file.split("/", 1)[-1]
        return str(f.get("name")), file, int(f.get("line") or 0)

    self_fn: dict[tuple[str, str], int] = {}
    total_fn: dict[tuple[str, str], int] = {}
    self_line: dict[tuple[str, str, int], int] = {}
    count = 0
    for prof in profiles:
        for stack in prof["samples"]:
            count += 1
            if not stack:
                continue
            name, file, line = where(stack[-1])
            self_fn[(name, file)] = self_fn.get((name, file), 0) + 1
            self_line[(name, file, line)] = self_line.get((name, file, line), 0) + 1
            for key in {where(i)[:2] for i in stack}:
                total_fn[key] = total_fn.get(key, 0) + 1
    if not count:
        return {"samples": 0, "self": [], "total": [], "lines": []}

    def ranked(weights: dict[Any, int], skip_all: bool = False) -> list[dict[str, Any]]:
        best = sorted(weights.items(), key=lambda kv: kv[1], reverse=True)
        out = []
        for key, n in best:
            if skip_all and n >= 0.99 * count:
                continue
            label = f"{key[0]} ({key[1]}" + (f":{key[2]})" if len(key) > 2 else ")")
            out.append({"function": label, "share": round(n / count, 4)})
            if len(out) == top:
                break
        return out

    return {
        "samples": count,
        "other_threads_samples": sum(len(p["samples"]) for p in others),
        "self": ranked(self_fn),
        "total": ranked(total_fn, skip_all=True),
        "lines": ranked(self_line),
    }


# Report ---------------------------------------------------------------------------------------


def value_of(results: dict[str, dict[str, Any]], server: str, scenario: str) -> float | None:
    item = results.get(server, {}).get(scenario)
    if isinstance(item, Figure):
        return item.value
    if isinstance(item, dict):
        value = item.get("kib_per_connection")
        return None if value is None else float(value)
    return None


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


#: The issue's targets: label, (server, scenario) over (server, scenario), operator, limit.
TARGETS: Final[tuple[tuple[str, tuple[str, str], tuple[str, str], str, float], ...]] = (
    ("gateway / bare, one stream", ("gateway", "one_stream"), ("bare", "one_stream"), ">=", 0.8),
    ("gateway / bare, 20 streams", ("gateway", "streams_20"), ("bare", "streams_20"), ">=", 0.8),
    (
        "gateway / socketio, one stream",
        ("gateway", "one_stream"),
        ("socketio", "one_stream"),
        ">=",
        1.5,
    ),
    (
        "gateway / socketio, 20 streams",
        ("gateway", "streams_20"),
        ("socketio", "streams_20"),
        ">=",
        1.5,
    ),
    (
        "gateway SSE / sse-starlette, one stream",
        ("gateway-sse", "one_stream"),
        ("sse-starlette", "one_stream"),
        ">=",
        1.0,
    ),
    (
        "gateway SSE / sse-starlette, 20 streams",
        ("gateway-sse", "streams_20"),
        ("sse-starlette", "streams_20"),
        ">=",
        1.0,
    ),
    ("gateway TTFE p50 / bare echo RTT p50", ("gateway", "ttfe"), ("bare", "echo_rtt"), "<=", 2.5),
    (
        "gateway / bare, memory per idle connection",
        ("gateway", "idle"),
        ("bare", "idle"),
        "<=",
        1.5,
    ),
)


def targets(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each with its figure and whether it is met."""
    rows = [
        (label, ratio(value_of(results, *top), value_of(results, *bottom)), op, limit)
        for label, top, bottom, op, limit in TARGETS
    ]
    out = []
    for label, value, op, limit in rows:
        met = None if value is None else (value >= limit if op == ">=" else value <= limit)
        out.append(
            {
                "target": label,
                "value": None if value is None else round(value, 3),
                "limit": f"{op} {limit}",
                "met": met,
            }
        )
    idle_item = results.get("gateway", {}).get("idle")
    if isinstance(idle_item, dict):
        n = idle_item["connections"]
        held = idle_item["held"]
        out.append(
            {
                "target": f"{n} idle connections held by one gateway process",
                "value": held,
                "limit": f"= {n}",
                "met": held == n,
            }
        )
    return out


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit in ("events/s", "deliveries/s"):
        return f"{value:,.0f}"
    if unit == "ms":
        return f"{value:.3f}"
    return f"{value:,.2f}"


def render(report: dict[str, Any]) -> str:
    results = report["results"]
    lines = [
        f"bench: {report['machine']['cpu']} x{report['machine']['nproc']}, "
        f"Python {report['machine']['python']}, uvicorn {report['versions'].get('uvicorn')} "
        f"({report['uvicorn_defaults']}); {'quick' if report['quick'] else 'full'} run "
        f"in {report['elapsed_s']:.0f} s; code {report.get('git', '?')}; load average "
        f"{report.get('loadavg', {}).get('before', ['?'])[0]} before",
        "",
    ]
    scenarios = [
        ("one_stream", "one stream", "events/s"),
        ("streams_20", "20 streams", "events/s"),
        ("streams_200", f"{report['sizes']['streams200_clients']} streams", "events/s"),
        ("fanout", f"1 run x {report['sizes']['fanout_sessions']} sessions", "deliveries/s"),
        ("ttfe", "TTFE p50", "ms"),
        ("echo_rtt", "echo RTT p50", "ms"),
        ("idle", f"KiB per idle conn ({report['sizes']['idle_connections']})", "KiB"),
    ]
    head = (
        f"{'WebSocket':<30}{'bare':>12}{'gateway':>12}{'socketio':>12}{'gw/bare':>9}{'gw/peer':>9}"
    )
    lines += [head, "-" * len(head)]
    for key, label, unit in scenarios:
        vals = [value_of(results, s, key) for s in WS_SERVERS]
        if all(x is None for x in vals):
            continue
        r1 = ratio(vals[1], vals[0])
        r2 = ratio(vals[1], vals[2])
        lines.append(
            f"{label:<30}"
            + "".join(f"{fmt(x, unit):>12}" for x in vals)
            + f"{fmt(r1):>9}{fmt(r2):>9}"
        )
    lines.append("")
    head = f"{'SSE':<30}{'gateway':>12}{'sse-starl.':>12}{'gw/peer':>9}"
    lines += [head, "-" * len(head)]
    for key, label, unit in [*scenarios[:3], scenarios[4]]:
        vals = [value_of(results, s, key) for s in SSE_SERVERS]
        if all(x is None for x in vals):
            continue
        lines.append(
            f"{label:<30}"
            + "".join(f"{fmt(x, unit):>12}" for x in vals)
            + f"{fmt(ratio(vals[0], vals[1])):>9}"
        )
    lines.append("")
    lines.append(
        "CPU share over each measurement (server/client; a side near 1.0 is the bottleneck)"
    )
    for server in (*WS_SERVERS, *SSE_SERVERS):
        cells = []
        for key, label, _ in scenarios[:5]:
            item = results.get(server, {}).get(key)
            if isinstance(item, Figure) and item.cpu:
                cells.append(f"{label}: {item.cpu['server']:.2f}/{item.cpu['client']:.2f}")
        if cells:
            lines.append(f"  {server:<14} " + "; ".join(cells))
    idle_rows = [(s, results.get(s, {}).get("idle")) for s in WS_SERVERS]
    for server, item in idle_rows:
        if isinstance(item, dict):
            before = item["rss_before_kib"] / 1024
            after = item["rss_after_kib"] / 1024
            lines.append(
                f"  idle {server:<9} {item['held']}/{item['connections']} held, "
                f"RSS {before:.1f} -> {after:.1f} MiB, opened in {item['open_s']} s, "
                f"idle server CPU {item['idle_server_cpu_share']:.1%}, "
                f"pings {item['ping_answered']}"
            )
    lines.append("")
    lines.append("Targets")
    for t in report["targets"]:
        mark = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        value = f"{t['value']:.3f}" if isinstance(t["value"], float) else str(t["value"])
        lines.append(f"  {t['target']:<48} {value:>8}  ({t['limit']})  {mark}")
    problems = [
        f"{server}/{scenario}: {p}"
        for server, items in results.items()
        for scenario, item in items.items()
        if isinstance(item, Figure)
        for p in item.problems
    ]
    if problems:
        lines.append("")
        lines.append("Problems seen")
        lines += [f"  {p}" for p in problems]
    if report.get("profiles"):
        for name, prof in report["profiles"].items():
            if not isinstance(prof, dict) or "self" not in prof:
                lines.append(f"profile {name}: {prof}")
                continue
            lines.append("")
            lines.append(f"Gateway profile, {name} ({prof['samples']} samples, {prof['file']})")
            lines.append("  self time")
            lines += [f"    {h['share']:6.1%}  {h['function']}" for h in prof["self"][:12]]
            lines.append("  total time (the function and what it calls)")
            lines += [f"    {h['share']:6.1%}  {h['function']}" for h in prof["total"][:12]]
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    """The figures as Markdown tables, for docs/benchmarks.md."""
    results = report["results"]
    sizes = report["sizes"]

    def cell(server: str, key: str, unit: str) -> str:
        item = results.get(server, {}).get(key)
        value = value_of(results, server, key)
        text = fmt(value, unit)
        if isinstance(item, Figure) and item.cpu:
            text += f" ({item.cpu['server']:.2f}/{item.cpu['client']:.2f})"
        return text

    rows = [
        ("one_stream", f"one stream, {sizes['one_stream_chunks']:,} chunks", "events/s"),
        ("streams_20", f"20 streams x {sizes['streams20_chunks']:,} chunks", "events/s"),
        (
            "streams_200",
            f"{sizes['streams200_clients']} streams x {sizes['streams200_chunks']} chunks",
            "events/s",
        ),
        (
            "fanout",
            f"1 run x {sizes['fanout_sessions']} sessions, {sizes['fanout_chunks']:,} chunks",
            "deliveries/s",
        ),
        ("ttfe", "time to first event, p50", "ms"),
        ("echo_rtt", "echo round trip, p50", "ms"),
        ("idle", f"KiB per idle connection ({sizes['idle_connections']:,})", "KiB"),
    ]
    out = [
        "| WebSocket | bare | gateway | python-socketio | gateway / bare | gateway / peer |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, label, unit in rows:
        vals = [value_of(results, s, key) for s in WS_SERVERS]
        if all(v is None for v in vals):
            continue
        cells = [cell(s, key, unit) for s in WS_SERVERS]
        out.append(
            f"| {label} | "
            + " | ".join(cells)
            + f" | {fmt(ratio(vals[1], vals[0]))} | {fmt(ratio(vals[1], vals[2]))} |"
        )
    out += [
        "",
        "| SSE | gateway | sse-starlette | gateway / peer |",
        "|---|---:|---:|---:|",
    ]
    for key, label, unit in [*rows[:3], rows[4]]:
        vals = [value_of(results, s, key) for s in SSE_SERVERS]
        if all(v is None for v in vals):
            continue
        cells = [cell(s, key, unit) for s in SSE_SERVERS]
        out.append(f"| {label} | " + " | ".join(cells) + f" | {fmt(ratio(vals[0], vals[1]))} |")
    out += ["", "| idle connections | held | RSS before -> after | opened in | idle server CPU |"]
    out.append("|---|---:|---:|---:|---:|")
    for server in WS_SERVERS:
        item = results.get(server, {}).get("idle")
        if isinstance(item, dict):
            out.append(
                f"| {server} | {item['held']:,} / {item['connections']:,} | "
                f"{item['rss_before_kib'] / 1024:.1f} -> {item['rss_after_kib'] / 1024:.1f} MiB | "
                f"{item['open_s']} s | {item['idle_server_cpu_share']:.1%} |"
            )
    out += ["", "| target | figure | limit | met |", "|---|---:|---:|---|"]
    for t in report["targets"]:
        value = f"{t['value']:.3f}" if isinstance(t["value"], float) else str(t["value"])
        mark = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        out.append(f"| {t['target']} | {value} | {t['limit']} | {mark} |")
    return "\n".join(out)


def machine() -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def versions() -> dict[str, str]:
    out = {}
    for name in (
        "uvicorn",
        "starlette",
        "websockets",
        "uvloop",
        "httptools",
        "orjson",
        "python-socketio",
        "python-engineio",
        "sse-starlette",
    ):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return [0.0, 0.0, 0.0]


def git_state() -> str:
    """The commit measured, and whether the working tree differed from it."""
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return done.stdout.strip() or "?"


def uvicorn_defaults() -> str:
    """What ``uvicorn.Config`` picks for loop, http and ws when left on ``auto``."""
    from uvicorn.loops.auto import auto_loop_factory
    from uvicorn.protocols.http.auto import AutoHTTPProtocol
    from uvicorn.protocols.websockets.auto import AutoWebSocketsProtocol

    loop = getattr(auto_loop_factory(), "__module__", "?") or "?"
    ws = getattr(AutoWebSocketsProtocol, "__name__", "none")
    return f"loop {loop.split('.')[0]}, http {AutoHTTPProtocol.__name__}, ws {ws}"


async def bench(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    sizes = QUICK if args.quick else FULL
    needed = sizes.idle_connections + 1000
    soft, hard = raise_nofile(needed)
    if soft < needed:
        log(
            f"warning: open-file limit {soft} (hard {hard}) is below the {needed} the idle "
            "scenario needs; some connections will fail"
        )
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        b = Bench(sizes, Path(tmp), bench_tokens(), args.profile, log, args.gateway_src)
        for kind in args.servers:
            log(f"{kind}:")
            if kind in WS_SERVERS:
                await b.ws_server(kind)
            else:
                await b.sse_server(kind)
    results = b.results
    return {
        "quick": args.quick,
        "command": "python scripts/bench.py" + (" --quick" if args.quick else ""),
        "machine": machine(),
        "versions": versions(),
        "uvicorn_defaults": uvicorn_defaults(),
        "nofile": {"soft": soft, "hard": hard},
        "sizes": sizes.__dict__,
        "results": results,
        "targets": targets(results),
        "profiles": b.profiles,
        "elapsed_s": time.perf_counter() - began,
    }


def to_json(report: dict[str, Any]) -> dict[str, Any]:
    out = dict(report)
    out["results"] = {
        server: {k: (v.json() if isinstance(v, Figure) else v) for k, v in items.items()}
        for server, items in report["results"].items()
    }
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench.py",
        description="The gateway side by side with a bare Starlette endpoint, python-socketio "
        "and sse-starlette, on this machine, over loopback.",
    )
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the report as JSON")
    output.add_argument(
        "--markdown", action="store_true", help="print the figures as Markdown tables"
    )
    parser.add_argument(
        "--gateway-src",
        type=Path,
        default=ROOT,
        metavar="DIR",
        help="run the gateway from this source tree, e.g. an older commit unpacked with "
        "`git archive COMMIT | tar -x -C DIR` (default: this checkout)",
    )
    parser.add_argument(
        "--save", type=Path, default=None, metavar="FILE", help="also write the JSON report to FILE"
    )
    parser.add_argument(
        "--servers",
        default=",".join((*WS_SERVERS, *SSE_SERVERS)),
        help="comma-separated subset of: " + ", ".join((*WS_SERVERS, *SSE_SERVERS)),
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="also record py-spy profiles (speedscope) of the gateway into DIR, during extra "
        "one-stream, 20-stream and time-to-first-event runs on a fresh gateway after the "
        "measured ones (py-spy pauses the process for each sample: these runs are not "
        "measured)",
    )
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="instead, the scaling figure: chat-gateway --workers 2 against --workers 1 on "
        "the Redis broker (scripts/scaling.py; needs redis-server)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.scaling:
        scaling = [sys.executable, str(Path(__file__).with_name("scaling.py"))]
        return subprocess.call([*scaling, *(["--json"] if args.json else [])])
    known = (*WS_SERVERS, *SSE_SERVERS)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = [s for s in args.servers if s not in known]
    if unknown:
        parser.error(f"unknown servers {unknown}; expected some of {', '.join(known)}")

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    load_before = loadavg()
    if load_before[0] > 0.5:
        log(
            f"warning: load average {load_before[0]:.2f} before the run: other processes are "
            "using the CPUs, so the figures will be noisy"
        )
    try:
        report = run_async(bench(args, log))
    except (BenchError, LaunchError) as exc:
        print(f"bench.py: error: {exc}", file=sys.stderr)
        return 1
    report["loadavg"] = {"before": load_before, "after": loadavg()}
    report["git"] = git_state()
    report["gateway_src"] = str(args.gateway_src.resolve())
    if args.save is not None:
        args.save.write_bytes(orjson.dumps(to_json(report), option=orjson.OPT_INDENT_2))
    if args.json:
        print(orjson.dumps(to_json(report), option=orjson.OPT_INDENT_2).decode())
    elif args.markdown:
        print(render_markdown(report))
    else:
        print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

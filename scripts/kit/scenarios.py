"""The benchmark's scenarios: many streams, one run fanned out, one run at a time, idle.

Each scenario drives connections already open to one server and returns what it
measured; :mod:`scripts.bench` starts the servers and repeats the scenarios.
Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import orjson

from scripts.kit.launcher import HOST, Process
from scripts.kit.measure import Cpu
from scripts.kit.sse import SseConn, SseMessage
from scripts.kit.stats import Run, Stats, expected_events, new_ref, sse_event, summarize
from scripts.kit.tokens import TokenCache
from scripts.kit.ws import HandshakeError, WsClient, ws_connect

#: The message of the time-to-first-event runs (one run at a time).
TTFE_MESSAGE: Final = "chunks=1 thinking=1"


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
        run = Run(new_ref(f"b{i}-"), loop.create_future())
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
        run = Run(new_ref(f"f{i}-"), loop.create_future())
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
        run = Run(new_ref(f"t{i}-"), loop.create_future())
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

"""Load clients: N clients over WebSocket or SSE, each sending its messages one after another.

Every client accounts what it receives to one shared :class:`~scripts.kit.stats.Stats`;
:func:`run_load` runs them all, with a ramp, and is bounded by ``Config.timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, TextIO

import orjson

from scripts.kit.args import Target
from scripts.kit.sse import SseParser
from scripts.kit.stats import Run, Stats, expected_events, new_ref, sse_event
from scripts.kit.ws import HandshakeError, ws_connect

DEFAULT_MESSAGE: Final = "chunks=50 delay_ms=0"
PROTOCOL: Final = "chat.v1"


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
            ref = new_ref(f"c{index}-{m}-")
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
        parser = SseParser()
        async for chunk in response.aiter_raw():
            now = time.time()
            stats.bytes += len(chunk)
            for message in parser.feed(chunk):
                sse_event(message, run, stats, now)


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

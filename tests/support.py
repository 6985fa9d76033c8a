"""Test helpers: a real gateway on loopback, and clients that speak chat.v1 over it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
from websockets.asyncio.client import ClientConnection, connect

from bridge.runstate import RunState
from scripts.kit import launcher, sse
from scripts.kit.launcher import free_port
from server.app import create_app
from server.auth import Authenticator
from server.serve import GatewayServer, uvicorn_config
from server.settings import Settings

SECRET = "test-secret-0123456789-0123456789"
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class LiveServer:
    """A gateway served by a real uvicorn in a thread, on a free loopback port."""

    settings: Settings
    port: int

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def token(self, user: str = "alice", ttl_s: float = 3600, **claims: Any) -> str:
        return Authenticator(self.settings).mint(user, ttl_s, **claims)

    def headers(self, user: str = "alice") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(user)}"}


def of_run(messages: list[dict[str, Any]], run_id: str) -> list[dict[str, Any]]:
    """The messages of ``run_id`` among ``messages``, in the order they came."""
    return [m for m in messages if m.get("run_id") == run_id]


@contextlib.contextmanager
def serving(app: Any, settings: Settings) -> Iterator[GatewayServer]:
    """``app`` under the gateway's uvicorn server in a thread, on a free loopback port
    (``server.config.port``): the server, once it has started; stopped afterwards."""
    port = free_port()
    server = GatewayServer(uvicorn_config(app, settings, "127.0.0.1", port, lifespan="on"))
    thread = threading.Thread(target=server.run, name=f"uvicorn:{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(timeout=20)


@contextlib.contextmanager
def run_server(settings: Settings | None = None, **overrides: Any) -> Iterator[LiveServer]:
    base = settings or Settings(jwt_secret=SECRET, log_level="warning", db_url="sqlite:///:memory:")
    settings = base.replace(**overrides)
    with serving(create_app(settings), settings) as server:
        yield LiveServer(settings, server.config.port)


class Client:
    """A chat.v1 WebSocket client for tests."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.ready: dict[str, Any] = {}

    async def send(self, **frame: Any) -> None:
        await self.ws.send(orjson.dumps(frame).decode())

    async def recv(self, timeout: float = 10) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        message: dict[str, Any] = orjson.loads(raw)
        return message

    async def recv_until(
        self, type: str, timeout: float = 15, run_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Every message up to and including the first of ``type`` (of ``run_id`` if given)."""
        got: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout):
            while True:
                message = await self.recv(timeout)
                got.append(message)
                if message["type"] == type and (run_id is None or message["run_id"] == run_id):
                    return got

    async def run(self, content: str, **fields: Any) -> list[dict[str, Any]]:
        """Send a message and return its run's events, up to ``agent_completed``."""
        await self.send(type="user_message", content=content, **fields)
        return await self.recv_until("agent_completed")


@contextlib.asynccontextmanager
async def ws_client(
    server: LiveServer, user: str = "alice", *, token: str | None = None, **kwargs: Any
) -> AsyncIterator[Client]:
    token = token if token is not None else server.token(user)
    async with connect(
        server.ws,
        subprotocols=["chat.v1", f"bearer.{token}"],
        **kwargs,  # type: ignore[list-item]
    ) as ws:
        client = Client(ws)
        ready = await client.recv()
        assert ready["type"] == "connection_ready", ready
        client.ready = ready
        yield client


def parse_sse(text: str) -> list[dict[str, Any]]:
    """SSE text into messages: the fields each had (``id``, ``event``, ``data``; no comments)."""
    out: list[dict[str, Any]] = []
    for message in sse.parse_text(text):
        fields: dict[str, Any] = {}
        if message.id is not None:
            fields["id"] = message.id.decode()
        if message.event is not None:
            fields["event"] = message.event.decode()
        if message.data is not None:
            fields["data"] = orjson.loads(message.data)
        if message.retry is not None:
            fields["retry"] = str(message.retry)
        out.append(fields)
    return out


def http_client(server: LiveServer, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.http, timeout=15, **kwargs)


RUN_EVENT_ORDER = ("user_message", "agent_started")


def check_run_invariants(run_events: list[dict[str, Any]]) -> None:
    """The contract's invariants over one run's events, as received."""
    assert run_events, "no events"
    run_ids = {e["run_id"] for e in run_events}
    assert len(run_ids) == 1, run_ids
    seqs = [e["seq"] for e in run_events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    types = [e["type"] for e in run_events]
    if seqs[0] == 1:
        assert types[0] == "user_message", types
    assert types[-1] == "agent_completed" and types.count("agent_completed") == 1, types
    assert types[-2] == "response_complete" and types.count("response_complete") == 1, types
    chunks = [e["data"] for e in run_events if e["type"] == "response_chunk"]
    if seqs[0] == 1:
        assert [c["index"] for c in chunks] == list(range(len(chunks)))
        content = "".join(c["text"] for c in chunks)
        assert run_events[-2]["data"]["content"] == content
    opened = [e["data"]["call_id"] for e in run_events if e["type"] == "tool_executing"]
    closed = [e["data"]["call_id"] for e in run_events if e["type"] == "tool_completed"]
    if seqs[0] == 1:
        assert sorted(opened) == sorted(closed), (opened, closed)
        assert len(set(closed)) == len(closed)
    paused = False
    for event in run_events:
        if event["type"] == "run_status":
            paused = event["data"]["status"] == "paused"
        elif paused:
            # Only a cancel may end a pause without run_status running.
            assert run_events[-1]["data"]["status"] == "cancelled", event
    if seqs[0] == 1:
        # The same rules as the bridge's: the whole run replays through its run state.
        state = RunState()
        for event in run_events:
            state.feed(event["type"], event["data"], event["seq"])
        assert state.completed and not state.open_calls and state.responded
        assert not state.open_requests  # every input_requested was resolved, once


@dataclass
class ServerProcess(LiveServer):
    """A gateway in a process of its own (``python -m server``), for faults and signals."""

    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def _pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_kib(self) -> int:
        return launcher.status_kib(self._pid(), "VmRSS")

    def peak_rss_kib(self) -> int:
        return launcher.status_kib(self._pid(), "VmHWM")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path else ""


@contextlib.contextmanager
def spawn_server(tmp_dir: Path, **env: str) -> Iterator[ServerProcess]:
    """Start ``python -m server`` on a free loopback port with ``CHAT_*`` settings."""
    port = free_port()
    full = {"CHAT_JWT_SECRET": SECRET, "CHAT_LOG_LEVEL": "warning", **launcher.clean_env(), **env}
    # The project first; a PYTHONPATH given adds paths after it (packages installed elsewhere).
    full["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    with launcher.launch(
        [sys.executable, "-m", "server", "--port", str(port)],
        port=port,
        ready=launcher.http_ready(port),
        env=full,
        cwd=tmp_dir,
        log_path=tmp_dir / f"server-{port}.log",
    ) as proc:
        yield ServerProcess(Settings.from_env(full), port, proc.proc, proc.log_path)


async def health(server: LiveServer) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=server.http, timeout=10) as client:
        body: dict[str, Any] = (await client.get("/health")).json()
    return body


async def wait_for(predicate: Any, timeout: float = 15, interval: float = 0.05) -> float:
    """Poll an async predicate until it holds; the seconds it took."""
    began = time.monotonic()
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(interval)
    return time.monotonic() - began

"""Two gateway processes on one Redis behind HAProxy (round-robin, no stickiness), run from
the sample configuration docs/deploy/haproxy.cfg: clients whose connections are dropped at
random moments reconnect wherever the balancer sends them and resume by seq, and every
event of every run arrives once, in order."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect

from scripts.kit import balancer
from tests.support import ServerProcess, check_run_invariants, spawn_server
from tests.test_faults import record_figures

pytestmark = pytest.mark.skipif(
    balancer.haproxy_bin() is None, reason="haproxy not installed (Debian package haproxy)"
)

CLIENTS = 12
RUN = "chunks=300 delay_ms=10 thinking=2 tools=1 tool_ms=50"


def shared_env(redis_url: str, tmp_path: Path) -> dict[str, str]:
    return {
        "CHAT_BROKER_URL": redis_url,
        "CHAT_DB_URL": f"sqlite:///{tmp_path}/chat.db",
        "CHAT_RUN_LEASE_S": "5",
    }


class Dropper:
    """One client: a run through the balancer, its connection dropped at random moments."""

    def __init__(self, url: str, server: ServerProcess, user: str, rng: random.Random) -> None:
        self.url = url
        self.token = server.token(user)
        self.rng = rng
        self.events: list[dict[str, Any]] = []
        self.served_by: list[str] = []
        self.drops = 0

    async def run(self) -> None:
        run_id: str | None = None
        async with asyncio.timeout(90):
            while True:
                async with connect(
                    self.url,
                    subprotocols=["chat.v1", f"bearer.{self.token}"],  # type: ignore[list-item]
                ) as ws:
                    assert ws.response is not None
                    self.served_by.append(ws.response.headers.get("X-Served-By", "?"))
                    ready = orjson.loads(await ws.recv())
                    assert ready["type"] == "connection_ready", ready
                    if run_id is None:
                        await ws.send(
                            orjson.dumps(
                                {"type": "user_message", "agent": "load", "content": RUN}
                            ).decode()
                        )
                    else:
                        after = self.events[-1]["seq"] if self.events else 0
                        await ws.send(
                            orjson.dumps(
                                {"type": "resume", "run_id": run_id, "after_seq": after}
                            ).decode()
                        )
                    drop_at = time.monotonic() + self.rng.uniform(0.05, 0.8)
                    while True:
                        left = drop_at - time.monotonic()
                        if left <= 0:
                            break
                        try:
                            message = orjson.loads(await asyncio.wait_for(ws.recv(), left))
                        except TimeoutError:
                            break
                        if message["type"] == "error":
                            pytest.fail(f"error frame: {message}")
                        if "seq" not in message:
                            continue
                        run_id = run_id or message["run_id"]
                        if message["run_id"] == run_id:
                            self.events.append(message)
                            if message["type"] == "agent_completed":
                                return
                    # Dropped without a closing handshake, like a lost network.
                    self.drops += 1
                    ws.transport.abort()


async def test_clients_dropped_at_random_resume_wherever_the_balancer_sends_them(
    redis_url: str, tmp_path: Path
) -> None:
    env = shared_env(redis_url, tmp_path)
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    with (
        spawn_server(tmp_path, **env) as a,
        spawn_server(tmp_path, **env) as b,
        balancer.haproxy([f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]) as lb,
    ):
        url = f"ws://127.0.0.1:{lb.port}/ws"
        clients = [
            Dropper(url, a, f"lb-{i:02d}", random.Random(rng.random())) for i in range(CLIENTS)
        ]
        began = time.monotonic()
        await asyncio.gather(*(c.run() for c in clients))
        took_s = time.monotonic() - began
        for client in clients:
            try:
                check_run_invariants(client.events)
            except AssertionError:
                print(f"seed {seed}, served by {client.served_by}")
                raise
            assert client.events[0]["seq"] == 1
            assert client.events[-1]["data"]["status"] == "completed"
        served = Counter(name for c in clients for name in c.served_by)
        assert set(served) == {"gw1", "gw2"}, served
        assert "Traceback" not in a.log() + b.log()
    drops = sum(c.drops for c in clients)
    assert drops >= CLIENTS
    record_figures(
        "balancer_drops",
        {
            "clients": CLIENTS,
            "run": RUN,
            "seed": seed,
            "drops": drops,
            "connections_per_process": dict(served),
            "events": sum(len(c.events) for c in clients),
            "took_s": round(took_s, 3),
        },
    )

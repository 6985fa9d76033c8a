"""Connecting stays fair while the event loop is busy: a gateway on loopback (a real
uvicorn in a thread) takes every connection waiting in its listening socket's queue
at one turn of its loop, not one per turn (``CHAT_EVENT_LOOP``).

The test holds the server's loop busy for a turn while 100 clients connect (the
kernel completes their handshakes and queues them for accept), lets it turn once
more, then reads the listening socket's accept queue (``TCP_INFO``) from inside the
loop, before anything else runs. No timing is asserted: only how many connections
are still waiting."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from server.app import create_app
from server.serve import GatewayServer
from server.settings import Settings
from tests.support import SECRET, serving

CLIENTS = 100


@contextlib.contextmanager
def served(event_loop: str) -> Iterator[GatewayServer]:
    settings = Settings(
        jwt_secret=SECRET,
        log_level="warning",
        db_url="sqlite:///:memory:",
        event_loop=event_loop,
        max_opening_per_address=10 * CLIENTS,
    )
    with serving(create_app(settings), settings) as server:
        yield server


def waiting_to_be_accepted(listener: Any) -> int:
    """Connections in a listening socket's accept queue (Linux: ``tcpi_unacked``)."""
    info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    unacked: int = struct.unpack_from("I", info, 24)[0]
    return unacked


@pytest.mark.skipif(not hasattr(socket, "TCP_INFO"), reason="needs Linux's TCP_INFO")
@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_connections_waiting_to_be_accepted_are_taken_at_one_turn_of_the_loop(
    event_loop: str,
) -> None:
    seen: list[int] = []
    done = threading.Event()
    with served(event_loop) as server:
        (listening,) = server.servers
        loop = listening.get_loop()
        listener = listening.sockets[0]

        def busy(turn: int) -> None:
            # Turn 0 holds the loop while the clients connect; turn 1 is the loop's
            # next turn, in which its poll finds the listening socket readable; at
            # turn 2 whatever that turn accepted has left the queue.
            time.sleep(1.0 if turn == 0 else 0.05)
            if turn < 2:
                loop.call_soon(busy, turn + 1)
            else:
                seen.append(waiting_to_be_accepted(listener))
                done.set()

        loop.call_soon_threadsafe(busy, 0)
        time.sleep(0.2)
        clients = []
        for _ in range(CLIENTS):
            client = socket.socket()
            client.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                client.connect(("127.0.0.1", server.config.port))
            clients.append(client)
        try:
            assert done.wait(20)
        finally:
            for client in clients:
                client.close()
    (left,) = seen
    print(f"\n{event_loop}: {left} of {CLIENTS} connections still waiting after one turn")
    if event_loop == "asyncio":
        assert left == 0
    else:
        # uvloop takes one per turn: why the gateway's default is asyncio's loop.
        assert left >= CLIENTS // 2

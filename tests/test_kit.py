"""The load kit (scripts/kit): its SSE parser and WebSocket client, pure and over real sockets.

The per-frame cost of the WebSocket client's two receive paths is printed and
written to ``var/figures/ws_client.json``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from scripts.kit import launcher
from scripts.kit.sse import SseMessage, SseParser, open_sse, parse_text
from scripts.kit.stats import Run, Stats, chunk_delay_s, expected_events, sse_event
from scripts.kit.ws import HandshakeError, WsClient, ws_connect
from tests.support import LiveServer

ROOT = Path(__file__).resolve().parents[1]


def record_figures(name: str, figures: dict[str, Any]) -> None:
    out = ROOT / "var" / "figures"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\n{name}: {figures}")


def fields(messages: list[SseMessage]) -> list[tuple[bytes | None, bytes | None, bytes | None]]:
    return [(m.event, m.data, m.id) for m in messages]


# SSE ------------------------------------------------------------------------------------------

STREAM = (
    b": a comment first\r\n\r\n"
    b'event: stream_start\r\ndata: {"run_id": "r_1"}\r\n\r\n'
    b'id: 1\nevent: user_message\ndata: {"seq": 1}\n\n'
    b"id: 2\revent: response_chunk\rdata: line one\rdata:line two\r\r"
    b": ping\n\n"
    b"retry: 3000\ndata\n\n"
    b"event: stream_end\r\ndata: {}\r\n\r\n"
)
EXPECTED = [
    (b"stream_start", b'{"run_id": "r_1"}', None),
    (b"user_message", b'{"seq": 1}', b"1"),
    (b"response_chunk", b"line one\nline two", b"2"),
    (None, b"", None),
    (b"stream_end", b"{}", None),
]


def test_chunks_are_measured_against_their_due_time_on_the_models_clock() -> None:
    """Chunk i of a paced run is due i pauses after chunk 0's ts: a chunk sent late (its
    ts late too) shows its lateness there and not in the latency from ts."""
    assert chunk_delay_s("load", "chunks=3 delay_ms=20") == 0.02
    assert chunk_delay_s("load", "chunks=3") is None and chunk_delay_s("demo", "hi") is None
    stats = Stats(expected_events("load", "chunks=3 delay_ms=20"), 0.02)
    run = Run("r")
    base = 1000.0

    def chunk(index: int, ts: float, now: float) -> None:
        message = {"type": "response_chunk", "seq": 2 + index, "ts": ts, "data": {"index": index}}
        stats.event(run, message, now)

    chunk(0, base, base + 0.001)
    chunk(1, base + 0.020, base + 0.021)  # on time
    chunk(2, base + 0.070, base + 0.071)  # sent 30 ms after it was due
    assert sorted(round(v, 3) for v in stats.latency_ms.values) == [1.0, 1.0, 1.0]
    assert sorted(round(v, 3) for v in stats.schedule_ms.values) == [1.0, 1.0, 31.0]
    assert stats.report()["chunk_due_latency_ms"]["max"] == pytest.approx(31.0)


def test_sse_parser_reads_every_line_ending_and_field() -> None:
    messages = SseParser().feed(STREAM)
    assert fields(messages) == EXPECTED
    assert messages[3].retry == 3000


@pytest.mark.parametrize("step", [1, 2, 3, 7, 64])
def test_sse_parser_gives_the_same_messages_however_the_bytes_are_split(step: int) -> None:
    parser = SseParser()
    got: list[SseMessage] = []
    for i in range(0, len(STREAM), step):
        got.extend(parser.feed(STREAM[i : i + step]))
    assert fields(got) == EXPECTED


def test_sse_text_ends_its_last_message_and_drops_comment_blocks() -> None:
    text = ": only a comment\n\nevent: a\ndata: 1\n\nevent: b\ndata: 2"
    assert fields(parse_text(text)) == [(b"a", b"1", None), (b"b", b"2", None)]


async def test_sse_conn_streams_runs_on_one_keep_alive_connection(
    server: LiveServer, user: str
) -> None:
    content = "chunks=200 chunk_chars=8 thinking=1"
    conn = await open_sse(server.port)
    try:
        for _ in range(2):  # the second request reuses the connection
            stats = Stats(expected_events("load", content))
            run = Run(None, asyncio.get_running_loop().create_future())
            seen: list[bytes | None] = []

            def on_message(
                message: SseMessage,
                now: float,
                run: Run = run,
                stats: Stats = stats,
                seen: list[bytes | None] = seen,
            ) -> None:
                seen.append(message.event)
                sse_event(message, run, stats, now)

            conn.on_message = on_message
            stats.sent(run, time.time())
            body = orjson.dumps({"message": content, "agent": "load"})
            netloc = f"127.0.0.1:{server.port}"
            auth = [f"Authorization: Bearer {server.token(user)}"]
            conn.request("/api/chat/stream", netloc, body, auth)
            assert conn.done is not None
            assert await asyncio.wait_for(conn.done, 15) == 200
            assert run.status == "completed", (stats.errors, seen[-3:])
            assert seen[0] == b"stream_start" and seen[-1] == b"stream_end"
            assert stats.problems == 0, stats.report()
            assert run.next_seq - 1 == stats.expected_per_run
            assert run.run_id is not None
        assert not conn.lost
    finally:
        conn.close()


# WebSocket: the receive paths, with a recording transport ---------------------------------------


class RecordingTransport(asyncio.Transport):
    """Keeps what the client writes; closing is only recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def can_write_eof(self) -> bool:
        return False


def server_frame(opcode: Opcode, data: bytes, fin: bool = True) -> bytes:
    return Frame(opcode, data, fin).serialize(mask=False, extensions=[])


def open_client(received: list[bytes]) -> tuple[WsClient, RecordingTransport]:
    protocol = ClientProtocol(parse_uri("ws://127.0.0.1:1/ws"), state=State.OPEN)
    client = WsClient(protocol, lambda payload, now: received.append(payload))
    client.handshake.set_result(None)
    transport = RecordingTransport()
    client.connection_made(transport)
    return client, transport


def frames_sent(written: bytes) -> list[Frame]:
    """Parse what the client wrote (masked client frames) with a server-side parser."""
    from websockets.server import ServerProtocol

    server = ServerProtocol(state=State.OPEN)
    server.receive_data(written)
    return [e for e in server.events_received() if isinstance(e, Frame)]


BIG = b"x" * 70_000  # a 64-bit length


def mixed_stream() -> bytes:
    return b"".join(
        (
            server_frame(Opcode.TEXT, b'{"n": 1}'),
            server_frame(Opcode.TEXT, b"frag-", fin=False),
            server_frame(Opcode.PING, b"are you there"),
            server_frame(Opcode.CONT, b"ment", fin=False),
            server_frame(Opcode.CONT, b"ed", fin=True),
            server_frame(Opcode.BINARY, b"\x00\x01"),
            server_frame(Opcode.TEXT, BIG),
            server_frame(Opcode.TEXT, b"y" * 300),  # a 16-bit length
            server_frame(Opcode.CLOSE, Close(4001, "bye").serialize()),
            server_frame(Opcode.TEXT, b"after the close: discarded"),
        )
    )


@pytest.mark.parametrize("step", [1, 5, 126, 4096, 1 << 20])
async def test_ws_client_hands_over_the_same_messages_however_the_bytes_are_split(
    step: int,
) -> None:
    received: list[bytes] = []
    client, transport = open_client(received)
    stream = mixed_stream()
    for i in range(0, len(stream), step):
        client.data_received(stream[i : i + step])
    assert received == [b'{"n": 1}', b"frag-mented", b"\x00\x01", BIG, b"y" * 300]
    replies = frames_sent(bytes(transport.written))
    assert [(f.opcode, f.data) for f in replies] == [
        (Opcode.PONG, b"are you there"),
        (Opcode.CLOSE, Close(4001, "bye").serialize()),
    ]
    assert transport.closing
    client.connection_lost(None)
    assert (client.close_code, client.close_reason) == (4001, "bye")


async def test_ws_client_leaves_a_protocol_error_to_the_protocol() -> None:
    received: list[bytes] = []
    client, transport = open_client(received)
    # A continuation with no message begun: websockets fails the connection with 1002.
    client.data_received(server_frame(Opcode.TEXT, b"ok") + server_frame(Opcode.CONT, b"?"))
    assert received == [b"ok"]
    assert client.protocol.parser_exc is not None
    assert [f.opcode for f in frames_sent(bytes(transport.written))] == [Opcode.CLOSE]
    assert transport.closing
    client.connection_lost(None)
    assert client.close_code == 1002


async def test_ws_client_receive_paths_cost_per_event() -> None:
    """Figures only: one run's events through the fast path, and through ClientProtocol alone.

    Each event is a frame of the gateway's size, decoded and checked by ``seq`` as the
    load clients do; CPU time per event, the best of three.
    """
    count = 20_000
    event = {"type": "response_chunk", "run_id": "r_0123456789abcdef", "seq": 0, "ts": 1.0}
    event.update(thread_id="t_0123456789abcdef", data={"index": 1, "text": "a" * 8})
    frames = [
        server_frame(Opcode.TEXT, orjson.dumps({**event, "seq": i})) for i in range(1, count + 1)
    ]
    wire = b"".join(frames)
    chunks = [wire[i : i + 65536] for i in range(0, len(wire), 65536)]
    figures: dict[str, Any] = {"events": count, "frame_bytes": len(frames[0])}
    loop = asyncio.get_running_loop()
    for name in ("fast_path", "protocol_only"):
        best = float("inf")
        for _ in range(3):
            stats = Stats()
            run = Run("r", loop.create_future())

            def on_text(payload: bytes, now: float, stats: Stats = stats, run: Run = run) -> None:
                stats.event(run, orjson.loads(payload), now)

            client, _ = open_client([])
            client.on_text = on_text
            began = time.process_time()
            for chunk in chunks:
                if name == "fast_path":
                    client.data_received(chunk)
                else:
                    client._to_protocol(chunk, time.time())
            best = min(best, time.process_time() - began)
            assert stats.events == count and stats.lost == stats.duplicated == 0
        figures[f"{name}_us_per_event"] = round(best / count * 1e6, 3)
    record_figures("ws_client", figures)


# WebSocket: over real sockets -----------------------------------------------------------------


async def test_ws_client_against_a_websockets_server() -> None:
    """Fragments, a large message, a server ping and a close code, from websockets' server."""
    pong_seen = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        assert ws.subprotocol == "chat.v1"
        await ws.send("hello")
        await ws.send(iter(["frag", "ment", "ed"]))  # one message in three frames
        await ws.send("z" * 100_000)
        waiter = await ws.ping()
        await asyncio.wait_for(waiter, 5)
        pong_seen.set()
        echo = await ws.recv()
        await ws.send(f"echo {echo}")
        await ws.close(4002, "done here")

    async with serve(handler, "127.0.0.1", 0, subprotocols=["chat.v1"]) as ws_server:  # type: ignore[list-item]
        port = ws_server.sockets[0].getsockname()[1]
        received: list[bytes] = []
        closed: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()
        client = await ws_connect(
            f"ws://127.0.0.1:{port}/",
            lambda payload, now: received.append(payload),
            on_close=lambda code, reason: closed.set_result((code, reason)),
            subprotocols=["chat.v1", "bearer.x"],
        )
        assert client.subprotocol == "chat.v1"
        await asyncio.wait_for(pong_seen.wait(), 5)
        client.send_text("hi")
        assert await asyncio.wait_for(closed, 5) == (4002, "done here")
    assert received == [b"hello", b"fragmented", b"z" * 100_000, b"echo hi"]
    assert not client.is_open


async def test_ws_client_talks_chat_v1_to_the_gateway(server: LiveServer, user: str) -> None:
    content = "chunks=300 chunk_chars=8 thinking=1 tools=1"
    stats = Stats(expected_events("load", content))
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    run = Run("k1", loop.create_future())

    def on_text(payload: bytes, now: float) -> None:
        message = orjson.loads(payload)
        if message["type"] == "connection_ready":
            ready.set_result(None)
        elif message.get("seq") is not None:
            stats.event(run, message, now)

    client = await ws_connect(
        server.ws, on_text, subprotocols=["chat.v1", f"bearer.{server.token(user)}"]
    )
    await asyncio.wait_for(ready, 10)
    stats.sent(run, time.time())
    client.send_text(
        orjson.dumps({"type": "user_message", "id": "k1", "content": content, "agent": "load"})
    )
    assert run.done is not None
    assert await asyncio.wait_for(run.done, 15) == "completed"
    assert stats.problems == 0, stats.report()
    await client.close()
    assert client.close_code == 1000


async def test_ws_client_reports_the_gateway_refusing_a_token(server: LiveServer) -> None:
    closed: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    # The gateway accepts the upgrade, then closes with 4401 (chat.v1, section 2).
    client = await ws_connect(
        server.ws,
        lambda payload, now: None,
        on_close=lambda code, reason: closed.set_result(code),
        subprotocols=["chat.v1", "bearer.not-a-jwt"],
    )
    assert await asyncio.wait_for(closed, 10) == 4401
    assert client.close_code == 4401
    assert not client.is_open


async def test_ws_client_raises_handshake_error_on_a_refused_upgrade(server: LiveServer) -> None:
    with pytest.raises(HandshakeError) as refused:
        await ws_connect(f"{server.http.replace('http', 'ws')}/no-such-socket", lambda p, n: None)
    assert refused.value.status == 403


# The launcher ---------------------------------------------------------------------------------


def test_launcher_reports_a_process_that_exits_early(tmp_path: Path) -> None:
    script = "import sys; print('no port for me', flush=True); sys.exit(3)"
    with pytest.raises(launcher.LaunchError, match="exited early") as failed:  # noqa: SIM117
        with launcher.launch(
            [sys.executable, "-c", script],
            port=launcher.free_port(),
            ready=lambda: False,
            name="quitter",
            log_path=tmp_path / "quitter.log",
        ):
            pass
    assert "quitter" in str(failed.value) and "no port for me" in str(failed.value)


def test_launcher_stops_a_process_that_never_gets_ready(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    script = (
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    )
    with pytest.raises(launcher.LaunchError, match=r"did not start within 0.5 s"):  # noqa: SIM117
        with launcher.launch(
            [sys.executable, "-c", script],
            port=launcher.free_port(),
            ready=lambda: False,
            start_timeout_s=0.5,
            stop_timeout_s=5,
        ):
            pass
    pid = int(pid_file.read_text()) if pid_file.exists() else None
    if pid is not None:  # it got as far as writing its pid: it must be gone now
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_launcher_serves_the_gateway_until_the_block_ends(tmp_path: Path) -> None:
    port = launcher.free_port()
    env = launcher.clean_env(
        CHAT_JWT_SECRET="k" * 40, CHAT_LOG_LEVEL="warning", PYTHONPATH=str(ROOT)
    )
    with launcher.launch(
        launcher.gateway_argv(port),
        port=port,
        ready=launcher.http_ready(port),
        name="gateway",
        env=env,
        cwd=tmp_path,
        log_path=tmp_path / "gateway.log",
    ) as gateway:
        assert launcher.tcp_ready(port)()
        assert gateway.rss_kib() > 0 and gateway.cpu_s() > 0
        proc = gateway.proc
    assert proc.poll() is not None  # stopped on the way out
    assert not launcher.tcp_ready(port)()


def test_the_load_clients_loop_runs_with_the_collector_set_as_the_gateways() -> None:
    """A client holding hundreds of streams must not pause for its own full collections
    (100 ms at CPython's threshold), which its latencies would count as the server's."""
    import gc

    from scripts.kit.loop import GC_THRESHOLD, run_async

    before = gc.get_threshold()

    async def threshold() -> int:
        return gc.get_threshold()[0]

    try:
        assert run_async(threshold()) == GC_THRESHOLD == 50_000
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def test_gateway_env_options_take_name_value_pairs() -> None:
    import argparse

    from scripts.kit.args import assignment

    assert assignment("CHAT_GC_THRESHOLD=0") == ("CHAT_GC_THRESHOLD", "0")
    assert assignment("A=b=c") == ("A", "b=c") and assignment("A=") == ("A", "")
    for bad in ("A", "=b", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="NAME=VALUE"):
            assignment(bad)

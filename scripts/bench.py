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
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson

from scripts.kit.args import assignment
from scripts.kit.launcher import (
    LaunchError,
    Process,
    clean_env,
    free_port,
    gateway_argv,
    launch,
    redis_server,
    tcp_ready,
    unlimited_gateway_env,
)
from scripts.kit.loop import run_async
from scripts.kit.measure import Cpu, Figure, bound_side, check_stats, median_figure, raise_nofile
from scripts.kit.report import (
    SSE_SERVERS,
    WS_SERVERS,
    git_state,
    hot_spots,
    loadavg,
    machine,
    render,
    render_markdown,
    targets,
    uvicorn_defaults,
    versions,
)
from scripts.kit.scenarios import (
    TTFE_MESSAGE,
    Conn,
    close_all,
    echo_rtt,
    idle,
    open_many,
    sse_streams,
    sse_ttfe,
    ws_fanout,
    ws_streams,
    ws_ttfe,
)
from scripts.kit.sse import open_sse
from scripts.kit.stats import Stats
from scripts.kit.tokens import TokenCache

ROOT = Path(__file__).resolve().parents[1]
SECRET: Final = "bench-secret-0123456789-0123456789-0123"

GATEWAY_ENV: Final = unlimited_gateway_env(SECRET)
#: More variables for the gateway's processes (``--gateway-env``), e.g. tracing on.
GATEWAY_EXTRA_ENV: dict[str, str] = {}


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
        env.update(GATEWAY_EXTRA_ENV)
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


def bench_tokens() -> TokenCache:
    """Tokens minted once per user, signed with the gateway's secret."""
    return TokenCache(SECRET, 3 * 3600)


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
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-"))
        if args.redis:
            # The gateway's processes on the Redis broker, a redis-server of the run's own.
            GATEWAY_EXTRA_ENV["CHAT_BROKER_URL"] = stack.enter_context(redis_server())
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
        "broker": "redis" if args.redis else "memory",
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
        "--gateway-env",
        action="append",
        type=assignment,
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for the gateway's processes, e.g. "
        "OTEL_TRACES_EXPORTER=console to measure tracing (repeatable)",
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
        "--redis",
        action="store_true",
        help="the gateway on the Redis broker, a redis-server of the run's own (needs "
        "redis-server); the comparison servers are as always",
    )
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="instead, the scaling figure: chat-gateway --workers 2 against --workers 1 on "
        "the Redis broker (scripts/scaling.py; needs redis-server)",
    )
    parser.add_argument(
        "--capacity",
        action="store_true",
        help="instead, the streams one process holds at a model's pace, on each broker, "
        "against python-socketio and through HAProxy (scripts/capacity.py; its options "
        "after --)",
    )
    parser.add_argument(
        "--idle",
        type=int,
        default=None,
        metavar="N",
        help="instead, N idle connections held by one gateway process: bytes each, idle CPU "
        "(scripts/capacity.py --idle N)",
    )
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.scaling:
        scaling = [sys.executable, str(Path(__file__).with_name("scaling.py"))]
        return subprocess.call([*scaling, *(["--json"] if args.json else [])])
    GATEWAY_EXTRA_ENV.update(args.gateway_env)
    if args.capacity or args.idle is not None:
        capacity = [sys.executable, str(Path(__file__).with_name("capacity.py"))]
        extra = ["--idle", str(args.idle)] if args.idle is not None else []
        json_out = ["--json"] if args.json else []
        save = ["--save", str(args.save)] if args.save is not None else []
        return subprocess.call([*capacity, *extra, *json_out, *save, *args.rest])
    if args.rest:
        parser.error(f"unrecognized arguments: {' '.join(args.rest)}")
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
    report["gateway_env"] = dict(GATEWAY_EXTRA_ENV)
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

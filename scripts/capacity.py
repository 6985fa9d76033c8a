"""Capacity at a model's pace, and idle connections, on this machine over loopback.

    python scripts/capacity.py [--targets gateway,gateway-redis,socketio,balancer]
        [--steps 100,200,400,...] [--ramp-s 10] [--content '...'] [--json]
    python scripts/capacity.py --idle 10000 [--hold-s 10] [--json]

Capacity: for each target, steps of N concurrent streams, each client one run of
the ``load`` agent at a model's pace (``chunks=400 chunk_chars=6 delay_ms=20
thinking=2 tools=1 tool_ms=50``: 8 s at 50 chunks/s), the clients' starts spread
over ``--ramp-s``; each step on fresh server processes. A step holds when the
p99 of per-event delivery latency (receipt against the envelope's ``ts``) and the
p99 of each chunk's delivery against its due time on the model's clock are at
most 50 ms, the runs' p99 duration is within ``--pace-slack`` times their own
delays, every run completes with every event once and in order, and no client is
cut or fails to connect. The figure is the largest N that held, with
connect latency p99 and connect timeouts at that N. Targets:

* ``gateway``: ``python -m server``, in-memory broker;
* ``gateway-redis``: the same on the Redis broker (a redis-server of its own);
* ``socketio``: python-socketio (``scripts/bench_apps.py socketio``), same events;
* ``balancer``: HAProxy (docs/deploy/haproxy.cfg) in front of two gateway
  processes on Redis, round-robin.

Idle: one gateway process holds N idle WebSocket connections; its VmRSS before
and after (bytes per connection) and its CPU share while they sit idle. The
open-file limit is raised to the hard limit as far as N needs (the servers
inherit it). Every wait is bounded; all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Final

import orjson

from scripts.kit import balancer
from scripts.kit.args import assignment, positive, positive_int
from scripts.kit.capacity import (
    MODEL_PACE,
    P99_BOUND_MS,
    PACE_SLACK,
    StepConfig,
    capacity_step,
    ramp,
)
from scripts.kit.launcher import (
    LaunchError,
    Process,
    clean_env,
    free_port,
    gateway_argv,
    http_ready,
    launch,
    redis_server,
    tcp_ready,
    unlimited_gateway_env,
)
from scripts.kit.loop import run_async
from scripts.kit.measure import raise_nofile
from scripts.kit.report import hot_spots, loadavg, machine
from scripts.kit.scenarios import idle
from scripts.kit.tokens import TokenCache

ROOT: Final = Path(__file__).resolve().parent.parent
SECRET: Final = "capacity-secret-0123456789-0123456789"
TARGETS: Final = ("gateway", "gateway-redis", "socketio", "balancer")
DEFAULT_STEPS: Final = "100,200,300,400,500,600,800,1000,1200,1500,2000"

GATEWAY_ENV: Final = unlimited_gateway_env(SECRET)
#: More variables for the gateway's processes (``--gateway-env``), e.g. a setting to compare.
GATEWAY_EXTRA_ENV: dict[str, str] = {}


@contextlib.contextmanager
def gateway(workdir: Path, redis_url: str | None = None) -> Iterator[Process]:
    port = free_port()
    env = clean_env(PYTHONPATH=str(ROOT))
    env.update(GATEWAY_ENV)
    env.update(GATEWAY_EXTRA_ENV)
    env["CHAT_DB_URL"] = f"sqlite:///{workdir}/chat.db"
    if redis_url is not None:
        env["CHAT_BROKER_URL"] = redis_url
    with launch(
        gateway_argv(port),
        port=port,
        ready=http_ready(port),
        name="gateway",
        env=env,
        cwd=workdir,
        log_path=workdir / f"gateway-{port}.log",
        stop_timeout_s=20,
    ) as proc:
        yield proc


@contextlib.contextmanager
def socketio(workdir: Path) -> Iterator[Process]:
    port = free_port()
    argv = [sys.executable, str(ROOT / "scripts" / "bench_apps.py"), "socketio"]
    with launch(
        [*argv, "--port", str(port)],
        port=port,
        ready=tcp_ready(port),
        name="socketio",
        env=clean_env(PYTHONPATH=str(ROOT)),
        cwd=workdir,
        log_path=workdir / f"socketio-{port}.log",
        stop_timeout_s=20,
    ) as proc:
        yield proc


def starter(
    target: str, workdir: Path, keep: bool = False
) -> Callable[[], contextlib.AbstractAsyncContextManager[tuple[str, int, list[Process]]]]:
    """Fresh processes for one step of ``target``: the client's kind, the port, the servers.
    Each step's logs and database go to a directory of its own under ``workdir``, removed
    afterwards unless ``keep``."""

    @contextlib.asynccontextmanager
    async def start() -> AsyncIterator[tuple[str, int, list[Process]]]:
        with contextlib.ExitStack() as stack:
            step_dir = Path(tempfile.mkdtemp(prefix=f"{target}-", dir=workdir))
            if not keep:
                stack.callback(shutil.rmtree, step_dir, True)
            if target == "gateway":
                proc = stack.enter_context(gateway(step_dir))
                yield "gateway", proc.port, [proc]
            elif target == "socketio":
                proc = stack.enter_context(socketio(step_dir))
                yield "socketio", proc.port, [proc]
            elif target == "gateway-redis":
                url = stack.enter_context(redis_server())
                proc = stack.enter_context(gateway(step_dir, url))
                yield "gateway", proc.port, [proc]
            else:
                url = stack.enter_context(redis_server())
                a = stack.enter_context(gateway(step_dir, url))
                b = stack.enter_context(gateway(step_dir, url))
                lb = stack.enter_context(
                    balancer.haproxy([f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"])
                )
                yield "gateway", lb.port, [a, b, lb]

    return start


async def capacity(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    steps = [int(s) for s in args.steps.split(",") if s.strip()]
    soft, hard = raise_nofile(2 * max(steps) + 1000)
    cfg = StepConfig(
        content=args.content,
        ramp_s=args.ramp_s,
        connect_timeout_s=args.connect_timeout_s,
        p99_bound_ms=args.p99_ms,
        pace_slack=args.pace_slack,
    )
    tokens = TokenCache(SECRET, 3 * 3600)
    out: dict[str, Any] = {}
    with contextlib.ExitStack() as dirs:
        if args.workdir is not None:
            tmp = str(args.workdir)
        else:
            tmp = dirs.enter_context(tempfile.TemporaryDirectory(prefix="capacity-"))
        for target in args.targets:
            log(f"{target}:")
            start = starter(target, Path(tmp), keep=args.workdir is not None)
            out[target] = result = await ramp(target, start, steps, cfg, tokens, log)
            worse = result["first_not_held"]
            if args.profile is not None and worse is not None and target != "socketio":
                result["profile"] = await profile(
                    target, start, worse["streams"], cfg, tokens, args.profile
                )
                log(f"  profile at {worse['streams']} streams: {result['profile'].get('file')}")
    return {
        "mode": "capacity",
        "config": {**cfg.__dict__, "steps": steps},
        "nofile": {"soft": soft, "hard": hard},
        "results": out,
    }


async def profile(
    target: str,
    start: Callable[[], contextlib.AbstractAsyncContextManager[tuple[str, int, list[Process]]]],
    n: int,
    cfg: StepConfig,
    tokens: TokenCache,
    out_dir: Path,
) -> dict[str, Any]:
    """py-spy on the (first) gateway process during one more step of ``n`` streams, not
    measured (py-spy pauses the process for each sample); where its time went."""
    pyspy = Path(sys.executable).parent / "py-spy"
    if not pyspy.exists():
        return {"error": f"py-spy not found at {pyspy} (pip install py-spy)"}
    out = out_dir / f"capacity-{target}-{n}.speedscope.json"
    async with start() as (kind, port, servers):
        spy = await asyncio.create_subprocess_exec(
            str(pyspy), "record", "--pid", str(servers[0].pid), "--rate", "200",
            "--format", "speedscope", "--output", str(out),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await asyncio.sleep(1.0)
        try:
            step = await capacity_step(kind, port, servers, n, cfg, tokens)
        finally:
            spy.send_signal(signal.SIGINT)
            try:
                _, err = await asyncio.wait_for(spy.communicate(), 60)
            except TimeoutError:
                spy.kill()
                _, err = await spy.communicate()
    if not out.exists():
        return {"error": err.decode(errors="replace")[-2000:]}
    return {"file": str(out), "streams": n, "step_under_profiler": step, **hot_spots(out)}


async def idle_mode(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    soft, hard = raise_nofile(2 * args.idle + 1000)
    if soft < args.idle + 500:
        log(f"warning: open-file limit {soft} (hard {hard}): some connections will fail")
    tokens = TokenCache(SECRET, 3 * 3600)
    with tempfile.TemporaryDirectory(prefix="idle-") as tmp, gateway(Path(tmp)) as proc:
        result = await idle("gateway", proc, tokens, args.idle, args.hold_s)
    if result["kib_per_connection"] is not None:
        result["bytes_per_connection"] = round(result["kib_per_connection"] * 1024)
    log(f"  gateway idle: {result}")
    return {"mode": "idle", "nofile": {"soft": soft, "hard": hard}, "results": {"gateway": result}}


def render(report: dict[str, Any]) -> str:
    lines: list[str] = []
    if report["mode"] == "idle":
        r = report["results"]["gateway"]
        lines.append(
            f"gateway holds {r['held']:,} of {r['connections']:,} idle connections: "
            f"{r['bytes_per_connection']:,} bytes each (VmRSS {r['rss_before_kib']:,} -> "
            f"{r['rss_after_kib']:,} KiB), idle CPU share {r['idle_server_cpu_share']}, "
            f"failures {r['failures'] or 0}, pings answered {r['ping_answered']}"
        )
        return "\n".join(lines)
    lines.append(
        "| target | streams held | event latency p99 (ms) | chunk due p99 (ms) | "
        "run / its delays | connect p99 (ms) | connect timeouts | first step not held |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|---|")
    for target, r in report["results"].items():
        best = r["at_capacity"] or {}
        worse = r["first_not_held"]
        why = "none (every step held)"
        if worse is not None:
            lat = (worse["event_latency_ms"] or {}).get("p99")
            due = (worse.get("chunk_due_latency_ms") or {}).get("p99")
            why = (
                f"{worse['streams']}: latency p99 {lat} ms, chunk due p99 {due} ms, "
                f"run / its delays {worse.get('pace')}, connect p99 "
                f"{(worse['connect_ms'] or {}).get('p99')} ms, connect failures "
                f"{worse['connect_failures'] or 0}, errors {worse['errors'] or 0}"
            )
        lines.append(
            f"| {target} | {r['capacity_streams']} | "
            f"{(best.get('event_latency_ms') or {}).get('p99')} | "
            f"{(best.get('chunk_due_latency_ms') or {}).get('p99')} | "
            f"{best.get('pace')} | "
            f"{(best.get('connect_ms') or {}).get('p99')} | "
            f"{(best.get('connect_failures') or {}).get('timeout', 0) if best else None} | "
            f"{why} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capacity.py",
        description="Concurrent streams at a model's pace one process holds, or idle "
        "connections it holds (loopback only).",
    )
    parser.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help=f"comma-separated subset of: {', '.join(TARGETS)}",
    )
    parser.add_argument(
        "--steps", default=DEFAULT_STEPS, help=f"streams per step ({DEFAULT_STEPS})"
    )
    parser.add_argument("--ramp-s", type=positive, default=10.0, help="ramp of each step (10)")
    parser.add_argument("--content", default=MODEL_PACE, help=f"each run ({MODEL_PACE!r})")
    parser.add_argument("--p99-ms", type=positive, default=P99_BOUND_MS, help="latency bound (50)")
    parser.add_argument(
        "--pace-slack",
        type=positive,
        default=PACE_SLACK,
        help="a step holds only if its runs' p99 duration is within this many times "
        f"their own delays ({PACE_SLACK})",
    )
    parser.add_argument(
        "--connect-timeout-s", type=positive, default=10.0, help="connect bound (10)"
    )
    parser.add_argument(
        "--idle", type=positive_int, default=None, metavar="N", help="instead: N idle connections"
    )
    parser.add_argument("--hold-s", type=positive, default=10.0, help="idle: hold for S s (10)")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="after each gateway target's ramp, one more (unmeasured) step at the first "
        "number that did not hold with py-spy on the gateway process; speedscope files "
        "into DIR and the hot spots in the report",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        metavar="DIR",
        help="keep each step's server logs and database in DIR (default: removed)",
    )
    parser.add_argument(
        "--gateway-env",
        action="append",
        type=assignment,
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for the gateway's processes, e.g. a setting to "
        "compare (repeatable)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--save", type=Path, default=None, help="also write the JSON to FILE")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown targets {unknown}; expected some of {', '.join(TARGETS)}")
    if "balancer" in args.targets and balancer.haproxy_bin() is None:
        parser.error("the balancer target needs haproxy (Debian package haproxy)")
    GATEWAY_EXTRA_ENV.update(args.gateway_env)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    for folder in (args.profile, args.workdir):
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
    before = loadavg()
    began = time.perf_counter()
    try:
        mode = idle_mode if args.idle is not None else capacity
        report = run_async(mode(args, log))
    except LaunchError as exc:
        print(f"capacity.py: error: {exc}", file=sys.stderr)
        return 1
    report["machine"] = machine()
    report["gateway_env"] = dict(GATEWAY_EXTRA_ENV)
    report["loadavg"] = {"before": before, "after": loadavg()}
    report["elapsed_s"] = round(time.perf_counter() - began, 1)
    data = orjson.dumps(report, option=orjson.OPT_INDENT_2)
    if args.save is not None:
        args.save.write_bytes(data)
    print(data.decode() if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How throughput scales with gateway processes: ``--workers 1`` against ``--workers 2``.

Starts a redis-server and, for each worker count, ``chat-gateway --workers N`` on the
Redis broker (loopback, free ports), then drives it with ``scripts/loadtest.py``
(the same clients, runs and sizes each time) and prints events per second and the
ratio.  Every run is bounded; traffic stays on 127.0.0.1.

Each run also says where the machine's cores went while the load ran: CPU seconds of
the gateway's processes (the parent and its workers), of redis-server (its ``INFO
cpu``) and of the load client, against the run's wall time and the cores.  On a
machine whose cores the load client and Redis share with the workers, two workers
cannot reach two times one; the events per CPU second of the gateway's processes
say whether a second worker costs more per event.

    python scripts/scaling.py [--clients 40] [--messages 3] [--chunks 2000] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from scripts.kit.args import positive_int
from scripts.kit.launcher import (
    LaunchError,
    clean_env,
    cpu_seconds,
    free_port,
    gateway_argv,
    http_ready,
    launch,
    redis_server,
)

ROOT = Path(__file__).resolve().parent.parent
SECRET = "scaling-secret-0123456789-0123456789"


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it (uvicorn's workers are its children)."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                with contextlib.suppress(OSError):
                    todo += [int(c) for c in (task / "children").read_text().split()]
    return out


def tree_cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += cpu_seconds(pid)
    return total


def redis_cpu_s(redis_url: str) -> float | None:
    """redis-server's own CPU seconds so far (``INFO cpu``); None on the in-memory broker."""
    if not redis_url.startswith("redis"):
        return None
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        info = client.info("cpu")
    finally:
        client.close()
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(
    workers: int, redis_url: str, workdir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    port = free_port()
    env = clean_env(
        PYTHONPATH=str(ROOT),
        CHAT_JWT_SECRET=SECRET,
        CHAT_BROKER_URL=redis_url,
        CHAT_DB_URL=f"sqlite:///{workdir}/chat-{workers}-{port}.db",
        CHAT_LOG_LEVEL="warning",
        CHAT_RATE_LIMIT_PER_MINUTE="1000000",
        CHAT_MAX_ACTIVE_RUNS_PER_USER="1000",
        CHAT_MAX_CONNECTIONS_PER_USER="1000",
    )
    with launch(
        gateway_argv(port, "--workers", str(workers)),
        port=port,
        ready=http_ready(port),
        name=f"chat-gateway --workers {workers}",
        env=env,
        cwd=workdir,
        start_timeout_s=60,
        stop_timeout_s=60,
    ) as proc:
        time.sleep(1.0)  # let every worker finish starting
        pids = process_tree(proc.pid)
        gateway0, redis0, client0 = tree_cpu_s(pids), redis_cpu_s(redis_url), children_cpu_s()
        began = time.perf_counter()
        done = subprocess.run(
            [
                sys.executable,
                str(ROOT / "scripts" / "loadtest.py"),
                "--url",
                f"ws://127.0.0.1:{port}/ws",
                "--secret",
                SECRET,
                "--clients",
                str(args.clients),
                "--messages",
                str(args.messages),
                "--ramp-s",
                "0.5",
                "--message",
                f"chunks={args.chunks} chunk_chars=8",
                "--timeout-s",
                "240",
                "--json",
                "--no-progress",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        wall = time.perf_counter() - began
        gateway_s = tree_cpu_s(pids) - gateway0
        redis1 = redis_cpu_s(redis_url)
        redis_s = None if redis0 is None or redis1 is None else redis1 - redis0
        client_s = children_cpu_s() - client0
        report: dict[str, Any] = json.loads(done.stdout)
        cores = os.cpu_count() or 1
        events = float(report["events"]["total"] or 0)
        report["cpu"] = {
            "wall_s": round(wall, 2),
            "gateway_processes": len(pids),
            "gateway_s": round(gateway_s, 2),
            "redis_s": None if redis_s is None else round(redis_s, 2),
            "load_client_s": round(client_s, 2),
            "machine_busy": round((gateway_s + (redis_s or 0) + client_s) / (wall * cores), 3),
            "events_per_gateway_cpu_s": round(events / gateway_s) if gateway_s else None,
        }
        return report


def events_per_s(report: dict[str, Any]) -> float:
    return float(report["events"]["per_s"] or 0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=positive_int, default=40)
    parser.add_argument("--messages", type=positive_int, default=3)
    parser.add_argument("--chunks", type=positive_int, default=2000)
    parser.add_argument("--reps", type=positive_int, default=2)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--memory",
        action="store_true",
        help="also one worker on the in-memory broker in each repetition, for the ratio "
        "of one process on Redis to one in memory",
    )
    args = parser.parse_args(argv)
    if shutil.which("redis-server") is None:
        print("scaling.py needs redis-server (Debian package redis-server)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="chat-scaling-"))
    results: dict[int, list[float]] = {}
    cpu: dict[int, list[dict[str, Any]]] = {}  # 0: the in-memory broker
    errors: dict[int, list[Any]] = {}  # 0: the in-memory broker
    memory: list[float] = []
    try:
        with redis_server() as url:
            for _ in range(args.reps):
                if args.memory:
                    report = run_once(1, "memory", workdir, args)
                    memory.append(events_per_s(report))
                    cpu.setdefault(0, []).append(report["cpu"])
                    errors.setdefault(0, []).append(report.get("errors") or report.get("integrity"))
                for workers in (1, 2):
                    report = run_once(workers, url, workdir, args)
                    results.setdefault(workers, []).append(events_per_s(report))
                    cpu.setdefault(workers, []).append(report["cpu"])
                    errors.setdefault(workers, []).append(
                        report.get("errors") or report.get("integrity")
                    )
    except LaunchError as exc:
        print(f"scaling.py: error: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    best = {w: max(v) for w, v in results.items()}
    memory_best = max(memory, default=0.0)
    summary = {
        "clients": args.clients,
        "messages": args.messages,
        "chunks": args.chunks,
        "events_per_s": results,
        "best_events_per_s": best,
        "two_workers_over_one": round(best[2] / best[1], 3) if best.get(1) else None,
        "memory_events_per_s": memory or None,
        "redis_over_memory": round(best[1] / memory_best, 3) if memory_best else None,
        "errors": errors,
        "cpu": cpu,
        "cores": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for workers in (1, 2):
            runs = ", ".join(f"{v:,.0f}" for v in results[workers])
            print(f"--workers {workers}: {runs} events/s (best {best[workers]:,.0f})")
        print(f"two workers / one: {summary['two_workers_over_one']}")
        for workers, samples in sorted(cpu.items()):
            name = "in memory" if workers == 0 else f"--workers {workers}"
            for run in samples:
                print(
                    f"  {name}: gateway {run['gateway_s']} CPU s, redis {run['redis_s']}, "
                    f"load client {run['load_client_s']} over {run['wall_s']} s: machine "
                    f"{run['machine_busy']:.0%} busy, {run['events_per_gateway_cpu_s']:,} "
                    "events per gateway CPU second"
                )
        if memory:
            runs = ", ".join(f"{v:,.0f}" for v in memory)
            print(f"in memory, one process: {runs} events/s")
            print(f"one process on Redis / in memory: {summary['redis_over_memory']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

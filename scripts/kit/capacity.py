"""Capacity at a model's pace: how many concurrent streams one server holds.

A step of ``n`` clients: each connects (its start spread evenly over the ramp),
waits for ``connection_ready`` and sends one message whose answer comes at a
language model's pace; the step holds when every run completes with every event
once and in order, no client is cut or fails to connect, and the p99 of the
per-event delivery latency (receipt time against the envelope's ``ts``) is
within the bound, so is the p99 of each chunk's delivery against its due time on
the model's clock (chunk ``i`` is due ``i`` pauses after chunk 0's ``ts``: the
``load`` agent keeps that clock, :class:`agents.load.Pacer`), and the runs kept
their pace: the p99 of the runs' durations (message sent to ``agent_completed``)
within ``pace_slack`` times what the answer's own delays add up to.  (The bound
from ``ts`` alone does not see a server that is saturated: the agents run in its
loop, so their timers fire late and their events go out late but with a late
``ts``; the due time sees it.)  The ramp raises ``n`` step by
step, each on a fresh server, until a step does not hold; the capacity is the
largest ``n`` that held.

Connect latency (TCP connect to ``connection_ready``) and connect timeouts are
reported beside it: at the capacity figure new users must still get in.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from scripts.kit.launcher import Process
from scripts.kit.scenarios import Conn, close_all, open_conn, run_handler
from scripts.kit.stats import Run, Stats, chunk_delay_s, expected_events, load_spec
from scripts.kit.tokens import TokenCache
from scripts.kit.ws import HandshakeError

#: One answer at a model's pace: 400 chunks of 6 characters 20 ms apart (8 s, 50 chunks/s),
#: two thinking events and a 50 ms tool call.
MODEL_PACE: Final = "chunks=400 chunk_chars=6 delay_ms=20 thinking=2 tools=1 tool_ms=50"
P99_BOUND_MS: Final = 50.0
#: How much longer than its own delays a run may take and still be at the model's pace.
PACE_SLACK: Final = 1.25


def nominal_ms(content: str) -> float | None:
    """What the load agent's delays in ``content`` add up to, in ms (None: not a load spec)."""
    spec = load_spec("load", content)
    if spec is None:
        return None
    # The pauses come between the chunks: one fewer than the chunks.
    return float(max(spec.chunks - 1, 0) * spec.delay_ms + spec.tools * spec.tool_ms)


@dataclass(frozen=True)
class StepConfig:
    content: str = MODEL_PACE
    ramp_s: float = 10.0
    connect_timeout_s: float = 10.0
    run_timeout_s: float = 60.0
    p99_bound_ms: float = P99_BOUND_MS
    pace_slack: float = PACE_SLACK


async def capacity_step(
    kind: str,
    port: int,
    servers: Sequence[Process],
    n: int,
    cfg: StepConfig,
    tokens: TokenCache,
) -> dict[str, Any]:
    """``n`` clients ramped over ``cfg.ramp_s`` against ``kind`` on ``port``: what held."""
    loop = asyncio.get_running_loop()
    stats = Stats(expected_events("load", cfg.content), chunk_delay_s("load", cfg.content))
    connect_failures: dict[str, int] = {}
    conns: list[Conn] = []
    began = time.perf_counter()
    cpu0 = [s.cpu_s() for s in servers]
    client0 = time.process_time()

    async def client(i: int) -> None:
        await asyncio.sleep(cfg.ramp_s * i / max(n, 1))
        t0 = time.perf_counter()
        try:
            conn = await open_conn(kind, port, tokens(f"cap-{i:05d}"), cfg.connect_timeout_s)
        except (OSError, TimeoutError, HandshakeError, ConnectionError) as exc:
            key = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
            connect_failures[key] = connect_failures.get(key, 0) + 1
            return
        stats.connect_ms.add((time.perf_counter() - t0) * 1000)
        stats.clients_connected += 1
        conns.append(conn)
        run = Run(f"c{i}", loop.create_future())
        conn.run = run
        conn.handler = run_handler(stats, run)
        stats.sent(run, time.time())
        conn.send("user_message", id=run.ref, content=cfg.content, agent="load")
        assert run.done is not None
        try:
            status = await asyncio.wait_for(asyncio.shield(run.done), cfg.run_timeout_s)
        except TimeoutError:
            status = "run timed out"
        if run.status is None:  # cut before its ending, or timed out
            stats.errors[status] += 1
            stats.end(run, status, time.time())

    await asyncio.gather(*(client(i) for i in range(n)))
    wall_s = time.perf_counter() - began
    cpu_s = [s.cpu_s() - c for s, c in zip(servers, cpu0, strict=True)]
    client_s = time.process_time() - client0
    await close_all(conns)
    report = stats.report()
    latency = report["event_latency_ms"]
    due = report["chunk_due_latency_ms"]
    connect = report["connect_ms"]
    p99 = latency.get("p99") if latency else None
    due_p99 = due.get("p99") if due else None
    on_time = due_p99 is None or due_p99 <= cfg.p99_bound_ms
    durations = report["agent_completed_ms"] or {}
    nominal = nominal_ms(cfg.content)
    run_p99 = durations.get("p99")
    pace = None if not nominal or run_p99 is None else round(run_p99 / nominal, 3)
    at_pace = pace is None or pace <= cfg.pace_slack
    held = (
        not connect_failures
        and report["ok"]
        and p99 is not None
        and p99 <= cfg.p99_bound_ms
        and on_time
        and at_pace
    )
    return {
        "streams": n,
        "held": held,
        "run_ms": durations,
        "nominal_run_ms": nominal,
        "pace": pace,
        "event_latency_ms": latency,
        "chunk_due_latency_ms": due,
        "connect_ms": connect,
        "connect_failures": connect_failures,
        "runs_completed": report["runs"]["completed"],
        "errors": report["errors"],
        "seq": report["seq"],
        "events": report["events"]["total"],
        "server_cpu_share": [round(c / wall_s, 3) for c in cpu_s],
        "client_cpu_share": round(client_s / wall_s, 3),
        "loadavg_1m": os.getloadavg()[0],
        "wall_s": round(wall_s, 2),
    }


async def ramp(
    name: str,
    start: Callable[[], contextlib.AbstractAsyncContextManager[tuple[str, int, list[Process]]]],
    steps: Sequence[int],
    cfg: StepConfig,
    tokens: TokenCache,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Each step on a fresh server from ``start()`` until one does not hold."""
    results: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    for n in steps:
        async with start() as (kind, port, servers):
            step = await capacity_step(kind, port, servers, n, cfg, tokens)
        results.append(step)
        lat, con = step["event_latency_ms"] or {}, step["connect_ms"] or {}
        log(
            f"  {name:<16} {n:>5} streams: {'held' if step['held'] else 'NOT held':<8} "
            f"latency p99 {lat.get('p99')} ms, "
            f"chunk due p99 {(step['chunk_due_latency_ms'] or {}).get('p99')} ms, "
            f"connect p99 {con.get('p99')} ms, "
            f"run p99 / its delays {step['pace']}, "
            f"connect failures {step['connect_failures'] or 0}, errors {step['errors'] or 0}, "
            f"cpu server {step['server_cpu_share']} client {step['client_cpu_share']}, "
            f"load {step['loadavg_1m']}"
        )
        if not step["held"]:
            break
        best = step
    return {
        "capacity_streams": None if best is None else best["streams"],
        "at_capacity": best,
        "first_not_held": results[-1] if results and not results[-1]["held"] else None,
        "steps": results,
    }

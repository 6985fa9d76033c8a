"""No message to a built-in agent stalls the event loop: the worst inputs found for the
demo agent and its tools are sent to a real gateway process while another user's
connection pings it.

The ping delays are measured, printed and written to ``var/figures/cpu_safety.json``;
they are reported, not asserted (the machine is shared).  What is asserted is that
every run ends as it should.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

from tests.support import check_run_invariants, spawn_server, ws_client
from tests.test_faults import record_figures

#: The worst inputs: each took seconds of the event loop before (measured on the test
#: machine: the time-zone lookup 5 s, the parenthesis trimming 1.2 s, the expression
#: search about 30 s for each of the runs of "(", "+" and "-(").
WORST: dict[str, tuple[str, str]] = {
    "zone_prefixes": ("what time is it in " + "Ab " * 21000, "UTC"),
    "closing_parens": ("1+1" + ")" * 64000, "1+1 = 2."),
    "opening_parens": ("(" * 64000, "demo agent"),
    "plus_signs": ("+" * 64000, "demo agent"),
    "signs_and_parens": ("-(" * 32000, "demo agent"),
    "many_places": ("what time is it " + "in Ab " * 10500, "UTC"),
    "huge_power": ("What is 9 ** 9 ** 9?", "too large"),
    "huge_product": ("What is " + " * ".join(["2 ** 4000"] * 20) + "?", "too large"),
    "big_exact_result": ("What is 2 ** 100?", "1267650600228229401496703205376"),
}

#: Each worst input is sent this often (within the per-minute limit of runs).
ROUNDS = 3


async def ping_loop(client: Any, delays: list[float], stop: asyncio.Event) -> None:
    """Ping every 20 ms and record how long each pong took."""
    n = 0
    while not stop.is_set():
        n += 1
        sent = time.perf_counter()
        await client.send(type="ping", id=f"p{n}")
        while True:
            message = await client.recv(timeout=120)
            if message["type"] == "pong" and message["data"]["ref"] == f"p{n}":
                break
        delays.append(time.perf_counter() - sent)
        await asyncio.sleep(0.02)


def summary(delays: list[float]) -> dict[str, Any]:
    ms = sorted(d * 1000 for d in delays)
    return {
        "pings": len(ms),
        "median_ms": round(statistics.median(ms), 2) if ms else None,
        "p99_ms": round(ms[int(len(ms) * 0.99)], 2) if ms else None,
        "max_ms": round(ms[-1], 2) if ms else None,
    }


async def test_worst_inputs_to_the_demo_agent_leave_another_users_pings_answered(
    tmp_path: Path,
) -> None:
    with spawn_server(tmp_path, CHAT_DB_URL="sqlite:///:memory:") as srv:
        async with ws_client(srv, "bystander") as bystander, ws_client(srv, "attacker") as bad:
            baseline: list[float] = []
            stop = asyncio.Event()
            pinger = asyncio.create_task(ping_loop(bystander, baseline, stop))
            await asyncio.sleep(1.0)
            stop.set()
            await pinger

            during: list[float] = []
            stop = asyncio.Event()
            pinger = asyncio.create_task(ping_loop(bystander, during, stop))
            runs: dict[str, list[float]] = {name: [] for name in WORST}
            try:
                for name, (message, expected) in list(WORST.items()) * ROUNDS:
                    assert len(message.encode()) < srv.settings.max_message_bytes - 100, name
                    began = time.perf_counter()
                    events = await bad.run(message, agent="demo")
                    runs[name].append(round((time.perf_counter() - began) * 1000, 2))
                    check_run_invariants(events)
                    assert events[-1]["data"]["status"] == "completed", (name, events[-1])
                    content = events[-2]["data"]["content"]
                    assert expected in content, (name, content[:200])
            finally:
                stop.set()
                await pinger
    figures = {
        "baseline": summary(baseline),
        "during_worst_inputs": summary(during),
        "rounds": ROUNDS,
        "run_ms": runs,
    }
    record_figures("cpu_safety", figures)
    assert during, "no ping was answered while the worst inputs ran"

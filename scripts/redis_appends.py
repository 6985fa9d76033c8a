"""What the Redis broker's appends cost per event, in one process, at a model's pace.

    python scripts/redis_appends.py [--runs 500] [--events 100] [--src DIR] [--json]

Starts a redis-server of its own and the Redis broker in this process (no gateway,
no clients: what is measured is the broker's append path alone, from ``publish``
to the local watcher's wake-up once Redis holds the event).  ``--runs`` runs, each
with one local watcher, publish one ``response_chunk`` each every 20 ms (a model's
pace), their starts spread over 1 ms ticks, ``--events`` events each, with the
collector set as a serving process sets it.  Reports this
process's CPU time over those events, per event, and the wake-ups they took (one per
run's write).  ``--src`` imports the broker from another checkout, for a before and
after in one run.  Every wait is bounded; all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TICK_S = 0.001
TICKS_PER_EVENT = 20  # one event of each run every 20 ms


class Controller:
    """The side of a run the broker calls back: nothing to do here."""

    def lost(self) -> None:
        pass

    def answer(self, chars: int) -> str:
        return ""

    def watchers_changed(self, count: int) -> None:
        pass

    async def apply(self, action: str) -> str:
        return "running"

    async def respond(self, request_id: str, payload: Any) -> str:
        return "running"


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(url: str, runs: int, events: int) -> dict[str, Any]:
    import bridge
    from bridge.broker import RunRecord
    from bridge.events import make_event
    from bridge.redis import RedisBroker

    broker = RedisBroker(url, run_log_max_bytes=32 << 20, resume_window_s=60, append_window_s=0.001)
    await broker.start()
    wakes = 0

    def wake() -> None:
        nonlocal wakes
        wakes += 1

    ids = [f"r_{i:06d}" for i in range(runs)]
    now = time.time()
    for run_id in ids:
        record = RunRecord(run_id, f"t_{run_id}", "load", "load", "running", now, now)
        await broker.create_run(record, Controller())
        await broker.watch(run_id, 0, wake)
    chunks = [
        [
            make_event(
                "response_chunk",
                {"text": "hello ", "index": k},
                run_id=run_id,
                thread_id=f"t_{run_id}",
                seq=k + 1,
            )
            for run_id in ids
        ]
        for k in range(events)
    ]
    await asyncio.sleep(0.2)
    # The collector as a serving process sets it (server/serve.py:tune_gc).
    gc.set_threshold(50_000, *gc.get_threshold()[1:])
    gc.freeze()
    wakes = 0
    began_cpu, began = cpu_s(), time.monotonic()
    for k in range(events):
        for tick in range(TICKS_PER_EVENT):
            for event in chunks[k][tick::TICKS_PER_EVENT]:
                await broker.publish(event)
            await asyncio.sleep(TICK_S)
    for run_id in ids:
        owned = broker.core.owned.get(run_id)
        if owned is not None:
            await asyncio.wait_for(broker.appender.drain(owned), 30)
    cpu, wall = cpu_s() - began_cpu, time.monotonic() - began
    last_seqs = [
        await broker.core.r.hget(broker.core.k("run", run_id), "last_seq") for run_id in ids
    ]
    await broker.close()
    total = runs * events
    return {
        "src": str(Path(bridge.__file__).parent.parent),
        "runs": runs,
        "events": total,
        "cpu_us_per_event": round(cpu / total * 1e6, 2),
        "cpu_share": round(cpu / wall, 3),
        "wall_s": round(wall, 2),
        "writes": wakes,
        "events_per_write": round(total / max(wakes, 1), 2),
        "every_event_in_redis": all(int(seq or 0) == events for seq in last_seqs),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--events", type=int, default=100, help="events of each run")
    parser.add_argument("--src", type=Path, default=None, help="the checkout to import from")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from scripts.kit.launcher import redis_server

    if args.src is not None:
        sys.path.insert(0, str(args.src.resolve()))
    with redis_server() as url:
        result = asyncio.run(measure(url, args.runs, args.events))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{result['events']:,} events of {result['runs']} runs: "
            f"{result['cpu_us_per_event']} us of CPU per event, "
            f"{result['events_per_write']} events per write, "
            f"every event in Redis: {result['every_event_in_redis']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

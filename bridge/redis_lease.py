"""Leases, the reaper and fencing, for the Redis broker.

A process renews its lease every ``lease_s / 3``; when one lapses, any other
process claims the dead process, marks it ``fenced``, fails its runs with
``node_lost`` (the ending built from what the appends recorded, not from the
trimmed stream) and drops its share of every run's watcher count.  Every write of
a run by its process is fenced (:data:`~bridge.redis_scripts.FENCED_WRITES`): a
process reaped while alive finds out at its next append or renewal, stops its runs
and joins again under a new name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import Final

from redis.exceptions import RedisError

from bridge import redis_scripts as lua
from bridge.broker import RunRecord
from bridge.errors import BrokerUnavailable
from bridge.events import Event, make_event
from bridge.redis_core import Owned, RedisCore, pairs, seq_id, text
from bridge.redis_registry import record_fields
from bridge.runstate import RunState
from bridge.wire import RunStatus

log = logging.getLogger("chat.redis")

NODE_LOST_APOLOGY: Final = "Sorry, the server working on this answer stopped. Please try again."
#: How long a reaped process's fence mark is kept (it names a process that is gone).
FENCE_KEEP_S: Final = 86_400


def ending(
    record: RunRecord, state: RunState, *, code: str, message: str, apology: str
) -> list[Event]:
    """The events that end a run its agent cannot end, after ``state``'s last ``seq``
    (see :meth:`RunState.lost`)."""
    closing = state.lost(
        code=code,
        message=message,
        apology=apology,
        message_id=f"m_{secrets.token_urlsafe(12)}",
        duration_ms=(time.time() - record.created_at) * 1000,
    )
    run_id, thread, seq = record.run_id, record.thread_id, state.seq
    events: list[Event] = []
    for item in closing:
        seq += 1
        events.append(make_event(item.type, item.data(), run_id=run_id, thread_id=thread, seq=seq))
    return events


class RedisLease:
    def __init__(self, core: RedisCore) -> None:
        self.core = core
        self._rejoining: asyncio.Task[None] | None = None

    async def renew(self) -> bool:
        """Renew this process's lease; False when it was reaped (fenced) meanwhile."""
        c = self.core
        keys = [c.k("node", c.node), c.k("fenced", c.node), c.k("nodes")]
        args = [str(time.time()), int(c.lease_s * 1000), c.node]
        return bool(await c.script("RENEW_LEASE", keys, args))

    async def keep(self) -> None:
        c = self.core
        while True:
            await asyncio.sleep(c.lease_s / 3)
            try:
                renewed = await self.renew()
                c.reachable = True
            except (RedisError, OSError) as exc:
                c.reachable = False
                c.counts["lease_renewal_failures"] += 1
                log.warning("renewing the lease failed: %r", exc)
                continue
            c.counts["lease_renewals"] += 1
            if not renewed:
                log.error("process %s was reaped while alive (its lease lapsed)", c.node)
                self.fenced_out()

    # Being reaped while alive -------------------------------------------------------

    def lose(self, owned: Owned) -> None:
        """Stop a run this process may no longer write: its ending is written elsewhere
        (or by the appender's ``give_up``); local watchers then read it from the stream."""
        c = self.core
        run_id = owned.record.run_id
        if c.owned.get(run_id) is owned:
            del c.owned[run_id]
        owned.pending.clear()
        if owned.failure is None:
            owned.failure = BrokerUnavailable(f"this process no longer executes run {run_id}")
        owned.controller.lost()
        c.forget_mirror(run_id)
        c.mirrors_changed.set()

    def fenced_out(self) -> None:
        """This process was (or may have been) reaped: check, and join again if so."""
        self.core.counts["fence_refusals"] += 1
        if self._rejoining is None or self._rejoining.done():
            task = asyncio.get_running_loop().create_task(self._rejoin(), name="redis rejoin")
            self._rejoining = task

    async def cancel_rejoin(self) -> None:
        task, self._rejoining = self._rejoining, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _rejoin(self) -> None:
        c = self.core
        old = c.node
        while True:
            try:
                if not await c.r.exists(c.k("fenced", old)):
                    return  # not reaped: a run's record names another process, that is all
                break
            except (RedisError, OSError) as exc:
                log.warning("checking this process's fence failed: %r", exc)
                await asyncio.sleep(0.5)
        c.counts["fenced"] += 1
        for owned in list(c.owned.values()):
            self.lose(owned)
            # Normally the reaper's; written here if no reaper did yet (written once).
            with contextlib.suppress(RedisError, OSError):
                await self.fail_lost_run(owned.record.run_id, old)
        c.epoch += 1
        c.node = f"{c.base_node}~{c.epoch}"
        while True:
            try:
                await self.renew()
                await c.pubsub.subscribe(c.k("bus", c.node))
                with contextlib.suppress(RedisError, OSError):
                    await c.pubsub.unsubscribe(c.k("bus", old))
                if c.conns:
                    await c.r.hset(c.k("conns", c.node), mapping=dict(c.conns))
                break
            except (RedisError, OSError) as exc:
                log.warning("joining Redis again failed: %r; retrying", exc)
                await asyncio.sleep(0.5)
        for run_id, mirror in list(c.mirrors.items()):
            if mirror.watchers:
                await c.watches.watchers_changed(run_id, None)
        log.warning("process %s joined again as %s", old, c.node)

    # Lost processes ----------------------------------------------------------------------

    async def janitor(self) -> None:
        c = self.core
        while True:
            await asyncio.sleep(c.lease_s / 4 + secrets.randbelow(100) / 1000)
            try:
                await self.reap_lost_nodes()
            except (RedisError, OSError) as exc:
                log.warning("looking for lost processes failed: %r", exc)
            except Exception:
                log.exception("looking for lost processes failed")

    async def reap_lost_nodes(self) -> int:
        """Fail the runs of every process whose lease lapsed; how many runs.

        The lost process is fenced first, so that nothing it still appends (were it
        alive after all) lands after the endings written here.  Its share of each
        run's watcher count goes with it, so the detach grace of runs it was the
        last to watch starts.
        """
        c = self.core
        nodes = [text(n) for n in await c.r.smembers(c.k("nodes"))]
        reaped = 0
        for node in nodes:
            if node == c.node:
                continue
            keys = [c.k("node", node), c.k("fenced", node), c.k("reaping", node)]
            if not await c.script("CLAIM_LOST_NODE", keys, [c.node, FENCE_KEEP_S]):
                continue  # alive, or another process reaps it
            runs = await c.r.smembers(c.k("runs", node))
            for raw in runs:
                if await self.fail_lost_run(text(raw), node):
                    reaped += 1
            await c.watches.drop_watchers(node)
            pipe = c.r.pipeline(transaction=False)
            pipe.delete(
                c.k("runs", node),
                c.k("conns", node),
                c.k("watching", node),
                c.k("reaping", node),
            )
            pipe.srem(c.k("nodes"), node)
            await pipe.execute()
            c.counts["nodes_reaped"] += 1
            log.warning("process %s lost its lease; %d of its runs failed", node, len(runs))
        return reaped

    async def fail_lost_run(
        self,
        run_id: str,
        node: str,
        *,
        code: str = "node_lost",
        message: str = "the process running the run was lost",
        apology: str = NODE_LOST_APOLOGY,
    ) -> bool:
        """End a run of the lost process ``node`` with ``node_lost``, unless it ended.

        The ending is built from what the run's appends recorded (open tool calls,
        the answer so far), not from its stream, which may be trimmed.
        """
        c = self.core
        record = await c.registry.get_run(run_id)
        if record is None or record.ended or record.extra.get("node") != node:
            return False
        pipe = c.r.pipeline(transaction=False)
        pipe.hgetall(c.k("calls", run_id))
        pipe.get(c.k("answer", run_id))
        pipe.hmget(c.k("run", run_id), "chunks", "responded")
        calls, answer, (chunk_count, responded) = await pipe.execute()
        state = RunState.resumed(
            seq=record.last_seq,
            open_calls={k.decode(): v.decode() for k, v in calls.items()},
            chunks=int(chunk_count or 0),
            responded=bool(responded),
            content=answer.decode() if answer else "",
        )
        closing = ending(record, state, code=code, message=message, apology=apology)
        if not await self.write_ending(record, closing, node):
            return False
        if c.on_run_lost is not None:
            with contextlib.suppress(Exception):
                await c.on_run_lost(record)
        return True

    async def write_ending(
        self, record: RunRecord, closing: list[Event], node: str, *, recreate: bool = False
    ) -> bool:
        """Append the ending of a run that ``node`` executed and record it failed, once:
        False when the run ended or moved on meanwhile.  ``record`` is updated.

        With ``recreate``, a run whose record Redis lost (restarted empty) is written
        again, with its ending only."""
        c = self.core
        run_id = record.run_id
        log_key, run_key = c.k("log", run_id), c.k("run", run_id)
        last = closing[-1]
        code = last.data["error"]["code"]
        commands: list[lua.Command] = [
            ["XADD", log_key, seq_id(event.seq or 0), "e", event.text] for event in closing
        ]
        now = time.time()
        fields = {
            **record_fields(record, ""),
            "status": RunStatus.FAILED.value,
            "error_code": code,
            "last_seq": last.seq or 0,
            "updated_at": now,
        }
        fields.pop("first_seq")
        commands.append(["HSET", run_key, *pairs(fields)])
        if recreate:
            commands.append(["HSETNX", run_key, "first_seq", closing[0].seq or 1])
        commands.append(["SREM", c.k("active", record.owner), run_id])
        commands.append(["SREM", c.k("runs", node), run_id])
        expire = max(1, int(c.window_s))
        for key in (
            log_key,
            run_key,
            c.k("watchers", run_id),
            c.k("answer", run_id),
            c.k("calls", run_id),
        ):
            commands.append(["EXPIRE", key, expire])
        args = [node, record.last_seq, int(recreate), *lua.flatten(commands)]
        if not await c.script("END_LOST_RUN", [run_key], args):
            return False
        record.status, record.error_code, record.last_seq = (
            RunStatus.FAILED.value,
            code,
            last.seq or 0,
        )
        record.updated_at = now
        return True

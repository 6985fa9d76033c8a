"""The Redis broker's registry: run records, the sets of live runs, per-user limits.

A run's record is the hash ``run:{id}``; ``active:{user}`` holds a user's runs not
yet ended and ``runs:{node}`` the runs each process executes.  Limits are checked
and counted in one script each, over every process sharing the Redis.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from typing import Any, Final

from bridge import bus
from bridge import redis_scripts as lua
from bridge.broker import RunAnnounced, RunController, RunQuota, RunRecord, ThreadFollow
from bridge.errors import BrokerUnavailable, RunConflict
from bridge.log import RunLog
from bridge.redis_core import Mirror, Owned, RedisCore, pairs, text
from bridge.wire import RESPOND, Action, RunStatus, is_terminal

log = logging.getLogger("chat.redis")

#: How long a reserved run start counts, at most, if its process never releases it.
RESERVATION_HOLD_S: Final = 30.0


def record_fields(record: RunRecord, node: str) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "thread_id": record.thread_id,
        "owner": record.owner,
        "agent": record.agent,
        "status": record.status,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "last_seq": record.last_seq,
        "error_code": record.error_code or "",
        "first_seq": 1,
        "node": node,
    }
    traceparent = record.extra.get("traceparent")
    if traceparent:
        # The run's trace context (traces on): commands from other processes join it.
        fields["traceparent"] = str(traceparent)
    return fields


def record_from(run_id: str, raw: dict[bytes, bytes]) -> RunRecord:
    f = {k.decode(): v.decode() for k, v in raw.items()}
    return RunRecord(
        run_id,
        f.get("thread_id", ""),
        f.get("owner", ""),
        f.get("agent", ""),
        f.get("status", RunStatus.QUEUED.value),
        float(f.get("created_at", 0)),
        float(f.get("updated_at", 0)),
        int(f.get("last_seq", 0)),
        f.get("error_code") or None,
        _extra_of(f),
    )


def _extra_of(f: dict[str, str]) -> dict[str, object]:
    extra: dict[str, object] = {"node": f.get("node", ""), "first_seq": int(f.get("first_seq", 1))}
    if f.get("traceparent"):
        extra["traceparent"] = f["traceparent"]
    return extra


def ended_answer(record: RunRecord, action: str) -> str:
    """The answer for a run no process executes any more (the lifecycle's, for its end)."""
    if record.status == RunStatus.CANCELLED and action == Action.CANCEL:
        return record.status
    if action == RESPOND:
        raise RunConflict(f"run {record.run_id} has ended: its requests are resolved")
    raise RunConflict(f"cannot {action} run {record.run_id}: it is {record.status}")


class RedisRegistry:
    def __init__(self, core: RedisCore) -> None:
        self.core = core

    async def create_run(self, record: RunRecord, controller: RunController) -> None:
        c = self.core
        run_key = c.k("run", record.run_id)
        fields = record_fields(record, c.node)
        commands: list[lua.Command] = [
            ["HSET", run_key, *pairs(fields)],
            ["SADD", c.k("runs", c.node), record.run_id],
            ["SADD", c.k("active", record.owner), record.run_id],
            ["ZADD", c.k("thread", record.thread_id), record.created_at, record.run_id],
        ]
        if not await c.call("create run", c.fenced_write(record.run_id, commands)):
            c.lease.fenced_out()
            raise BrokerUnavailable("this process is joining Redis again; try again shortly")
        c.owned[record.run_id] = Owned(record, controller)
        # This process has every event of the run: its watchers here read them from
        # its own copy, from the first, never from the stream (once Redis holds them).
        c.mirrors.setdefault(record.run_id, Mirror(RunLog(record.run_id, c.max_bytes)))
        # Followers of the thread, on every process (this one included), watch it now.
        announced = bus.encode(bus.run_created(record.thread_id, record.run_id))
        with contextlib.suppress(BrokerUnavailable):
            await c.call("announce run", c.r.publish(c.k("threads"), announced))

    async def get_run(self, run_id: str) -> RunRecord | None:
        c = self.core
        raw = await c.call("get run", c.r.hgetall(c.k("run", run_id)))
        return record_from(run_id, raw) if raw else None

    async def set_status(self, run_id: str, status: str, error_code: str | None = None) -> None:
        c = self.core
        fields: dict[str, Any] = {"status": status, "updated_at": time.time()}
        if error_code is not None:
            fields["error_code"] = error_code
        owned = c.owned.get(run_id)
        ended = is_terminal(status)
        if owned is None and ended:
            # Its agent_completed was appended with the status, in one step: nothing
            # is left to write (and a Redis that just restarted cannot fail it).
            return
        commands: list[lua.Command] = [["HSET", c.k("run", run_id), *pairs(fields)]]
        if ended and owned is not None:
            commands.append(["SREM", c.k("active", owned.record.owner), run_id])
            commands.append(["ZREM", c.k("thread", owned.record.thread_id), run_id])
            commands.append(["SREM", c.k("runs", c.node), run_id])
        if not await c.call("set status", c.fenced_write(run_id, commands)):
            # Reaped: the run's ending is another process's; this one stops it.
            if owned is not None:
                c.lease.lose(owned)
            c.lease.fenced_out()

    # Threads ------------------------------------------------------------------------

    async def thread_runs(self, thread_id: str) -> list[str]:
        c = self.core
        key = c.k("thread", thread_id)
        raw = await c.call("thread runs", c.r.zrange(key, 0, -1))
        going: list[str] = []
        for item in raw:
            run_id = item.decode() if isinstance(item, bytes) else str(item)
            record = await self.get_run(run_id)
            if record is None or record.ended:
                # Ended without this set knowing (its process was lost): forget it here.
                await c.call("thread runs", c.r.zrem(key, run_id))
                continue
            going.append(run_id)
        return going

    def follow_thread(self, thread_id: str, announce: RunAnnounced) -> ThreadFollow:
        return self.core.followers.follow(thread_id, announce)

    # Idempotency keys -----------------------------------------------------------------

    async def claim_key(self, user: str, key: str, value: str, ttl_s: float) -> str | None:
        c = self.core
        name = c.k("idem", user, key)
        ttl_ms = max(1, int(ttl_s * 1000))
        for _ in range(3):
            claimed = await c.call("claim key", c.r.set(name, value, nx=True, px=ttl_ms))
            if claimed:
                return None
            held = await c.call("claim key", c.r.get(name))
            if held is not None:
                return held.decode() if isinstance(held, bytes) else str(held)
            # Released or expired between the two calls: claim it again.
        raise BrokerUnavailable(f"the key {key[:32]!r} changed hands too often; try again")

    async def release_key(self, user: str, key: str, value: str) -> None:
        c = self.core
        with contextlib.suppress(BrokerUnavailable):  # the claim lapses by itself
            await c.call("release key", c.script("RELEASE_KEY", [c.k("idem", user, key)], [value]))

    async def active_runs(self, owner: str) -> int:
        c = self.core
        return int(await c.call("active runs", c.r.scard(c.k("active", owner))))

    async def live_runs(self) -> list[tuple[RunRecord, int, str]]:
        """Every run not ended on any process, with its watchers over every process
        and the process that executes it (the operator's view)."""
        c = self.core
        r = c.r
        nodes = sorted(text(n) for n in await c.call("live runs", r.smembers(c.k("nodes"))))
        pipe = r.pipeline(transaction=False)
        for node in nodes:
            pipe.smembers(c.k("runs", node))
        sets = await c.call("live runs", pipe.execute())
        run_ids = sorted({text(run_id) for ids in sets for run_id in ids})
        pipe = r.pipeline(transaction=False)
        for run_id in run_ids:
            pipe.hgetall(c.k("run", run_id))
            pipe.hvals(c.k("watchers", run_id))
        replies = await c.call("live runs", pipe.execute())
        out: list[tuple[RunRecord, int, str]] = []
        for i, run_id in enumerate(run_ids):
            raw, counts = replies[2 * i], replies[2 * i + 1]
            if not raw:
                continue  # ended and expired meanwhile
            record = record_from(run_id, raw)
            if record.ended:
                continue
            watchers = sum(max(int(n), 0) for n in counts)
            out.append((record, watchers, str(record.extra.get("node") or "")))
        return out

    # Per-user limits, shared by every process ----------------------------------------

    async def connection_opened(self, user: str, limit: int) -> bool:
        c = self.core
        counted = await c.call(
            "count connections",
            c.script("OPEN_CONNECTION", [c.k("nodes")], [c.p, c.node, user, limit]),
        )
        if not counted:
            return False
        c.conns[user] = c.conns.get(user, 0) + 1
        return True

    async def connection_closed(self, user: str) -> None:
        c = self.core
        left_here = c.conns.get(user, 0) - 1
        if left_here > 0:
            c.conns[user] = left_here
        else:
            c.conns.pop(user, None)
        with contextlib.suppress(BrokerUnavailable):
            left = await c.call("count connections", c.r.hincrby(c.k("conns", c.node), user, -1))
            if int(left) <= 0:
                await c.call("count connections", c.r.hdel(c.k("conns", c.node), user))

    async def reserve_run(
        self, user: str, *, max_active: int, per_window: int, window_s: float
    ) -> RunQuota:
        c = self.core
        token = f"{c.node}/{secrets.token_hex(6)}"
        keys = [c.k("active", user), c.k("starting", user), c.k("rate", user)]
        now = time.time()
        args = [now, window_s, max_active, per_window, token, RESERVATION_HOLD_S]
        answer = await c.call("run limits", c.script("RESERVE_RUN", keys, args))
        verdict = int(answer[0])
        if verdict == 0:
            return RunQuota(token)
        if verdict == 1:
            return RunQuota(None, active=int(answer[1]))
        oldest = float(answer[1])
        return RunQuota(None, wait_s=max(0.001, oldest + window_s - now))

    async def release_run(self, user: str, token: str, *, started: bool) -> None:
        c = self.core
        pipe = c.r.pipeline(transaction=True)
        pipe.zrem(c.k("starting", user), token)
        if not started:
            pipe.zrem(c.k("rate", user), token)
        try:
            await c.call("run limits", pipe.execute())
        except BrokerUnavailable as exc:
            # The reservation lapses by itself after RESERVATION_HOLD_S.
            log.warning("releasing a run start of %s failed: %s", user, exc)

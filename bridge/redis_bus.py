"""The command bus between Redis broker processes: lifecycle commands sent to the
process that executes a run, their replies, and watcher counts (the typed messages
of :mod:`bridge.bus`, over one pub/sub channel per process, ``bus:{node}``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Mapping
from typing import Any, Final

from redis.exceptions import RedisError

from bridge import bus, tracing
from bridge.errors import BrokerUnavailable, RemoteCommandError, RunNotFound
from bridge.redis_core import RedisCore
from bridge.redis_registry import ended_answer
from bridge.wire import RESPOND, WireError

log = logging.getLogger("chat.redis")

COMMAND_TIMEOUT_S: Final = 10.0


class RedisBus:
    def __init__(self, core: RedisCore) -> None:
        self.core = core

    async def command(self, run_id: str, action: str) -> str:
        owned = self.core.owned.get(run_id)
        if owned is not None:
            return await owned.controller.apply(action)
        return await self._remote(run_id, action)

    async def respond(self, run_id: str, request_id: str, payload: Mapping[str, Any]) -> str:
        owned = self.core.owned.get(run_id)
        if owned is not None:
            return await owned.controller.respond(request_id, payload)
        return await self._remote(run_id, RESPOND, {**payload, "request_id": request_id})

    async def _remote(self, run_id: str, action: str, payload: dict[str, Any] | None = None) -> str:
        """Send a command to the process that executes the run, and wait for its answer."""
        c = self.core
        record = await c.registry.get_run(run_id)
        if record is None:
            raise RunNotFound(f"no run {run_id}")
        node = str(record.extra.get("node") or "")
        if record.ended or not node:
            # Nothing executes it any more: answer as the lifecycle would.
            return ended_answer(record, action)
        request_id = secrets.token_hex(8)
        future: asyncio.Future[bus.CommandReply] = asyncio.get_running_loop().create_future()
        c.replies[request_id] = future
        # In the run's trace (its context is in its record): the process running it
        # continues it from this span.
        carried = record.extra.get("traceparent")
        with tracing.command(
            f"chat.command {action}", run_id, action, carried if isinstance(carried, str) else None
        ) as span:
            span.set("chat.node", node)
            try:
                message = bus.command(
                    request_id, run_id, action, c.node, payload, tracing.current_traceparent()
                )
                await self.send(node, message)
                async with asyncio.timeout(COMMAND_TIMEOUT_S):
                    reply = await future
            except TimeoutError:
                raise BrokerUnavailable(f"the process running {run_id} did not answer") from None
            finally:
                c.replies.pop(request_id, None)
        if reply.error_code is not None:
            raise RemoteCommandError(reply.error_code, reply.error_message or "")
        return str(reply.status)

    async def send(self, node: str, message: bus.Message) -> None:
        c = self.core
        await c.call("publish", c.r.publish(c.k("bus", node), bus.encode(message)))

    async def listen(self) -> None:
        c = self.core
        while True:
            try:
                message = await c.pubsub.get_message(timeout=1.0)
            except (RedisError, OSError) as exc:
                c.reachable = False
                log.warning("the command bus failed: %r; resubscribing", exc)
                await asyncio.sleep(0.5)
                with contextlib.suppress(Exception):
                    await c.pubsub.subscribe(*c.channels())
                continue
            if message is None:
                continue
            body = bus.decode(message["data"])
            if body is None:
                continue
            c.spawn(self._on_message(body))

    async def _on_message(self, body: bus.Message) -> None:
        c = self.core
        if isinstance(body, bus.RunCreated):
            c.followers.announce(body.thread_id, body.run_id)
        elif isinstance(body, bus.CommandReply):
            future = c.replies.get(body.id)
            if future is not None and not future.done():
                future.set_result(body)
        elif isinstance(body, bus.CommandRequest):
            owned = c.owned.get(body.run_id)
            answer: bus.CommandReply
            with tracing.command(
                f"chat.command.apply {body.action}", body.run_id, body.action, body.traceparent
            ) as span:
                span.set("chat.command.from", body.reply_to)
                try:
                    if owned is None:
                        record = await c.registry.get_run(body.run_id)
                        if record is None:
                            raise RunNotFound(f"no run {body.run_id}")
                        answer = bus.reply(body.id, ended_answer(record, body.action))
                    elif body.action == RESPOND:
                        payload = dict(body.payload or {})
                        request_id = str(payload.pop("request_id", ""))
                        status = await owned.controller.respond(request_id, payload)
                        answer = bus.reply(body.id, status)
                    else:
                        answer = bus.reply(body.id, await owned.controller.apply(body.action))
                except Exception as exc:
                    code = exc.code if isinstance(exc, WireError) else "internal"
                    answer = bus.failed(body.id, code, str(exc))
                    span.failed(code)
            with contextlib.suppress(BrokerUnavailable):
                await self.send(body.reply_to, answer)
        else:
            owned = c.owned.get(body.run_id)
            if owned is not None:
                owned.controller.watchers_changed(body.count)

"""The bridge between an agent and its run, and the adapter agents emit through.

:class:`RunBridge` is the one writer of a run's events: it numbers them (``seq``
from 1, no gaps), holds them while the run is paused, keeps the bookkeeping the
run's invariants need (open tool calls, response chunks) and publishes each event
to the broker, which keeps it for resume and wakes the watchers.

:class:`EventAdapter` is the face an agent sees.  It fails hard: emitting with no
run bound raises :class:`BridgeNotAttached`; emitting into a run that was cancelled
(its clients gone for good, a cancel, a shutdown) raises the reason.  An event is
either published, or its emitter gets an exception.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from bridge.broker import Broker
from bridge.errors import AnswerTooLarge, BridgeError, BridgeNotAttached, InvariantBroken, RunClosed
from bridge.events import THINKING_KINDS, Event, RunEventType, ThinkingKind, make_event
from bridge.runstate import RunState

#: Give the event loop a turn after this many events of one run, so that a fast
#: agent cannot starve the writers; yielding on every event costs throughput.
YIELD_EVERY: Final = 32


class RunBridge:
    """Numbers, gates and publishes the events of one run."""

    def __init__(
        self,
        broker: Broker,
        run_id: str,
        thread_id: str,
        *,
        max_answer_bytes: int | None = None,
    ) -> None:
        self.broker = broker
        self.run_id = run_id
        self.thread_id = thread_id
        #: Set while the run may emit; cleared while it is paused.
        self.gate = asyncio.Event()
        self.gate.set()
        #: The run's events so far, as its invariants see them.
        self.state = RunState()
        #: When each open call was announced (``time.perf_counter()``).
        self.call_started: dict[str, float] = {}
        #: The most ``answer_bytes`` the agent's chunks may reach (None: no bound).
        self.max_answer_bytes = max_answer_bytes
        #: Set when the agent's answer reached its bound; the run then fails with it.
        self.limit_error: AnswerTooLarge | None = None
        #: Once set, every emit from the agent raises this error.
        self.agent_error: BridgeError | None = None
        #: When the agent's first event was published (``time.perf_counter()``), for
        #: the run's span: the first after ``user_message`` and ``agent_started``.
        self.first_event_at: float | None = None
        self._since_yield = 0
        self._publish_now: Callable[[Event], None] | None = getattr(broker, "publish_now", None)

    @property
    def seq(self) -> int:
        """``seq`` of the run's last event."""
        return self.state.seq

    @property
    def open_calls(self) -> dict[str, str]:
        """Tool calls announced and not yet answered: call id → tool name."""
        return self.state.open_calls

    @property
    def chunk_count(self) -> int:
        """Response chunks published so far (the next chunk's ``index``)."""
        return self.state.chunks

    @property
    def answer_bytes(self) -> int:
        """UTF-8 bytes of the answer so far."""
        return self.state.answer_bytes

    @property
    def completed(self) -> bool:
        """Whether the run's ``agent_completed`` was published."""
        return self.state.completed

    @property
    def content(self) -> str:
        """The response so far: every chunk's text in ``index`` order."""
        return self.state.content

    @property
    def ends_with_space(self) -> bool:
        """Whether the response so far is empty or ends with whitespace."""
        return self.state.ends_with_space

    async def emit(
        self, type: RunEventType, data: Mapping[str, Any], *, gated: bool = True
    ) -> Event:
        """Publish the run's next event.

        ``gated`` events wait while the run is paused; the events that end a
        cancelled run are not gated.

        Raises:
            RunClosed: the run already sent its ``agent_completed``.
            ValueError: the event would break the run's invariants.
        """
        if self.completed:
            raise RunClosed(f"run {self.run_id} has ended; {type} cannot follow agent_completed")
        while gated and not self.gate.is_set():
            await self.gate.wait()
        if self.completed:
            raise RunClosed(f"run {self.run_id} has ended; {type} cannot follow agent_completed")
        state = self.state
        data = state.check(type, data)
        seq = state.seq + 1
        # Encoded before anything is booked: an event that cannot be made (out of
        # memory) leaves no gap in seq and no chunk that was never sent.
        event = make_event(type, data, run_id=self.run_id, thread_id=self.thread_id, seq=seq)
        if type == "response_chunk":
            event.chunk = data["text"]
        state.apply(type, data)
        state.seq = seq
        if type == "tool_executing":
            self.call_started[data["call_id"]] = time.perf_counter()
        elif type == "tool_completed":
            self.call_started.pop(data["call_id"], None)
        if self.first_event_at is None and type not in _NOT_THE_AGENTS:
            self.first_event_at = time.perf_counter()
        if self._publish_now is not None:
            self._publish_now(event)  # a broker that never waits: no coroutine per event
        else:
            await self.broker.publish(event)
        self._since_yield += 1
        if self._since_yield >= YIELD_EVERY:
            self._since_yield = 0
            await asyncio.sleep(0)
        return event

    async def chunk(self, text: str) -> Event:
        """Publish a response chunk of the agent's answer: :meth:`emit`, inlined for the
        hottest event, and held to the answer's bound.

        Raises:
            AnswerTooLarge: the chunk would make the answer larger than
                ``max_answer_bytes``; it is not published, and every later emit of
                the agent raises the same error.
        """
        if not isinstance(text, str) or not text:
            raise InvariantBroken("a response chunk needs non-empty text")
        nbytes = _utf8_len(text)
        limit = self.max_answer_bytes
        state = self.state
        if limit is not None and state.answer_bytes + nbytes > limit:
            error = AnswerTooLarge(
                f"the answer would pass {limit} bytes, the most a run may answer"
            )
            self.limit_error = error
            if self.agent_error is None:
                self.agent_error = error
            raise error
        if self.completed or not self.gate.is_set() or self._publish_now is None:
            return await self.emit("response_chunk", {"text": text})
        seq = state.seq + 1
        event = make_event(
            "response_chunk",
            {"text": text, "index": state.chunks},
            run_id=self.run_id,
            thread_id=self.thread_id,
            seq=seq,
        )
        event.chunk = text
        state.add_chunk(text, nbytes)
        state.seq = seq
        if self.first_event_at is None:
            self.first_event_at = time.perf_counter()
        self._publish_now(event)
        self._since_yield += 1
        if self._since_yield >= YIELD_EVERY:
            self._since_yield = 0
            await asyncio.sleep(0)
        return event


#: The events of a run that are not its agent's (for :attr:`RunBridge.first_event_at`).
_NOT_THE_AGENTS: Final = frozenset({"user_message", "agent_started", "run_status"})


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())


class EventAdapter:
    """What agents emit through: the five critical events and the answer's chunks."""

    def __init__(self) -> None:
        self._bridge: RunBridge | None = None

    def attach(self, bridge: RunBridge) -> None:
        self._bridge = bridge

    def detach(self) -> None:
        self._bridge = None

    async def _emit(self, type: RunEventType, data: Mapping[str, Any]) -> Event:
        bridge = self._bridge
        if bridge is None:
            raise BridgeNotAttached(f"no run is bound to this adapter; cannot emit {type}")
        if bridge.agent_error is not None:
            raise bridge.agent_error
        return await bridge.emit(type, data)

    async def agent_started(self, agent: str) -> Event:
        return await self._emit("agent_started", {"agent": agent})

    async def thinking(self, text: str, kind: ThinkingKind = "reasoning") -> Event:
        """``kind`` is ``reasoning`` (the agent's or model's own thoughts) or ``status``
        (a short progress line the agent writes: which model is asked, which step runs)."""
        if kind not in THINKING_KINDS:
            raise ValueError(f"agent_thinking kind must be reasoning or status, got {kind!r}")
        return await self._emit("agent_thinking", {"text": text, "kind": kind})

    async def tool_executing(self, call_id: str, tool: str, args: Mapping[str, Any]) -> Event:
        return await self._emit(
            "tool_executing", {"call_id": call_id, "tool": tool, "args": dict(args)}
        )

    async def tool_completed(
        self,
        call_id: str,
        tool: str,
        *,
        ok: bool,
        duration_ms: float,
        result: Any = None,
        error: str | None = None,
        pending: bool = False,
    ) -> Event:
        """``pending``: the call was not run here but left for the client to answer (a
        client-side tool); it goes out ``ok: false`` with ``pending: true``."""
        data: dict[str, Any] = {
            "call_id": call_id,
            "tool": tool,
            "ok": ok and not pending,
            "duration_ms": round(duration_ms, 3),
        }
        if ok and not pending:
            data["result"] = result
        else:
            data["error"] = error or "failed"
        if pending:
            data["pending"] = True
        return await self._emit("tool_completed", data)

    async def agent_state(self, state: Any) -> Event:
        """The agent's whole current state (an AG-UI agent's shared state)."""
        return await self._emit("agent_state", {"state": state})

    async def agent_event(self, type: str, event: Mapping[str, Any]) -> Event:
        """An event of the agent the protocol has no type of its own for, passed through."""
        return await self._emit("agent_event", {"type": type, "event": dict(event)})

    async def chunk(self, text: str) -> Event:
        # The hot path of every answer: the checks of _emit, without its extra coroutine.
        bridge = self._bridge
        if bridge is None:
            raise BridgeNotAttached("no run is bound to this adapter; cannot emit response_chunk")
        if bridge.agent_error is not None:
            raise bridge.agent_error
        return await bridge.chunk(text)

    async def agent_completed(
        self, status: str, duration_ms: float, error: Mapping[str, str] | None = None
    ) -> Event:
        data: dict[str, Any] = {"status": status, "duration_ms": round(duration_ms, 3)}
        if error is not None:
            data["error"] = dict(error)
        return await self._emit("agent_completed", data)

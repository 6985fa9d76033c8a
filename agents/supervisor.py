"""The run supervisor: starts each run's agent as a task and sees it to a clean end.

Whatever happens to a run, it ends with its invariants: every open tool call is
answered, ``response_complete`` carries the concatenated chunks, and
``agent_completed`` is the last event, exactly once.  Runs are not tied to the
connection that started them: when no watcher is attached for the detach grace,
the run is cancelled with ``client_gone``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

from agents.base import Agent, AgentRegistry, ClientTool, ClientToolResult, RunContext, Usage
from agents.errors import AgentError
from agents.inputs import InputDesk, InputKind, Resolution
from agents.lifecycle import Action, Lifecycle, RunStatus
from agents.recorder import MemoryRecorder, Recorder
from agents.tools import ToolRegistry
from bridge import logctx, tracing
from bridge.bridge import EventAdapter, RunBridge
from bridge.broker import Broker, RunRecord
from bridge.errors import BridgeError, RunClosed, RunGone
from bridge.events import ErrorData
from bridge.runstate import AgentCompleted, ResponseComplete

if TYPE_CHECKING:
    from opentelemetry.trace import Span

log = logging.getLogger("chat.runs")

APOLOGY: Final = (
    "Sorry, ",
    "something went wrong ",
    "while I was answering. ",
    "Please try again.",
)


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_urlsafe(12)}"


class RunObserver(Protocol):
    """Told of each run's start and end (the server's metrics)."""

    def run_started(self, agent: str, wait_s: float) -> None:
        """The agent started, ``wait_s`` after the run was created."""
        ...

    def run_finished(self, agent: str, status: str, duration_s: float, events: int) -> None: ...

    def run_usage(self, agent: str, usage: Usage) -> None:
        """The tokens a run used with one model, once, as its ``agent_completed`` goes out."""
        ...


class _NoObserver:
    def run_started(self, agent: str, wait_s: float) -> None:
        return None

    def run_finished(self, agent: str, status: str, duration_s: float, events: int) -> None:
        return None

    def run_usage(self, agent: str, usage: Usage) -> None:
        return None


@dataclass(frozen=True, slots=True)
class SupervisorConfig:
    detach_grace_s: float = 60.0
    typing_delay_ms: float = 0.0
    #: The most UTF-8 bytes an agent's answer may have (None: no bound).
    max_answer_bytes: int | None = None
    #: Tools whose calls wait for the owner's approval (``*``: all).
    approval_tools: frozenset[str] = frozenset()
    #: How long an input request waits for its answer.
    input_timeout_s: float = 600.0


@dataclass(frozen=True, slots=True)
class RunError:
    code: str
    message: str

    def wire(self) -> ErrorData:
        return {"code": self.code, "message": self.message}


class RunHandle:
    """One run in the process that executes it: lifecycle, bridge, task and grace timer."""

    def __init__(
        self,
        supervisor: Supervisor,
        record: RunRecord,
        agent: Agent,
        ctx: RunContext,
        bridge: RunBridge,
    ) -> None:
        self._supervisor = supervisor
        self.record = record
        self.agent = agent
        self.ctx = ctx
        self.bridge = bridge
        self.lifecycle = Lifecycle(record.run_id)
        self.desk = InputDesk(supervisor.config.input_timeout_s)
        self.desk.on_resolved = self._input_answered
        self.task: asyncio.Task[None] | None = None
        self._started = False
        self._cancel_error: RunError | None = None
        self._grace: asyncio.TimerHandle | None = None
        self.created = time.perf_counter()
        #: Why :meth:`begin` failed, for :meth:`drive` to end the run with.
        self.begin_error: Exception | None = None
        self._announced = False  # agent_started published
        self._commands = asyncio.Lock()
        # How far the ending got: an ending interrupted by a cancel resumes from there.
        # (whether the answer was completed is the bridge's run state's).
        self._apologized = False
        self._answer_id: str | None = None
        self._answer_stored = False
        #: Set when the broker ended the run without it (:meth:`lost`).
        self._lost = False
        #: Created behind other runs of its thread: it begins when they have ended.
        self.queued = False
        #: The user message's id, and whether it is in the thread (a queued run's is
        #: stored when it begins: one cancelled while queued leaves nothing in it).
        self.message_id = ""
        self.message_stored = False
        #: The run's span (None with tracing off).
        self.span: Span | None = None

    @property
    def run_id(self) -> str:
        return self.record.run_id

    @property
    def broker(self) -> Broker:
        return self.bridge.broker

    # RunController ------------------------------------------------------------

    async def apply(self, action: str) -> str:
        # One command at a time: the status, its announcement and the gate move together.
        # ``cancel:<code>`` is a cancel for a newer message of the thread (its error
        # code ``interrupted`` or ``rolled_back``), sent through the broker like a cancel.
        action, _, code = action.partition(":")
        async with self._commands:
            return await self._apply(action, CANCEL_REASONS.get(code))

    async def _apply(self, action: str, reason: RunError | None = None) -> str:
        transition = self.lifecycle.apply(action)
        if not transition.changed:
            return str(transition.after)
        if transition.after is RunStatus.PAUSED:
            # Close the gate first, then announce: nothing of the run follows the
            # announcement until it is started again or cancelled.
            self.bridge.gate.clear()
            await self.bridge.emit("run_status", {"status": "paused"}, gated=False)
        elif transition.after in (RunStatus.RUNNING, RunStatus.WAITING):
            # Started while an input request is still open: it waits again.
            status = transition.after.value
            await self.bridge.emit("run_status", {"status": status}, gated=False)
            self.bridge.gate.set()
        else:
            self._cancel(reason or RunError("cancelled", "the run was cancelled"))
        await self.set_status(transition.after, reason.code if reason else None)
        return str(transition.after)

    def watchers_changed(self, count: int) -> None:
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        if count == 0 and not self.lifecycle.status.terminal:
            loop = asyncio.get_running_loop()
            self._grace = loop.call_later(self._supervisor.config.detach_grace_s, self._gone)

    def answer(self, chars: int) -> str:
        return self.bridge.content[:chars]

    async def respond(self, request_id: str, payload: Mapping[str, Any]) -> str:
        """Resolve one of the run's input requests with its owner's answer; answer the
        status the answer leads to (a waiting run runs again once its resolution is
        announced; a paused one takes the answer when it is started).

        Raises:
            InputNotFound: the run made no such request.
            InputConflict: it is already resolved.
            BadResponse: the answer does not fit the request.
        """
        self.desk.respond(request_id, payload)
        status = self.lifecycle.status
        if status is RunStatus.WAITING and not self.lifecycle.awaiting:
            return str(RunStatus.RUNNING)
        return str(status)

    # Input requests (RunContext.inputs) -----------------------------------------

    async def request_input(self, kind: InputKind, fields: Mapping[str, Any]) -> Resolution:
        """Ask the run's owner: ``input_requested``, ``run_status{waiting}``; wait for
        the answer, the request's expiry or the run's end; then ``input_resolved`` and
        ``run_status{running}``.  A cancel while waiting resolves the request in the
        run's ending (``by: cancel``)."""
        bridge = self.bridge
        async with self._gate_and_commands():
            request = self.desk.make(kind, fields)
            self.lifecycle.awaiting = self.desk.pending()
            await bridge.emit("input_requested", request.data(), gated=False)
            self._supervisor.inputs["requested"] += 1
            await self._record_input("input_requested", request.data())
            if self.lifecycle.wait().changed:
                await bridge.emit("run_status", {"status": "waiting"}, gated=False)
                await self.set_status(RunStatus.WAITING)
        resolution = await request.future
        async with self._gate_and_commands():
            await bridge.emit("input_resolved", resolution.data(request.request_id), gated=False)
            self.desk.close(request)
            await self._record_input("input_resolved", resolution.data(request.request_id))
            self._supervisor.inputs[resolution.by] += 1
            if self.lifecycle.resolved().changed:
                await bridge.emit("run_status", {"status": "running"}, gated=False)
                await self.set_status(RunStatus.RUNNING)
        return resolution

    @contextlib.asynccontextmanager
    async def _gate_and_commands(self) -> AsyncIterator[None]:
        """Hold the command lock with the run's gate open (not paused), so that an
        announcement and the status it changes go out together, between commands."""
        gate = self.bridge.gate
        while True:
            while not gate.is_set():
                await gate.wait()
            async with self._commands:
                if not gate.is_set():
                    continue
                if self.bridge.agent_error is not None:
                    raise self.bridge.agent_error
                yield
                return

    async def _record_input(self, type: str, data: Mapping[str, Any]) -> None:
        try:
            await self._supervisor.recorder.input_event(self.record, type, data)
        except Exception:  # the stream goes on, as for any failed write
            log.exception("run %s: its %s could not be recorded", self.run_id, type)

    def _input_answered(self) -> None:
        # The answer may come while paused: a start then makes the run running.
        self.lifecycle.awaiting = self.desk.pending()

    def lost(self) -> None:
        # The broker wrote the run's ending (or will): nothing more of this process's.
        if self._lost:
            return
        self._lost = True
        log.warning("run %s: ended by the broker; stopping its agent", self.run_id)
        self.lifecycle.status = RunStatus.FAILED
        self.bridge.agent_error = RunClosed(f"run {self.run_id} was ended by the broker")
        self.bridge.gate.set()
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        if self.task is not None:
            self.task.cancel()

    # Cancellation -------------------------------------------------------------

    def _gone(self) -> None:
        self._grace = None
        if self.lifecycle.status.terminal:
            return
        expiry = self.desk.earliest_expiry()
        if expiry is not None:
            # Waiting for its owner: not given up before the request expires.
            grace = self._supervisor.config.detach_grace_s
            delay = max(0.0, expiry - time.time()) + grace
            self._grace = asyncio.get_running_loop().call_later(delay, self._gone)
            return
        log.info("run %s: no client came back; cancelling", self.run_id)
        self.lifecycle.apply(Action.CANCEL)
        grace = self._supervisor.config.detach_grace_s
        self._cancel(RunError("client_gone", f"no client was attached for {grace:g} s"))
        self._spawn_status_update()

    def cancel_for(self, error: RunError) -> bool:
        """Cancel the run for a server reason (``shutdown``); False if it had ended."""
        if self.lifecycle.status.terminal:
            return False
        self.lifecycle.apply(Action.CANCEL)
        self._cancel(error)
        self._spawn_status_update()
        return True

    def _spawn_status_update(self) -> None:
        task = asyncio.get_running_loop().create_task(self.set_status(RunStatus.CANCELLED))
        self._supervisor.keep(task)

    async def set_status(self, status: RunStatus, error_code: str | None = None) -> None:
        """Record a new status in the broker (for every process) and the recorder."""
        if self._lost:
            return
        record = self.record
        record.status = str(status)
        record.updated_at = time.time()
        record.last_seq = self.bridge.seq
        if error_code is not None:
            record.error_code = error_code
        try:
            await self.broker.set_status(self.run_id, record.status, error_code)
        finally:
            # The store agrees with what clients saw even when the broker could not be
            # written to; a run the broker ended is recorded by the broker's side.
            if not self._lost:
                await self._supervisor.recorder.run_changed(record.copy())

    def _cancel(self, error: RunError) -> None:
        self._cancel_error = error
        if error.code == "client_gone":
            self.bridge.agent_error = RunGone(f"run {self.run_id}: {error.message}")
        else:
            self.bridge.agent_error = RunClosed(f"run {self.run_id}: {error.message}")
        if self.task is not None and self._started:
            self.task.cancel()
        # A task that has not started yet sees the cancel error as it begins.

    # The run --------------------------------------------------------------------

    async def begin(self) -> None:
        """Start the run: ``running``, and ``agent_started`` right behind ``user_message``."""
        transition = self.lifecycle.begin()
        if transition.changed:
            await self.set_status(transition.after)
        if self.bridge.gate.is_set():  # a stop that came in meanwhile leaves it to the task
            await self._agent_started()

    async def _agent_started(self) -> None:
        gate = self.bridge.gate
        while not gate.is_set():
            await gate.wait()
        # The gate is open, so it is published before the emit can yield: marked first,
        # a cancel right after it must not make the ending publish it again.
        self._announced = True
        await self.ctx.emit.agent_started(self.agent.name)
        self._supervisor.observer.run_started(self.agent.name, time.perf_counter() - self.created)

    async def _wait_turn(self) -> None:
        """While queued: wait until the runs of the thread created before this one have
        ended (the broker's list of the thread's runs is the queue, across processes).
        A ``stop`` or ``start`` of the queued run ends the wait."""
        delay = 0.01
        while self.lifecycle.status is RunStatus.QUEUED:
            try:
                going = await self.broker.thread_runs(self.record.thread_id)
            except BridgeError as exc:
                log.warning("run %s: its place in the thread is unknown: %r", self.run_id, exc)
                going = [self.run_id, self.run_id]
            ahead = going[: going.index(self.run_id)] if self.run_id in going else []
            if not ahead:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, QUEUE_POLL_S)

    async def _join_thread(self) -> None:
        """A queued run's turn: its history now holds the answers of the runs before it,
        and its message is stored after them."""
        if self._cancel_error is not None:
            raise asyncio.CancelledError
        recorder = self._supervisor.recorder
        record = self.record
        self.ctx.history = await recorder.open_thread(
            record.owner, record.thread_id, self.ctx.message, new=False
        )
        await recorder.user_message(record, self.message_id, self.ctx.message)
        self.message_stored = True

    async def drive(self) -> None:
        logctx.bind_run(self.run_id, self.record.thread_id)  # for the run task's log lines
        tracing.bind_run(self.span)
        self._started = True
        started = self.created
        status = RunStatus.COMPLETED
        error: RunError | None = None
        adapter = self.ctx.emit
        try:
            if self._cancel_error is not None:
                raise asyncio.CancelledError
            if self.queued:
                await self._wait_turn()
                try:
                    await self._join_thread()
                    await self.begin()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.begin_error = exc
            if self._cancel_error is not None:
                raise asyncio.CancelledError
            if self.begin_error is not None:
                raise self.begin_error
            if not self._announced:
                await self._agent_started()  # waits while the run is paused
            await self.agent.run(self.ctx)
        except asyncio.CancelledError:
            self._uncancel()
            status = RunStatus.CANCELLED
        except Exception as exc:
            if self._cancel_error is not None or self._lost:
                status = RunStatus.CANCELLED
            else:
                status = RunStatus.FAILED
                error = _run_error(exc)
                # The type and the code only: an exception's text may quote the user's
                # message, which never goes into the logs (the traceback at debug level).
                log.warning(
                    "run %s: agent %s failed: %s (%s)",
                    self.run_id,
                    self.agent.name,
                    type(exc).__name__,
                    error.code,
                )
                log.debug("run %s: the agent's exception", self.run_id, exc_info=exc)
        if status is RunStatus.CANCELLED and self._cancel_error is None:
            # Cancelled from outside the supervisor (the event loop is closing).
            self.lifecycle.status = RunStatus.CANCELLED
            self._cancel_error = RunError("cancelled", "the run was cancelled")
        limit = self.bridge.limit_error
        if limit is not None and status is not RunStatus.CANCELLED:
            # The answer reached its bound: whatever the agent made of the error (caught
            # it, returned, raised another), the run fails with it.
            status = RunStatus.FAILED
            error = _run_error(limit)
        try:
            if not self._lost:
                await self._finish(status, error, started)
        except Exception as exc:
            if self._lost:
                # Fenced: the process that took the run over ends it for every client.
                log.exception("run %s: its ending could not be published", self.run_id)
            else:
                # The ending failed part way (out of memory, a recorder's or broker's
                # error): the run still ends, failed, with whatever of its ending is
                # missing.
                log.exception("run %s: its ending failed; ending it as failed", self.run_id)
                await self._end_anyway(exc, started)
        finally:
            self._supervisor.observer.run_finished(
                self.agent.name, self.record.status, time.perf_counter() - started, self.bridge.seq
            )
            self._supervisor.events_finished += self.bridge.seq
            if self.span is not None:
                self._end_span()
            adapter.detach()
            self.desk.close_all()
            # No cycle through the handle outlives the run: its answer is freed as soon
            # as the broker forgets the run, not at the next collection.
            self.desk.on_resolved = None
            self.ctx.inputs = None
            if self._grace is not None:
                self._grace.cancel()
                self._grace = None
            self._supervisor.forget(self.run_id)

    async def _finish(self, status: RunStatus, error: RunError | None, started: float) -> None:
        while True:
            try:
                await self._finish_once(status, error, started)
                return
            except asyncio.CancelledError:
                # Cancelled while the ending waited on a paused run: end it cancelled.
                self._uncancel()
                if self._lost:
                    return
                status = RunStatus.CANCELLED

    async def _finish_once(self, status: RunStatus, error: RunError | None, started: float) -> None:
        bridge = self.bridge
        if status is RunStatus.CANCELLED:
            error = self._cancel_error
        gated = status is not RunStatus.CANCELLED
        reason = "cancelled" if status is RunStatus.CANCELLED else "the agent failed"
        for request in bridge.state.cancelled_requests():
            await bridge.emit(request.type, request.data(), gated=gated)
            self._supervisor.inputs["cancel"] += 1
            await self._record_input(request.type, request.data())
        for call in bridge.state.failed_calls(reason, self._call_durations()):
            await bridge.emit(call.type, call.data(), gated=gated)
        if status is RunStatus.FAILED and not self._apologized:
            self._apologized = True
            separator = "" if bridge.ends_with_space else "\n\n"
            for i, piece in enumerate(APOLOGY):
                text = separator + piece if i == 0 else piece
                await bridge.emit("response_chunk", {"text": text}, gated=gated)
        if not bridge.state.responded:
            fallback = status is RunStatus.FAILED
            if self._answer_id is None:
                # Stored once, before it is announced: its id is the stored message's.
                self._answer_id = new_id("m_")
                if not self.message_stored:
                    self._answer_stored = False  # ended while queued: nothing in the thread
                else:
                    try:
                        self._answer_stored = await self._supervisor.recorder.answer(
                            self.record, self._answer_id, bridge.content, fallback
                        )
                    except Exception:
                        # Not stored, whatever went wrong in the recorder (a MemoryError
                        # included): the stream goes on, as for a failed write.
                        log.exception("run %s: its answer could not be recorded", self.run_id)
                        self._answer_stored = False
            while gated and not bridge.gate.is_set():
                await bridge.gate.wait()
            # The run state counts it as made before emit can yield: an ending resumed
            # after a cancel does not publish it again.
            complete = ResponseComplete(
                self._answer_id, bridge.content, fallback, self._answer_stored
            )
            await bridge.emit(complete.type, complete.data(), gated=False)
        while gated and not bridge.gate.is_set():
            await bridge.gate.wait()
        if status is not RunStatus.CANCELLED:
            self.lifecycle.finish(status)
        end = AgentCompleted(
            status,
            (time.perf_counter() - started) * 1000,
            error.wire() if error is not None else None,
            self._usage(),
        )
        await bridge.emit(end.type, end.data(), gated=False)
        await self._record_end(status, error.code if error is not None else None)

    async def _end_anyway(self, cause: Exception, started: float) -> None:
        """End a run whose ending failed part way: ``failed`` with ``internal``.

        What the ending had not published yet is published now, each step on its
        own, so that one more failure does not cost the ones after it:
        ``agent_completed`` goes out whenever the broker takes it, and the run's end
        is recorded whatever was published.
        """
        bridge = self.bridge
        error = RunError("internal", f"the run's ending failed ({type(cause).__name__})")
        status = RunStatus.FAILED
        if bridge.completed:
            # agent_completed is out: only recording the end failed.
            status = self.lifecycle.status if self.lifecycle.status.terminal else status
            await self._record_end(status, self.record.error_code)
            return
        self.lifecycle.status = status
        try:
            for request in bridge.state.cancelled_requests():
                await bridge.emit(request.type, request.data(), gated=False)
            for call in bridge.state.failed_calls("the run failed", self._call_durations()):
                await bridge.emit(call.type, call.data(), gated=False)
            if not bridge.state.responded:
                complete = ResponseComplete(
                    self._answer_id or new_id("m_"), bridge.content, True, self._answer_stored
                )
                await bridge.emit(complete.type, complete.data(), gated=False)
        except Exception:
            log.exception("run %s: its ending could not be completed", self.run_id)
        bridge.open_calls.clear()  # whatever was not answered, agent_completed must go out
        bridge.state.open_requests.clear()
        end = AgentCompleted(
            status, (time.perf_counter() - started) * 1000, error.wire(), self._usage()
        )
        try:
            await bridge.emit(end.type, end.data(), gated=False)
        except Exception:
            # The broker itself is gone: its own recovery (a lease, a restart) ends the
            # run for its clients.
            log.exception("run %s: agent_completed could not be published", self.run_id)
        await self._record_end(status, error.code)

    async def _record_end(self, status: RunStatus, error_code: str | None) -> None:
        """Record the run's end in the broker and the recorder, each whatever the other
        does; a recorder that fails is asked once more, so the stored run is not left
        ``running``."""
        try:
            await self.set_status(status, error_code)
            return
        except Exception:
            log.exception("run %s: its end could not be recorded; trying again", self.run_id)
        record = self.record
        record.status = str(status)
        record.error_code = error_code or record.error_code
        record.last_seq = self.bridge.seq
        try:
            await self._supervisor.recorder.run_changed(record.copy())
        except Exception:
            log.exception("run %s: its end could not be recorded", self.run_id)

    def _usage(self) -> dict[str, object] | None:
        """The run's tokens for ``agent_completed`` and its stored record, told to the
        observer the first time."""
        usage = self.ctx.usage
        if usage is None:
            return None
        wire = usage.wire()
        if "usage" not in self.record.extra:
            self.record.extra["usage"] = wire
            for entry in self.ctx.usage_by_model():
                self._supervisor.observer.run_usage(self.agent.name, entry)
        return wire

    def _end_span(self) -> None:
        bridge = self.bridge
        first = bridge.first_event_at
        usage = self.record.extra.get("usage")
        tracing.end_run(
            self.span,
            status=self.record.status,
            error_code=self.record.error_code,
            events=bridge.seq,
            answer_bytes=bridge.state.answer_bytes,
            first_event_s=first - self.created if first is not None else None,
            usage=usage if isinstance(usage, dict) else None,
            answer=bridge.content,
        )

    def _call_durations(self) -> dict[str, float]:
        """Milliseconds since each open tool call was announced."""
        now = time.perf_counter()
        started = self.bridge.call_started
        return {call_id: (now - started.get(call_id, now)) * 1000 for call_id in started}

    @staticmethod
    def _uncancel() -> None:
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()


#: The cancels a newer message of the thread makes (contract section 6.2).
CANCEL_REASONS: dict[str, RunError] = {
    "interrupted": RunError("interrupted", "a newer message of the thread interrupted the run"),
    "rolled_back": RunError("rolled_back", "a newer message of the thread replaced the run"),
}
#: The longest pause between two looks at a queued run's place in its thread.
QUEUE_POLL_S = 0.1


def _run_error(exc: Exception) -> RunError:
    if isinstance(exc, AgentError | BridgeError):
        return RunError(exc.code, str(exc))
    # The exception's text stays in the server log: it may say more than a client should see.
    return RunError("agent_error", f"the agent failed ({type(exc).__name__})")


class Supervisor:
    """Starts runs, holds the ones this process executes, and ends them on shutdown."""

    def __init__(
        self,
        broker: Broker,
        agents: AgentRegistry,
        tools: ToolRegistry,
        config: SupervisorConfig,
        recorder: Recorder | None = None,
        observer: RunObserver | None = None,
    ) -> None:
        self.broker = broker
        self.agents = agents
        self.tools = tools
        self.config = config
        self.recorder: Recorder = recorder if recorder is not None else MemoryRecorder()
        self.observer: RunObserver = observer if observer is not None else _NoObserver()
        #: Events of runs that ended in this process (live runs: :meth:`events_emitted`).
        self.events_finished = 0
        self._runs: dict[str, RunHandle] = {}
        #: Input requests made, and resolved by whom (``user``, ``timeout``, ``cancel``).
        self.inputs: dict[str, int] = {"requested": 0, "user": 0, "timeout": 0, "cancel": 0}
        self._background: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._runs)

    async def start_run(
        self,
        *,
        owner: str,
        content: str,
        thread_id: str | None = None,
        agent: str | None = None,
        ref: str | int | None = None,
        run_id: str | None = None,
        queued: bool = False,
        restate: str | None = None,
        client_tools: Sequence[ClientTool] = (),
        tool_results: Sequence[ClientToolResult] = (),
    ) -> RunRecord:
        """Create a run, record and publish its ``user_message`` (seq 1), start its agent.

        ``run_id`` is the run's id when the caller chose it beforehand (an idempotent
        send claims it before the run exists); a ``queued`` run begins once the runs of
        its thread before it have ended (its message is stored then).

        The agent gets the thread's earlier messages as its history.  ``restate`` is
        the id of the thread's last stored message, a user message answered again (a
        regenerate): it is not stored a second time, and it is the run's message, not
        part of its history.  ``client_tools`` and ``tool_results`` go to the agent's
        context (see :class:`RunContext`).

        Raises:
            UnknownAgent: no agent of that name.
            RunNotFound: ``thread_id`` belongs to another user.
        """
        chosen = self.agents.get(agent)
        thread = thread_id or new_id("t_")
        history = await self.recorder.open_thread(owner, thread, content, new=thread_id is None)
        if restate is not None and history and history[-1].role == "user":
            history = history[:-1]
        run_id = run_id or new_id("r_")
        now = time.time()
        record = RunRecord(run_id, thread, owner, chosen.name, str(RunStatus.QUEUED), now, now)
        span = tracing.start_run(run_id, thread, owner, chosen.name, content, record.extra)
        bridge = RunBridge(
            self.broker, run_id, thread, max_answer_bytes=self.config.max_answer_bytes
        )
        adapter = EventAdapter()
        adapter.attach(bridge)
        ctx = RunContext(
            run_id=run_id,
            thread_id=thread,
            user_id=owner,
            message=content,
            emit=adapter,
            tools=self.tools,
            history=history,
            typing_delay_s=self.config.typing_delay_ms / 1000,
            approval_tools=self.config.approval_tools,
            client_tools=client_tools,
            tool_results=tool_results,
        )
        handle = RunHandle(self, record, chosen, ctx, bridge)
        ctx.inputs = handle
        handle.span = span
        await self.broker.create_run(record, handle)
        self._runs[run_id] = handle
        message_id = restate or new_id("m_")
        handle.message_id = message_id
        queued = queued and restate is None  # a restated message is in the thread already
        if restate is not None:
            handle.message_stored = True
        elif not queued:
            # A queued run's message joins the thread when the run begins, behind the
            # answers of the runs before it.
            await self.recorder.user_message(record, message_id, content)
            handle.message_stored = True
        await self.recorder.run_changed(record.copy())
        await bridge.emit(
            "user_message",
            {"message_id": message_id, "content": content, "ref": ref},
            gated=False,
        )
        handle.watchers_changed(0)  # until a watcher attaches, the detach grace runs
        if queued:
            # Behind the thread's runs going: it stays queued until they have ended.
            handle.queued = True
            handle.task = asyncio.get_running_loop().create_task(
                handle.drive(), name=f"run {run_id}"
            )
            return record
        # agent_started goes out now, in the same turn of the session's writer as
        # user_message, not one scheduling round later when the agent's task starts.
        try:
            await handle.begin()
        except Exception as exc:
            handle.begin_error = exc  # the task ends the run, failed, with its invariants
        except BaseException:
            # Cancelled while starting (the client went away): the run still gets its task.
            handle.begin_error = RuntimeError("the run was interrupted while starting")
            handle.task = asyncio.get_running_loop().create_task(handle.drive())
            raise
        handle.task = asyncio.get_running_loop().create_task(handle.drive(), name=f"run {run_id}")
        return record

    def events_emitted(self) -> int:
        """Every event the runs of this process published."""
        return self.events_finished + sum(h.bridge.seq for h in self._runs.values())

    def statuses(self) -> dict[str, int]:
        """Runs held by this process, by status."""
        counts: dict[str, int] = {}
        for handle in self._runs.values():
            key = str(handle.lifecycle.status)
            counts[key] = counts.get(key, 0) + 1
        return counts

    def input_counts(self) -> dict[str, int]:
        """Input requests: made, open now, and resolved by the user, timeout or cancel."""
        counts = dict(self.inputs)
        counts["open"] = sum(len(h.bridge.state.open_requests) for h in self._runs.values())
        return counts

    def runs_of_thread(self, thread_id: str) -> list[RunHandle]:
        return [h for h in self._runs.values() if h.record.thread_id == thread_id]

    def forget(self, run_id: str) -> None:
        self._runs.pop(run_id, None)

    def keep(self, task: asyncio.Task[None]) -> None:
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def shutdown(self, grace_s: float) -> None:
        """Let runs finish for up to ``grace_s``, then cancel the rest with ``shutdown``."""
        tasks = [h.task for h in self._runs.values() if h.task is not None]
        if tasks and grace_s > 0:
            await asyncio.wait(tasks, timeout=grace_s)
        for handle in list(self._runs.values()):
            handle.cancel_for(RunError("shutdown", "the server is shutting down"))
        tasks = [h.task for h in self._runs.values() if h.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        if self._background:
            await asyncio.wait(self._background, timeout=5)

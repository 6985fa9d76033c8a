"""Prometheus metrics at ``/metrics``, with prometheus-client.

Counts the hot path already keeps (connections, events, closes) are read when
scraped, by a collector; nothing is added per event.  Two histograms are observed
once per run.  Each app has a registry of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bridge.wire import UNFINISHED, RunStatus

if TYPE_CHECKING:
    from agents.base import Usage

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """The counts a scrape reports, read from the services that keep them."""

    connections: int
    sse_streams: int
    outbound_buffered_bytes: int
    #: Runs held by this process, by status.
    runs: Mapping[str, int]
    runs_started: int
    events_emitted: int
    events_delivered: int
    slow_consumer_closes: int
    auth_failures: int
    rate_limited: int
    store_failures: int
    #: Slow-consumer closes by transport (``ws``, ``sse``).
    slow_consumer_by: Mapping[str, int] = field(default_factory=dict)
    resumes_recovered: int = 0
    resumes_unavailable: int = 0
    #: Bytes not sent yet, by transport: (their sum, the most one client holds).
    outbound_lag: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    #: The broker's own counts (with Redis: lease renewals, fencing).
    broker_counts: Mapping[str, int] = field(default_factory=dict)
    #: Input requests: ``requested``, ``open``, and resolved by ``user``, ``timeout``,
    #: ``cancel``.
    inputs: Mapping[str, int] = field(default_factory=dict)


#: Reads the counts when scraped.
Snapshot = Callable[[], MetricsSnapshot]


class Metrics:
    """The gateway's metrics, and the supervisor's run observer."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.first_event = Histogram(
            "chat_time_to_first_event_seconds",
            "From a run's creation to its agent_started",
            ["agent"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
        self.run_duration = Histogram(
            "chat_run_duration_seconds",
            "From a run's creation to its agent_completed",
            ["agent", "status"],
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=self.registry,
        )

        self.store_write = Histogram(
            "chat_store_write_seconds",
            "Time of each transaction the persistence writer committed",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.tokens = Counter(
            "chat_llm_tokens",
            "Tokens the runs' model requests used, as their servers reported them",
            ["model", "agent", "kind"],
            registry=self.registry,
        )

    def bind(self, snapshot: Snapshot) -> None:
        """Report what ``snapshot`` reads at each scrape."""
        self.registry.register(_SnapshotCollector(snapshot))

    # RunObserver ------------------------------------------------------------------

    def run_started(self, agent: str, wait_s: float) -> None:
        self.first_event.labels(agent).observe(wait_s)

    def run_finished(self, agent: str, status: str, duration_s: float, events: int) -> None:
        self.run_duration.labels(agent, status).observe(duration_s)

    def run_usage(self, agent: str, usage: Usage) -> None:
        model = usage.model or ""
        self.tokens.labels(model, agent, "input").inc(usage.input_tokens)
        self.tokens.labels(model, agent, "output").inc(usage.output_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        yield GaugeMetricFamily(
            "chat_connections_open", "Open WebSocket sessions", value=snap.connections
        )
        yield GaugeMetricFamily("chat_sse_streams_open", "Open SSE streams", value=snap.sse_streams)
        yield GaugeMetricFamily(
            "chat_outbound_buffered_bytes",
            "Bytes published to the runs clients watch that they have not been sent yet",
            value=snap.outbound_buffered_bytes,
        )
        runs = GaugeMetricFamily(
            "chat_runs", "Runs held by this process, by status", labels=["status"]
        )
        for status in (*UNFINISHED, RunStatus.CANCELLED):
            runs.add_metric([status.value], snap.runs.get(status.value, 0))
        yield runs
        yield CounterMetricFamily("chat_runs_started", "Runs started", value=snap.runs_started)
        yield CounterMetricFamily(
            "chat_events_emitted", "Run events published", value=snap.events_emitted
        )
        yield CounterMetricFamily(
            "chat_events_delivered",
            "Run events written to WebSocket and SSE clients",
            value=snap.events_delivered,
        )
        yield CounterMetricFamily(
            "chat_slow_consumer_closes",
            "Connections closed with 4408",
            value=snap.slow_consumer_closes,
        )
        by_transport = CounterMetricFamily(
            "chat_slow_consumer_closes_by_transport",
            "Connections closed with 4408 (WebSocket) or cut as slow (SSE), by transport",
            labels=["transport"],
        )
        for transport, count in sorted(snap.slow_consumer_by.items()):
            by_transport.add_metric([transport], count)
        yield by_transport
        resumes = CounterMetricFamily(
            "chat_resumes",
            "Resumes (a watch after a seq, WebSocket or SSE): recovered, or resume_unavailable",
            labels=["outcome"],
        )
        resumes.add_metric(["recovered"], snap.resumes_recovered)
        resumes.add_metric(["unavailable"], snap.resumes_unavailable)
        yield resumes
        lag = GaugeMetricFamily(
            "chat_outbound_lag_bytes",
            "Bytes published to watched runs not sent yet, by transport: the sum and the most "
            "one client holds",
            labels=["transport", "of"],
        )
        for transport in ("ws", "sse"):
            total, most = snap.outbound_lag.get(transport, (0, 0))
            lag.add_metric([transport, "sum"], total)
            lag.add_metric([transport, "max"], most)
        yield lag
        if snap.broker_counts:
            counts = snap.broker_counts
            for name, help_ in (
                ("lease_renewals", "This process's lease renewals in Redis"),
                ("lease_renewal_failures", "Lease renewals that could not reach Redis"),
                ("fence_refusals", "Writes or renewals of this process the fence refused"),
                ("fenced", "Times this process was found reaped while alive, and joined again"),
                ("nodes_reaped", "Processes whose lease lapsed that this process reaped"),
            ):
                yield CounterMetricFamily(f"chat_redis_{name}", help_, value=counts.get(name, 0))
        inputs = snap.inputs
        yield GaugeMetricFamily(
            "chat_input_requests_open",
            "Approvals and questions of this process's runs waiting for an answer",
            value=inputs.get("open", 0),
        )
        yield CounterMetricFamily(
            "chat_input_requests", "Approvals and questions asked", value=inputs.get("requested", 0)
        )
        resolved = CounterMetricFamily(
            "chat_input_resolved",
            "Approvals and questions resolved, by whom: answered (user), timed out, cancelled",
            labels=["by"],
        )
        for by in ("user", "timeout", "cancel"):
            resolved.add_metric([by], inputs.get(by, 0))
        yield resolved
        yield CounterMetricFamily(
            "chat_auth_failures",
            "Requests and sockets refused for their token",
            value=snap.auth_failures,
        )
        yield CounterMetricFamily(
            "chat_rate_limited", "Runs refused by a per-user limit", value=snap.rate_limited
        )
        yield CounterMetricFamily(
            "chat_store_failures",
            "Database calls that failed or timed out",
            value=snap.store_failures,
        )

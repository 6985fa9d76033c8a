"""The composition root: every service the gateway runs on, built from Settings.

:func:`build_services` is the one place that knows which broker, store, agents
and tools the settings name and how they are wired to each other; each service
is handed only the others it needs.  Endpoints never build anything.
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass

from agents.base import AgentRegistry
from agents.registry import build_agents, build_tools
from agents.supervisor import Supervisor, SupervisorConfig
from agents.tools import ToolRegistry
from bridge.broker import Broker
from bridge.memory import InMemoryBroker
from bridge.redis import RedisBroker
from server.metrics import Metrics
from server.persistence import Persistence
from server.settings import Settings
from server.store import Store, open_store


@dataclass(frozen=True, slots=True)
class Services:
    """What :func:`build_services` built, for the gateway to hand out."""

    broker: Broker
    store: Store
    persistence: Persistence
    agents: AgentRegistry
    tools: ToolRegistry
    supervisor: Supervisor
    metrics: Metrics


def make_broker(settings: Settings) -> Broker:
    """The broker ``CHAT_BROKER_URL`` names: in-memory when unset, Redis for ``redis://``."""
    url = settings.broker_url
    if not url or url == "memory":
        return InMemoryBroker(
            run_log_max_bytes=settings.run_log_max_bytes,
            resume_window_s=settings.resume_window_s,
            user_log_max_bytes=settings.user_log_max_bytes,
        )
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisBroker(
            url,
            run_log_max_bytes=settings.run_log_max_bytes,
            resume_window_s=settings.resume_window_s,
            lease_s=settings.run_lease_s,
            outage_s=settings.redis_outage_s,
            max_connections=settings.redis_max_connections,
            node=f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}",
        )
    raise ValueError("CHAT_BROKER_URL must be unset, 'memory', or a redis:// URL")


def build_services(settings: Settings, *, broker: Broker | None = None) -> Services:
    """Build and wire the services ``settings`` name (``broker`` replaces the named one)."""
    broker = broker or make_broker(settings)
    agents = build_agents(settings)
    tools = build_tools(settings)
    store = open_store(settings.db_url)
    metrics = Metrics()
    persistence = Persistence(
        store,
        timeout_s=settings.store_timeout_s,
        history_messages=settings.history_messages,
        node=f"{socket.gethostname()}:{os.getpid()}",
    )
    supervisor = Supervisor(
        broker,
        agents,
        tools,
        SupervisorConfig(
            detach_grace_s=settings.detach_grace_s,
            typing_delay_ms=settings.typing_delay_ms,
            max_answer_bytes=settings.max_answer_bytes,
            approval_tools=frozenset(settings.approval_tools),
            input_timeout_s=settings.input_timeout_s,
        ),
        recorder=persistence,
        observer=metrics,
    )
    # A run the broker ended without its agent is recorded as it ended.
    broker.on_run_lost = persistence.run_lost
    return Services(broker, store, persistence, agents, tools, supervisor, metrics)

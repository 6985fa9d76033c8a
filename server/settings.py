"""One typed settings object, read from ``CHAT_*`` environment variables.

Every field ``name`` is read from ``CHAT_<NAME>`` and can be given to the CLI as
``--<name-with-dashes>``; the CLI only maps flags onto this object.
"""

import dataclasses
import os
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Union, get_args, get_origin

ENV_PREFIX: Final = "CHAT_"
KiB: Final = 1024
MiB: Final = 1024 * KiB
#: The most ``max_answer_bytes`` may be: an answer is stored as one row, and SQLite
#: refuses strings of more than 1,000,000,000 bytes by default.
MAX_ANSWER_BYTES_LIMIT: Final = 256 * MiB
#: What a message does to a thread's run still going (contract section 6.2).
ON_ACTIVE: Final = ("reject", "enqueue", "interrupt", "rollback")


def _opt(default: Any, help: str, *, repr: bool = True) -> Any:
    return field(default=default, repr=repr, metadata={"help": help})


@dataclass(frozen=True, slots=True)
class Settings:
    # Identity -----------------------------------------------------------------
    jwt_secret: str | None = _opt(
        None, "HS256 secret; unset: dev mode with a random secret", repr=False
    )
    jwt_public_key: str | None = _opt(
        None, "RS256 public key (PEM text or a path to a PEM file); when set, only RS256"
    )
    jwt_audience: str | None = _opt(None, "required 'aud' claim, when set")
    jwt_issuer: str | None = _opt(None, "required 'iss' claim, when set")
    jwt_leeway_s: float = _opt(0.0, "clock skew allowed on 'exp' and 'iat', in seconds")
    max_token_bytes: int = _opt(
        8 * KiB, "largest token accepted (header, subprotocol or query); longer: 401 / 4401"
    )
    allowed_origins: tuple[str, ...] = _opt(
        (), "comma-separated origins allowed besides the server's own (CORS and /ws)"
    )
    # Limits -------------------------------------------------------------------
    max_message_bytes: int = _opt(64 * KiB, "largest client frame; larger closes with 1009")
    max_frontend_body_bytes: int = _opt(
        4 * MiB, "largest AG-UI or AI SDK request body (it carries the chat's history); 413"
    )
    heartbeat_s: float = _opt(15.0, "keepalive interval for WebSocket pings and SSE comments")
    send_buffer_bytes: int = _opt(
        1 * MiB, "untaken bytes allowed per client whose sends are stuck before it is cut (4408)"
    )
    send_timeout_s: float = _opt(
        10.0, "a send to a client stuck this long closes it as a slow consumer (4408)"
    )
    ws_compression: str = _opt(
        "off", "permessage-deflate for WebSocket clients that offer it: on or off (costs CPU)"
    )
    max_connections_per_user: int = _opt(20, "open WebSocket connections and SSE streams per user")
    rate_limit_per_minute: int = _opt(30, "new runs per user per minute")
    max_active_runs_per_user: int = _opt(5, "runs of one user not yet ended")
    # Runs ---------------------------------------------------------------------
    detach_grace_s: float = _opt(60.0, "a run with no client for this long is cancelled")
    resume_window_s: float = _opt(120.0, "how long a finished run's events stay resumable")
    on_active: str = _opt(
        "enqueue",
        "a message for a thread with a run going: reject, enqueue, interrupt or rollback",
    )
    idempotency_window_s: float = _opt(
        300.0, "a user_message id (Idempotency-Key) of a user starts one run within this window"
    )
    approval_tools: tuple[str, ...] = _opt(
        (), "comma-separated tools whose calls wait for the owner's approval (* for all)"
    )
    input_timeout_s: float = _opt(
        600.0, "an approval or question unanswered this long is resolved by timeout"
    )
    run_log_max_bytes: int = _opt(32 * MiB, "events kept per run for resume; oldest dropped")
    user_log_max_bytes: int = _opt(
        128 * MiB,
        "events one user's finished runs keep for resume, together; oldest runs forgotten first",
    )
    max_answer_bytes: int = _opt(
        1 * MiB, "largest answer of a run (UTF-8 bytes); past it the run fails answer_too_large"
    )
    load_agent: str = _opt("on", "offer the load agent (tests, load scripts): on or off")
    default_agent: str | None = _opt(
        None, "agent that answers when a message names none (llm when configured, else demo)"
    )
    typing_delay_ms: float = _opt(0.0, "pause between the demo agent's chunks")
    agents: tuple[str, ...] = _opt(
        (), "comma-separated name=target: module:attribute (agent, class or factory) or AG-UI URL"
    )
    agent_headers: tuple[str, ...] = _opt(
        (),
        "comma-separated agent.Header-Name=value sent to AG-UI agents (never logged)",
        repr=False,
    )
    agent_timeout_s: float = _opt(60.0, "an AG-UI agent silent this long fails its run")
    entry_points: str = _opt(
        "on", "load agents and tools of installed packages (chat_gateway.agents/.tools): on or off"
    )
    llm_base_url: str | None = _opt(
        None, "OpenAI-compatible endpoint (http://127.0.0.1:11434/v1); with llm_model: llm agent"
    )
    llm_api_key: str | None = _opt(
        None, "API key for the llm endpoint (local servers need none)", repr=False
    )
    llm_model: str | None = _opt(None, "model name the llm endpoint serves")
    llm_usage: str = _opt(
        "on", "ask the llm endpoint for token usage (stream_options.include_usage): on or off"
    )
    llm_max_steps: int = _opt(6, "model requests per run of the llm agent (tool-calling turns)")
    llm_retries: int = _opt(2, "retries of a failed llm request before its first token")
    llm_max_history: int = _opt(20, "earlier messages of the thread sent to the model")
    llm_system_prompt: str | None = _opt(None, "system prompt for the llm agent")
    llm_timeout_s: float = _opt(60.0, "llm connect and read timeout, in seconds")
    llm_retry_backoff_s: float = _opt(0.5, "first backoff between llm retries; doubles each time")
    shutdown_grace_s: float = _opt(10.0, "on shutdown, how long runs may go on finishing")
    # Broker -------------------------------------------------------------------
    broker_url: str | None = _opt(
        None, "unset: in-memory, one process; redis://host:port/0 to share runs across processes"
    )
    run_lease_s: float = _opt(
        10.0, "with Redis: a process silent this long has its runs failed with node_lost"
    )
    redis_outage_s: float = _opt(
        30.0, "with Redis: a run whose events cannot be appended this long is ended failed"
    )
    redis_max_connections: int = _opt(
        100, "with Redis: pooled connections at most; more concurrent calls wait for one"
    )
    redis_append_window_ms: float = _opt(
        1.0,
        "with Redis: while appends are on their way, how long the next call waits for other "
        "runs' appends to share it (an append that finds none on their way goes at once)",
    )
    # Storage ------------------------------------------------------------------
    db_url: str = _opt(
        "sqlite:///var/chat.db", "sqlite:///path.db (default, WAL) or postgresql://user@host/db"
    )
    store_timeout_s: float = _opt(5.0, "a database call slower than this counts as failed")
    history_messages: int = _opt(50, "earlier messages of a thread given to agents as context")
    # Connections --------------------------------------------------------------
    header_timeout_s: float = _opt(
        10.0, "time from accept (or a later request's first byte) to a complete request head"
    )
    body_timeout_s: float = _opt(
        30.0, "time from a complete request head to its complete body; slower: 408"
    )
    max_opening_per_address: int = _opt(
        256, "connections of one client address not yet past their request head; more: 429"
    )
    max_head_bytes: int = _opt(
        64 * KiB, "largest request head (request line and headers); larger: 431"
    )
    # Server -------------------------------------------------------------------
    metrics: str = _opt("on", "serve Prometheus metrics at /metrics: on or off")
    metrics_token: str | None = _opt(
        None, "when set, /metrics needs 'Authorization: Bearer <this token>'", repr=False
    )
    log_level: str = _opt("info", "debug, info, warning or error")
    admin_claim: str | None = _opt(
        None, "claim=value that makes a token an operator (/admin); unset: no operators"
    )
    log_format: str = _opt(
        "text", "text, or json: one JSON object per line with the run, thread and session ids"
    )
    trace_content: str = _opt(
        "off", "on: spans carry message content (messages, answers, tool arguments); off: never"
    )
    event_loop: str = _opt(
        "asyncio",
        "asyncio, or uvloop: less CPU per event, but it accepts one connection per turn of "
        "its loop, so under load new connections queue in the kernel for seconds",
    )
    gc_threshold: int = _opt(
        50_000,
        "allocations between the garbage collector's young collections (CPython: 700); 0: "
        "CPython's own",
    )
    gc_freeze: str = _opt(
        "on", "on: what the serving process set up is kept out of the collector's full passes"
    )

    @property
    def dev_mode(self) -> bool:
        return self.jwt_secret is None and self.jwt_public_key is None

    def public_key_pem(self) -> str | None:
        key = self.jwt_public_key
        if key is None or key.lstrip().startswith("-----BEGIN"):
            return key
        return Path(key).read_text()

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """Read every ``CHAT_*`` variable that is set; the rest keep their defaults.

        Raises:
            ValueError: a variable's value does not fit its setting, naming both.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = ENV_PREFIX + f.name.upper()
            if name in env:
                values[f.name] = parse_value(f, env[name], name)
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """Raise ValueError for settings that cannot work together."""
        if self.ws_compression not in ("on", "off"):
            raise ValueError(
                f"{ENV_PREFIX}WS_COMPRESSION must be on or off, got {self.ws_compression!r}"
            )
        if self.entry_points not in ("on", "off"):
            raise ValueError(
                f"{ENV_PREFIX}ENTRY_POINTS must be on or off, got {self.entry_points!r}"
            )
        if self.admin_claim is not None and "=" not in self.admin_claim.strip("="):
            raise ValueError(f"{ENV_PREFIX}ADMIN_CLAIM must be claim=value, e.g. role=operator")
        if self.llm_usage not in ("on", "off"):
            raise ValueError(f"{ENV_PREFIX}LLM_USAGE must be on or off, got {self.llm_usage!r}")
        if self.trace_content not in ("on", "off"):
            raise ValueError(f"CHAT_TRACE_CONTENT must be on or off, not {self.trace_content!r}")
        if self.event_loop not in ("asyncio", "uvloop"):
            raise ValueError(f"CHAT_EVENT_LOOP must be asyncio or uvloop, got {self.event_loop!r}")
        if self.gc_threshold < 0:
            raise ValueError(f"CHAT_GC_THRESHOLD must be 0 or more, got {self.gc_threshold}")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"CHAT_LOG_FORMAT must be text or json, not {self.log_format!r}")
        if self.metrics not in ("on", "off"):
            raise ValueError(f"{ENV_PREFIX}METRICS must be on or off, got {self.metrics!r}")
        if self.on_active not in ON_ACTIVE:
            raise ValueError(
                f"{ENV_PREFIX}ON_ACTIVE must be one of {', '.join(ON_ACTIVE)}, "
                f"not {self.on_active!r}"
            )
        if self.gc_freeze not in ("on", "off"):
            raise ValueError(f"{ENV_PREFIX}GC_FREEZE must be on or off, got {self.gc_freeze!r}")
        if self.load_agent not in ("on", "off"):
            raise ValueError(f"{ENV_PREFIX}LOAD_AGENT must be on or off, got {self.load_agent!r}")
        if self.max_answer_bytes > MAX_ANSWER_BYTES_LIMIT:
            raise ValueError(
                f"{ENV_PREFIX}MAX_ANSWER_BYTES must be at most {MAX_ANSWER_BYTES_LIMIT}"
            )
        for name in (
            "max_message_bytes",
            "max_frontend_body_bytes",
            "send_buffer_bytes",
            "max_connections_per_user",
            "rate_limit_per_minute",
            "max_active_runs_per_user",
            "run_log_max_bytes",
            "user_log_max_bytes",
            "max_answer_bytes",
            "history_messages",
            "llm_max_steps",
            "max_token_bytes",
            "max_opening_per_address",
            "max_head_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{ENV_PREFIX}{name.upper()} must be at least 1")
        for name in (
            "heartbeat_s",
            "detach_grace_s",
            "resume_window_s",
            "idempotency_window_s",
            "send_timeout_s",
            "store_timeout_s",
            "llm_timeout_s",
            "header_timeout_s",
            "body_timeout_s",
            "agent_timeout_s",
            "redis_outage_s",
            "input_timeout_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{ENV_PREFIX}{name.upper()} must be positive")
        for name in (
            "jwt_leeway_s",
            "typing_delay_ms",
            "shutdown_grace_s",
            "llm_retries",
            "llm_max_history",
            "llm_retry_backoff_s",
            "redis_append_window_ms",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{ENV_PREFIX}{name.upper()} must not be negative")
        if (self.llm_base_url is None) != (self.llm_model is None):
            raise ValueError(
                f"{ENV_PREFIX}LLM_BASE_URL and {ENV_PREFIX}LLM_MODEL are set together, or neither"
            )


def base_type(f: "dataclasses.Field[Any]") -> type:
    """The field's type without ``| None``."""
    tp: Any = f.type
    if get_origin(tp) in (Union, types.UnionType):
        tp = next(a for a in get_args(tp) if a is not type(None))
    return get_origin(tp) or tp  # type: ignore[no-any-return]


def parse_value(f: "dataclasses.Field[Any]", raw: str, source: str) -> Any:
    """Convert one textual value (an environment variable or a flag) for field ``f``."""
    tp = base_type(f)
    text = raw.strip()
    try:
        if tp is tuple:
            return tuple(part.strip() for part in text.split(",") if part.strip())
        if tp is int:
            return int(text.replace("_", ""))
        if tp is float:
            return float(text)
        return text or None
    except ValueError:
        kind = {int: "an integer", float: "a number"}.get(tp, "a value")
        raise ValueError(f"{source} must be {kind}, got {raw!r}") from None

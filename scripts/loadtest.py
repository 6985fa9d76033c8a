"""Load test for the gateway: N concurrent clients, each sending M messages to an agent.

Usage (from the project root, with the gateway running, e.g. ``make run``)::

    python scripts/loadtest.py --clients 20 --messages 5
    python scripts/loadtest.py --clients 50 --ramp-s 5 --duration-s 30 --message 'chunks=200'
    python scripts/loadtest.py --sse --clients 10 --messages 3 --json

Each client opens one WebSocket (``--sse``: one keep-alive HTTP connection) at
its turn in the ramp, waits for ``connection_ready``, then sends its messages one
after the other: the next one once the previous run's ``agent_completed`` came.
The ``load`` agent is the default, so the agent's own cost is known (protocol
chat.v1, section 5: ``chunks=N chunk_chars=C delay_ms=D thinking=T tools=K
tool_ms=M``); with it the client also knows how many events each run must bring.

Measured: connect time (WebSocket: TCP connect to ``connection_ready``; SSE: the
POST to its response headers), time from sending a message to its run's first
event, to ``agent_started`` and to ``agent_completed`` (p50, p95, p99), the
latency of every event from the server's ``ts`` to its arrival (both clocks are
this machine's), events per second (every run event over the wall time from the
first message sent to the last ``agent_completed``), errors and close codes by
kind, and events lost, duplicated or reordered, found from each run's ``seq``.

The WebSocket client is the load kit's (``scripts/kit/ws.py``: websockets'
Sans-I/O protocol, no compression offered, frames handled as they arrive, one
event loop, uvloop when installed), so that one process can drive many fast
streams; ``--sse`` uses httpx and the kit's SSE parser, which
costs more per event: the report gives the share of a core the client used, and
near 100% the client, not the server, is what limits the figures.

Tokens: ``--token`` is used by every client as is; otherwise each client gets a
token of its own user (``load-0000``, ``load-0001``, …) minted with ``--secret``,
else ``CHAT_JWT_SECRET``, else the dev-mode file ``var/dev_secret``.  The
gateway's per-user defaults are 30 new runs a minute, 5 runs at once and 20
connections: one client per user keeps the last two out of the way, but a client
sending more than 30 messages a minute gets ``rate_limited``.  For heavy runs
start the gateway with higher limits, e.g.::

    CHAT_RATE_LIMIT_PER_MINUTE=100000 CHAT_MAX_ACTIVE_RUNS_PER_USER=1000 \\
    CHAT_MAX_CONNECTIONS_PER_USER=1000 chat-gateway

Only loopback targets are accepted (127.0.0.0/8, ::1, localhost).  Every loop is
bounded: messages per client by ``--messages``, each run by ``--run-timeout-s``,
the whole test by ``--timeout-s``.

Exit status: 0 when every run completed with no error and no lost, duplicated or
reordered event; 1 otherwise; 2 for usage errors.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, Final

import orjson

from scripts.kit.args import (
    SSE_PATH,
    UsageError,
    loopback_target,
    non_negative,
    positive,
    positive_int,
)
from scripts.kit.load import DEFAULT_MESSAGE, Config, run_load
from scripts.kit.loop import run_async
from scripts.kit.stats import Sample, expected_events, percentile
from scripts.kit.tokens import NoSecretError, env_claim, resolve_secret

__all__ = ["Sample", "expected_events", "loopback_target", "main", "percentile"]

DEFAULT_URL: Final = "ws://127.0.0.1:8000/ws"
#: Runs a client sends at most when only ``--duration-s`` bounds it.
MAX_MESSAGES_PER_CLIENT: Final = 1_000_000

EXIT_OK: Final = 0
EXIT_PROBLEMS: Final = 1
EXIT_USAGE: Final = 2


# Output ---------------------------------------------------------------------------------------


def render(report: dict[str, Any]) -> str:
    """The human summary of a report."""
    cfg = report["config"]
    runs = report["runs"]
    events = report["events"]
    seq = report["seq"]
    transport = "SSE" if cfg["sse"] else "WebSocket"
    lines = [
        f"loadtest: {cfg['clients']} clients x {cfg['messages_per_client']} messages over "
        f"{transport} to {cfg['url']} (agent {cfg['agent']}: {cfg['message']!r})",
        f"  clients   {report['clients_connected']} connected of {cfg['clients']}",
        f"  runs      {runs['sent']} sent, {runs['completed']} completed"
        + (f"  {runs['by_status']}" if set(runs["by_status"]) - {"completed"} else ""),
    ]
    wall = events["wall_s"]
    rate = events["per_s"]
    expected = events["expected_per_run"]
    lines.append(
        f"  events    {events['total']:,} ({events['bytes'] / 1e6:.2f} MB)"
        + (f", {expected} per run expected" if expected is not None else "")
        + (f", in {wall:.3f} s: {rate:,.0f} events/s" if wall else "")
    )
    lines.append(
        f"  seq       lost {seq['lost']}, duplicated {seq['duplicated']}, reordered "
        f"{seq['reordered']}, runs with a wrong count {seq['wrong_count_runs']}, "
        f"after agent_completed {seq['after_agent_completed']}"
    )
    lines.append("")
    lines.append(f"  {'(ms)':<28}{'n':>9}{'mean':>10}{'p50':>10}{'p95':>10}{'p99':>10}{'max':>10}")
    rows = [
        ("connect", "connect_ms"),
        ("message -> first event", "first_event_ms"),
        ("message -> agent_started", "agent_started_ms"),
        ("message -> agent_completed", "agent_completed_ms"),
        ("event latency (server ts)", "event_latency_ms"),
    ]
    for label, key in rows:
        s = report[key]

        def cell(v: float | None) -> str:
            return f"{v:>10.2f}" if v is not None else f"{'-':>10}"

        lines.append(
            f"  {label:<28}{s['n']:>9}"
            + "".join(cell(s[k]) for k in ("mean", "p50", "p95", "p99", "max"))
        )
    lines.append("")
    errors = report["errors"]
    lines.append(
        "  errors    " + (", ".join(f"{k}: {v}" for k, v in errors.items()) if errors else "none")
    )
    codes = report["close_codes"]
    lines.append(
        "  closed by the server  "
        + (", ".join(f"{k}: {v}" for k, v in codes.items()) if codes else "none")
    )
    share = report["client_cpu_share"]
    lines.append(
        f"  client    {share:.0%} of one core"
        + (" (the client may be what limits these figures)" if share >= 0.85 else "")
    )
    lines.append("  result    " + ("ok" if report["ok"] else "PROBLEMS (see above)"))
    return "\n".join(lines)


def token_source(args: argparse.Namespace, ttl_s: int) -> Callable[[int], str] | None:
    """Each client's token: ``--token`` for all, else one minted per client user."""
    if args.token:
        token: str = args.token
        return lambda _index: token
    from server.auth import Authenticator
    from server.settings import Settings

    try:
        secret, _ = resolve_secret(args.secret)
    except NoSecretError as exc:
        raise UsageError(str(exc)) from None
    settings = Settings(
        jwt_secret=secret,
        jwt_audience=env_claim(None, "CHAT_JWT_AUDIENCE"),
        jwt_issuer=env_claim(None, "CHAT_JWT_ISSUER"),
    )
    auth = Authenticator(settings)
    prefix = args.user_prefix
    return lambda index: auth.mint(f"{prefix}-{index:04d}", ttl_s)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loadtest.py",
        description=(
            "Load-test the gateway (loopback only): N clients over WebSocket or SSE, each "
            "sending M messages to an agent, with latency percentiles, events per second, "
            "errors, close codes and lost/duplicated/reordered events."
        ),
        epilog=(
            "Per-user limits: clients get users of their own (PREFIX-0000, PREFIX-0001, ...), "
            "but the gateway's defaults still allow only 30 new runs a minute per user, 5 runs "
            "at once and 20 connections. For heavy runs start the gateway with e.g. "
            "CHAT_RATE_LIMIT_PER_MINUTE=100000 CHAT_MAX_ACTIVE_RUNS_PER_USER=1000 "
            "CHAT_MAX_CONNECTIONS_PER_USER=1000. With --token every client is the same user. "
            "Exit status: 0 when every run completed cleanly, 1 when anything went wrong, "
            "2 for usage errors."
        ),
    )
    parser.add_argument(
        "--url", default=DEFAULT_URL, help=f"the gateway's WebSocket URL ({DEFAULT_URL})"
    )
    parser.add_argument(
        "--sse",
        action="store_true",
        help=f"use SSE (POST {SSE_PATH} on the same host and port) instead of WebSocket",
    )
    parser.add_argument(
        "--clients", type=positive_int, default=10, metavar="N", help="concurrent clients (10)"
    )
    parser.add_argument(
        "--messages",
        type=positive_int,
        default=None,
        metavar="M",
        help="messages per client, one after the other (default 5; with --duration-s: "
        f"as many as fit, at most {MAX_MESSAGES_PER_CLIENT:,})",
    )
    parser.add_argument(
        "--ramp-s",
        type=non_negative,
        default=0.0,
        metavar="S",
        help="spread the clients' starts evenly over S seconds (0)",
    )
    parser.add_argument(
        "--duration-s",
        type=positive,
        default=None,
        metavar="S",
        help="after the ramp, send new messages for S seconds (runs under way finish)",
    )
    parser.add_argument("--agent", default="load", help="the agent to ask (load)")
    parser.add_argument(
        "--message", default=DEFAULT_MESSAGE, help=f"the message text ({DEFAULT_MESSAGE!r})"
    )
    parser.add_argument("--token", default=None, help="one JWT for every client")
    parser.add_argument(
        "--secret",
        default=None,
        help="HS256 secret to mint per-client tokens (default: CHAT_JWT_SECRET, else "
        "var/dev_secret)",
    )
    parser.add_argument(
        "--user-prefix", default="load", metavar="PREFIX", help="per-client users (load)"
    )
    parser.add_argument(
        "--run-timeout-s",
        type=positive,
        default=60.0,
        metavar="S",
        help="a run not ended after S seconds counts as an error (60)",
    )
    parser.add_argument(
        "--connect-timeout-s",
        type=positive,
        default=10.0,
        metavar="S",
        help="bound on connecting and on waiting for connection_ready (10)",
    )
    parser.add_argument(
        "--timeout-s",
        type=positive,
        default=None,
        metavar="S",
        help="hard limit on the whole test (default: ramp + duration + run timeout + 30, "
        "or 600 with no duration)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    progress = parser.add_mutually_exclusive_group()
    progress.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="show the progress bar on stderr (default: when stderr is a terminal)",
    )
    progress.add_argument("--no-progress", dest="progress", action="store_false")
    return parser


def config_from(args: argparse.Namespace) -> Config:
    target = loopback_target(args.url, sse=args.sse)
    if args.messages is None:
        args.messages = MAX_MESSAGES_PER_CLIENT if args.duration_s is not None else 5
    if args.timeout_s is None:
        if args.duration_s is not None:
            args.timeout_s = args.ramp_s + args.duration_s + args.run_timeout_s + 30
        else:
            args.timeout_s = 600.0
    ttl = int(args.timeout_s + 3600)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    return Config(
        target=target,
        clients=args.clients,
        messages=args.messages,
        ramp_s=args.ramp_s,
        duration_s=args.duration_s,
        agent=args.agent or None,
        message=args.message,
        sse=args.sse,
        run_timeout_s=args.run_timeout_s,
        connect_timeout_s=args.connect_timeout_s,
        timeout_s=args.timeout_s,
        tokens=token_source(args, ttl),
        progress=progress,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        cfg = config_from(args)
    except UsageError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    stats = run_async(run_load(cfg))
    report = {
        "config": {
            "url": cfg.target.http_url if cfg.sse else cfg.target.ws_url,
            "sse": cfg.sse,
            "clients": cfg.clients,
            "messages_per_client": cfg.messages,
            "ramp_s": cfg.ramp_s,
            "duration_s": cfg.duration_s,
            "agent": cfg.agent,
            "message": cfg.message,
        },
        **stats.report(),
    }
    if args.json:
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(render(report))
    return EXIT_OK if report["ok"] else EXIT_PROBLEMS


if __name__ == "__main__":
    sys.exit(main())

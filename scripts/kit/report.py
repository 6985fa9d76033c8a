"""The benchmark's report: targets, text and Markdown tables, the machine, profiles.

Works on the results :mod:`scripts.bench` collects: per server, per scenario, a
:class:`~scripts.kit.measure.Figure` or the idle scenario's dict.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import orjson

from scripts.kit.measure import Figure

ROOT = Path(__file__).resolve().parents[2]
WS_SERVERS: Final = ("bare", "gateway", "socketio")
SSE_SERVERS: Final = ("gateway-sse", "sse-starlette")


def hot_spots(path: Path, top: int = 15, src: Path = ROOT) -> dict[str, Any]:
    """Where the event loop's thread spent its samples, from a py-spy speedscope file.

    ``self``: samples in the function itself (a line that calls into C, such as a
    socket write, counts for the function); ``total``: samples with the function
    anywhere on the stack (the frames above ``Server.run``, on every sample, are
    left out); ``lines``: the hottest lines by self samples.
    """
    doc = orjson.loads(path.read_bytes())
    frames = doc["shared"]["frames"]
    profiles = [p for p in doc["profiles"] if "MainThread" in str(p.get("name"))]
    others = [p for p in doc["profiles"] if p not in profiles]
    profiles = profiles or doc["profiles"]

    def where(i: int) -> tuple[str, str, int]:
        f = frames[i]
        file = str(f.get("file", ""))
        for marker in ("site-packages/", str(src) + "/", str(ROOT) + "/", "lib/python3."):
            if marker in file:
                file = file.split(marker, 1)[1]
                if marker == "lib/python3.":
                    file = "stdlib/" + file.split("/", 1)[-1]
        return str(f.get("name")), file, int(f.get("line") or 0)

    self_fn: dict[tuple[str, str], int] = {}
    total_fn: dict[tuple[str, str], int] = {}
    self_line: dict[tuple[str, str, int], int] = {}
    count = 0
    for prof in profiles:
        for stack in prof["samples"]:
            count += 1
            if not stack:
                continue
            name, file, line = where(stack[-1])
            self_fn[(name, file)] = self_fn.get((name, file), 0) + 1
            self_line[(name, file, line)] = self_line.get((name, file, line), 0) + 1
            for key in {where(i)[:2] for i in stack}:
                total_fn[key] = total_fn.get(key, 0) + 1
    if not count:
        return {"samples": 0, "self": [], "total": [], "lines": []}

    def ranked(weights: dict[Any, int], skip_all: bool = False) -> list[dict[str, Any]]:
        best = sorted(weights.items(), key=lambda kv: kv[1], reverse=True)
        out = []
        for key, n in best:
            if skip_all and n >= 0.99 * count:
                continue
            label = f"{key[0]} ({key[1]}" + (f":{key[2]})" if len(key) > 2 else ")")
            out.append({"function": label, "share": round(n / count, 4)})
            if len(out) == top:
                break
        return out

    return {
        "samples": count,
        "other_threads_samples": sum(len(p["samples"]) for p in others),
        "self": ranked(self_fn),
        "total": ranked(total_fn, skip_all=True),
        "lines": ranked(self_line),
    }


def value_of(results: dict[str, dict[str, Any]], server: str, scenario: str) -> float | None:
    item = results.get(server, {}).get(scenario)
    if isinstance(item, Figure):
        return item.value
    if isinstance(item, dict):
        value = item.get("kib_per_connection")
        return None if value is None else float(value)
    return None


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


#: The issue's targets: label, (server, scenario) over (server, scenario), operator, limit.
TARGETS: Final[tuple[tuple[str, tuple[str, str], tuple[str, str], str, float], ...]] = (
    ("gateway / bare, one stream", ("gateway", "one_stream"), ("bare", "one_stream"), ">=", 0.8),
    ("gateway / bare, 20 streams", ("gateway", "streams_20"), ("bare", "streams_20"), ">=", 0.8),
    (
        "gateway / socketio, one stream",
        ("gateway", "one_stream"),
        ("socketio", "one_stream"),
        ">=",
        1.5,
    ),
    (
        "gateway / socketio, 20 streams",
        ("gateway", "streams_20"),
        ("socketio", "streams_20"),
        ">=",
        1.5,
    ),
    (
        "gateway SSE / sse-starlette, one stream",
        ("gateway-sse", "one_stream"),
        ("sse-starlette", "one_stream"),
        ">=",
        1.0,
    ),
    (
        "gateway SSE / sse-starlette, 20 streams",
        ("gateway-sse", "streams_20"),
        ("sse-starlette", "streams_20"),
        ">=",
        1.0,
    ),
    ("gateway TTFE p50 / bare echo RTT p50", ("gateway", "ttfe"), ("bare", "echo_rtt"), "<=", 2.5),
    (
        "gateway / bare, memory per idle connection",
        ("gateway", "idle"),
        ("bare", "idle"),
        "<=",
        1.5,
    ),
)


def targets(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each with its figure and whether it is met."""
    rows = [
        (label, ratio(value_of(results, *top), value_of(results, *bottom)), op, limit)
        for label, top, bottom, op, limit in TARGETS
    ]
    out = []
    for label, value, op, limit in rows:
        met = None if value is None else (value >= limit if op == ">=" else value <= limit)
        out.append(
            {
                "target": label,
                "value": None if value is None else round(value, 3),
                "limit": f"{op} {limit}",
                "met": met,
            }
        )
    idle_item = results.get("gateway", {}).get("idle")
    if isinstance(idle_item, dict):
        n = idle_item["connections"]
        held = idle_item["held"]
        out.append(
            {
                "target": f"{n} idle connections held by one gateway process",
                "value": held,
                "limit": f"= {n}",
                "met": held == n,
            }
        )
    return out


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit in ("events/s", "deliveries/s"):
        return f"{value:,.0f}"
    if unit == "ms":
        return f"{value:.3f}"
    return f"{value:,.2f}"


def render(report: dict[str, Any]) -> str:
    results = report["results"]
    lines = [
        f"bench: {report['machine']['cpu']} x{report['machine']['nproc']}, "
        f"Python {report['machine']['python']}, uvicorn {report['versions'].get('uvicorn')} "
        f"({report['uvicorn_defaults']}); {'quick' if report['quick'] else 'full'} run "
        f"in {report['elapsed_s']:.0f} s; code {report.get('git', '?')}; load average "
        f"{report.get('loadavg', {}).get('before', ['?'])[0]} before",
        "",
    ]
    scenarios = [
        ("one_stream", "one stream", "events/s"),
        ("streams_20", "20 streams", "events/s"),
        ("streams_200", f"{report['sizes']['streams200_clients']} streams", "events/s"),
        ("fanout", f"1 run x {report['sizes']['fanout_sessions']} sessions", "deliveries/s"),
        ("ttfe", "TTFE p50", "ms"),
        ("echo_rtt", "echo RTT p50", "ms"),
        ("idle", f"KiB per idle conn ({report['sizes']['idle_connections']})", "KiB"),
    ]
    head = (
        f"{'WebSocket':<30}{'bare':>12}{'gateway':>12}{'socketio':>12}{'gw/bare':>9}{'gw/peer':>9}"
    )
    lines += [head, "-" * len(head)]
    for key, label, unit in scenarios:
        vals = [value_of(results, s, key) for s in WS_SERVERS]
        if all(x is None for x in vals):
            continue
        r1 = ratio(vals[1], vals[0])
        r2 = ratio(vals[1], vals[2])
        lines.append(
            f"{label:<30}"
            + "".join(f"{fmt(x, unit):>12}" for x in vals)
            + f"{fmt(r1):>9}{fmt(r2):>9}"
        )
    lines.append("")
    head = f"{'SSE':<30}{'gateway':>12}{'sse-starl.':>12}{'gw/peer':>9}"
    lines += [head, "-" * len(head)]
    for key, label, unit in [*scenarios[:3], scenarios[4]]:
        vals = [value_of(results, s, key) for s in SSE_SERVERS]
        if all(x is None for x in vals):
            continue
        lines.append(
            f"{label:<30}"
            + "".join(f"{fmt(x, unit):>12}" for x in vals)
            + f"{fmt(ratio(vals[0], vals[1])):>9}"
        )
    lines.append("")
    lines.append(
        "CPU share over each measurement (server/client; a side near 1.0 is the bottleneck)"
    )
    for server in (*WS_SERVERS, *SSE_SERVERS):
        cells = []
        for key, label, _ in scenarios[:5]:
            item = results.get(server, {}).get(key)
            if isinstance(item, Figure) and item.cpu:
                cells.append(f"{label}: {item.cpu['server']:.2f}/{item.cpu['client']:.2f}")
        if cells:
            lines.append(f"  {server:<14} " + "; ".join(cells))
    idle_rows = [(s, results.get(s, {}).get("idle")) for s in WS_SERVERS]
    for server, item in idle_rows:
        if isinstance(item, dict):
            before = item["rss_before_kib"] / 1024
            after = item["rss_after_kib"] / 1024
            lines.append(
                f"  idle {server:<9} {item['held']}/{item['connections']} held, "
                f"RSS {before:.1f} -> {after:.1f} MiB, opened in {item['open_s']} s, "
                f"idle server CPU {item['idle_server_cpu_share']:.1%}, "
                f"pings {item['ping_answered']}"
            )
    lines.append("")
    lines.append("Targets")
    for t in report["targets"]:
        mark = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        value = f"{t['value']:.3f}" if isinstance(t["value"], float) else str(t["value"])
        lines.append(f"  {t['target']:<48} {value:>8}  ({t['limit']})  {mark}")
    problems = [
        f"{server}/{scenario}: {p}"
        for server, items in results.items()
        for scenario, item in items.items()
        if isinstance(item, Figure)
        for p in item.problems
    ]
    if problems:
        lines.append("")
        lines.append("Problems seen")
        lines += [f"  {p}" for p in problems]
    if report.get("profiles"):
        for name, prof in report["profiles"].items():
            if not isinstance(prof, dict) or "self" not in prof:
                lines.append(f"profile {name}: {prof}")
                continue
            lines.append("")
            lines.append(f"Gateway profile, {name} ({prof['samples']} samples, {prof['file']})")
            lines.append("  self time")
            lines += [f"    {h['share']:6.1%}  {h['function']}" for h in prof["self"][:12]]
            lines.append("  total time (the function and what it calls)")
            lines += [f"    {h['share']:6.1%}  {h['function']}" for h in prof["total"][:12]]
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    """The figures as Markdown tables, for docs/benchmarks.md."""
    results = report["results"]
    sizes = report["sizes"]

    def cell(server: str, key: str, unit: str) -> str:
        item = results.get(server, {}).get(key)
        value = value_of(results, server, key)
        text = fmt(value, unit)
        if isinstance(item, Figure) and item.cpu:
            text += f" ({item.cpu['server']:.2f}/{item.cpu['client']:.2f})"
        return text

    rows = [
        ("one_stream", f"one stream, {sizes['one_stream_chunks']:,} chunks", "events/s"),
        ("streams_20", f"20 streams x {sizes['streams20_chunks']:,} chunks", "events/s"),
        (
            "streams_200",
            f"{sizes['streams200_clients']} streams x {sizes['streams200_chunks']} chunks",
            "events/s",
        ),
        (
            "fanout",
            f"1 run x {sizes['fanout_sessions']} sessions, {sizes['fanout_chunks']:,} chunks",
            "deliveries/s",
        ),
        ("ttfe", "time to first event, p50", "ms"),
        ("echo_rtt", "echo round trip, p50", "ms"),
        ("idle", f"KiB per idle connection ({sizes['idle_connections']:,})", "KiB"),
    ]
    out = [
        "| WebSocket | bare | gateway | python-socketio | gateway / bare | gateway / peer |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, label, unit in rows:
        vals = [value_of(results, s, key) for s in WS_SERVERS]
        if all(v is None for v in vals):
            continue
        cells = [cell(s, key, unit) for s in WS_SERVERS]
        out.append(
            f"| {label} | "
            + " | ".join(cells)
            + f" | {fmt(ratio(vals[1], vals[0]))} | {fmt(ratio(vals[1], vals[2]))} |"
        )
    out += [
        "",
        "| SSE | gateway | sse-starlette | gateway / peer |",
        "|---|---:|---:|---:|",
    ]
    for key, label, unit in [*rows[:3], rows[4]]:
        vals = [value_of(results, s, key) for s in SSE_SERVERS]
        if all(v is None for v in vals):
            continue
        cells = [cell(s, key, unit) for s in SSE_SERVERS]
        out.append(f"| {label} | " + " | ".join(cells) + f" | {fmt(ratio(vals[0], vals[1]))} |")
    out += ["", "| idle connections | held | RSS before -> after | opened in | idle server CPU |"]
    out.append("|---|---:|---:|---:|---:|")
    for server in WS_SERVERS:
        item = results.get(server, {}).get("idle")
        if isinstance(item, dict):
            out.append(
                f"| {server} | {item['held']:,} / {item['connections']:,} | "
                f"{item['rss_before_kib'] / 1024:.1f} -> {item['rss_after_kib'] / 1024:.1f} MiB | "
                f"{item['open_s']} s | {item['idle_server_cpu_share']:.1%} |"
            )
    out += ["", "| target | figure | limit | met |", "|---|---:|---:|---|"]
    for t in report["targets"]:
        value = f"{t['value']:.3f}" if isinstance(t["value"], float) else str(t["value"])
        mark = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        out.append(f"| {t['target']} | {value} | {t['limit']} | {mark} |")
    return "\n".join(out)


def machine() -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def versions() -> dict[str, str]:
    out = {}
    for name in (
        "uvicorn",
        "starlette",
        "websockets",
        "uvloop",
        "httptools",
        "orjson",
        "python-socketio",
        "python-engineio",
        "sse-starlette",
    ):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return [0.0, 0.0, 0.0]


def git_state() -> str:
    """The commit measured, and whether the working tree differed from it."""
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return done.stdout.strip() or "?"


def uvicorn_defaults() -> str:
    """What ``uvicorn.Config`` picks for loop, http and ws when left on ``auto``."""
    from uvicorn.loops.auto import auto_loop_factory
    from uvicorn.protocols.http.auto import AutoHTTPProtocol
    from uvicorn.protocols.websockets.auto import AutoWebSocketsProtocol

    loop = getattr(auto_loop_factory(), "__module__", "?") or "?"
    ws = getattr(AutoWebSocketsProtocol, "__name__", "none")
    return f"loop {loop.split('.')[0]}, http {AutoHTTPProtocol.__name__}, ws {ws}"

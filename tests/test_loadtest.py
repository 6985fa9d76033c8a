"""The measurement scripts, run as real processes against servers started here, on loopback.

Small on purpose: these run in CI on two cores.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from starlette.testclient import TestClient

from scripts.bench_apps import bare_app
from scripts.loadtest import Sample, expected_events, loopback_target, percentile
from tests.support import SECRET, LiveServer, spawn_server, ws_client

ROOT = Path(__file__).resolve().parents[1]
LOADTEST = "scripts/loadtest.py"
BENCH = "scripts/bench.py"
MESSAGE = "chunks=20 chunk_chars=5 thinking=2 tools=1 tool_ms=1"
#: user_message, agent_started, 2 thinking, 2 tool events, 20 chunks, response_complete,
#: agent_completed
EVENTS_PER_RUN = 28


def run_script(script: str, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    return subprocess.run(
        [sys.executable, script, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def report_of(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert done.stdout, done.stderr
    report: dict[str, Any] = orjson.loads(done.stdout)
    return report


def assert_clean(report: dict[str, Any], runs: int) -> None:
    assert report["ok"], report
    assert report["runs"] == {
        "sent": runs,
        "ended": runs,
        "completed": runs,
        "by_status": {"completed": runs},
    }
    assert report["seq"] == {
        "lost": 0,
        "duplicated": 0,
        "reordered": 0,
        "wrong_count_runs": 0,
        "after_agent_completed": 0,
    }
    assert report["errors"] == {}
    assert report["close_codes"] == {}
    events = report["events"]
    assert events["expected_per_run"] == EVENTS_PER_RUN
    assert events["total"] == runs * EVENTS_PER_RUN
    assert events["by_type"] == {
        "agent_completed": runs,
        "agent_started": runs,
        "agent_thinking": 2 * runs,
        "response_chunk": 20 * runs,
        "response_complete": runs,
        "tool_completed": runs,
        "tool_executing": runs,
        "user_message": runs,
    }
    assert events["per_s"] > 0
    for key in ("first_event_ms", "agent_started_ms", "agent_completed_ms"):
        summary = report[key]
        assert summary["n"] == runs
        assert 0 <= summary["p50"] <= summary["p95"] <= summary["p99"] <= summary["max"]
    assert report["event_latency_ms"]["n"] == runs * EVENTS_PER_RUN


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with spawn_server(tmp_path_factory.mktemp("loadtest"), CHAT_LOG_LEVEL="warning") as server:
        yield server


def test_websocket_clients_get_every_event_once_and_in_order(gateway: LiveServer) -> None:
    done = run_script(
        LOADTEST,
        *("--url", gateway.ws, "--secret", SECRET, "--clients", "3", "--messages", "3"),
        *("--ramp-s", "0.2", "--message", MESSAGE, "--json", "--no-progress"),
    )
    assert done.returncode == 0, done.stderr + done.stdout
    report = report_of(done)
    assert report["clients_connected"] == 3
    assert report["connect_ms"]["n"] == 3
    assert_clean(report, runs=9)


def test_sse_clients_get_every_event_once_and_in_order(gateway: LiveServer) -> None:
    done = run_script(
        LOADTEST,
        *("--url", gateway.ws, "--sse", "--secret", SECRET, "--clients", "2", "--messages", "2"),
        *("--message", MESSAGE, "--json", "--no-progress"),
    )
    assert done.returncode == 0, done.stderr + done.stdout
    report = report_of(done)
    assert report["config"]["url"].endswith("/api/chat/stream")
    assert_clean(report, runs=4)


def test_human_summary_and_rate_limits_are_reported(tmp_path: Path) -> None:
    # One user for every client (--token) and a limit of 2 new runs a minute.
    with spawn_server(tmp_path, CHAT_RATE_LIMIT_PER_MINUTE="2") as server:
        token = server.token("shared-user")
        done = run_script(
            LOADTEST,
            *("--url", server.ws, "--token", token, "--clients", "1", "--messages", "4"),
            *("--message", "chunks=2", "--no-progress"),
        )
    assert done.returncode == 1, done.stderr + done.stdout
    assert "error rate_limited: 2" in done.stdout
    assert "2 completed" in done.stdout
    assert "PROBLEMS" in done.stdout


def test_bad_tokens_show_as_close_codes(gateway: LiveServer) -> None:
    done = run_script(
        LOADTEST,
        *("--url", gateway.ws, "--token", "not-a-jwt", "--clients", "2", "--messages", "1"),
        *("--json", "--no-progress"),
    )
    assert done.returncode == 1
    report = report_of(done)
    assert report["close_codes"] == {"4401": 2}
    assert report["clients_connected"] == 0
    assert not report["ok"]


@pytest.mark.parametrize(
    "url",
    [
        "ws://example.com/ws",
        "ws://10.1.2.3:8000/ws",
        "http://[2001:db8::1]:80/",
        "wss://127.0.0.1/ws",
    ],
)
def test_non_loopback_targets_are_refused(url: str) -> None:
    done = run_script(LOADTEST, "--url", url, "--token", "t", "--no-progress", timeout=30)
    assert done.returncode == 2
    assert "error" in done.stderr
    assert done.stdout == ""


def test_loopback_targets() -> None:
    assert loopback_target("ws://localhost:9/ws").host == "127.0.0.1"
    assert loopback_target("ws://127.0.0.2:9/ws").port == 9
    assert loopback_target("ws://[::1]:9/ws").netloc == "[::1]:9"
    sse = loopback_target("ws://127.0.0.1:9/ws", sse=True)
    assert sse.http_url == "http://127.0.0.1:9/api/chat/stream"


def test_figures() -> None:
    assert expected_events("load", MESSAGE) == EVENTS_PER_RUN
    assert expected_events("load", "chunks=3 fail=1") == 2 + 1 + 3 + 4 + 2
    assert expected_events("demo", "hello") is None
    assert expected_events("load", "bogus") is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    sample = Sample(cap=10)
    for i in range(1000):
        sample.add(float(i))
    summary = sample.summary()
    assert summary["n"] == 1000
    assert summary["max"] == 999.0
    assert len(sample.values) == 10


async def test_bare_frames_match_the_gateways(server: LiveServer, user: str) -> None:
    """The bare endpoint sends the gateway's events: same types, order and sizes."""
    message = "chunks=5 chunk_chars=7 thinking=2 tools=1 tool_ms=0"
    async with ws_client(server, user) as client:
        await client.send(type="user_message", id="m1", content=message, agent="load")
        ours = [m for m in await client.recv_until("agent_completed") if m.get("seq")]
    with TestClient(bare_app()) as http, http.websocket_connect("/ws") as ws:
        assert orjson.loads(ws.receive_text())["type"] == "connection_ready"
        ws.send_text(
            orjson.dumps({"type": "user_message", "id": "m1", "content": message}).decode()
        )
        bare = []
        for _ in range(100):
            bare.append(orjson.loads(ws.receive_text()))
            if bare[-1]["type"] == "agent_completed":
                break
    # When this fails, the gateway's events changed: make scripts/bench_apps.py send them too.
    assert [m["type"] for m in bare] == [m["type"] for m in ours]
    assert [m["seq"] for m in bare] == [m["seq"] for m in ours]
    for a, b in zip(bare, ours, strict=True):
        assert set(a) == set(b)
        assert set(a["data"]) == set(b["data"]), (a, b)
        # Only the digits of ts and of durations may differ.
        sizes = len(orjson.dumps(a)), len(orjson.dumps(b))
        assert abs(sizes[0] - sizes[1]) <= 8, (a, b)


@pytest.mark.skipif(
    importlib.util.find_spec("socketio") is None
    or importlib.util.find_spec("sse_starlette") is None,
    reason="the bench extra (python-socketio, sse-starlette) is not installed",
)
def test_bench_quick_runs_every_server_and_scenario() -> None:
    done = run_script(BENCH, "--quick", "--json", timeout=110)
    assert done.returncode == 0, done.stderr[-4000:]
    report = report_of(done)
    results = report["results"]
    assert set(results) == {"bare", "gateway", "socketio", "gateway-sse", "sse-starlette"}
    for server, items in results.items():
        for scenario, item in items.items():
            if scenario == "idle":
                assert item["held"] == item["connections"], (server, item)
                assert item["failures"] == {}, (server, item)
                continue
            assert item["value"] and item["value"] > 0, (server, scenario, item)
            assert "problems" not in item, (server, scenario, item["problems"])
    # Same events, same sizes: the bare endpoint and the gateway send identical bytes per event.
    bare = results["bare"]["one_stream"]["detail"]
    gateway = results["gateway"]["one_stream"]["detail"]
    assert bare["events_per_rep"] == gateway["events_per_rep"]
    assert abs(bare["bytes_per_event"] - gateway["bytes_per_event"]) < 1.0
    assert {t["target"] for t in report["targets"]} >= {"gateway / bare, one stream"}


def test_bench_runs_the_gateway_on_redis_when_asked() -> None:
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed (Debian package redis-server)")
    done = run_script(BENCH, "--quick", "--json", "--servers", "gateway", "--redis", timeout=110)
    assert done.returncode == 0, done.stderr[-4000:]
    report = report_of(done)
    assert report["broker"] == "redis"
    assert report["gateway_env"]["CHAT_BROKER_URL"].startswith("redis://127.0.0.1:")
    ttfe = report["results"]["gateway"]["ttfe"]
    assert ttfe["value"] > 0 and "problems" not in ttfe, ttfe


def test_scaling_compares_one_and_two_workers() -> None:
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed (Debian package redis-server)")
    script = Path(__file__).resolve().parent.parent / "scripts" / "scaling.py"
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            "--clients",
            "4",
            "--messages",
            "1",
            "--chunks",
            "200",
            "--reps",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    )
    report = json.loads(done.stdout)
    assert set(report["best_events_per_s"]) == {"1", "2"}
    assert all(v > 0 for v in report["best_events_per_s"].values())
    assert report["two_workers_over_one"] > 0
    # Where the cores went: the parent and its two workers, Redis, the load client.
    one, two = report["cpu"]["1"][0], report["cpu"]["2"][0]
    assert one["gateway_processes"] == 1 and two["gateway_processes"] >= 3
    for run in (one, two):
        assert run["gateway_s"] > 0 and run["load_client_s"] > 0 and run["redis_s"] >= 0
        assert 0 < run["machine_busy"] <= 1.1 and run["events_per_gateway_cpu_s"] > 0

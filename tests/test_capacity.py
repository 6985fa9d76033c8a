"""scripts/capacity.py end to end, small: the ramp stops at the first step that does not
hold, and the idle mode counts what one gateway process holds."""

from __future__ import annotations

import shutil
import subprocess
import sys
from typing import Any

import orjson
import pytest

from scripts.kit.stats import expected_events
from tests.support import ROOT


def capacity(*args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = orjson.loads(done.stdout)
    return report


SMALL = ["--targets", "gateway", "--ramp-s", "0.5", "--content", "chunks=30 delay_ms=5"]


def test_every_step_holds_under_a_loose_bound() -> None:
    report = capacity(
        "--capacity", "--json", "--", *SMALL, "--steps", "5,10", "--p99-ms", "1000",
        "--pace-slack", "1000",
    )  # fmt: skip
    result = report["results"]["gateway"]
    assert result["capacity_streams"] == 10
    assert [s["streams"] for s in result["steps"]] == [5, 10]
    best = result["at_capacity"]
    assert best["runs_completed"] == 10 and best["connect_failures"] == {}
    assert best["seq"] == {
        "lost": 0,
        "duplicated": 0,
        "reordered": 0,
        "wrong_count_runs": 0,
        "after_agent_completed": 0,
    }
    per_run = expected_events("load", "chunks=30 delay_ms=5")
    assert per_run is not None
    assert best["event_latency_ms"]["n"] == best["events"] == 10 * per_run
    assert result["first_not_held"] is None


def test_the_ramp_stops_at_the_first_step_past_the_bound() -> None:
    report = capacity("--capacity", "--json", "--", *SMALL, "--steps", "5,10", "--p99-ms", "1e-6")
    result = report["results"]["gateway"]
    assert result["capacity_streams"] is None
    assert [s["streams"] for s in result["steps"]] == [5]
    assert result["first_not_held"]["held"] is False
    assert result["first_not_held"]["event_latency_ms"]["p99"] > 1e-6


def test_a_step_whose_runs_fall_behind_their_pace_does_not_hold() -> None:
    """A server too busy to keep its agents' pace slows them down rather than showing
    late events: a step holds only if its runs took at most ``--pace-slack`` times their
    own delays (here a slack no run can meet)."""
    report = capacity(
        "--capacity", "--json", "--", *SMALL, "--steps", "5,10", "--p99-ms", "1000",
        "--pace-slack", "0.5",
    )  # fmt: skip
    result = report["results"]["gateway"]
    assert result["capacity_streams"] is None
    step = result["first_not_held"]
    assert step["streams"] == 5 and step["runs_completed"] == 5
    assert step["nominal_run_ms"] == 145.0  # 30 chunks 5 ms apart: 29 pauses
    assert step["pace"] >= 1.0 and step["pace"] == round(step["run_ms"]["p99"] / 145.0, 3)


def test_idle_connections_are_held_and_measured() -> None:
    report = capacity("--idle", "60", "--json", "--", "--hold-s", "0.5")
    result = report["results"]["gateway"]
    assert (result["connections"], result["held"], result["failures"]) == (60, 60, {})
    assert result["ping_answered"] == "20/20"
    assert result["bytes_per_connection"] > 0
    assert report["nofile"]["soft"] >= 60


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_200_streams_starting_together_on_redis_are_all_served() -> None:
    """Latency and pace aside (their bounds are out of the way): every client gets in and
    every run completes, on one process on the Redis broker."""
    report = capacity(
        "--capacity", "--json", "--", "--targets", "gateway-redis", "--steps", "200",
        "--ramp-s", "0.5", "--content", "chunks=100 delay_ms=20", "--p99-ms", "1e9",
        "--pace-slack", "1e9",
    )  # fmt: skip
    step = report["results"]["gateway-redis"]["steps"][0]
    assert step["connect_failures"] == {} and step["errors"] == {}, step
    assert step["runs_completed"] == 200

"""What a serving process is set up with: the garbage collector's first threshold from
``CHAT_GC_THRESHOLD`` and what was set up frozen, and the event loop of
``CHAT_EVENT_LOOP`` (checked in the gateway's real command line, stopped right
before it serves)."""

from __future__ import annotations

import os
import subprocess
import sys

import orjson
import pytest

from tests.support import ROOT, SECRET

PROBE = """
import gc, sys, orjson
import server.serve as serve
def run(self, *args, **kwargs):
    loop = self.config.get_loop_factory()()
    print(orjson.dumps({
        "threshold": gc.get_threshold(),
        "frozen": gc.get_freeze_count(),
        "loop": type(loop).__module__ + "." + type(loop).__name__,
    }).decode())
    loop.close()
serve.GatewayServer.run = run
from server.cli import main
sys.exit(main(["--port", "0"]))
"""


def served_gc(**env: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**os.environ, "PYTHONPATH": str(ROOT), "CHAT_JWT_SECRET": SECRET, **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, object] = orjson.loads(done.stdout.strip().splitlines()[-1])
    return report


def test_a_serving_process_collects_young_objects_every_50000_allocations() -> None:
    report = served_gc(CHAT_DB_URL="sqlite:///:memory:")
    assert report["threshold"][0] == 50_000  # type: ignore[index]
    assert report["frozen"] > 10_000  # type: ignore[operator]


def test_the_threshold_is_a_setting_and_0_keeps_cpythons_own() -> None:
    assert served_gc(CHAT_GC_THRESHOLD="20000")["threshold"][0] == 20_000  # type: ignore[index]
    assert served_gc(CHAT_GC_THRESHOLD="0")["threshold"][0] == 700  # type: ignore[index]
    with pytest.raises(AssertionError, match="CHAT_GC_THRESHOLD"):
        served_gc(CHAT_GC_THRESHOLD="-1")


def test_the_event_loop_is_asyncios_unless_uvloop_is_asked_for() -> None:
    assert served_gc()["loop"] == "asyncio.unix_events._UnixSelectorEventLoop"
    assert served_gc(CHAT_EVENT_LOOP="uvloop")["loop"] == "uvloop.Loop"
    with pytest.raises(AssertionError, match="CHAT_EVENT_LOOP"):
        served_gc(CHAT_EVENT_LOOP="trio")

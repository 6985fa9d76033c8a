"""The garbage collector of a serving process: the gateway's command line sets the
first threshold from ``CHAT_GC_THRESHOLD`` and freezes what it set up, right before
it serves (checked in a real ``python -m server`` process, stopped at that point)."""

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
    print(orjson.dumps({"threshold": gc.get_threshold(), "frozen": gc.get_freeze_count()}).decode())
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

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server.cli import build_parser, settings_from
from server.logs import RedactTokens
from server.settings import Settings
from tests.support import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_the_contracts() -> None:
    s = Settings()
    assert s.max_message_bytes == 64 * 1024
    assert s.max_connections_per_user == 20
    assert s.rate_limit_per_minute == 30
    assert s.max_active_runs_per_user == 5
    assert s.detach_grace_s == 60 and s.resume_window_s == 120
    assert s.run_log_max_bytes == 32 * 1024 * 1024
    assert s.heartbeat_s == 15 and s.send_buffer_bytes == 1024 * 1024
    assert s.shutdown_grace_s == 10 and s.typing_delay_ms == 0
    assert s.dev_mode


def test_from_env() -> None:
    s = Settings.from_env(
        {
            "CHAT_JWT_SECRET": "s3cret",
            "CHAT_MAX_MESSAGE_BYTES": "1_024",
            "CHAT_HEARTBEAT_S": "2.5",
            "CHAT_ALLOWED_ORIGINS": "https://a.example, https://b.example,",
            "UNRELATED": "x",
        }
    )
    assert s.jwt_secret == "s3cret" and not s.dev_mode
    assert s.max_message_bytes == 1024 and s.heartbeat_s == 2.5
    assert s.allowed_origins == ("https://a.example", "https://b.example")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CHAT_MAX_MESSAGE_BYTES": "lots"}, "CHAT_MAX_MESSAGE_BYTES must be an integer"),
        ({"CHAT_HEARTBEAT_S": "soon"}, "CHAT_HEARTBEAT_S must be a number"),
        ({"CHAT_MAX_MESSAGE_BYTES": "0"}, "at least 1"),
        ({"CHAT_DETACH_GRACE_S": "-1"}, "must be positive"),
    ],
)
def test_bad_env_values_say_which(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings.from_env(env)


def test_flags_win_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHAT_MAX_MESSAGE_BYTES", "2048")
    monkeypatch.setenv("CHAT_DETACH_GRACE_S", "5")
    args = build_parser().parse_args(["--max-message-bytes", "4096", "--port", "9000"])
    s = settings_from(args)
    assert s.max_message_bytes == 4096 and s.detach_grace_s == 5 and args.port == 9000


def test_access_log_redacts_query_tokens() -> None:
    import logging

    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:1", "GET", "/ws?access_token=eyJ.abc.def&x=1", "1.1", 101),
        None,
    )
    RedactTokens().filter(record)
    line = record.getMessage()
    assert "eyJ" not in line and "access_token=[redacted]&x=1" in line


def test_dev_mode_prints_a_signed_in_url(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "--port", str(port)],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = None
        deadline = time.monotonic() + 30
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            match = re.search(r"(http://127\.0\.0\.1:\d+/#token=(\S+))", line)
            if match:
                url, token = match.group(1), match.group(2)
        assert url is not None and url.startswith(f"http://127.0.0.1:{port}/#token=")
        assert (tmp_path / "var" / "dev_secret").stat().st_mode & 0o777 == 0o600
        deadline = time.monotonic() + 30
        while True:
            try:
                resp = httpx.get(
                    f"http://127.0.0.1:{port}/api/chat/agents/r_none/status",
                    headers={"Authorization": f"Bearer {token}"},
                )
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline, "the dev server did not answer"
                time.sleep(0.05)
        # The printed token is accepted: the route answers 404 for the unknown run, not 401.
        assert resp.status_code == 404
        page = httpx.get(f"http://127.0.0.1:{port}/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        if proc.stdout is not None:
            proc.stdout.close()
    # SIGTERM ends the process cleanly, and the secret goes with it.
    assert not (tmp_path / "var" / "dev_secret").exists()


def test_request_head_and_token_limits_are_settings() -> None:
    s = Settings()
    assert s.header_timeout_s == 10 and s.max_opening_per_address == 256
    assert s.max_head_bytes == 64 * 1024 and s.max_token_bytes == 8 * 1024
    s = Settings.from_env({"CHAT_HEADER_TIMEOUT_S": "2.5", "CHAT_MAX_TOKEN_BYTES": "4096"})
    assert s.header_timeout_s == 2.5 and s.max_token_bytes == 4096
    for env, message in [
        ({"CHAT_HEADER_TIMEOUT_S": "0"}, "CHAT_HEADER_TIMEOUT_S must be positive"),
        ({"CHAT_MAX_OPENING_PER_ADDRESS": "0"}, "CHAT_MAX_OPENING_PER_ADDRESS must be at least 1"),
        ({"CHAT_MAX_HEAD_BYTES": "0"}, "CHAT_MAX_HEAD_BYTES must be at least 1"),
        ({"CHAT_MAX_TOKEN_BYTES": "0"}, "CHAT_MAX_TOKEN_BYTES must be at least 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            Settings.from_env(env)


def test_the_redis_append_window_is_checked() -> None:
    assert Settings().redis_append_window_ms == 1.0
    assert Settings.from_env({"CHAT_REDIS_APPEND_WINDOW_MS": "0"}).redis_append_window_ms == 0
    with pytest.raises(ValueError, match="CHAT_REDIS_APPEND_WINDOW_MS"):
        Settings.from_env({"CHAT_REDIS_APPEND_WINDOW_MS": "-1"})
    with pytest.raises(ValueError, match="CHAT_GC_FREEZE"):
        Settings.from_env({"CHAT_GC_FREEZE": "maybe"})

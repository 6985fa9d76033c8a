"""The command-line scripts, run as real processes against a live gateway."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from scripts.chat import HumanPrinter, format_ms, format_value
from server.auth import Authenticator
from server.settings import Settings
from tests.support import SECRET, LiveServer, free_port, ws_client

ROOT = Path(__file__).resolve().parents[1]
CHAT = "scripts/chat.py"
MINT = "scripts/mint_token.py"


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any ``CHAT_*`` variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    env.update(extra)
    return env


def run_script(
    script: str, *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / script) if cwd != ROOT else script, *args],
        cwd=cwd,
        env=clean_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def chat(server: LiveServer, user: str, *args: str) -> subprocess.CompletedProcess[str]:
    token = server.token(user)
    # The defaults come first, so that a test's own flags win.
    return run_script(CHAT, "--url", server.ws, "--token", token, "--timeout", "30", *args)


def json_lines(stdout: str) -> list[dict[str, Any]]:
    lines = stdout.splitlines()
    assert lines, "no output"
    messages = [json.loads(line) for line in lines]
    assert all(isinstance(m, dict) for m in messages)
    return messages


def run_events(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in messages if m.get("seq") is not None]


# chat.py -----------------------------------------------------------------------------


def test_demo_question_streams_the_answer(server: LiveServer, user: str) -> None:
    proc = chat(server, user, "What is 12 * 7?")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert '[tool] calculator {"expression": "12 * 7"}' in out
    assert "[tool] calculator -> 84 (" in out
    assert "[thinking] " in out
    lines = out.splitlines()
    answer = next(line for line in lines if not line.startswith("["))
    assert "84" in answer
    assert lines[-1].startswith("[done] completed in ")


def test_json_output_is_one_message_per_line(server: LiveServer, user: str) -> None:
    proc = chat(server, user, "chunks=3", "--agent", "load", "--json")
    assert proc.returncode == 0, proc.stderr
    messages = json_lines(proc.stdout)
    assert messages[0]["type"] == "connection_ready"
    assert messages[0]["data"]["user_id"] == user
    events = run_events(messages)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert messages[-1] is events[-1]
    assert events[-1]["type"] == "agent_completed"
    assert events[-1]["data"]["status"] == "completed"
    assert [e["data"]["text"] for e in events if e["type"] == "response_chunk"] == [
        "aaaaaaaa",
        "bbbbbbbb",
        "cccccccc",
    ]
    assert len({e["run_id"] for e in events}) == 1


def test_thread_and_agent_are_sent(server: LiveServer, user: str) -> None:
    thread = f"t-{user}"
    proc = chat(server, user, "chunks=1", "--agent", "load", "--thread", thread, "--json")
    assert proc.returncode == 0, proc.stderr
    events = run_events(json_lines(proc.stdout))
    assert {e["thread_id"] for e in events} == {thread}
    started = next(e for e in events if e["type"] == "agent_started")
    assert started["data"]["agent"] == "load"


def test_failed_run_exits_1(server: LiveServer, user: str) -> None:
    proc = chat(server, user, "chunks=1 fail=1", "--agent", "load")
    assert proc.returncode == 1, proc.stderr
    assert "[fallback]" in proc.stdout
    assert proc.stdout.splitlines()[-1].startswith("[done] failed in ")


def test_bad_token_exits_2_with_the_close_code(server: LiveServer) -> None:
    proc = run_script(CHAT, "hello", "--url", server.ws, "--token", "not-a-jwt", "--timeout", "30")
    assert proc.returncode == 2
    assert "4401" in proc.stderr
    assert proc.stdout == ""


def test_expired_token_exits_2(server: LiveServer, user: str) -> None:
    token = server.token(user, ttl_s=-60)
    proc = run_script(CHAT, "hello", "--url", server.ws, "--token", token)
    assert proc.returncode == 2
    assert "4401" in proc.stderr and "expired" in proc.stderr


def test_resume_prints_only_later_events(server: LiveServer, user: str) -> None:
    first = chat(server, user, "chunks=3", "--agent", "load", "--json")
    assert first.returncode == 0, first.stderr
    events = run_events(json_lines(first.stdout))
    run_id = events[-1]["run_id"]
    after = 4

    proc = chat(server, user, "--resume", run_id, "--after", str(after), "--json")
    assert proc.returncode == 0, proc.stderr
    messages = json_lines(proc.stdout)
    ack = next(m for m in messages if m["type"] == "ack")
    assert ack["data"]["action"] == "resume" and ack["data"]["status"] == "completed"
    replayed = run_events(messages)
    assert [e["seq"] for e in replayed] == list(range(after + 1, len(events) + 1))
    assert [e["data"] for e in replayed] == [e["data"] for e in events[after:]]
    assert replayed[-1]["type"] == "agent_completed"

    human = chat(server, user, "--resume", run_id, "--after", str(after))
    assert human.returncode == 0, human.stderr
    assert "aaaaaaaa" not in human.stdout
    assert "bbbbbbbbcccccccc\n" in human.stdout
    assert human.stdout.splitlines()[-1].startswith("[done] completed in ")


def test_resume_after_the_last_event_ends(server: LiveServer, user: str) -> None:
    first = chat(server, user, "chunks=1", "--agent", "load", "--json")
    last = run_events(json_lines(first.stdout))[-1]
    proc = chat(server, user, "--resume", last["run_id"], "--after", str(last["seq"]), "--json")
    assert proc.returncode == 0, proc.stderr
    assert run_events(json_lines(proc.stdout)) == []
    assert "no events after" in proc.stderr


def test_resume_of_an_unknown_run_exits_1(server: LiveServer, user: str) -> None:
    proc = chat(server, user, "--resume", "r_does_not_exist")
    assert proc.returncode == 1
    assert "not_found" in proc.stderr


def test_usage_errors_exit_2() -> None:
    assert run_script(CHAT).returncode == 2
    assert run_script(CHAT, "--after", "3").returncode == 2
    assert run_script(CHAT, "hi", "--resume", "r_x").returncode == 2
    assert run_script(CHAT, "hi", "--timeout", "0").returncode == 2


def test_connection_refused_exits_2() -> None:
    url = f"ws://127.0.0.1:{free_port()}/ws"
    proc = run_script(CHAT, "hi", "--url", url, "--token", "t", "--timeout", "10")
    assert proc.returncode == 2
    assert "cannot connect" in proc.stderr


def test_timeout_is_bounded(server: LiveServer, user: str) -> None:
    proc = chat(server, user, "chunks=40 delay_ms=50", "--agent", "load", "--timeout", "0.5")
    assert proc.returncode == 2
    assert "timed out after 0.5 s" in proc.stderr


def test_token_is_minted_from_the_dev_secret_file(server: LiveServer, tmp_path: Path) -> None:
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "dev_secret").write_text(SECRET + "\n")
    proc = run_script(
        CHAT, "chunks=1", "--agent", "load", "--url", server.ws, "--json", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert json_lines(proc.stdout)[0]["data"]["user_id"] == "dev"


def test_no_token_and_no_secret_exits_2(server: LiveServer, tmp_path: Path) -> None:
    proc = run_script(CHAT, "hi", "--url", server.ws, cwd=tmp_path)
    assert proc.returncode == 2
    assert "no token" in proc.stderr


def test_token_from_the_environment(server: LiveServer, user: str) -> None:
    env = clean_env(CHAT_TOKEN=server.token(user))
    proc = run_script(CHAT, "chunks=1", "--agent", "load", "--url", server.ws, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json_lines(proc.stdout)[0]["data"]["user_id"] == user


def test_human_output_keeps_lines_readable() -> None:
    out, err = io.StringIO(), io.StringIO()
    printer = HumanPrinter(out, err)
    base: dict[str, Any] = {"run_id": "r_1", "thread_id": "t_1"}
    for kind, data in [
        ("response_chunk", {"text": "Hel", "index": 0}),
        ("response_chunk", {"text": "lo", "index": 1}),
        ("agent_thinking", {"text": "hmm"}),
        ("response_chunk", {"text": "!", "index": 2}),
        ("run_status", {"status": "paused"}),
        ("response_complete", {"content": "Hello!", "fallback": False}),
        ("agent_completed", {"status": "completed", "duration_ms": 1234.5}),
    ]:
        printer.message({"type": kind, "data": data, **base}, "")
    assert out.getvalue() == (
        "Hello\n[thinking] hmm\n!\n[status] paused\n[done] completed in 1.23 s\n"
    )
    assert err.getvalue() == ""


def test_formatting_helpers() -> None:
    assert format_ms(0.077) == "0.1 ms"
    assert format_ms(None) == "? ms"
    assert format_value(84) == "84"
    assert format_value("a\nb") == "a b"
    assert format_value({"x": 1}) == '{"x": 1}'
    assert len(format_value("x" * 1000)) == 300


# mint_token.py -----------------------------------------------------------------------


async def test_minted_token_is_accepted(server: LiveServer, user: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        MINT,
        user,
        "--secret",
        SECRET,
        "--ttl",
        "120",
        cwd=ROOT,
        env=clean_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stderr.decode()
    token = stdout.decode().strip()
    assert stdout.decode() == token + "\n"
    async with ws_client(server, token=token) as client:
        assert client.ready["data"]["user_id"] == user
    claims = Authenticator(server.settings).verify(token).claims
    assert claims["exp"] - claims["iat"] == 120


def test_mint_reads_the_environment_then_the_dev_secret_file(tmp_path: Path) -> None:
    auth = Authenticator(Settings(jwt_secret=SECRET))
    from_env = run_script(MINT, "erin", cwd=tmp_path, env=clean_env(CHAT_JWT_SECRET=SECRET))
    assert from_env.returncode == 0, from_env.stderr
    assert auth.verify(from_env.stdout.strip()).user_id == "erin"

    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "dev_secret").write_text(SECRET + "\n")
    from_file = run_script(MINT, "fay", cwd=tmp_path)
    assert from_file.returncode == 0, from_file.stderr
    assert auth.verify(from_file.stdout.strip()).user_id == "fay"


def test_mint_audience_and_issuer(tmp_path: Path) -> None:
    strict = Authenticator(Settings(jwt_secret=SECRET, jwt_audience="aud-x", jwt_issuer="iss-y"))
    flags = run_script(MINT, "gus", "--secret", SECRET, "--aud", "aud-x", "--iss", "iss-y")
    assert flags.returncode == 0, flags.stderr
    assert strict.verify(flags.stdout.strip()).user_id == "gus"

    env = clean_env(CHAT_JWT_SECRET=SECRET, CHAT_JWT_AUDIENCE="aud-x", CHAT_JWT_ISSUER="iss-y")
    from_env = run_script(MINT, "hal", cwd=tmp_path, env=env)
    assert from_env.returncode == 0, from_env.stderr
    assert strict.verify(from_env.stdout.strip()).user_id == "hal"


def test_mint_without_a_secret_fails_clearly(tmp_path: Path) -> None:
    proc = run_script(MINT, "ivy", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "no JWT secret" in proc.stderr
    assert "CHAT_JWT_SECRET" in proc.stderr and "var/dev_secret" in proc.stderr


def test_mint_usage_errors(tmp_path: Path) -> None:
    assert run_script(MINT, cwd=tmp_path).returncode == 2
    assert run_script(MINT, "ann", "--secret", SECRET, "--ttl", "0").returncode == 2
    assert run_script(MINT, "ann", "--secret", "").returncode == 2

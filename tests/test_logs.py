"""``CHAT_LOG_FORMAT=json``: a real gateway process writes one JSON object per line,
with the ids of what each line is about, and never a token, a secret or what a user
wrote."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from bridge import logctx
from server.logs import JsonFormatter, secrets_of
from server.settings import Settings
from tests.support import SECRET, free_port, spawn_server, ws_client

API_KEY = "sk-logtest-0123456789abcdef"
CONTENT = "my-private-words-4f1c9e"
FIELDS = {"time", "level", "logger", "message", "run_id", "thread_id", "session_id", "trace_id"}


async def test_json_logs_of_a_real_server_have_their_fields_and_no_token(tmp_path: Path) -> None:
    dead = free_port()  # nothing listens here: the agents behind it fail
    tokens: list[str] = []
    with spawn_server(
        tmp_path,
        CHAT_LOG_FORMAT="json",
        CHAT_LOG_LEVEL="info",
        PYTHONUNBUFFERED="1",
        CHAT_AGENTS=f"broken=http://127.0.0.1:{dead}/agent",
        CHAT_LLM_BASE_URL=f"http://127.0.0.1:{dead}/v1",
        CHAT_LLM_MODEL="stub-model",
        CHAT_LLM_API_KEY=API_KEY,
        CHAT_LLM_RETRIES="0",
        CHAT_DEFAULT_AGENT="demo",
    ) as srv:
        async with ws_client(srv, "alice") as client:
            tokens.append(client_token := srv.token("alice"))
            del client_token
            ok = await client.run(f"hello {CONTENT}", agent="demo")
            failed = await client.run(f"and {CONTENT}", agent="broken")
            model = await client.run(f"then {CONTENT}", agent="llm")
            # An agent's error that quotes the message (the load agent's bad parameter).
            quoted = await client.run(f"chunks={CONTENT}", agent="load")
        assert ok[-1]["data"]["status"] == "completed"
        assert quoted[-1]["data"]["status"] == "failed"
        assert failed[-1]["data"]["status"] == "failed"
        assert model[-1]["data"]["status"] == "failed"
        run_ids = {failed[1]["run_id"], model[1]["run_id"], quoted[1]["run_id"]}
        # A bad token, over WebSocket and HTTP.
        bad = srv.token("mallory")[:-4] + "AAAA"
        tokens.append(bad)
        with pytest.raises(ConnectionClosed):
            async with connect(srv.ws, subprotocols=["chat.v1", f"bearer.{bad}"]) as ws:
                await asyncio.wait_for(ws.recv(), 10)
        async with httpx.AsyncClient(base_url=srv.http, timeout=10) as http:
            assert (await http.get("/api/threads", headers={"Authorization": bad})).status_code
            # A good token in the query string, over HTTP and WebSocket.
            query = srv.token("bob")
            tokens.append(query)
            resp = await http.get(f"/api/threads?access_token={query}")
            assert resp.status_code == 200
        async with connect(f"{srv.ws}?access_token={query}") as ws:
            assert orjson.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "connection_ready"
        await asyncio.sleep(0.3)  # the last lines are written
    text = srv.log()
    lines = [orjson.loads(line) for line in text.splitlines() if line.strip()]
    assert lines, "nothing was logged"
    for line in lines:
        assert set(line) - {"exc"} == FIELDS, line
        assert line["level"] in ("debug", "info", "warning", "error", "critical")
        assert line["trace_id"] is None
    loggers = {line["logger"] for line in lines}
    assert {"uvicorn.access", "uvicorn.error"} <= loggers, loggers
    # The failed runs' lines name their run, thread and session.
    about_runs = [line for line in lines if line["run_id"] in run_ids]
    assert {line["run_id"] for line in about_runs} == run_ids, [x["message"] for x in lines]
    for line in about_runs:
        assert line["thread_id"] and line["session_id"], line
    assert any("access_token=[redacted]" in line["message"] for line in lines)
    for secret in (SECRET, API_KEY, CONTENT, *tokens, *(t.rsplit(".", 1)[1] for t in tokens)):
        assert secret not in text, secret
    print(f"\n{len(lines)} JSON log lines from {len(loggers)} loggers: {sorted(loggers)}")


def test_the_formatter_redacts_tokens_and_secrets_and_keeps_the_ids() -> None:
    formatter = JsonFormatter(secrets=["topsecret-value", "short"])
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
    token = logctx.RUN_ID.set("r_1")
    try:
        record = logging.LogRecord(
            "chat.test", logging.WARNING, __file__, 1, "%s said %s", ("bearer." + jwt, "x"), None
        )
        record.msg += " with topsecret-value at /ws?access_token=abc&y=1"
        line = orjson.loads(formatter.format(record))
    finally:
        logctx.RUN_ID.reset(token)
    assert line["message"] == (
        "bearer.[redacted] said x with [redacted] at /ws?access_token=[redacted]&y=1"
    )
    assert line["run_id"] == "r_1" and line["thread_id"] is None and line["level"] == "warning"


def test_the_secrets_of_the_settings() -> None:
    settings = Settings(
        jwt_secret=SECRET,
        metrics_token="scrape-token-123",
        llm_api_key=API_KEY,
        agent_headers=("remote.Authorization=Bearer agent-secret-42",),
    )
    assert secrets_of(settings) == [SECRET, "scrape-token-123", API_KEY, "Bearer agent-secret-42"]

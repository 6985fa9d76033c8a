"""The operator's view over HTTP, on each broker: the live runs of every process
(listed and cancelled from another process with Redis), filters, and 403 for anyone
who is not an operator."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from server.admin import is_operator
from server.auth import Principal
from server.settings import Settings
from tests.support import SECRET, LiveServer, check_run_invariants, run_server, ws_client

CLAIM = "role=operator"
SLOW = "chunks=2000 delay_ms=20"  # 40 s unless cancelled


@pytest.fixture(scope="module", params=["memory", "redis"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[LiveServer, LiveServer]]:
    """Two processes' worth of gateway: with Redis, two gateways sharing it (the
    operator asks the one that does not run the runs); in memory, one."""
    if request.param == "memory":
        with run_server(admin_claim=CLAIM) as server:
            yield server, server
        return
    url = request.getfixturevalue("redis_url")
    with (
        run_server(admin_claim=CLAIM, broker_url=url) as one,
        run_server(admin_claim=CLAIM, broker_url=url) as two,
    ):
        yield one, two


def op_headers(server: LiveServer, **claims: Any) -> dict[str, str]:
    token = server.token("ops-1", role="operator", **claims)
    return {"Authorization": f"Bearer {token}"}


async def admin_runs(server: LiveServer, **params: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=server.http, headers=op_headers(server)) as http:
        resp = await http.get("/api/admin/runs", params=params)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["ok"] and body["count"] == len(body["runs"])
    runs: list[dict[str, Any]] = body["runs"]
    return runs


async def test_live_runs_of_every_process_filtered_and_cancelled(
    pair: tuple[LiveServer, LiveServer], user: str
) -> None:
    runner, operator = pair
    other = f"{user}-b"
    async with ws_client(runner, user) as a, ws_client(runner, other) as b:
        await a.send(type="user_message", agent="load", content=SLOW)
        run_a = (await a.recv())["run_id"]
        await b.send(type="user_message", agent="load", content=SLOW)
        run_b = (await b.recv())["run_id"]
        await b.send(type="user_message", agent="demo", content="What time is it?")
        ended = await b.recv_until("agent_completed")  # the demo run
        assert ended[-1]["run_id"] != run_b
        began = time.time()
        mine = {r["run_id"]: r for r in await admin_runs(operator) if r["user"] in (user, other)}
        assert set(mine) == {run_a, run_b}, mine  # the ended demo run is not listed
        row = mine[run_a]
        assert row["user"] == user and row["agent"] == "load" and row["status"] == "running"
        assert row["watchers"] == 1 and row["node"], row
        assert 0 <= row["age_s"] <= time.time() - began + 60
        assert [r["run_id"] for r in await admin_runs(operator, user=user)] == [run_a]
        assert {r["run_id"] for r in await admin_runs(operator, agent="load", user=other)} == {
            run_b
        }
        assert await admin_runs(operator, user=user, status="paused") == []
        assert await admin_runs(operator, user=user, agent="demo") == []

        async with httpx.AsyncClient(base_url=operator.http, headers=op_headers(operator)) as http:
            resp = await http.post(f"/api/admin/runs/{run_a}/cancel")
            assert resp.status_code == 200, resp.text
            assert resp.json()["status"] == "cancelled"
            missing = await http.post("/api/admin/runs/r_nope/cancel")
            assert missing.status_code == 404
        events = await a.recv_until("agent_completed")
        check_run_invariants(events)
        assert events[-1]["data"]["status"] == "cancelled"
        assert events[-1]["data"]["error"]["code"] == "cancelled"
        left = [r["run_id"] for r in await admin_runs(operator) if r["user"] in (user, other)]
        assert left == [run_b]
        await b.send(type="cancel", run_id=run_b)
        await b.recv_until("agent_completed")


async def test_everyone_but_an_operator_is_refused(
    pair: tuple[LiveServer, LiveServer], user: str
) -> None:
    _, server = pair
    refused: dict[str, dict[str, str]] = {
        "no token": {},
        "a user's token": {"Authorization": f"Bearer {server.token(user)}"},
        "an expired operator's": {
            "Authorization": f"Bearer {server.token('ops-1', ttl_s=-60, role='operator')}"
        },
        "the claim, another value": {
            "Authorization": f"Bearer {server.token('ops-2', role='operators')}"
        },
        "another claim with the value": {
            "Authorization": f"Bearer {server.token('ops-3', group='operator')}"
        },
        "a bad signature": {
            "Authorization": f"Bearer {server.token('ops-1', role='operator')[:-3]}AAA"
        },
    }
    async with httpx.AsyncClient(base_url=server.http) as http:
        for label, headers in refused.items():
            for method, path in (
                ("GET", "/api/admin/runs"),
                ("POST", "/api/admin/runs/r_x/cancel"),
            ):
                resp = await http.request(method, path, headers=headers)
                assert resp.status_code == 403, (label, path, resp.text)
                assert resp.json()["error"]["code"] == "forbidden", label
        ok = await http.get("/api/admin/runs", headers=op_headers(server))
        assert ok.status_code == 200
        page = await http.get("/admin")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]


async def test_without_the_setting_nobody_is_an_operator(user: str) -> None:
    with run_server() as server:
        async with httpx.AsyncClient(base_url=server.http, headers=op_headers(server)) as http:
            assert (await http.get("/api/admin/runs")).status_code == 403
        # Nor can a user cancel another user's run through the user routes.
        async with ws_client(server, user) as a:
            await a.send(type="user_message", agent="load", content=SLOW)
            run_id = (await a.recv())["run_id"]
            async with httpx.AsyncClient(base_url=server.http, headers=op_headers(server)) as http:
                resp = await http.post(f"/api/chat/agents/{run_id}/cancel")
                assert resp.status_code == 404
            await a.send(type="cancel", run_id=run_id)
            await a.recv_until("agent_completed")


def test_the_claim_matches_a_value_or_a_list_member() -> None:
    def who(**claims: Any) -> Principal:
        return Principal("u", 0.0, claims)

    assert is_operator(who(role="operator"), CLAIM)
    assert is_operator(who(role=["user", "operator"]), CLAIM)
    assert not is_operator(who(role="operator"), None)
    assert not is_operator(who(role="Operator"), CLAIM)
    assert not is_operator(who(role=1), "role=1")
    with pytest.raises(ValueError, match="ADMIN_CLAIM"):
        Settings(jwt_secret=SECRET, admin_claim="role").check()

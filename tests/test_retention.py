"""What one user's finished runs keep for resume, together: the pure bookkeeping, and a
real gateway where one user's runs fill their logs as fast as the limits let them."""

from __future__ import annotations

import httpx

from bridge.retention import Retention
from tests.support import LiveServer, health, parse_sse, run_server, ws_client
from tests.test_faults import record_figures

MiB = 1 << 20


def test_the_oldest_finished_runs_go_first_and_the_newest_stays() -> None:
    kept = Retention(100)
    assert kept.finished("ann", "r1", 40) == []
    assert kept.finished("bob", "b1", 90) == []  # another user's runs count apart
    assert kept.finished("ann", "r2", 40) == []
    assert kept.finished("ann", "r3", 40) == ["r1"]
    assert kept.held("ann") == 80 and kept.held("bob") == 90
    # One run larger than the whole bound is still kept, alone.
    assert kept.finished("ann", "r4", 500) == ["r2", "r3"]
    assert kept.held("ann") == 500
    # A run forgotten at the end of its window leaves the count; unknown ids change nothing.
    kept.forgotten("ann", "r4")
    kept.forgotten("ann", "r4")
    kept.forgotten("nobody", "x")
    assert kept.held("ann") == 0 and len(kept) == 1
    # A run counted again (it finished twice: never, but harmless) counts once.
    assert kept.finished("bob", "b1", 10) == []
    assert kept.held("bob") == 10


async def events_after(server: LiveServer, user: str, run_id: str) -> int:
    async with httpx.AsyncClient(base_url=server.http, timeout=30) as client:
        answer = await client.get(
            f"/api/chat/runs/{run_id}/events",
            params={"after_seq": 0},
            headers=server.headers(user),
        )
    return answer.status_code


async def test_one_users_finished_runs_hold_at_most_their_bound(user: str) -> None:
    """Runs of about 0.8 MiB of events each, one after another, by one user, with the
    bound at 3 MiB: what the process keeps stops growing at about the bound, the oldest finished
    runs answer like runs past their window, the newest is read whole, and another user's
    finished run is not touched."""
    with run_server(
        run_log_max_bytes=2 * MiB, user_log_max_bytes=3 * MiB, rate_limit_per_minute=100
    ) as server:
        other = f"{user}-other"
        async with ws_client(server, other) as client:
            theirs = (await client.run("chunks=50", agent="load"))[0]["run_id"]
        runs: list[str] = []
        held: list[int] = []
        async with ws_client(server, user) as client:
            for _ in range(8):
                events = await client.run("thinking=0 chunks=2000 chunk_chars=8", agent="load")
                assert events[-1]["data"]["status"] == "completed"
                runs.append(events[0]["run_id"])
                held.append((await health(server))["memory"]["run_log_bytes"])
        # About 0.8 MiB per run: the bound keeps three or so, never all eight.
        assert held[-1] <= 3 * MiB + 64 * 1024 + held[0] // 8, held
        assert held[-1] < held[0] * 8 // 2, held
        statuses = [await events_after(server, user, run_id) for run_id in runs]
        assert statuses[-1] == 200 and statuses[0] in (404, 410), statuses
        kept = statuses.count(200)
        assert 2 <= kept <= 4, statuses
        assert await events_after(server, other, theirs) == 200
        async with httpx.AsyncClient(base_url=server.http, timeout=30) as client:
            answer = await client.get(
                f"/api/chat/runs/{runs[-1]}/events",
                params={"after_seq": 0},
                headers=server.headers(user),
            )
            last = [m["data"] for m in parse_sse(answer.text) if "id" in m]
        assert last[0]["seq"] == 1 and last[-1]["type"] == "agent_completed"
    record_figures(
        "user_retention",
        {
            "user_log_max_bytes": 3 * MiB,
            "run_log_bytes_after_each_run": held,
            "finished_runs_kept_of_8": kept,
        },
    )

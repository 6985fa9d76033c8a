from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.support import http_client, run_server, ws_client


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_metrics_count_what_happened(user: str) -> None:
    with run_server() as srv:
        async with ws_client(srv, user) as client:
            events = await client.run("chunks=5", agent="load")
            async with http_client(srv) as http:
                text = (await http.get("/metrics")).text
                await http.get("/api/chat/agents/r_x/status")  # no token: an auth failure
                again = samples((await http.get("/metrics")).text)
    got = samples(text)
    assert got[("chat_connections_open", ())] == 1
    assert got[("chat_runs_started_total", ())] == 1
    assert got[("chat_events_emitted_total", ())] == len(events)
    assert got[("chat_events_delivered_total", ())] == len(events)
    assert got[("chat_time_to_first_event_seconds_count", (("agent", "load"),))] == 1
    finished = (("agent", "load"), ("status", "completed"))
    assert got[("chat_run_duration_seconds_count", finished)] == 1
    assert got[("chat_slow_consumer_closes_total", ())] == 0
    assert again[("chat_auth_failures_total", ())] == 1


async def test_metrics_off_or_behind_a_token() -> None:
    with run_server(metrics="off") as srv:
        async with http_client(srv) as http:
            assert (await http.get("/metrics")).status_code == 404
    with run_server(metrics_token="scrape-me") as srv:
        async with http_client(srv) as http:
            assert (await http.get("/metrics")).status_code == 401
            wrong = await http.get("/metrics", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            ok = await http.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
            assert ok.status_code == 200 and "chat_connections_open" in ok.text

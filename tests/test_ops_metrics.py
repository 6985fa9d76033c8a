"""The metrics that answer operators' questions, against a real gateway: resumes that
recovered against those answered ``resume_unavailable``, slow-consumer closes by
transport, outbound lag, store write latency, and (with Redis) lease renewals."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support import LiveServer, http_client, run_server, wait_for, ws_client
from tests.test_faults import record_figures
from tests.test_outbound import unread_stream

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(srv: LiveServer) -> Samples:
    async with http_client(srv) as http:
        text = (await http.get("/metrics")).text
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def resumes(got: Samples, outcome: str) -> float:
    return got[("chat_resumes_total", (("outcome", outcome),))]


async def test_resumes_recovered_and_unavailable_and_store_writes(user: str) -> None:
    with run_server(run_log_max_bytes=4096) as srv:
        before = await scrape(srv)
        assert resumes(before, "recovered") == resumes(before, "unavailable") == 0
        async with ws_client(srv, user) as client:
            events = await client.run("chunks=100 chunk_chars=16 delay_ms=1", agent="load")
            run_id = events[0]["run_id"]
            await client.send(type="resume", run_id=run_id, after_seq=0)
            reply = await client.recv()
            assert reply["data"]["code"] == "resume_unavailable"
            await client.send(type="resume", run_id=run_id, after_seq=events[-3]["seq"])
            tail = await client.recv_until("agent_completed")
            assert tail[-1]["type"] == "agent_completed"
        # Over SSE too: the run's events after a seq.
        async with httpx.AsyncClient(base_url=srv.http, headers=srv.headers(user)) as http:
            url = f"/api/chat/runs/{run_id}/events?after_seq={events[-2]['seq']}"
            body = (await http.get(url)).text
            assert "agent_completed" in body
            gone = await http.get(f"/api/chat/runs/{run_id}/events?after_seq=0")
            assert gone.status_code == 410
        got = await scrape(srv)
    assert resumes(got, "recovered") == 2
    assert resumes(got, "unavailable") == 2
    # The writer committed the thread, the messages and the run's statuses.
    assert got[("chat_store_write_seconds_count", ())] >= 2
    assert got[("chat_store_write_seconds_sum", ())] > 0
    for transport in ("ws", "sse"):
        for of in ("sum", "max"):
            assert got[("chat_outbound_lag_bytes", (("of", of), ("transport", transport)))] == 0
    assert not any(name.startswith("chat_redis_") for name, _ in got)


async def test_slow_consumer_closes_by_transport_and_the_lag_they_left(user: str) -> None:
    with run_server(
        send_timeout_s=1.0,
        send_buffer_bytes=256 * 1024,
        max_answer_bytes=32 * 1024 * 1024,
    ) as srv:
        sock = unread_stream(srv, user, "chunks=20000 chunk_chars=400 thinking=0")
        try:
            lag: dict[str, Any] = {}

            async def sse_cut() -> bool:
                got = await scrape(srv)
                lag["sse_max"] = max(
                    lag.get("sse_max", 0),
                    got[("chat_outbound_lag_bytes", (("of", "max"), ("transport", "sse")))],
                )
                key = ("chat_slow_consumer_closes_by_transport_total", (("transport", "sse"),))
                return got[key] == 1

            began = time.monotonic()
            await wait_for(sse_cut, timeout=30)
            sse_s = time.monotonic() - began
        finally:
            sock.close()
        async with ws_client(srv, user) as slow:
            await slow.send(
                type="user_message", agent="load", content="chunks=20000 chunk_chars=400"
            )
            await slow.recv()
            slow.ws.transport.pause_reading()  # the tab stops reading

            async def ws_cut() -> bool:
                got = await scrape(srv)
                key = ("chat_slow_consumer_closes_by_transport_total", (("transport", "ws"),))
                return got[key] == 1

            began = time.monotonic()
            await wait_for(ws_cut, timeout=30)
            ws_s = time.monotonic() - began
            slow.ws.transport.resume_reading()
            await asyncio.sleep(0)
        got = await scrape(srv)
    assert got[("chat_slow_consumer_closes_total", ())] == 2
    record_figures(
        "slow_consumer_by_transport",
        {
            "sse_cut_after_s": round(sse_s, 3),
            "ws_cut_after_s": round(ws_s, 3),
            "sse_lag_max_bytes_seen": lag["sse_max"],
        },
    )
    print(
        f"\nslow consumers cut: sse after {sse_s:.2f} s (lag seen up to {lag['sse_max']:.0f} B), "
        f"ws after {ws_s:.2f} s"
    )


async def test_lease_renewals_are_counted_with_redis(redis_url: str) -> None:
    with run_server(broker_url=redis_url, run_lease_s=0.3) as srv:

        async def renewed() -> bool:
            got = await scrape(srv)
            return got[("chat_redis_lease_renewals_total", ())] >= 3

        await wait_for(renewed, timeout=10)
        got = await scrape(srv)
    for name in ("lease_renewal_failures", "fence_refusals", "fenced", "nodes_reaped"):
        assert got[(f"chat_redis_{name}_total", ())] == 0, name


async def test_a_fenced_process_counts_the_refusal_and_its_rejoin(redis_url: str) -> None:
    import redis.asyncio as aioredis

    r = aioredis.from_url(redis_url)
    try:
        before = {n.decode() for n in await r.smembers("chat:nodes")}
        with run_server(broker_url=redis_url, run_lease_s=0.3) as srv:

            async def joined() -> bool:
                return bool({n.decode() for n in await r.smembers("chat:nodes")} - before)

            await wait_for(joined, timeout=10)
            (node,) = {n.decode() for n in await r.smembers("chat:nodes")} - before
            # As a reaper does: the fence marker, which its next renewal finds.
            await r.set(f"chat:fenced:{node}", "1", ex=30)

            async def rejoined() -> bool:
                return (await scrape(srv))[("chat_redis_fenced_total", ())] == 1

            await wait_for(rejoined, timeout=10)
            got = await scrape(srv)
            assert got[("chat_redis_fence_refusals_total", ())] >= 1
            assert f"{node}~2".encode() in await r.smembers("chat:nodes")
    finally:
        await r.aclose()

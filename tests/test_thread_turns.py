"""Sends that must not let two runs of a thread go at once: a ``reject`` send and a
regenerate of the thread's last answer, sent together."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from tests.support import LiveServer, http_client, ws_client
from tests.test_redis_faults import status_of

SLOW = "thinking=0 chunks=30 delay_ms=10"


async def test_a_reject_send_and_a_regenerate_sent_together_never_run_side_by_side(
    server: LiveServer, user: str
) -> None:
    """A regenerate takes the thread's turn too, and looks for runs going where the
    broker has them (a run just created is not in the store yet): of a ``reject`` send
    and a regenerate sent together, ten times, never both run at once."""
    async with ws_client(server, user) as client:
        first = await client.run(SLOW, agent="load")
        thread_id = first[0]["thread_id"]

        async def send(n: int) -> str | None:
            await asyncio.sleep(n * 0.004)  # the two arrive in turn a little apart
            await client.send(
                type="user_message",
                agent="load",
                content=SLOW,
                thread_id=thread_id,
                on_active="reject",
                id=f"reject-{n}",
            )
            head = await client.recv(timeout=30)
            while head.get("type") not in ("error", "user_message"):
                head = await client.recv(timeout=30)
            if head["type"] == "error":
                return None
            run_id: str = head["run_id"]
            await client.recv_until("agent_completed", run_id=run_id, timeout=60)
            return run_id

        async def regenerate() -> str | None:
            part = {"type": "text", "text": SLOW}
            body = {
                "id": thread_id,
                "trigger": "regenerate-message",
                "agent": "load",
                "messages": [{"id": "q", "role": "user", "parts": [part]}],
            }
            async with httpx.AsyncClient(base_url=server.http, timeout=60) as rest:
                answer = await rest.post(
                    "/api/ai-sdk/chat", json=body, headers=server.headers(user)
                )
            if answer.status_code != 200:
                print("regenerate:", answer.status_code, answer.text[:200])
                return None
            return answer.headers["x-chat-run-id"]

        overlaps: list[tuple[dict[str, Any], dict[str, Any]]] = []
        both = 0
        for n in range(10):
            sent, again = await asyncio.gather(send(n), regenerate())
            print("round", n, sent, again)
            if sent is None or again is None:
                continue
            both += 1
            a = await status_of(server, user, sent)
            b = await status_of(server, user, again)
            # Both started: one must have been created after the other had ended.
            if a["created_at"] < b["updated_at"] and b["created_at"] < a["updated_at"]:
                overlaps.append((a, b))
                print(
                    "  send",
                    a["status"],
                    a["created_at"],
                    a["updated_at"],
                    "| regenerate",
                    b["status"],
                    b["created_at"],
                    b["updated_at"],
                )
        async with http_client(server, headers=server.headers(user)) as rest:
            stored = (await rest.get(f"/api/threads/{thread_id}/messages")).json()["messages"]
        print("thread:", [(m["role"], m.get("run_id")) for m in stored])
        print(f"rounds where both started: {both}, overlapping: {len(overlaps)}")
        assert not overlaps, overlaps

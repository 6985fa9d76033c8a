"""The front-end routes' idempotent sends: the key a POST is known by names its chat and
message apart from every other chat and message of the user's."""

from __future__ import annotations

from typing import Any

import httpx

from tests.support import LiveServer, http_client


async def test_ai_sdk_posts_of_two_chats_never_share_a_run(server: LiveServer, user: str) -> None:
    """Chat ``<user>-a b`` with message ``c`` and chat ``<user>-a`` with message ``b c``
    (same text): two chats, two messages, two runs (a key that joined the ids with a
    space took the second POST for a retry of the first)."""

    def body(chat: str, message_id: str) -> dict[str, Any]:
        part = {"type": "text", "text": "chunks=3"}
        return {
            "id": chat,
            "messages": [{"id": message_id, "role": "user", "parts": [part]}],
            "trigger": "submit-message",
            "agent": "load",
        }

    async with httpx.AsyncClient(base_url=server.http, timeout=30) as client:
        headers = server.headers(user)
        first = await client.post(
            "/api/ai-sdk/chat", json=body(f"{user}-a b", "c"), headers=headers
        )
        second = await client.post(
            "/api/ai-sdk/chat", json=body(f"{user}-a", "b c"), headers=headers
        )
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    async with http_client(server, headers=server.headers(user)) as rest:
        answer = await rest.get(f"/api/threads/{user}-a/messages")
        stored = answer.json().get("messages", []) if answer.status_code == 200 else []
    assert second.headers["x-chat-run-id"] != first.headers["x-chat-run-id"]
    assert [m["role"] for m in stored] == ["user", "assistant"]

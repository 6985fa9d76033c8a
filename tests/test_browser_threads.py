"""The browser client and a conversation open in several tabs, in headless Chromium.

Two tabs of one user on one thread stay in step (each watches the open thread); a message
sent while an answer streams is queued behind it; a message sent just as the connection
drops is sent again with its id, and makes one run.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.support import LiveServer
from tests.test_browser import (  # noqa: F401 - the fixtures are used by name; skips without Chromium
    WAIT_MS,
    Browser,
    Page,
    TcpProxy,
    browser,
    expect,
    gateway,
    load_text,
    open_chat,
    send,
)


@pytest.fixture
def tabs(browser: Browser) -> Iterator[tuple[Page, Page]]:  # noqa: F811
    """Two tabs, each in a context of its own (its own sessionStorage), as two windows."""
    contexts = [browser.new_context(viewport={"width": 1100, "height": 860}) for _ in range(2)]
    pages = [context.new_page() for context in contexts]
    errors: list[str] = []
    for page in pages:
        page.set_default_timeout(WAIT_MS)
        page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield pages[0], pages[1]
    finally:
        for context in contexts:
            context.close()
    assert not errors, f"uncaught errors in the pages: {errors}"


def stored_roles(server: LiveServer, user: str, thread_id: str) -> list[str]:
    answer = httpx.get(
        f"{server.http}/api/threads/{thread_id}/messages", headers=server.headers(user)
    )
    return [m["role"] for m in answer.json()["messages"]]


def test_two_tabs_on_one_thread_stay_in_step(
    tabs: tuple[Page, Page],
    gateway: LiveServer,  # noqa: F811
    user: str,
) -> None:
    one, two = tabs
    token = gateway.token(user)
    open_chat(one, gateway.http, token, "?agent=load")
    send(one, "chunks=3")
    expect(one.locator(".msg.assistant").last).to_have_attribute("data-status", "completed")

    open_chat(two, gateway.http, token, "?agent=load")
    expect(two.locator("#thread-list li")).to_have_count(1)
    two.locator("#thread-list .thread-open").first.click()
    expect(two.locator(".turn")).to_have_count(1)

    # A run the first tab starts shows in the second, from its first event to its last.
    send(one, "chunks=60 delay_ms=10")
    turn = two.locator(".turn").nth(1)
    expect(turn.locator(".msg.user")).to_have_text("chunks=60 delay_ms=10")
    expect(turn.locator(".msg.assistant")).to_have_attribute("data-status", "completed")
    expect(turn.locator(".answer")).to_have_text(load_text(60))

    # And one the second tab starts shows in the first.
    send(two, "chunks=12 delay_ms=10")
    turn = one.locator(".turn").nth(2)
    expect(turn.locator(".msg.user")).to_have_text("chunks=12 delay_ms=10")
    expect(turn.locator(".msg.assistant")).to_have_attribute("data-status", "completed")
    expect(turn.locator(".answer")).to_have_text(load_text(12))
    for page in (one, two):
        expect(page.locator(".turn")).to_have_count(3)


def test_a_message_sent_while_an_answer_streams_is_queued(
    tabs: tuple[Page, Page],
    gateway: LiveServer,  # noqa: F811
    user: str,
) -> None:
    page, _ = tabs
    open_chat(page, gateway.http, gateway.token(user), "?agent=load")
    send(page, "chunks=2")
    expect(page.locator(".msg.assistant").last).to_have_attribute("data-status", "completed")
    send(page, "chunks=150 delay_ms=20")
    first = page.locator(".turn").nth(1).locator(".msg.assistant")
    expect(first.locator(".answer")).to_contain_text(load_text(150)[:40])
    expect(page.locator("#send")).to_be_enabled()  # the composer stays open
    send(page, "chunks=5")
    second = page.locator(".turn").nth(2).locator(".msg.assistant")
    expect(second).to_have_attribute("data-status", "queued")
    expect(second.locator(".badge")).to_have_text("Queued")
    expect(first).to_have_attribute("data-status", "completed")
    expect(second).to_have_attribute("data-status", "completed")
    expect(second.locator(".answer")).to_have_text(load_text(5))
    thread_id = page.evaluate("[...window.chat.client.runs.values()].at(-1).threadId")
    assert stored_roles(gateway, user, thread_id) == ["user", "assistant"] * 3


def test_a_message_sent_as_the_connection_drops_makes_one_run(
    tabs: tuple[Page, Page],
    gateway: LiveServer,  # noqa: F811
    user: str,
) -> None:
    page, _ = tabs
    with TcpProxy(gateway.port) as proxy:
        open_chat(page, proxy.http, gateway.token(user), "?agent=load")
        send(page, "chunks=2")
        expect(page.locator(".msg.assistant").last).to_have_attribute("data-status", "completed")
        # The connection is cut as the message goes out: it may or may not have arrived.
        send(page, "chunks=40 delay_ms=10")
        proxy.abort_all()
        turn = page.locator(".turn").nth(1)
        expect(turn.locator(".msg.assistant")).to_have_attribute("data-status", "completed")
        expect(turn.locator(".answer")).to_have_text(load_text(40))
        expect(page.locator(".turn")).to_have_count(2)
    thread_id = page.evaluate("[...window.chat.client.runs.values()].at(-1).threadId")
    assert stored_roles(gateway, user, thread_id) == ["user", "assistant"] * 2


@pytest.mark.parametrize("in_thread", [False, True], ids=["new-thread", "watched-thread"])
def test_a_message_whose_run_started_unseen_is_not_sent_twice(
    tabs: tuple[Page, Page],
    gateway: LiveServer,  # noqa: F811
    user: str,
    in_thread: bool,
) -> None:
    """The socket closes right behind the message's frame: the gateway starts the run,
    the page sees none of it, sends the message again with its id after reconnecting,
    and follows the run the first send started."""
    page, _ = tabs
    open_chat(page, gateway.http, gateway.token(user), "?agent=load")
    if in_thread:  # then the run also comes through the thread's watch
        send(page, "chunks=2")
        expect(page.locator(".msg.assistant").last).to_have_attribute("data-status", "completed")
    page.evaluate(
        """() => {
          const send = WebSocket.prototype.send;
          WebSocket.prototype.send = function (data) {
            send.call(this, data);
            if (!window.cutOnce && String(data).includes('"user_message"')) {
              window.cutOnce = true;
              this.close();
            }
          };
        }"""
    )
    send(page, "chunks=40 delay_ms=10")
    turns = 1 + in_thread
    turn = page.locator(".turn").nth(turns - 1)
    expect(turn.locator(".msg.assistant")).to_have_attribute("data-status", "completed")
    expect(turn.locator(".answer")).to_have_text(load_text(40))
    expect(page.locator(".turn")).to_have_count(turns)
    stats = page.evaluate("window.chat.client.stats")
    assert stats["duplicateSends"] == 1 and stats["reconnects"] >= 1, stats
    thread_id = page.evaluate("[...window.chat.client.runs.values()].at(-1).threadId")
    assert stored_roles(gateway, user, thread_id) == ["user", "assistant"] * turns

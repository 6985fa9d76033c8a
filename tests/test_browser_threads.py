"""The browser client and a conversation open in several tabs, in headless Chromium.

Two tabs of one user on one thread stay in step (each watches the open thread), over the
WebSocket and over SSE, through cut connections; a message sent while an answer streams
is queued behind it; a message sent just as the connection drops is sent again with its
id, and makes one run.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import LiveServer, parse_sse, run_server
from tests.test_browser import (  # noqa: F401 - the fixtures are used by name; skips without Chromium
    WAIT_MS,
    Browser,
    Page,
    TcpProxy,
    browser,
    client_stats,
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


def test_two_tabs_on_one_thread_stay_in_step_over_sse_through_cuts(
    tabs: tuple[Page, Page],
    gateway: LiveServer,  # noqa: F811
    user: str,
) -> None:
    """Both tabs on SSE: each watches the thread through its event stream; a message sent
    in one streams in the other whole and once, and still does after every connection
    (the thread streams, the message's own stream) was cut in the middle of an answer."""
    one, two = tabs
    token = gateway.token(user)
    query = "?agent=load&transport=sse"
    with TcpProxy(gateway.port) as proxy:
        open_chat(one, proxy.http, token, query)
        send(one, "chunks=3")
        expect(one.locator(".msg.assistant").last).to_have_attribute("data-status", "completed")
        open_chat(two, proxy.http, token, query)
        for page in (one, two):
            expect(page.locator("#connection")).to_have_attribute("data-transport", "sse")
        expect(two.locator("#thread-list li")).to_have_count(1)
        two.locator("#thread-list .thread-open").first.click()
        expect(two.locator(".turn")).to_have_count(1)
        wait_for_thread_stream(two)

        # A run the first tab starts shows in the second, from its first event to its last.
        send(one, "chunks=60 delay_ms=10")
        turn = two.locator(".turn").nth(1)
        expect(turn.locator(".msg.user")).to_have_text("chunks=60 delay_ms=10")
        expect(turn.locator(".msg.assistant")).to_have_attribute("data-status", "completed")
        expect(turn.locator(".answer")).to_have_text(load_text(60))

        # Every connection is cut mid-answer: both tabs re-open their streams and the
        # answer goes on, the events the thread's stream repeats dropped by seq.
        chunks = 150
        send(one, f"chunks={chunks} delay_ms=20")
        answer = two.locator(".turn").nth(2).locator(".answer")
        expect(answer).to_contain_text(load_text(chunks)[:200])
        before = client_stats(two)["threadStreams"]
        cut = proxy.abort_all()
        assert cut >= 3, cut  # the two thread streams and the message's own stream
        for page in (one, two):
            turn = page.locator(".turn").nth(2)
            expect(turn.locator(".msg.assistant")).to_have_attribute("data-status", "completed")
            expect(turn.locator(".answer")).to_have_text(load_text(chunks))
        expect(two.locator("#connection")).to_have_attribute("data-state", "connected")
        stats = client_stats(two)
        assert stats["threadStreams"] > before, stats
        assert stats["duplicates"] > 0 and stats["gaps"] == 0, stats

        # The first tab's watch came back too: a run the second tab starts shows there.
        wait_for_thread_stream(one, at_least=2)
        send(two, "chunks=12 delay_ms=10")
        turn = one.locator(".turn").nth(3)
        expect(turn.locator(".msg.user")).to_have_text("chunks=12 delay_ms=10")
        expect(turn.locator(".msg.assistant")).to_have_attribute("data-status", "completed")
        expect(turn.locator(".answer")).to_have_text(load_text(12))
        for page in (one, two):
            expect(page.locator(".turn")).to_have_count(4)
            expect(page.locator(".msg.user")).to_have_count(4)
            broken = page.locator(".answer[data-repaired], .answer[data-out-of-order]")
            assert broken.count() == 0
            assert page.evaluate("window.chat.client.transport") == "sse"
    thread_id = one.evaluate("[...window.chat.client.runs.values()].at(-1).threadId")
    assert stored_roles(gateway, user, thread_id) == ["user", "assistant"] * 4


def wait_for_thread_stream(page: Page, at_least: int = 1) -> None:
    """Until the page's client has opened its thread's SSE stream ``at_least`` times."""
    page.wait_for_function(
        "n => window.chat.client.stats.threadStreams >= n", arg=at_least, timeout=WAIT_MS
    )


# chat-client.js on its own, in a page: the thread's SSE stream --------------------------

FIGURES = Path(__file__).resolve().parents[1] / "var" / "figures"

#: A ChatClient in the page whose WebSockets never open (as behind a proxy that blocks
#: them), so that it falls back to SSE; it watches the thread before it connects.
START_CLIENT = """async ({ token, threadId }) => {
  const { ChatClient } = await import("/chat-client.js");
  class Blocked {
    constructor() {
      setTimeout(() => this.onclose?.({ code: 1006, reason: "blocked" }), 0);
    }
    send() {}
    close() {}
  }
  // The thread's streams go through a "network" that the test can cut and hold down.
  const requests = [];
  const net = { hold: false, cut: new AbortController() };
  const fetchAll = (url, init = {}) => {
    const path = new URL(url, location.href).pathname;
    if (!path.startsWith("/api/threads/")) return fetch(url, init);
    requests.push({ path, signal: init.signal });
    if (net.hold) return Promise.reject(new TypeError("the network is down"));
    return fetch(url, { ...init, signal: AbortSignal.any([init.signal, net.cut.signal]) });
  };
  const client = new ChatClient({
    token,
    WebSocket: Blocked,
    fetch: fetchAll,
    reconnect: { initialDelayMs: 20, maxDelayMs: 100 },
  });
  const seen = [];
  const errors = [];
  const states = [];
  client.addEventListener("event", (e) => {
    const { event } = e.detail;
    seen.push([event.run_id, event.seq, event.type]);
  });
  client.addEventListener("error", (e) => {
    const { error, threadId } = e.detail;
    errors.push({ code: error.code, status: error.status ?? null, threadId: threadId ?? null });
  });
  client.addEventListener("state", (e) => states.push(e.detail.state));
  client.watchThread(threadId);
  client.connect();
  window.t = { client, seen, errors, states, requests, net };
  window.t.cutAndHold = () => {
    net.hold = true;
    net.cut.abort();
    net.cut = new AbortController();
  };
  window.t.open = () => requests.filter((r) => !r.signal.aborted).map((r) => r.path);
}"""


def start_run(server: LiveServer, user: str, content: str, thread_id: str | None) -> list[Any]:
    """A run started over HTTP (as another device would), read to its end."""
    body: dict[str, Any] = {"message": content, "agent": "load"}
    if thread_id is not None:
        body["thread_id"] = thread_id
    answer = httpx.post(
        f"{server.http}/api/chat/stream", json=body, headers=server.headers(user), timeout=30
    )
    assert answer.status_code == 200, answer.text
    return parse_sse(answer.text)


def sse_streams_open(server: LiveServer) -> int:
    text = httpx.get(f"{server.http}/metrics").text
    found = re.search(r"^chat_sse_streams_open (\S+)$", text, re.M)
    assert found, text
    return int(float(found.group(1)))


def wait_streams(server: LiveServer, count: int) -> None:
    deadline = time.monotonic() + WAIT_MS / 1000
    while (now := sse_streams_open(server)) != count:
        assert time.monotonic() < deadline, f"{now} SSE streams open, expected {count}"
        time.sleep(0.05)


def test_client_watch_over_sse_survives_the_fallback_and_frees_its_stream(
    tabs: tuple[Page, Page],
    user: str,
) -> None:
    """``watchThread`` before the WebSocket fails over to SSE: the watch is carried over
    to the thread's stream, a run another device starts arrives through it once and in
    order, one that ends while the stream is down is followed to its end when it is back,
    watching another thread or none closes it, a thread that is not the user's
    (404) stops the watch with an error and no retry, and ``close()`` frees it."""
    page, _ = tabs
    with run_server() as server:  # its own gateway, so the open-stream gauge is exact
        first = start_run(server, user, "chunks=2", None)
        thread_id = first[0]["data"]["thread_id"]
        page.goto(f"{server.http}/")
        page.evaluate(START_CLIENT, {"token": server.token(user), "threadId": thread_id})
        page.wait_for_function("() => window.t.client.transport === 'sse'")
        page.wait_for_function("() => window.t.client.stats.threadStreams === 1")
        wait_streams(server, 1)

        began = time.perf_counter()
        events = start_run(server, user, "chunks=30 delay_ms=5", thread_id)
        run_id = events[0]["data"]["run_id"]
        page.wait_for_function(
            "id => window.t.seen.some(([r, , type]) => r === id && type === 'agent_completed')",
            arg=run_id,
        )
        shown_after_s = time.perf_counter() - began
        seen = page.evaluate("window.t.seen")
        seqs = [seq for run, seq, _ in seen if run == run_id]
        last = max(int(e["id"]) for e in events if "id" in e)
        assert seqs == list(range(1, last + 1)), seqs
        assert not any(run == first[0]["data"]["run_id"] for run, _, _ in seen)  # ended before

        # The thread's stream is down while a run ends: when it is back, that run (which
        # it no longer lists) is followed on its own from its last seq to its end.
        with ThreadPoolExecutor(1) as pool:
            ending = pool.submit(start_run, server, user, "chunks=40 delay_ms=20", thread_id)
            page.wait_for_function(
                "n => window.t.seen.length >= n",
                arg=len(seen) + 5,
            )
            page.evaluate("window.t.cutAndHold()")
            events = ending.result(timeout=30)
        run_id = events[0]["data"]["run_id"]
        # Re-opened with backoff meanwhile, and said so (offline after a few attempts).
        assert page.evaluate("window.t.client.state") in ("reconnecting", "offline")
        assert "reconnecting" in page.evaluate("window.t.states")
        held = page.evaluate("window.t.requests.length")
        page.evaluate("window.t.net.hold = false")
        page.wait_for_function(
            "id => window.t.seen.some(([r, , type]) => r === id && type === 'agent_completed')",
            arg=run_id,
        )
        seen = page.evaluate("window.t.seen")
        seqs = [seq for run, seq, _ in seen if run == run_id]
        last = max(int(e["id"]) for e in events if "id" in e)
        assert seqs == list(range(1, last + 1)), seqs
        resumed = page.evaluate("window.t.client.stats.resumes")
        assert [r for r in resumed if r["runId"] == run_id and r["afterSeq"] > 0], resumed
        page.wait_for_function("() => window.t.client.state === 'connected'")
        wait_streams(server, 1)
        retries_while_down = held - 2

        # Another thread (this user's, then not) or none: the stream before is let go.
        page.evaluate("window.t.client.watchThread(null)")
        wait_streams(server, 0)
        assert page.evaluate("window.t.open()") == []
        page.evaluate("window.t.client.watchThread('t_not_yours_or_gone')")
        page.wait_for_function("() => window.t.errors.length === 1")
        errors = page.evaluate("window.t.errors")
        assert errors == [{"code": "not_found", "status": 404, "threadId": "t_not_yours_or_gone"}]
        # Had it been retried, 20-100 ms backoffs would have made more requests by now.
        page.wait_for_timeout(500)
        requests = page.evaluate("window.t.requests.map((r) => r.path)")
        assert requests.count("/api/threads/t_not_yours_or_gone/events") == 1, requests
        assert page.evaluate("window.t.client.state") == "connected"

        page.evaluate(f"window.t.client.watchThread({json.dumps(thread_id)})")
        page.wait_for_function("() => window.t.client.stats.threadStreams === 3")
        wait_streams(server, 1)
        page.evaluate("window.t.client.close()")
        wait_streams(server, 0)
        assert page.evaluate("window.t.open()") == []
        assert page.evaluate("window.t.client.stats.gaps") == 0

    FIGURES.mkdir(parents=True, exist_ok=True)
    figures = {
        "thread_sse_run_30_chunks_shown_after_s": round(shown_after_s, 3),
        "thread_sse_reopen_attempts_while_down": retries_while_down,
    }
    (FIGURES / "browser_thread_sse.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(figures)


def test_a_watch_the_socket_refuses_is_reported_as_over_sse(
    tabs: tuple[Page, Page], user: str
) -> None:
    """Over the WebSocket too, watching a thread that is not the user's (or is gone)
    gives one ``error`` event with the thread's id, and the client stays connected."""
    page, _ = tabs
    with run_server() as server:
        page.goto(f"{server.http}/")
        page.evaluate(
            """async ({ token }) => {
              const { ChatClient } = await import("/chat-client.js");
              const client = new ChatClient({ token });
              const errors = [];
              client.addEventListener("error", (e) => {
                const { error, threadId } = e.detail;
                errors.push({ code: error.code, threadId: threadId ?? null });
              });
              client.connect();
              window.w = { client, errors };
            }""",
            {"token": server.token(user)},
        )
        page.wait_for_function("() => window.w.client.state === 'connected'")
        assert page.evaluate("window.w.client.transport") == "websocket"
        page.evaluate("window.w.client.watchThread('t_not_yours_or_gone')")
        page.wait_for_function("() => window.w.errors.length === 1")
        page.wait_for_timeout(200)
        assert page.evaluate("window.w.errors") == [
            {"code": "not_found", "threadId": "t_not_yours_or_gone"}
        ]
        assert page.evaluate("window.w.client.state") == "connected"
        page.evaluate("window.w.client.close()")

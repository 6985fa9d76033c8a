"""The browser client end to end: headless Chromium, driven by Playwright, against a real gateway.

Some tests put a small TCP proxy on loopback between the browser and the gateway, so that
they can cut every connection in the middle of an answer, or refuse WebSocket upgrades the
way some proxies do, without touching the server.

Skipped when the ``playwright`` package or a Chromium binary is missing.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import string
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    pytest.skip(
        "the playwright package is not installed (pip install -e '.[dev]')",
        allow_module_level=True,
    )

from tests.support import LiveServer, run_server


def find_chromium() -> str | None:
    found = shutil.which("chromium")
    if found:
        return found
    return "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None


CHROMIUM = find_chromium()
if CHROMIUM is None:  # pragma: no cover - depends on the environment
    pytest.skip(
        "no Chromium found (shutil.which('chromium') and /usr/bin/chromium are absent; "
        "apt-get install chromium)",
        allow_module_level=True,
    )

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Waits for DOM conditions, in ms: generous, for a loaded machine; they end as soon as met.
WAIT_MS = 20_000
SCREENSHOTS = Path(__file__).resolve().parents[1] / "var" / "screenshots"


def load_text(chunks: int, chunk_chars: int = 8) -> str:
    """What the load agent answers: chunk i is letter i mod 26, ``chunk_chars`` times."""
    return "".join(string.ascii_lowercase[i % 26] * chunk_chars for i in range(chunks))


# A TCP proxy that can cut connections ------------------------------------------------------


class TcpProxy:
    """A loopback TCP proxy in front of the gateway, with its own event loop in a thread.

    ``abort_all()`` cuts every proxied connection at once (the browser sees the socket
    drop); with ``refuse_websockets`` it answers WebSocket upgrades with 403, as a proxy
    that does not allow them would.
    """

    def __init__(self, upstream_port: int, *, refuse_websockets: bool = False) -> None:
        self.upstream_port = upstream_port
        self.refuse_websockets = refuse_websockets
        self.port = 0
        self.websocket_upgrades = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="tcp-proxy", daemon=True
        )
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._call(self._stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()

    def abort_all(self) -> int:
        """Cut every open connection; return how many were cut."""
        return self._call(self._abort_all())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._abort_all()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _abort_all(self) -> int:
        writers = list(self._open)
        for writer in writers:
            writer.transport.abort()
        return len(writers) // 2

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        upstream: asyncio.StreamWriter | None = None
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if b"\r\nupgrade: websocket" in head.lower():
                self.websocket_upgrades += 1
                if self.refuse_websockets:
                    writer.write(
                        b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )
                    await writer.drain()
                    return
            up_reader, upstream = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            self._open.update((writer, upstream))
            upstream.write(head)
            await asyncio.gather(self._pipe(reader, upstream), self._pipe(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            for side in (writer, upstream):
                if side is not None:
                    self._open.discard(side)
                    side.transport.abort()
            self._tasks.discard(task)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof() and not writer.is_closing():
                writer.write_eof()
        except OSError:
            writer.transport.abort()


# Fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway() -> Iterator[LiveServer]:
    """A gateway of its own, with default settings: these tests are about the client."""
    with run_server() as live:
        yield live


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1100, "height": 860})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def open_chat(page: Page, base: str, token: str, query: str = "") -> None:
    page.goto(f"{base}/{query}#token={token}")
    expect(page.locator("#connection")).to_have_attribute("data-state", "connected")


def send(page: Page, text: str) -> None:
    box = page.locator("#message")
    box.fill(text)
    box.press("Enter")


def client_stats(page: Page) -> dict[str, Any]:
    stats: dict[str, Any] = page.evaluate("window.chat.client.stats")
    return stats


# Tests --------------------------------------------------------------------------------------


def test_question_with_a_tool_call_streams_the_answer(
    page: Page, gateway: LiveServer, user: str
) -> None:
    token = gateway.token(user)
    open_chat(page, gateway.http, token)
    # The token left the address bar for sessionStorage.
    assert "token" not in page.url
    assert page.evaluate("sessionStorage.getItem('chat.token')") == token
    expect(page.locator("#who")).to_have_text(f"Signed in as {user}")

    # Shift+Enter adds a line and sends nothing; Enter sends.
    box = page.locator("#message")
    box.fill("What is")
    box.press("Shift+Enter")
    expect(box).to_have_value("What is\n")
    expect(page.locator(".turn")).to_have_count(0)
    send(page, "What is 12 * 7?")

    turn = page.locator(".turn").last
    expect(turn.locator(".msg.user")).to_have_text("What is 12 * 7?")
    assistant = turn.locator(".msg.assistant")
    expect(assistant).to_have_attribute("data-status", "completed")
    expect(assistant.locator(".agent-name")).to_have_text("demo")
    expect(assistant.locator(".thinking .step")).not_to_have_count(0)
    card = assistant.locator(".tool")
    expect(card).to_have_count(1)
    expect(card).to_have_attribute("data-state", "ok")
    expect(card.locator(".tool-name")).to_have_text("calculator")
    expect(card.locator(".tool-args")).to_contain_text('"expression": "12 * 7"')
    expect(card.locator(".tool-result")).to_have_text("84")
    expect(card.locator(".tool-time")).to_have_text(re.compile(r"^(<1 ms|\d+ ms|\d+\.\d s)$"))
    answer = assistant.locator(".answer")
    expect(answer).to_contain_text("84")
    expect(answer).to_have_attribute("aria-live", "polite")
    expect(answer).to_have_attribute("aria-busy", "false")
    expect(page.locator("#runbar")).to_be_hidden()

    # The sidebar lists the conversation once its run has ended.
    expect(page.locator("#thread-list li")).to_have_count(1)

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / "conversation.png"
    page.screenshot(path=str(path))
    print(f"screenshot of the finished conversation: {path}")


def test_stop_freezes_the_answer_and_resume_continues_it(
    page: Page, gateway: LiveServer, user: str
) -> None:
    open_chat(page, gateway.http, gateway.token(user), "?agent=load")
    expect(page.locator("#agent")).to_have_value("load")
    send(page, "chunks=200 delay_ms=20")
    assistant = page.locator(".msg.assistant").last
    answer = assistant.locator(".answer")
    expected = load_text(200)
    expect(answer).to_contain_text(expected[:40])  # it is streaming

    page.locator("#stop").click()
    expect(assistant).to_have_attribute("data-status", "paused")
    expect(page.locator("#resume")).to_be_enabled()
    expect(page.locator("#stop")).to_be_disabled()
    frozen = answer.text_content() or ""
    seq = assistant.get_attribute("data-seq")
    assert expected.startswith(frozen) and 0 < len(frozen) < len(expected)
    # Nothing may arrive while paused: 25 chunk intervals later the answer is the same.
    page.wait_for_timeout(500)
    assert answer.text_content() == frozen
    assert assistant.get_attribute("data-seq") == seq

    page.locator("#resume").click()
    expect(assistant).to_have_attribute("data-status", "completed")
    expect(answer).to_have_text(expected)
    assert assistant.locator(".answer[data-repaired]").count() == 0


def test_cancel_ends_the_run(page: Page, gateway: LiveServer, user: str) -> None:
    open_chat(page, gateway.http, gateway.token(user), "?agent=load")
    send(page, "chunks=1000 delay_ms=20")
    assistant = page.locator(".msg.assistant").last
    expect(assistant.locator(".answer")).to_contain_text("aaaaaaaa")
    page.locator("#cancel").click()
    expect(assistant).to_have_attribute("data-status", "cancelled")
    expect(page.locator("#runbar")).to_be_hidden()
    expect(page.locator("#send")).to_be_enabled()
    assert len(assistant.locator(".answer").text_content() or "") < 8000


def test_dropped_connection_mid_answer_resumes_without_gap_or_repeat(
    page: Page, gateway: LiveServer, user: str
) -> None:
    chunks = 180
    expected = load_text(chunks)
    with TcpProxy(gateway.port) as proxy:
        open_chat(page, proxy.http, gateway.token(user), "?agent=load")
        expect(page.locator("#connection")).to_have_attribute("data-transport", "websocket")
        send(page, f"chunks={chunks} delay_ms=20")
        assistant = page.locator(".msg.assistant").last
        answer = assistant.locator(".answer")

        # Cut every connection twice, in the middle of the answer.
        for streamed in (200, 640):
            expect(answer).to_contain_text(expected[:streamed])
            assert proxy.abort_all() >= 1
        expect(assistant).to_have_attribute("data-status", "completed")
        expect(answer).to_have_text(expected)
        expect(page.locator("#connection")).to_have_attribute("data-state", "connected")
        assert proxy.websocket_upgrades >= 3

    assert assistant.locator(".answer[data-repaired], .answer[data-out-of-order]").count() == 0
    stats = client_stats(page)
    assert stats["reconnects"] >= 2 and stats["gaps"] == 0, stats
    resumed = [r["afterSeq"] for r in stats["resumes"] if r["transport"] == "websocket"]
    last_seq = int(assistant.get_attribute("data-seq") or 0)
    assert len(resumed) >= 2 and all(0 < seq < last_seq for seq in resumed), (resumed, last_seq)


def test_reload_mid_answer_picks_the_run_up_again(
    page: Page, gateway: LiveServer, user: str
) -> None:
    chunks = 120
    expected = load_text(chunks)
    open_chat(page, gateway.http, gateway.token(user), "?agent=load")
    send(page, f"chunks={chunks} delay_ms=20")
    expect(page.locator(".answer").last).to_contain_text(expected[:160])

    page.reload()  # the token and the live run's id are in sessionStorage
    expect(page.locator("#connection")).to_have_attribute("data-state", "connected")
    turn = page.locator(".turn").last
    expect(turn.locator(".msg.user")).to_have_text(f"chunks={chunks} delay_ms=20")
    expect(turn.locator(".msg.assistant")).to_have_attribute("data-status", "completed")
    expect(turn.locator(".answer")).to_have_text(expected)
    expect(page.locator(".turn")).to_have_count(1)


def test_websocket_refused_falls_back_to_sse(page: Page, gateway: LiveServer, user: str) -> None:
    chunks = 150
    expected = load_text(chunks)
    with TcpProxy(gateway.port, refuse_websockets=True) as proxy:
        open_chat(page, proxy.http, gateway.token(user), "?agent=load")
        expect(page.locator("#connection")).to_have_attribute("data-transport", "sse")
        assert proxy.websocket_upgrades >= 1
        send(page, f"chunks={chunks} delay_ms=20")
        assistant = page.locator(".msg.assistant").last
        answer = assistant.locator(".answer")

        # The stream breaks mid-answer: the client follows the run after its last seq.
        expect(answer).to_contain_text(expected[:200])
        assert proxy.abort_all() >= 1
        expect(answer).to_contain_text(expected[:400])

        # Stop and Resume go over the REST routes.
        page.locator("#stop").click()
        expect(assistant).to_have_attribute("data-status", "paused")
        page.locator("#resume").click()
        expect(assistant).to_have_attribute("data-status", "completed")
        expect(answer).to_have_text(expected)

    assert assistant.locator(".answer[data-repaired], .answer[data-out-of-order]").count() == 0
    stats = client_stats(page)
    assert stats["gaps"] == 0, stats
    resumed = [r["afterSeq"] for r in stats["resumes"] if r["transport"] == "sse"]
    assert resumed and all(seq > 0 for seq in resumed), stats


def test_markup_in_a_message_is_shown_as_text(page: Page, gateway: LiveServer, user: str) -> None:
    open_chat(page, gateway.http, gateway.token(user))
    payload = '<img src=x onerror="window.__injected = true">'
    send(page, payload)
    turn = page.locator(".turn").last
    expect(turn.locator(".msg.user")).to_have_text(payload)
    expect(turn.locator(".msg.assistant")).to_have_attribute("data-status", "completed")
    assert page.evaluate("window.__injected") is None
    assert page.locator("img").count() == 0

    # Answers go through the Markdown renderer: markup stays text, unsafe links are dropped.
    rendered = page.evaluate(
        """async (source) => {
            const { renderMarkdown } = await import("/markdown.js");
            const box = document.createElement("div");
            box.appendChild(renderMarkdown(source));
            return {
                text: box.textContent,
                live: box.querySelectorAll("img, script, iframe, [onerror]").length,
                strong: box.querySelectorAll("strong").length,
                links: [...box.querySelectorAll("a")].map((a) => a.href),
            };
        }""",
        payload
        + " **bold** [click](javascript:alert(1)) ![pixel](https://example.com/p.png)"
        + "\n\n<script>window.__injected = true</script>",
    )
    assert rendered["live"] == 0 and rendered["strong"] == 1, rendered
    assert payload in rendered["text"] and "<script>" in rendered["text"], rendered
    assert rendered["links"] == ["https://example.com/p.png"], rendered
    assert page.evaluate("window.__injected") is None


def test_sign_in_with_the_token_field(page: Page, gateway: LiveServer, user: str) -> None:
    page.goto(f"{gateway.http}/")
    expect(page.locator("#signin")).to_be_visible()
    page.locator("#token").fill("not-a-token")
    page.locator("#token").press("Enter")
    # The gateway refuses it after the handshake (4401): back to the sign-in, with the reason.
    expect(page.locator("#signin-error")).to_contain_text("refused")
    expect(page.locator("#signin")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('chat.token')") is None

    page.locator("#token").fill(gateway.token(user))
    page.locator("#token").press("Enter")
    expect(page.locator("#signin")).to_be_hidden()
    expect(page.locator("#connection")).to_have_attribute("data-state", "connected")
    expect(page.locator("#who")).to_have_text(f"Signed in as {user}")


def test_threads_sidebar_lists_reopens_and_deletes_conversations(
    page: Page, gateway: LiveServer, user: str
) -> None:
    open_chat(page, gateway.http, gateway.token(user))
    items = page.locator("#thread-list .thread-item")
    expect(items).to_have_count(0)
    expect(page.locator("#threads-empty")).to_be_visible()

    # Two questions in one conversation, then one in a new chat.
    for question in ("What is 12 * 7?", "What is 2 + 3?"):
        send(page, question)
        expect(page.locator(".msg.assistant").last).to_have_attribute("data-status", "completed")
    expect(items).to_have_count(1)  # refreshed once the run completed
    page.locator("#new-chat").click()
    expect(page.locator(".turn")).to_have_count(0)
    send(page, "What time is it in Tokyo?")
    expect(page.locator(".msg.assistant").last).to_have_attribute("data-status", "completed")
    expect(items).to_have_count(2)

    page.reload()
    expect(page.locator("#connection")).to_have_attribute("data-state", "connected")
    expect(page.locator(".turn")).to_have_count(0)
    # Newest first: the older conversation is the second, titled by its first message.
    expect(items).to_have_count(2)
    expect(items.locator(".thread-title")).to_have_text(
        ["What time is it in Tokyo?", "What is 12 * 7?"]
    )
    expect(items.first.locator(".thread-time")).to_have_text("just now")
    expect(page.locator("#threads-more")).to_be_hidden()

    older = items.nth(1)
    older.locator(".thread-open").click()
    expect(older).to_have_attribute("data-current", "true")
    expect(older.locator(".thread-open")).to_have_attribute("aria-current", "true")
    turns = page.locator(".turn")
    expect(turns).to_have_count(2)
    expect(turns.locator(".msg.user")).to_have_text(["What is 12 * 7?", "What is 2 + 3?"])
    expect(turns.nth(0).locator(".answer")).to_contain_text("84")
    expect(turns.nth(1).locator(".answer")).to_contain_text("5")
    for turn in turns.all():
        expect(turn.locator(".msg.assistant")).to_have_attribute("data-status", "completed")
    thread_id = older.get_attribute("data-thread-id")

    # The next message continues that thread: it moves to the top of the list.
    send(page, "What is 6 * 7?")
    expect(turns).to_have_count(3)
    expect(turns.last.locator(".answer")).to_contain_text("42")
    expect(items.first).to_have_attribute("data-thread-id", thread_id or "")
    expect(items).to_have_count(2)

    # Delete asks for a second click; the first only arms the button.
    target = items.first
    remove = target.locator(".thread-delete")
    expect(remove).to_have_attribute("aria-label", "Delete conversation: What is 12 * 7?")
    remove.click()
    expect(remove).to_have_attribute("data-confirm", "true")
    expect(remove).to_have_text("Delete?")
    expect(items).to_have_count(2)
    remove.click()
    expect(items).to_have_count(1)
    expect(items.locator(".thread-title")).to_have_text(["What time is it in Tokyo?"])
    # It was the open conversation: the view is a new chat again.
    expect(page.locator(".turn")).to_have_count(0)
    expect(page.locator("#empty")).to_be_visible()
    status = page.evaluate(
        """async (id) => (await fetch(`/api/threads/${id}/messages`, {
            headers: { Authorization: `Bearer ${sessionStorage.getItem("chat.token")}` },
        })).status""",
        thread_id,
    )
    assert status == 404

"""The browser client with a human in the loop (protocol 6.4): an approval on the tool's
card, with its arguments edited; a question answered with a choice; an open request that
is still there after a reload.  Headless Chromium, as in ``tests/test_browser.py``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import LiveServer, run_server
from tests.test_browser import (  # the module skips itself without Playwright or Chromium
    SCREENSHOTS,
    browser,
    open_chat,
    page,
    send,
)

try:
    from playwright.sync_api import Page, expect
except ImportError:  # pragma: no cover - test_browser skipped the module already
    pytest.skip("no playwright", allow_module_level=True)

__all__ = ["browser", "page"]  # the fixtures, shared with tests/test_browser.py


@pytest.fixture(scope="module")
def gateway() -> Iterator[LiveServer]:
    """Calculator calls wait for approval; the asking test agent is offered."""
    with run_server(
        approval_tools=("calculator",), agents=("asker=tests.plugin_agents:Asker",)
    ) as live:
        yield live


def test_approving_a_tool_call_with_edited_arguments(
    page: Page, gateway: LiveServer, user: str
) -> None:
    open_chat(page, gateway.http, gateway.token(user))
    send(page, "What is 12 * 7?")
    assistant = page.locator(".turn").last.locator(".msg.assistant")
    expect(assistant).to_have_attribute("data-status", "waiting")
    card = assistant.locator(".tool")
    expect(card).to_have_attribute("data-state", "waiting")
    request = card.locator(".input-request.approval")
    expect(request).to_be_visible()
    expect(request.locator(".input-args")).to_have_value('{\n  "expression": "12 * 7"\n}')
    expect(page.locator("#run-label")).to_have_text("Waiting for your answer")
    request.locator(".input-args").fill('{"expression": "6 * 7"}')
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "approval.png"))
    request.locator("button.approve").click()
    expect(assistant).to_have_attribute("data-status", "completed")
    expect(card).to_have_attribute("data-state", "ok")
    expect(card.locator(".tool-result")).to_have_text("42")
    expect(card.locator(".input-outcome")).to_have_text("Approved, with edited arguments.")
    expect(assistant.locator(".answer")).to_contain_text("6 * 7 = 42")


def test_an_open_request_survives_a_reload_and_can_be_denied(
    page: Page, gateway: LiveServer, user: str
) -> None:
    open_chat(page, gateway.http, gateway.token(user))
    send(page, "What is 2 + 3?")
    expect(page.locator(".input-request.approval")).to_be_visible()
    page.reload()  # the live run's id is in sessionStorage: it is resumed from its start
    expect(page.locator("#connection")).to_have_attribute("data-state", "connected")
    card = page.locator(".turn").last.locator(".tool")
    request = card.locator(".input-request.approval")
    expect(request).to_be_visible()
    expect(page.locator(".turn")).to_have_count(1)
    request.locator(".input-reason").fill("not now")
    request.locator("button.deny").click()
    expect(card).to_have_attribute("data-state", "error")
    expect(card.locator(".tool-result")).to_contain_text("denied")
    expect(card.locator(".tool-result")).to_contain_text("not now")
    expect(card.locator(".input-outcome")).to_have_text("Denied. Reason: not now")
    assistant = page.locator(".turn").last.locator(".msg.assistant")
    expect(assistant).to_have_attribute("data-status", "completed")


def test_a_question_is_answered_with_a_choice(page: Page, gateway: LiveServer, user: str) -> None:
    open_chat(page, gateway.http, gateway.token(user), "?agent=asker")
    send(page, "choices")
    question = page.locator(".input-request.question")
    expect(question.locator(".input-question")).to_have_text("Which colour?")
    question.locator("button.choice", has_text="blue").click()
    expect(question.locator(".input-outcome")).to_have_text("Answered: blue")
    answer = page.locator(".turn").last.locator(".answer")
    expect(answer).to_contain_text("You said 'blue'.")

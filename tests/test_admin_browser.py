"""The operator's page (/admin) in headless Chromium against a real gateway: it lists
the live runs, filters them, cancels one, and sends a non-operator back to sign-in.

Skipped as tests/test_browser.py is, when Playwright or Chromium is missing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.support import LiveServer, run_server, ws_client
from tests.test_browser import SCREENSHOTS, browser, page  # noqa: F401  (fixtures)

from playwright.sync_api import Page, expect  # isort: skip  (after the skip above)

SLOW = "chunks=3000 delay_ms=20"  # a minute unless cancelled


@pytest.fixture(scope="module")
def gateway() -> Iterator[LiveServer]:
    with run_server(admin_claim="role=operator") as live:
        yield live


def start_run(server: LiveServer, user: str, agent: str = "load", content: str = SLOW) -> str:
    """Start a run and leave it: it goes on for the detach grace without a watcher."""

    async def go() -> str:
        async with ws_client(server, user) as client:
            await client.send(type="user_message", agent=agent, content=content)
            run_id: str = (await client.recv())["run_id"]
            return run_id

    # Playwright's sync API runs a loop in this thread: the client gets a thread of its own.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, go()).result(timeout=30)


def status_of(server: LiveServer, user: str, run_id: str) -> str:
    resp = httpx.get(f"{server.http}/api/chat/agents/{run_id}/status", headers=server.headers(user))
    status: str = resp.json()["status"]
    return status


def test_the_admin_page_lists_filters_and_cancels(
    page: Page,  # noqa: F811
    gateway: LiveServer,
    user: str,
) -> None:
    other = f"{user}-b"
    run_a = start_run(gateway, user)
    run_b = start_run(gateway, other)
    token = gateway.token("ops-1", role="operator")
    page.goto(f"{gateway.http}/admin#token={token}")
    row_a = page.locator(f'tr[data-run-id="{run_a}"]')
    row_b = page.locator(f'tr[data-run-id="{run_b}"]')
    expect(row_a).to_be_visible()
    expect(row_b).to_be_visible()
    expect(row_a.locator("td.user")).to_have_text(user)
    expect(row_a.locator("td.agent")).to_have_text("load")
    expect(row_a.locator("td.status")).to_have_text("running")
    expect(row_a.locator("td.watchers")).to_have_text("0")
    expect(page.locator("#who")).to_have_text("ops-1")
    assert "token=" not in page.url  # taken out of the address bar
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "admin.png"))

    page.locator("#filter-user").fill(user)
    expect(row_b).to_have_count(0)
    expect(row_a).to_be_visible()
    page.locator("#filter-status").select_option("paused")
    expect(row_a).to_have_count(0)
    expect(page.locator("#runs-empty")).to_be_visible()
    page.locator("#filter-status").select_option("running")
    expect(row_a).to_be_visible()

    row_a.get_by_role("button", name="Cancel").click()
    expect(row_a).to_have_count(0)
    assert status_of(gateway, user, run_a) == "cancelled"
    page.locator("#filter-user").fill(other)
    expect(row_b).to_be_visible()
    assert status_of(gateway, other, run_b) == "running"
    row_b.get_by_role("button", name="Cancel").click()
    expect(row_b).to_have_count(0)


def test_a_non_operator_is_sent_to_sign_in(
    page: Page,  # noqa: F811
    gateway: LiveServer,
    user: str,
) -> None:
    page.goto(f"{gateway.http}/admin#token={gateway.token(user)}")
    expect(page.locator("#signin")).to_be_visible()
    expect(page.locator("#signin-error")).to_have_text("This token is not an operator's.")
    expect(page.locator("#run-rows tr")).to_have_count(0)
    # Signing in with an operator's token shows the runs.
    page.locator("#token").fill(gateway.token("ops-2", role="operator"))
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#signin")).to_be_hidden()
    expect(page.locator("#admin-status")).to_contain_text("live run")

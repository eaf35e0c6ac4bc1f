"""A real headless Chromium walks the consent flow on the local stack: what a person actually sees and clicks.

Screenshots of the consent, success and denial pages land in test-artifacts/ for a human to look at.
Chromium comes from the system (`make chromium`); Playwright's own browser downloads are never used.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from local.stack import LocalStack

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
TIMEOUT_MS = 15_000


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    with LocalStack() as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make chromium` (apt-get install chromium)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1024, "height": 720})
    context.set_default_timeout(TIMEOUT_MS)
    yield context.new_page()
    context.close()


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def open_consent(page: Page, stack: LocalStack, name: str) -> None:
    """Open the signed link; the API redirects the browser to ServiceNow's consent page."""
    answer = page.goto(stack.authorize_link(name))
    assert answer is not None and answer.status == 200
    assert page.url.startswith(f"{stack.instance_url}/oauth_auth.do?")
    assert answer.request.redirected_from is not None
    assert answer.request.redirected_from.url.startswith(f"{stack.api.url}/connections/{name}/authorize?")
    expect(page.locator("#allow")).to_be_visible()
    expect(page.locator("#deny")).to_be_visible()


def click_to_callback(page: Page, stack: LocalStack, button: str) -> int:
    """Press a consent button and wait until ServiceNow's redirect has loaded our callback; its HTTP status."""
    with page.expect_navigation(url=lambda url: url.startswith(f"{stack.callback_url}?")) as navigation:
        page.click(button)
    answer = navigation.value
    assert answer is not None
    return answer.status


def test_allow_in_a_browser_authorizes_the_connection(stack: LocalStack, page: Page) -> None:
    name = "browser-allow"
    stack.create_connection(name)
    open_consent(page, stack, name)
    expect(page.locator("#scope")).to_have_text("useraccount")
    screenshot(page, "consent.png")

    assert click_to_callback(page, stack, "#allow") == 200
    host = stack.instance_url.split("://", 1)[1]
    expect(page.locator("h1")).to_have_text("Connection authorized")
    expect(page.locator("#summary")).to_have_text(f"Connection {name} to {host} is authorized.")
    expect(page.locator("#access-expiry")).to_have_text(stack_expiry(stack, name, "accessTokenExpiresAt"))
    screenshot(page, "authorized.png")

    document = json.loads(stack.read_secret(name)["SecretString"])
    assert document["status"] == "active"
    assert document["accessToken"] and document["refreshToken"]
    content = page.content()
    assert document["accessToken"] not in content and document["refreshToken"] not in content


def stack_expiry(stack: LocalStack, name: str, key: str) -> str:
    value: str = json.loads(stack.read_secret(name)["SecretString"])[key]
    return value


def test_deny_in_a_browser_shows_why_and_changes_nothing(stack: LocalStack, page: Page) -> None:
    name = "browser-deny"
    stack.create_connection(name)
    before = stack.read_secret(name)
    open_consent(page, stack, name)

    assert click_to_callback(page, stack, "#deny") == 400
    expect(page.locator("h1")).to_have_text("Authorization not completed")
    expect(page.locator("#message")).to_contain_text("pressed Deny")
    expect(page.locator("#connection")).to_have_text(name)
    screenshot(page, "denied.png")

    after = stack.read_secret(name)
    assert (after["VersionId"], after["SecretString"]) == (before["VersionId"], before["SecretString"])
    assert json.loads(after["SecretString"])["status"] == "pending_authorization"

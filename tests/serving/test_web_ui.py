"""The web UI in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright): it asks for
the API key once (again when the key is refused), loads, sends a message with the key, shows a
streamed reply, keeps the history across a reload, regenerates, clears, and takes settings. The
screenshot is kept under .artifacts/ as a test artifact."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / ".artifacts"


@pytest.fixture(scope="module")
def browser(chat_service):
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (make setup-system installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(browser, chat_service):
    page = browser.new_page()
    page.goto(chat_service.url + "/")
    yield page
    page.close()


def test_the_page_asks_for_the_api_key_once_and_again_when_it_is_refused(page, chat_service):
    dialog = page.locator("#api-key-dialog")
    dialog.wait_for(state="visible", timeout=30_000)  # the page's first API call got a 401
    assert "needs an API key" in page.inner_text("#api-key-reason")
    page.fill("#api-key", "sk-nanorun-wrong-" + "0" * 32)
    page.click("#api-key-save")
    page.wait_for_function(
        "() => (document.querySelector('#api-key-reason') || {}).textContent?.includes('refused')"
    )
    assert "The saved API key was refused" in page.inner_text("#api-key-reason")
    page.fill("#api-key", chat_service.key)
    page.click("#api-key-save")
    dialog.wait_for(state="detached")
    page.wait_for_function("() => document.querySelector('#model').textContent === 'nanorun'")
    assert page.evaluate("localStorage.getItem('nanorun-api-key')") == chat_service.key
    page.reload()  # asked once: the stored key is used from now on
    page.wait_for_function("() => document.querySelector('#model').textContent === 'nanorun'")
    assert page.locator("#api-key-dialog").count() == 0


def test_without_a_key_a_message_gets_a_clear_error(browser, chat_service):
    page = browser.new_page()
    try:
        page.goto(chat_service.url + "/")
        page.locator("#api-key-dialog").wait_for(state="visible", timeout=30_000)
        page.click("#api-key-cancel")
        page.fill("#input", "Hello without a key")
        page.press("#input", "Enter")
        page.locator("#api-key-dialog").wait_for(state="visible")
        page.keyboard.press("Escape")
        page.wait_for_selector(".message.error")
        assert "this service needs an API key" in page.inner_text(".message.error .content")
    finally:
        page.close()


def test_chat_page_streams_a_reply_and_keeps_history(page, chat_service):
    requests, responses = [], []
    page.on("request", lambda r: requests.append(r) if r.url.endswith("/v1/chat/completions") else None)
    page.on("response", lambda r: responses.append(r) if r.url.endswith("/v1/chat/completions") else None)
    page.fill("#temperature", "0")
    page.dispatch_event("#temperature", "change")
    page.fill("#max-tokens", "24")
    page.dispatch_event("#max-tokens", "change")
    page.fill("#input", "Hello from the browser")
    page.press("#input", "Enter")
    page.wait_for_selector(".message.assistant[data-done='1']", timeout=60_000)

    assert page.inner_text(".message.user .content") == "Hello from the browser"
    reply = page.inner_text(".message.assistant .content")
    assert reply.strip()
    body = requests[0].post_data_json
    assert body["stream"] is True and body["temperature"] == 0 and body["max_tokens"] == 24
    assert requests[0].headers["authorization"] == f"Bearer {chat_service.key}"
    assert responses[0].headers["content-type"].startswith("text/event-stream")  # the reply was streamed
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-ui-chat.png"), full_page=True)
    assert (ARTIFACTS / "web-ui-chat.png").stat().st_size > 1000

    # the same reply the API gives for the same greedy request: what streamed in is the model's text
    import httpx

    expected = httpx.post(
        f"{chat_service.url}/v1/chat/completions",
        timeout=60,
        json={
            "messages": [{"role": "user", "content": "Hello from the browser"}],
            "temperature": 0,
            "max_tokens": 24,
            "top_k": 50,
        },
        headers=chat_service.headers,
    ).json()["choices"][0]["message"]["content"]
    assert reply.strip() == expected.strip()

    page.reload()  # history survives a reload
    page.wait_for_selector(".message.assistant")
    assert page.inner_text(".message.assistant .content") == reply

    page.click("#regenerate")  # temperature 0: the regenerated reply is the same
    page.wait_for_selector(".message.assistant[data-done='1']", timeout=60_000)
    assert page.locator(".message.assistant").count() == 1
    assert page.inner_text(".message.assistant .content") == reply


def test_slash_commands_change_settings_and_clear_the_chat(page):
    page.fill("#input", "/topk 7")
    page.press("#input", "Enter")
    assert page.input_value("#top-k") == "7"
    page.fill("#input", "/temperature 9")
    page.press("#input", "Enter")
    assert "between 0 and 2" in page.inner_text(".message.system >> nth=-1")
    page.click("#clear")
    assert page.locator(".message").count() == 0
    page.reload()
    assert page.locator(".message").count() == 0
    assert page.input_value("#top-k") == "7"  # settings persist

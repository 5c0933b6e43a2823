"""The web UI in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright): it loads,
sends a message, shows a streamed reply, keeps the history across a reload, regenerates, clears,
and takes settings. The screenshot is kept under .artifacts/ as a test artifact."""

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
def page(chat_service):
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (make setup-system installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        page = browser.new_page()
        page.goto(chat_service.url + "/")
        yield page
        browser.close()


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

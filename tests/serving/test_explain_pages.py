"""The explainer pages in headless Chromium (as the chat UI's test drives it): the tokenizer's
spans rebuild the typed text and the merge slider replays BPE; a next-token bar click extends the
prompt; the attention heatmap has tokens² cells; the training page draws the run's curves. A
screenshot of each page at phone-friendly width is saved under .artifacts/ (copied to
docs/images/ by hand when the pages change)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.serving.test_web_ui import ARTIFACTS, CHROMIUM, CHROMIUM_FLAGS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser(chat_service):
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (make setup-system installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        yield browser
        browser.close()


def keyed_page(browser, service, **options):
    """A page whose browser has the API key stored already (the chat page's test asks for it)."""
    page = browser.new_page(**options)
    page.add_init_script(f"localStorage.setItem('nanorun-api-key', {json.dumps(service.key)})")
    return page


@pytest.fixture
def page(browser, chat_service):
    page = keyed_page(browser, chat_service, viewport={"width": 900, "height": 900})
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.requests = requests
    yield page
    page.close()


def tokenizer_ids(service, text: str) -> list[int]:
    reply = service.post("/api/tokenize", {"text": text}).json()
    return [t["id"] for t in reply["tokens"]]


def open_page(page, service, name: str) -> None:
    page.goto(f"{service.url}/explain/{name}")
    page.wait_for_selector("body[data-ready='1']", timeout=60_000)


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"explain-{name}.png"), full_page=True)


def only_local_requests(page, service) -> bool:
    return all(url.startswith(service.url) for url in page.requests)


def test_tokenizer_spans_rebuild_the_text_and_the_slider_replays_merges(page, chat_service):
    open_page(page, chat_service, "tokenizer")
    text = "Hello, tokenizer! naïve 🙂 12345"
    page.fill("#text", text)
    page.wait_for_function(
        "t => [...document.querySelectorAll('#tokens .tok')].map(s => s.textContent).join('') === t", arg=text
    )
    expected = chat_service.post("/api/tokenize", {"text": text}).json()
    assert page.locator("#tokens .tok").count() == expected["count"]
    assert page.inner_text("#token-count") == str(expected["count"])
    page.focus("#tokens .tok >> nth=0")
    assert f"id {expected['tokens'][0]['id']}" in page.inner_text("#detail")

    page.fill("#merges", "0")  # a range input: fill sets the value and fires input
    page.wait_for_function(
        "n => document.querySelector('#replay-count').textContent === String(n)", arg=len(text.encode())
    )
    assert page.inner_text("#last-merge") == "no merges: every token is one byte"
    page.fill("#merges", "1")
    page.wait_for_function(
        "() => document.querySelector('#last-merge').textContent.startsWith('merge 1 (token 256)')"
    )
    total = int(page.get_attribute("#merges", "max"))
    page.fill("#merges", str(total))
    page.wait_for_function(
        "n => document.querySelector('#replay-count').textContent === String(n)", arg=expected["count"]
    )
    assert page.locator("#merge-list li").count() > 0
    screenshot(page, "tokenizer")
    assert only_local_requests(page, chat_service)


def test_clicking_a_next_token_bar_appends_it_and_predicts_again(page, chat_service):
    open_page(page, chat_service, "next-token")
    before = page.input_value("#prompt")
    bars = page.locator("#bars .bar:not([disabled])")
    assert bars.count() >= 1
    page.fill("#top-k", "8")
    page.press("#top-k", "Tab")  # leaving the field commits it (one change event)
    page.wait_for_function("() => document.querySelectorAll('#bars .bar').length === 8")
    first = page.locator("#bars .bar:not([disabled]) >> nth=0")
    first.focus()
    pressed = first.element_handle()
    page.keyboard.press("Enter")  # keyboard works as well as a click
    page.wait_for_function("b => document.querySelector('#prompt').value.length > b.length", arg=before)
    assert page.input_value("#prompt").startswith(before)
    # The new prediction replaces the bars; the keyboard's focus stays among them.
    page.wait_for_function(
        "old => document.activeElement !== old && document.activeElement.matches('#bars .bar')",
        arg=pressed,
    )
    screenshot(page, "next-token")
    assert only_local_requests(page, chat_service)


def test_attention_heatmap_has_a_cell_per_token_pair(page, chat_service):
    open_page(page, chat_service, "attention")
    page.wait_for_selector("#heatmap rect.cell")
    tokens = chat_service.post("/api/attention", {"prompt": page.input_value("#prompt")}).json()["tokens"]
    assert page.locator("#heatmap rect.cell").count() == len(tokens) ** 2
    page.select_option("#layer", "1")
    page.fill("#prompt", "one two three")
    page.press("#prompt", "Enter")
    n = len(tokenizer_ids(chat_service, "one two three")) + 1  # with <|bos|>
    page.wait_for_function("n => document.querySelectorAll('#heatmap rect.cell').length === n * n", arg=n)
    page.focus("#heatmap .row-label >> nth=2")
    assert "attends to" in page.inner_text("#cell-info")
    screenshot(page, "attention")


def test_training_page_draws_the_curves_and_follows_a_running_stage(page, chat_service, tiny_chat_run):
    """A pretraining stage half done (history.jsonl + progress.json, no done.json): the page draws
    its loss and val-bpb curves, then, polling, picks up the finished stage."""
    from nanorun.pipeline.progress import Done, Progress, write_done, write_progress

    stage_dir = Path(tiny_chat_run) / "pretrain"
    stage_dir.mkdir(exist_ok=True)

    def history(steps: int) -> None:
        records = [{"step": s, "loss": 6.0 * 0.97**s} for s in range(1, steps + 1)]
        records += [{"step": s, "val_bpb": 2.0 * 0.99**s} for s in range(0, steps + 1, 10)]
        records += [
            {"step": s, "samples": [{"prompt": "The capital of France is", "text": f" Paris {s}"}]}
            for s in range(0, steps + 1, 20)
        ]
        (stage_dir / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    history(40)
    write_progress(tiny_chat_run, Progress(stage="pretrain", step=40, total_steps=80))
    try:
        open_page(page, chat_service, "training")
        summary = page.inner_text("#summary")
        assert "sft, 1" in summary and tiny_chat_run not in summary  # what is served, not where
        section = "section[data-stage='pretrain']"
        assert "running" in page.inner_text(f"{section} h2")
        assert page.locator(f"{section} polyline.curve").count() == 2  # loss and val bpb
        bar = page.locator("#timeline rect.span.running")  # pretraining, still running, on the timeline
        assert bar.count() == 1 and "pretrain: running" in bar.locator("title").text_content()
        samples = page.locator(f"{section} details.samples td.sample-text")
        assert samples.all_inner_texts() == [" Paris 0", " Paris 20", " Paris 40"]  # what it wrote, per step
        screenshot(page, "training")
        history(80)
        write_progress(tiny_chat_run, Progress(stage="pretrain", step=80, total_steps=80))
        write_done(tiny_chat_run, Done(stage="pretrain", seconds=1.0))
        page.wait_for_function(
            "s => document.querySelector(s + ' h2').textContent.includes('done')", arg=section, timeout=20_000
        )
    finally:
        shutil.rmtree(stage_dir)


@pytest.mark.parametrize("name", ["tokenizer", "next-token", "attention", "training"])
def test_pages_fit_a_phone_screen_and_are_reachable_by_keyboard(browser, chat_service, name):
    page = keyed_page(browser, chat_service, viewport={"width": 390, "height": 800})
    try:
        open_page(page, chat_service, name)
        # nothing but the heatmap (which scrolls in its own box) is wider than the screen
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        page.keyboard.press("Tab")  # the first stop is the page's navigation
        assert page.evaluate("document.activeElement.closest('nav') !== null")
    finally:
        page.close()

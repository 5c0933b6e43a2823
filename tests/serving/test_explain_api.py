"""The explainer endpoints over HTTP, on the served tiny run under Ray Serve: answers that agree with
the run's tokenizer and model, bounded inputs rejected with a 4xx naming the field, and explainer
work running beside chat decoding without holding it up."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from nanorun.serving.explain import MAX_ATTENTION_TOKENS, MAX_TEXT_CHARS, MAX_TOP_K
from nanorun.trainer.data.tokenizer import Tokenizer

pytestmark = pytest.mark.slow  # starts Ray once per session (~20 s)

TEXT = "Hello there! Tokenizers cut naïve text into 12345 pieces 🙂"


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_run) -> Tokenizer:
    return Tokenizer.load(f"{tiny_chat_run}/tokenizer")


def post(service, path: str, body: dict) -> httpx.Response:
    return service.post(f"/api/{path}", body)


def test_tokenize_spans_rebuild_the_text_with_the_runs_ids(chat_service, tokenizer):
    out = post(chat_service, "tokenize", {"text": TEXT}).json()
    assert "".join(t["text"] for t in out["tokens"]) == TEXT
    assert [t["id"] for t in out["tokens"]] == tokenizer.encode(TEXT)
    assert out["chars_per_token"] == round(len(TEXT) / out["count"], 3)
    for name in ("gpt2", "cl100k_base"):
        entry = out["compare"][name]
        assert entry["available"] is True or entry["reason"]


def test_bpe_replay_from_bytes_to_the_full_encoding(chat_service, tokenizer):
    total = len(tokenizer.mergeable_ranks) - 256
    counts = []
    for merges in (0, 10, 100, 400, total):
        out = post(chat_service, "bpe-replay", {"text": TEXT, "merges": merges, "list_merges": 5}).json()
        assert "".join(t["text"] for t in out["tokens"]) == TEXT
        counts.append(out["count"])
        if merges == 0:
            assert [t["id"] for t in out["tokens"]] == list(TEXT.encode())
        if merges == total:
            assert [t["id"] for t in out["tokens"]] == tokenizer.encode(TEXT)
            assert [m["rank"] for m in out["first_merges"]] == [256, 257, 258, 259, 260]
    assert counts == sorted(counts, reverse=True)


def test_next_token_distribution_is_sorted_and_bounded(chat_service):
    out = post(chat_service, "next-token", {"prompt": "Once upon a", "temperature": 0.7, "top_k": 12}).json()
    probs = [t["prob"] for t in out["tokens"]]
    assert len(probs) == 12 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    assert post(chat_service, "next-token", {"prompt": "x", "top_k": MAX_TOP_K}).status_code == 200


def test_attention_rows_are_causal_distributions(chat_service):
    out = post(
        chat_service, "attention", {"prompt": "a b c d e f g h i j k l m n o p q r s", "layer": 0, "head": 2}
    )
    out = out.json()
    window, weights = out["window"], out["weights"]
    assert window == 16 and len(weights) == len(out["tokens"]) > window + 1
    for q, row in enumerate(weights):
        assert sum(row) == pytest.approx(1, abs=1e-4)
        assert all(w == 0 for k, w in enumerate(row) if k > q or q - k > window)


def test_run_describes_the_served_checkpoint_without_its_location(chat_service, tiny_chat_run):
    out = httpx.get(f"{chat_service.url}/api/run", headers=chat_service.headers, timeout=30).json()
    assert out["stage"] == "sft" and out["step"] == 1
    assert out["model"]["n_layer"] == 2 and out["context"] == 512 and out["vocab_size"] > 256
    assert not {"checkpoint", "run_dir", "tokenizer"} & set(out)


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("tokenize", {}, "text"),
        ("tokenize", {"text": "x" * (MAX_TEXT_CHARS + 1)}, "text"),
        ("tokenize", {"text": "x", "extra": 1}, "extra"),
        ("bpe-replay", {"text": "x", "merges": -1}, "merges"),
        ("bpe-replay", {"text": "x", "merges": 3, "list_merges": 10_000}, "list_merges"),
        ("next-token", {"prompt": "x", "top_k": 0}, "top_k"),
        ("next-token", {"prompt": "x", "top_k": MAX_TOP_K + 1}, "top_k"),
        ("next-token", {"prompt": "x", "temperature": 3}, "temperature"),
        ("next-token", {"prompt": "word " * 700}, "prompt"),
        ("attention", {"prompt": "x", "layer": 2}, "layer"),
        ("attention", {"prompt": "x", "head": 4}, "head"),
        ("attention", {"prompt": "x", "head": -1}, "head"),
        ("attention", {"prompt": "word " * MAX_ATTENTION_TOKENS}, "prompt"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(chat_service, path, body, param):
    response = post(chat_service, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and param in error["message"]


def test_explainer_requests_do_not_hold_up_chat(chat_service):
    """Attention maps and distributions computed while replies stream: every request succeeds,
    and a chat reply finishes while explainer requests keep arriving."""

    def chat() -> float:
        start = time.monotonic()
        response = chat_service.post(
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 48, "temperature": 0},
            timeout=120,
        )
        assert response.status_code == 200
        return time.monotonic() - start

    def explain(i: int) -> int:
        if i % 2:
            return post(
                chat_service, "attention", {"prompt": f"sentence {i} " * 4, "layer": i % 2}
            ).status_code
        return post(chat_service, "next-token", {"prompt": f"sentence {i}"}).status_code

    with ThreadPoolExecutor(12) as pool:
        chats = [pool.submit(chat) for _ in range(4)]
        statuses = list(pool.map(explain, range(24)))
        assert all(c.result() < 120 for c in chats)
    assert statuses == [200] * 24

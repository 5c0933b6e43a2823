"""The explainer's computations (`nanorun.serving.explain`) on the project's small tokenizer and a
tiny random GPT, without Ray: spans, BPE replay, next-token distributions, attention maps, history."""

from __future__ import annotations

import json

import pytest
import torch
from nanorun.serving import explain

from tests.fixtures.chat_model import save_chat_checkpoint, tiny_chat_model

TEXTS = [
    "Hello world! The tokenizer splits this sentence.",
    "naïve café — 日本語 🙂 emoji",
    "  spaces,\n\nnewlines\tand 12345 digits",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_token_spans_concatenate_to_the_input_and_ids_are_the_tokenizers(chat_tokenizer, text):
    out = explain.tokenize(chat_tokenizer, text)
    assert [t["id"] for t in out["tokens"]] == chat_tokenizer.encode(text)
    assert "".join(t["text"] for t in out["tokens"]) == text
    assert b"".join(bytes(t["bytes"]) for t in out["tokens"]) == text.encode("utf-8")
    assert out["count"] == len(out["tokens"])
    if text:
        assert out["chars_per_token"] == round(len(text) / out["count"], 3)
    for name in explain.OTHER_ENCODINGS:  # offline here: not available, and it says why
        entry = out["compare"][name]
        assert entry["available"] or entry["reason"]


def test_a_token_inside_a_multibyte_character_has_no_text_of_its_own():
    pieces = ["é".encode()[:1], "é".encode()[1:] + b"x"]
    assert explain.token_texts(pieces) == ["", "éx"]
    assert explain.token_texts([b"\xf0\x9f", b"\x99", b"\x82!"]) == ["", "", "🙂!"]


@pytest.mark.parametrize("text", TEXTS)
def test_bpe_replay_goes_from_bytes_to_the_tokenizers_encoding(chat_tokenizer, text):
    total = explain.total_merges(chat_tokenizer)
    zero = explain.bpe_replay(chat_tokenizer, text, 0)
    assert [t["id"] for t in zero["tokens"]] == list(text.encode("utf-8"))
    assert zero["first_merges"] == []
    full = explain.bpe_replay(chat_tokenizer, text, total)
    assert [t["id"] for t in full["tokens"]] == chat_tokenizer.encode(text)
    counts = [explain.bpe_replay(chat_tokenizer, text, m)["count"] for m in range(0, total + 1, 37)]
    assert counts == sorted(counts, reverse=True)  # more merges never mean more tokens
    for m in (0, 5, total):
        assert "".join(t["text"] for t in explain.bpe_replay(chat_tokenizer, text, m)["tokens"]) == text
    assert explain.bpe_replay(chat_tokenizer, text, total + 1000)["merges"] == total


def test_first_merges_are_listed_in_rank_order_and_rebuild_their_token(chat_tokenizer):
    merges = explain.bpe_replay(chat_tokenizer, "x", 40, list_merges=10)["first_merges"]
    assert [m["rank"] for m in merges] == list(range(256, 266))
    for m in merges:
        assert m["left"] + m["right"] == m["text"]


def test_the_replay_names_the_pair_its_last_merge_joined(chat_tokenizer):
    assert explain.bpe_replay(chat_tokenizer, "x", 0)["last_merge"] is None
    for n in (1, 40, explain.total_merges(chat_tokenizer)):
        last = explain.bpe_replay(chat_tokenizer, "x", n)["last_merge"]
        assert last["rank"] == 256 + n - 1 and last["left"] + last["right"] == last["text"]


@pytest.fixture(scope="module")
def model(chat_tokenizer):
    return tiny_chat_model(chat_tokenizer.vocab_size)


def test_next_token_is_a_sorted_top_k_of_a_distribution(model, chat_tokenizer):
    out = explain.next_token(model, chat_tokenizer, "The capital of France is", 0.8, 25)
    probs = [t["prob"] for t in out["tokens"]]
    assert len(probs) == 25 and probs == sorted(probs, reverse=True)
    # the same distribution computed here, from the model's logits for <|bos|> and the prompt
    ids = [chat_tokenizer.bos_token_id, *chat_tokenizer.encode("The capital of France is")]
    with torch.inference_mode():
        reference = torch.softmax(model(torch.tensor([ids]))[0, -1].double() / 0.8, dim=-1)
    top = torch.topk(reference, 25)
    assert [t["id"] for t in out["tokens"]] == top.indices.tolist()
    assert probs == pytest.approx(top.values.tolist(), rel=1e-4)
    assert out["top_mass"] == pytest.approx(float(top.values.sum()), rel=1e-4) and out["top_mass"] < 1
    assert out["prompt_tokens"] == len(chat_tokenizer.encode("The capital of France is")) + 1
    greedy = explain.next_token(model, chat_tokenizer, "The capital of France is", 0, 3)
    assert greedy["tokens"][0]["prob"] == 1.0 and greedy["tokens"][0]["id"] == out["tokens"][0]["id"]
    tiny = explain.next_token(model, chat_tokenizer, "The capital of France is", 5e-324, 3)
    assert tiny["tokens"][0] == {**greedy["tokens"][0]} and tiny["tokens"][1]["prob"] == 0.0
    sharp = explain.next_token(model, chat_tokenizer, "The capital of France is", 0.2, 1)
    assert sharp["tokens"][0]["prob"] > out["tokens"][0]["prob"]  # lower temperature: more peaked
    with pytest.raises(explain.ExplainInputError) as err:
        explain.next_token(model, chat_tokenizer, "word " * 400, 1.0, 5)
    assert err.value.param == "prompt"


def test_attention_rows_are_causal_distributions_with_the_window_visible(model, chat_tokenizer):
    prompt = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    out = explain.attention(model, chat_tokenizer, prompt, layer=0, head=1)
    T = len(out["tokens"])
    assert T > out["window"] + 2 == 16 + 2
    assert out["tokens"][0] == "<|bos|>" and len(out["weights"]) == T
    for q, row in enumerate(out["weights"]):
        assert len(row) == T and sum(row) == pytest.approx(1, abs=1e-4)
        assert all(w == 0 for k, w in enumerate(row) if k > q or q - k > out["window"])
    full = explain.attention(model, chat_tokenizer, prompt, layer=1, head=0)
    assert full["window"] is None and full["weights"][T - 1][0] > 0
    for field, layer, head in (("layer", 2, 0), ("head", 0, 4)):
        with pytest.raises(explain.ExplainInputError) as err:
            explain.attention(model, chat_tokenizer, prompt, layer, head)
        assert err.value.param == field
    with pytest.raises(explain.ExplainInputError, match="64"):
        explain.attention(model, chat_tokenizer, "word " * 100, 0, 0)


def test_run_summary_reads_the_history_of_each_stage(tmp_path, model, chat_tokenizer):
    run = tmp_path / "run"
    checkpoint = save_chat_checkpoint(str(run), model, stage="sft", step=3)
    records = [{"step": s, "loss": 5.0 - s / 10} for s in range(1, 6)] + [{"step": 5, "val_bpb": 2.5}]
    records += [
        {"step": 5, "samples": [{"prompt": "Once", "text": " upon" * 200}, {"prompt": 3, "text": "bad"}]}
    ]
    (run / "pretrain").mkdir()
    (run / "pretrain" / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "pretrain" / "done.json").write_text(json.dumps({"stage": "pretrain", "seconds": 1.0}))
    info = {"checkpoint": checkpoint, "step": 3, "context": 128}
    out = explain.run_summary(model, chat_tokenizer, info)
    assert out["stage"] == "sft" and out["step"] == 3
    assert str(run) not in json.dumps(out)  # public: no storage location
    assert out["model"]["n_layer"] == 2 and out["vocab_size"] == chat_tokenizer.vocab_size
    base = next(s for s in out["stages"] if s["key"] == "pretrain")
    assert base["state"] == "done" and base["key"] == "pretrain"
    assert [p["step"] for p in base["loss"]] == [1, 2, 3, 4, 5]
    assert base["val_bpb"] == [{"step": 5, "value": 2.5}]
    # the greedy samples, bounded in length, malformed ones dropped
    assert base["samples"] == [{"step": 5, "samples": [{"prompt": "Once", "text": (" upon" * 200)[:400]}]}]
    assert explain.run_summary(model, chat_tokenizer, {"checkpoint": "/somewhere/else"})["stages"] == []


def test_the_timeline_places_every_stage_that_ran_on_the_runs_clock(tmp_path):
    from nanorun.pipeline.progress import Done, Progress, write_done, write_progress

    run = str(tmp_path)
    write_done(run, Done(stage="tokenizer", seconds=10.0, finished_at=1000.0))
    write_done(run, Done(stage="pretrain", seconds=50.0, finished_at=1060.0))
    progress = Progress(stage="midtrain", step=3, total_steps=9, elapsed_seconds=5.0)
    write_progress(run, progress)  # stamps updated_at now
    stages = explain.timeline(run)
    assert [(s["key"], s["state"]) for s in stages] == [
        ("tokenizer", "done"),
        ("pretrain", "done"),
        ("midtrain", "running"),
    ]
    assert (stages[0]["start"], stages[0]["end"], stages[1]["start"]) == (990.0, 1000.0, 1010.0)
    assert stages[2]["seconds"] == 5.0 and stages[2]["end"] > 1060.0


def test_long_histories_are_thinned_keeping_the_last_point():
    records = [{"step": i} for i in range(10_001)]
    thinned = explain.thin(records, 1000)
    assert len(thinned) <= 1001 and thinned[-1] == {"step": 10_000} and thinned[0] == {"step": 0}


def naive_bpe(piece: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    """The textbook loop (rescan every pair after each merge), as a reference."""
    parts = [bytes([b]) for b in piece]
    while True:
        found = [
            (ranks.get(a + b, max_rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:], strict=False))
        ]
        rank, i = min(found, default=(max_rank, -1))
        if rank >= max_rank:
            return parts
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


@pytest.mark.parametrize("merges", [0, 1, 7, 60, 300, 10_000])
def test_bpe_merge_equals_the_textbook_loop(chat_tokenizer, merges):
    ranks = chat_tokenizer.mergeable_ranks
    for chunk in ["        ", " tokenization", "aaaaaaaaaaa", "naïve", "ababababab", "\n\n\n"]:
        piece = chunk.encode()
        assert explain.bpe_merge(piece, ranks, 256 + merges) == naive_bpe(piece, ranks, 256 + merges)


def test_bpe_replay_of_a_long_run_of_spaces_is_fast(chat_tokenizer):
    import time

    start = time.monotonic()
    out = explain.bpe_replay(chat_tokenizer, " " * explain.MAX_TEXT_CHARS, 10**6)
    assert [t["id"] for t in out["tokens"]] == chat_tokenizer.encode(" " * explain.MAX_TEXT_CHARS)
    assert time.monotonic() - start < 5

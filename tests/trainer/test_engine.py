"""The inference engine: KV-cached generation equals full recomputation, sampling is seeded, tool
calls are answered by forced calculator output, and long conversations never overflow the context."""

from __future__ import annotations

import pytest
import torch
from nanorun.trainer.chat.conversation import render_for_completion
from nanorun.trainer.chat.engine import (
    ContextOverflowError,
    Engine,
    SpecialTokens,
    TextStream,
    fit_conversation,
    sample_tokens,
)

from tests.fixtures.chat_model import CONTEXT

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


@pytest.fixture(scope="module")
def engine(chat_model, chat_tokenizer):
    return Engine(chat_model, chat_tokenizer)


def prompt_for(tokenizer, text: str) -> list[int]:
    return render_for_completion(tokenizer, {"messages": [{"role": "user", "content": text}]})


@torch.inference_mode()
def naive_greedy(model, tokens: list[int], max_tokens: int, stop: set[int]) -> list[int]:
    """Reference generation: recompute the whole sequence for every new token, no cache."""
    ids = list(tokens)
    for _ in range(max_tokens):
        logits = model(torch.tensor([ids]))[0, -1]
        token = int(torch.argmax(logits))
        if token in stop:
            break
        ids.append(token)
    return ids


def test_greedy_generation_equals_naive_full_recompute_token_for_token(engine, chat_model, chat_tokenizer):
    stop = engine.special.stop
    for text in ["Hello there, how are you?", "Explain the os module in one sentence please, with details."]:
        prompt = prompt_for(chat_tokenizer, text)
        expected = naive_greedy(chat_model, prompt, 40, stop)
        completions, masks = engine.generate_batch(prompt, num_samples=3, max_tokens=40, temperature=0.0)
        assert len(expected) > len(prompt) + 5  # the comparison covers real generated tokens
        for completion, mask in zip(completions, masks, strict=True):
            assert completion == expected
            assert mask == [0] * len(prompt) + [1] * (len(completion) - len(prompt))


def test_sampling_is_reproducible_for_a_seed_and_varies_across_rows(engine, chat_tokenizer):
    prompt = prompt_for(chat_tokenizer, "Tell me a story.")
    first, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=20, temperature=1.0, seed=7)
    again, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=20, temperature=1.0, seed=7)
    other, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=20, temperature=1.0, seed=8)
    assert first == again
    assert first != other
    assert len({tuple(c) for c in first}) > 1  # rows draw different samples


def test_top_k_one_and_tiny_top_p_are_greedy(engine, chat_tokenizer):
    prompt = prompt_for(chat_tokenizer, "What is a thread?")
    greedy, _ = engine.generate_batch(prompt, max_tokens=15, temperature=0.0)
    top1, _ = engine.generate_batch(prompt, max_tokens=15, temperature=1.5, top_k=1, seed=3)
    nucleus, _ = engine.generate_batch(prompt, max_tokens=15, temperature=1.5, top_p=1e-6, seed=3)
    assert top1 == greedy
    assert nucleus == greedy


def test_top_k_and_top_p_restrict_the_candidates():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_tokens(logits, gen, 1.0, top_k=2).tolist()) == {0, 1}
    # probabilities ~ .64 .24 .09 .03 .01: the 0.8 nucleus is the first two tokens
    assert set(sample_tokens(logits, gen, 1.0, top_p=0.8).tolist()) == {0, 1}
    assert set(sample_tokens(logits, gen, 1.0).tolist()) >= {0, 1, 2, 3}


def test_a_vanishing_temperature_samples_the_argmax_instead_of_failing():
    logits = torch.tensor([[4.0, 3.0, -2.0], [0.0, 9.0, 1.0]])
    gen = torch.Generator().manual_seed(0)
    for temperature in (5e-324, 1e-30):
        assert sample_tokens(logits, gen, temperature).tolist() == [0, 1]
        assert sample_tokens(logits, gen, temperature, top_k=2, top_p=0.5).tolist() == [0, 1]
    assert sample_tokens(logits, gen, 1.0, top_p=5e-324).tolist() == [0, 1]  # 0 in fp32: still the top


class ScriptedModel(torch.nn.Module):
    """The real tiny model with its preferred next token steered by a script (generated position
    -> token). It records every input the engine feeds it, so a test can see forced tokens arrive."""

    def __init__(self, model, script: dict[int, int], prompt_len: int) -> None:
        super().__init__()
        self.inner, self.script, self.prompt_len = model, script, prompt_len
        self.config = model.config
        self.compute_dtype = model.compute_dtype
        self.fed: list[list[int]] = []

    def forward(self, idx, targets=None, kv_cache=None):
        self.fed.append(idx[0].tolist())
        logits = self.inner(idx, kv_cache=kv_cache)
        position = sum(len(x) for x in self.fed) - self.prompt_len  # index of the token to produce
        if position in self.script:
            logits[:, -1, self.script[position]] += 1000.0
        return logits


def scripted_engine(model, tokenizer, prompt, wanted: list[int]):
    scripted = ScriptedModel(model, dict(enumerate(wanted)), len(prompt))
    return Engine(scripted, tokenizer), scripted


def test_tool_call_is_answered_with_forced_calculator_output(chat_model, chat_tokenizer):
    s = SpecialTokens(chat_tokenizer)
    prompt = prompt_for(chat_tokenizer, "What is 6 times 7?")
    expr, result = chat_tokenizer.encode("6*7"), chat_tokenizer.encode("42")
    call = [s.python_start, *expr, s.python_end]
    forced = [s.output_start, *result, s.output_end]
    after = chat_tokenizer.encode(" done")
    # The script wants junk (token 5) where the output belongs: the engine must override it.
    wanted = call + [5] * len(forced) + after + [s.assistant_end]
    engine, scripted = scripted_engine(chat_model, chat_tokenizer, prompt, wanted)

    columns = list(engine.generate(prompt, max_tokens=60, temperature=0.0))
    tokens = [c[0] for c, _ in columns]
    masks = [m[0] for _, m in columns]
    assert tokens == call + forced + after + [s.assistant_end]
    assert masks == [1] * len(call) + [0] * len(forced) + [1] * (len(after) + 1)
    fed = [t for step in scripted.fed[1:] for t in step]  # the model really saw the forced tokens
    assert fed == tokens[:-1]

    scripted.fed = []  # the script counts positions from the start of a generation
    completions, completion_masks = engine.generate_batch(prompt, max_tokens=60, temperature=0.0)
    assert completions[0] == prompt + call + forced + after  # the stop token is not part of it
    assert completion_masks[0][len(prompt) :] == [1] * len(call) + [0] * len(forced) + [1] * len(after)

    stream = TextStream(chat_tokenizer, s)
    assert "".join(stream.push(t) for t in tokens) + stream.flush() == "<<6*7=42>> done"


def test_refused_tool_call_gets_an_empty_output_and_generation_goes_on(chat_model, chat_tokenizer):
    s = SpecialTokens(chat_tokenizer)
    prompt = prompt_for(chat_tokenizer, "Import os")
    call = [s.python_start, *chat_tokenizer.encode("__import__('os')"), s.python_end]
    wanted = call + [5, 5] + [s.assistant_end]
    engine, _ = scripted_engine(chat_model, chat_tokenizer, prompt, wanted)
    (completion,), _ = engine.generate_batch(prompt, max_tokens=60, temperature=0.0)
    assert completion[len(prompt) :] == call + [s.output_start, s.output_end]


def test_generation_stops_at_the_end_of_the_context_without_error(engine, chat_tokenizer):
    prompt = prompt_for(chat_tokenizer, "word " * 200)[: CONTEXT - 3]
    columns = list(engine.generate(prompt, max_tokens=100, temperature=0.0))
    last = columns[-1][0][0]  # the last step's token of the one row
    # the three positions left, unless the reply ended on a stop token before them
    assert len(columns) == 3 or (len(columns) < 3 and last in engine.special.stop), (len(columns), last)
    with pytest.raises(ContextOverflowError, match="context is 128"):
        next(engine.generate(prompt_for(chat_tokenizer, "word " * 200), max_tokens=10))


def long_conversation(turns: int) -> dict:
    messages = [{"role": "system", "content": "You are terse."}]
    for i in range(turns):
        messages.append({"role": "user", "content": f"question number {i} about the json module and files"})
        messages.append({"role": "assistant", "content": f"answer number {i}, which is fairly long as well"})
    messages.append({"role": "user", "content": "and the last question?"})
    return {"messages": messages}


def test_long_conversation_is_trimmed_from_the_oldest_turns_keeping_the_system_message(chat_tokenizer):
    conversation = long_conversation(30)
    tokens, notice = fit_conversation(chat_tokenizer, conversation, 100)
    assert len(tokens) <= 100
    assert notice is not None and "dropped the" in notice and "oldest message" in notice
    text = chat_tokenizer.decode(tokens)
    assert "You are terse." in text and "and the last question?" in text
    assert "question number 0 " not in text and "question number 29 " in text
    # exactly the fewest whole exchanges were dropped: keeping one more would not fit
    dropped = int(notice.split("dropped the ")[1].split()[0])
    kept = conversation["messages"][0:1] + conversation["messages"][1 + dropped - 2 :]
    assert len(render_for_completion(chat_tokenizer, {"messages": kept})) > 100
    assert fit_conversation(chat_tokenizer, long_conversation(1), 100) == (
        render_for_completion(chat_tokenizer, long_conversation(1)),
        None,
    )


def test_a_single_message_longer_than_the_context_keeps_its_end(engine, chat_tokenizer):
    conversation = {
        "messages": [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "BEGINNING " + "blah " * 500 + "THE END"},
        ]
    }
    tokens, notice = fit_conversation(chat_tokenizer, conversation, 64)
    assert len(tokens) <= 64 and "kept only the last" in notice
    text = chat_tokenizer.decode(tokens)
    assert "Be kind." in text and "THE END" in text and "BEGINNING" not in text
    columns = list(engine.generate(tokens, max_tokens=200, temperature=0.0))  # and it generates
    room, last = CONTEXT - len(tokens), columns[-1][0][0]
    assert len(columns) == room or (len(columns) < room and last in engine.special.stop), (len(columns), room)
    with pytest.raises(ContextOverflowError, match="system message"):
        fit_conversation(
            chat_tokenizer,
            {"messages": [{"role": "system", "content": "long " * 200}, {"role": "user", "content": "hi"}]},
            64,
        )


def test_text_stream_never_splits_a_utf8_character(chat_tokenizer):
    s = SpecialTokens(chat_tokenizer)
    text = "naïve café, 日本語 and emoji 🙂 done"
    stream = TextStream(chat_tokenizer, s)
    pieces = [stream.push(t) for t in chat_tokenizer.encode(text)]
    assert "".join(pieces) + stream.flush() == text
    assert all("\ufffd" not in p for p in pieces)

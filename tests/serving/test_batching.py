"""The continuous-batching scheduler, without Ray: requests of different lengths decode together
yet each gets exactly the tokens it would get alone; rows are reused; a cancelled request frees
its row at once."""

from __future__ import annotations

import asyncio

import pytest
from nanorun.serving.batching import SamplingParams, Scheduler
from nanorun.serving.metrics import ServeMetrics
from nanorun.trainer.chat.conversation import render_for_completion
from nanorun.trainer.chat.engine import Engine

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


def prompt(tokenizer, i: int) -> list[int]:
    text = f"Request {i}: " + "tell me more " * i
    return render_for_completion(tokenizer, {"messages": [{"role": "user", "content": text}]})


async def collect(
    scheduler: Scheduler, tokens: list[int], params: SamplingParams
) -> tuple[list[int], str, str]:
    out, text, reason = [], [], None
    async for event in scheduler.stream(tokens, params):
        if event.token is not None:
            out.append(event.token)
        text.append(event.text)
        reason = event.finish_reason
    return out, "".join(text), reason


def test_concurrent_greedy_requests_get_exactly_their_solo_output(chat_model, chat_tokenizer):
    engine = Engine(chat_model, chat_tokenizer)
    prompts = [prompt(chat_tokenizer, i) for i in range(10)]
    budgets = [5 + 3 * i for i in range(10)]  # rows finish at different steps and are refilled
    expected = []
    for p, budget in zip(prompts, budgets, strict=True):
        (completion,), _ = engine.generate_batch(p, max_tokens=budget, temperature=0.0)
        expected.append(completion[len(p) :])

    scheduler = Scheduler(chat_model, chat_tokenizer, slots=4).start()  # fewer rows than requests: some wait

    async def run():
        return await asyncio.gather(
            *(
                collect(scheduler, p, SamplingParams(max_tokens=b, temperature=0.0))
                for p, b in zip(prompts, budgets, strict=True)
            )
        )

    try:
        results = asyncio.run(run())
    finally:
        scheduler.close()
    assert [tokens for tokens, _, _ in results] == expected
    # a reply shorter than its budget ended on a stop token, one as long ran out of budget
    assert [reason for _, _, reason in results] == [
        "length" if len(tokens) == budget else "stop"
        for tokens, budget in zip(expected, budgets, strict=True)
    ]
    total = sum(len(tokens) for tokens, _, _ in results)
    assert scheduler.steps < total * 0.6, (scheduler.steps, total)  # decode steps were shared
    assert scheduler.stats()["inflight"] == 0 and int(scheduler.cache.cache_seqlens.sum()) == 0


def test_seeded_sampling_is_reproducible_inside_a_batch(chat_model, chat_tokenizer):
    scheduler = Scheduler(chat_model, chat_tokenizer, slots=8).start()
    params = [SamplingParams(max_tokens=12, temperature=1.0, top_k=40, top_p=0.9, seed=s) for s in (1, 1, 2)]

    async def run():
        return await asyncio.gather(*(collect(scheduler, prompt(chat_tokenizer, 3), p) for p in params))

    try:
        (a, _, _), (b, _, _), (c, _, _) = asyncio.run(run())
    finally:
        scheduler.close()
    assert a == b and a != c


def test_a_cancelled_request_frees_its_row_and_the_others_continue(chat_model, chat_tokenizer):
    other_prompt = prompt(chat_tokenizer, 2)
    (solo,), _ = Engine(chat_model, chat_tokenizer).generate_batch(
        other_prompt, max_tokens=20, temperature=0.0
    )
    metrics = ServeMetrics()
    scheduler = Scheduler(chat_model, chat_tokenizer, slots=2, metrics=metrics).start()
    long = SamplingParams(max_tokens=100, temperature=1.0, seed=0)

    async def run():
        events = scheduler.stream(prompt(chat_tokenizer, 1), long)
        await anext(events)  # generating
        other = asyncio.create_task(
            collect(scheduler, other_prompt, SamplingParams(max_tokens=20, temperature=0.0))
        )
        await events.aclose()  # the client goes away

        async def freed() -> None:
            while scheduler.stats()["inflight"] > 1:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(freed(), timeout=60)  # its row, while the other request goes on
        return await other

    try:
        tokens, _, reason = asyncio.run(run())
    finally:
        scheduler.close()
    assert tokens == solo[len(other_prompt) :]  # the other request got what it gets alone
    assert reason == ("length" if len(tokens) == 20 else "stop")
    assert scheduler.stats()["inflight"] == 0
    assert metrics.inflight._value.get() == 0 and metrics.queued._value.get() == 0
    cancelled = metrics.generated_tokens._value.get() - len(tokens)
    assert 1 <= cancelled < 100  # the cancelled request stopped short of its 100 tokens


def test_prompts_that_do_not_fit_are_refused_clearly(chat_model, chat_tokenizer):
    scheduler = Scheduler(chat_model, chat_tokenizer, slots=1)

    async def run():
        with pytest.raises(ValueError, match="context"):
            await anext(scheduler.stream(list(range(chat_model.config.sequence_len)), SamplingParams()))
        with pytest.raises(ValueError, match="empty"):
            await anext(scheduler.stream([], SamplingParams()))

    asyncio.run(run())

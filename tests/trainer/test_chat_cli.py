"""`nanorun chat`: one-shot and multi-turn chat in the terminal, its slash commands, trimming of
long conversations, tool calls kept as tool calls, and a clear message for a missing checkpoint."""

from __future__ import annotations

import io

import pytest
import torch
from nanorun.cli.main import main as nanorun_main
from nanorun.trainer.chat.engine import Engine, SpecialTokens, inference_dtype, load_chat_model
from nanorun.trainer.chat_cli import assistant_parts, main
from nanorun.trainer.data.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


def chat(run_dir: str, *args: str, stdin: str = "") -> tuple[int, str]:
    out = io.StringIO()
    code = main(["--checkpoint", run_dir, "--device", "cpu", *args], stdin=io.StringIO(stdin), out=out)
    return code, out.getvalue()


def greedy_reply(run_dir: str, messages: list[dict], max_tokens: int) -> str:
    from nanorun.trainer.chat.conversation import render_for_completion
    from nanorun.trainer.chat.engine import TextStream

    model, tokenizer, _ = load_chat_model(run_dir, device="cpu")
    engine = Engine(model, tokenizer)
    prompt = render_for_completion(tokenizer, {"messages": messages})
    (completion,), _ = engine.generate_batch(prompt, max_tokens=max_tokens, temperature=0.0)
    stream = TextStream(tokenizer, engine.special)
    return "".join(stream.push(t) for t in completion[len(prompt) :]) + stream.flush()


def test_one_shot_prompt_prints_the_streamed_reply(tiny_chat_run):
    code, out = chat(tiny_chat_run, "-p", "Hello there", "--temperature", "0", "--max-tokens", "12")
    assert code == 0
    assert out == greedy_reply(tiny_chat_run, [{"role": "user", "content": "Hello there"}], 12) + "\n"


def test_multi_turn_chat_with_slash_commands(tiny_chat_run):
    script = "first question\n/temperature 0\n/topk 5\n/topk 900\n/help\nsecond question\n/clear\nthird\n/quit\nnever read\n"
    code, out = chat(tiny_chat_run, "--max-tokens", "6", "--temperature", "1.0", stdin=script)
    assert code == 0
    assert "(temperature = 0.0)" in out and "(top-k = 5)" in out
    assert "usage: /topk N" in out and "/clear          start a new conversation" in out
    assert "(conversation cleared)" in out


def test_second_turn_sees_the_first_and_clear_forgets_it(tiny_chat_run):
    code, out = chat(
        tiny_chat_run,
        "--max-tokens",
        "6",
        "--temperature",
        "0",
        stdin="hi\nhow are you\n/clear\nhow are you\n",
    )
    assert code == 0
    first = greedy_reply(tiny_chat_run, [{"role": "user", "content": "hi"}], 6)
    second = greedy_reply(
        tiny_chat_run,
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "how are you"},
        ],
        6,
    )
    fresh = greedy_reply(tiny_chat_run, [{"role": "user", "content": "how are you"}], 6)
    assert second != fresh  # the history changes the answer, so the check below means something
    transcript = out.split("\n", 1)[1]  # after the banner line
    assert transcript == f"{first}\n{second}\n(conversation cleared)\n{fresh}\n\n"  # last: end of input


def test_a_conversation_longer_than_the_context_is_trimmed_with_a_note(tiny_chat_run):
    long_message = "please remember this sentence about files and modules. " * 60  # ~600 tokens > context
    code, out = chat(
        tiny_chat_run,
        "--max-tokens",
        "4",
        "--temperature",
        "0",
        "--system",
        "Be brief.",
        stdin=f"{long_message}\nshort one\n",
    )
    assert code == 0
    assert "(note: the newest message is longer than the model's context" in out


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert nanorun_main(["chat", "--checkpoint", str(tmp_path / "no-such-run"), "-p", "hi"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint at" in err and "no-such-run" in err and "nanorun run" in err


def test_tool_calls_stay_tool_calls_in_the_history(tiny_chat_run):
    tokenizer = Tokenizer.from_run_dir(tiny_chat_run)
    s = SpecialTokens(tokenizer)
    tokens = (
        tokenizer.encode("It is ")
        + [s.python_start]
        + tokenizer.encode("6*7")
        + [s.python_end, s.output_start]
        + tokenizer.encode("42")
        + [s.output_end]
        + tokenizer.encode(" in all.")
        + [s.assistant_end]
    )
    assert assistant_parts(tokens, tokenizer, s) == [
        {"type": "text", "text": "It is "},
        {"type": "python", "text": "6*7"},
        {"type": "python_output", "text": "42"},
        {"type": "text", "text": " in all."},
    ]


def test_a_model_loaded_for_inference_holds_its_weights_in_the_compute_dtype(tiny_chat_run):
    # On a GPU the chat model is loaded in bf16 once, so no decoding step casts weights; the same
    # load, asked for bf16 on CPU, shows it: every weight is bf16 and Linear's cast is a no-op.
    model, tokenizer, _ = load_chat_model(tiny_chat_run, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    linear = model.blocks[0].mlp.c_fc
    assert linear.weight.to(torch.bfloat16) is linear.weight
    (completion,), _ = Engine(model, tokenizer).generate_batch([tokenizer.bos_token_id], max_tokens=4)
    assert len(completion) == 1 + 4  # it decodes in bf16 (the fixture's model never stops on its own)
    fp32, _, _ = load_chat_model(tiny_chat_run, device="cpu")
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}  # CPU computes in fp32
    assert (
        inference_dtype(torch.device("cuda")) is torch.bfloat16
        and inference_dtype(torch.device("cpu")) is None
    )

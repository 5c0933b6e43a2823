"""rl: GRPO-style updates raise the mean reward; the stage is resumable and idempotent."""

from __future__ import annotations

import types

import pytest
import torch
from nanorun.trainer.chat.engine import Engine
from nanorun.trainer.chat_rl import group_loss, rl_step
from nanorun.trainer.tasks.common import Task

from tests.fixtures.post_training import (
    RL_FLAGS,
    assert_idempotent,
    assert_resumes_exactly,
    stage_done,
    stage_history,
)
from tests.tasks.byte_tokenizer import ByteTokenizer
from tests.trainer.tiny_models import tiny_gpt, tiny_optimizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class DigitsTask(Task):
    """A small verifiable task with a dense reward: the share of the reply's characters that are digits."""

    def num_examples(self) -> int:
        return 8

    def get_example(self, index: int) -> dict:
        return {
            "messages": [
                {"role": "user", "content": f"Say some digits ({index})"},
                {"role": "assistant", "content": "123"},
            ]
        }

    def evaluate(self, conversation: dict, response: str) -> bool:
        return bool(response) and response.isdigit()

    def reward(self, conversation: dict, response: str) -> float:
        return sum(ch.isdigit() for ch in response) / len(response) if response else 0.0


def test_policy_gradient_steps_raise_the_mean_reward():
    tokenizer = ByteTokenizer()
    model = tiny_gpt(tokenizer.vocab_size, sequence_len=64)
    optimizer = tiny_optimizer(model)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    engine, task = Engine(model, tokenizer), DigitsTask()
    args = types.SimpleNamespace(
        num_samples=8, max_new_tokens=5, temperature=1.0, top_k=0, device_batch_size=8
    )
    rewards = [
        rl_step(
            model,
            optimizer,
            engine,
            tokenizer,
            task,
            [step % 8, (step + 1) % 8],
            args,
            step,
            base_lrs,
            1.0,
            "cpu",
        )["reward"]
        for step in range(10)
    ]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.15, rewards


def test_a_group_with_equal_rewards_gives_no_gradient():
    tokenizer = ByteTokenizer()
    model = tiny_gpt(tokenizer.vocab_size, sequence_len=64)
    completions = [[1, 2, 3, 4], [1, 2, 5, 6]]
    masks = [[0, 0, 1, 1], [0, 0, 1, 1]]
    assert group_loss(model, completions, masks, [1.0, 1.0], 0, "cpu", 8, 1.0) == 0.0
    assert all(p.grad is None for p in model.parameters())


def test_advantage_raises_the_likelihood_of_the_better_sample_only_on_sampled_tokens():
    tokenizer = ByteTokenizer()
    model = tiny_gpt(tokenizer.vocab_size, sequence_len=64)
    completions = [[1, 2, 3, 4], [1, 2, 5, 6]]
    masks = [[0, 0, 1, 0], [0, 0, 1, 1]]  # token 4 was forced (a tool output): not the policy's choice
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)

    def logp(row: list[int], position: int) -> float:
        with torch.no_grad():
            logits = model(torch.tensor([row[:-1]]))
        return torch.log_softmax(logits[0, position - 1], -1)[row[position]].item()

    before = logp(completions[0], 2), logp(completions[1], 2)
    group_loss(model, completions, masks, [1.0, 0.0], 0, "cpu", 8, 1.0)
    optimizer.step()
    after = logp(completions[0], 2), logp(completions[1], 2)
    assert after[0] > before[0] and after[1] < before[1]


@pytest.mark.slow
def test_chat_rl_falls_back_to_arithmetic_offline_and_reports_pass_at_k(tiny_rl_run):
    done = stage_done(tiny_rl_run, "rl")
    assert done["metrics"]["task"] == "Arithmetic" and done["metrics"]["steps"] == 2
    assert 0.0 <= done["metrics"]["pass@1"] <= done["metrics"]["pass@4"] <= 1.0
    history = stage_history(tiny_rl_run, "rl")
    assert [r["step"] for r in history if "reward" in r] == [1, 2]


@pytest.mark.slow
def test_interrupted_chat_rl_resumes_to_the_same_weights(tiny_rl_run, tmp_path):
    assert_resumes_exactly("rl", tiny_rl_run, tmp_path / "run", RL_FLAGS, resume_step=1, final_step=2)


@pytest.mark.slow
def test_finished_chat_rl_is_a_no_op(tiny_rl_run, tmp_path):
    assert_idempotent("rl", tiny_rl_run, tmp_path / "run", RL_FLAGS)

"""Arithmetic word problems that use the calculator: a no-download stand-in for GSM8K, for RL.

    "Maya has 12 marbles. She buys 3 bags with 4 marbles each. How many marbles does Maya have now?"
    -> "... <|python_start|>12 + 3 * 4<|python_end|><|output_start|>24<|output_end|> ... #### 24"

Problems are generated deterministically from (split, index); `difficulty` 1 has one operation,
2 has two. The reply format is GSM8K's (tool call, then `#### answer`), so a model trained here
is prompted and rewarded exactly like on GSM8K.
"""

from __future__ import annotations

import random
from typing import Any

from nanorun.trainer.tasks.common import Conversation, Task
from nanorun.trainer.tasks.gsm8k import extract_answer

SPLIT_SEEDS = {"train": 0, "test": 10_000_000}
NAMES = ("Maya", "Liam", "Ana", "Kofi", "Sofia", "Ravi", "Mei", "Jonas", "Amara", "Diego")
THINGS = ("marbles", "apples", "stickers", "books", "coins", "shells", "pencils", "cards")


def _one_step(rng: random.Random, name: str, thing: str) -> tuple[str, str, int]:
    a, b = rng.randint(2, 50), rng.randint(2, 30)
    kind = rng.choice(("add", "sub", "mul"))
    if kind == "add":
        return (
            f"{name} has {a} {thing} and finds {b} more. How many {thing} does {name} have now?",
            f"{a} + {b}",
            a + b,
        )
    if kind == "sub":
        a = a + b
        return f"{name} has {a} {thing} and gives away {b}. How many {thing} are left?", f"{a} - {b}", a - b
    a = rng.randint(2, 12)
    return (
        f"{name} has {a} boxes with {b} {thing} in each. How many {thing} is that in total?",
        f"{a} * {b}",
        a * b,
    )


def _two_step(rng: random.Random, name: str, thing: str) -> tuple[str, str, int]:
    a, bags, each = rng.randint(2, 40), rng.randint(2, 9), rng.randint(2, 12)
    question = (
        f"{name} has {a} {thing}. {name} buys {bags} bags with {each} {thing} each. "
        f"How many {thing} does {name} have now?"
    )
    return question, f"{a} + {bags} * {each}", a + bags * each


class Arithmetic(Task):
    def __init__(self, split: str = "train", size: int = 1000, difficulty: int = 2, **slice_: Any):
        super().__init__(**slice_)
        if split not in SPLIT_SEEDS:
            raise ValueError(f"Arithmetic split must be train or test, got {split!r}")
        if difficulty not in (1, 2):
            raise ValueError(f"Arithmetic difficulty must be 1 or 2, got {difficulty}")
        self.seed, self.size, self.difficulty = SPLIT_SEEDS[split], size, difficulty

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> Conversation:
        rng = random.Random(self.seed + index)
        name, thing = rng.choice(NAMES), rng.choice(THINGS)
        two = self.difficulty == 2 and rng.random() < 0.5
        question, expression, result = (_two_step if two else _one_step)(rng, name, thing)
        return {
            "messages": [
                {"role": "user", "content": question},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "Let me compute it: "},
                        {"type": "python", "text": expression},
                        {"type": "python_output", "text": str(result)},
                        {"type": "text", "text": f"\n\n#### {result}"},
                    ],
                },
            ],
            "answer": str(result),
        }

    def evaluate(self, conversation: Conversation, response: str) -> bool:
        return extract_answer(response) == conversation["answer"]

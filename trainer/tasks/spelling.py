"""Spelling tasks that need no download: they teach the model to look inside its tokens.

- `SpellingBee`: "How many 'r' are in 'strawberry'?" The reply spells the word letter by letter,
  counts, checks the count with the python tool (`'strawberry'.count('r')`) and ends with
  `#### 3`. `evaluate` checks the final number.
- `SimpleSpelling`: "Spell the word: apple" -> "a,p,p,l,e".

Examples are generated from the shipped word list (`data/words.txt`, written for nanorun),
deterministically from (split, index), so every rank and every restart sees the same data.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from nanorun.trainer.tasks.common import Conversation, Task
from nanorun.trainer.tasks.gsm8k import extract_answer

WORDS_PATH = Path(__file__).parent / "data" / "words.txt"
SPLIT_SEEDS = {"train": 0, "test": 10_000_000}
QUESTIONS = (
    "How many {letter} are in the word {word}?",
    "How many times does the letter '{letter}' appear in '{word}'?",
    "Count the letter {letter} in {word}.",
    "how many {letter}s are there in {word}",
    'In the word "{word}", how many times does {letter} occur?',
)


def load_words() -> list[str]:
    return [w.strip() for w in WORDS_PATH.read_text().splitlines() if w.strip()]


class _GeneratedTask(Task):
    def __init__(self, split: str = "train", size: int = 1000, **slice_: Any):
        super().__init__(**slice_)
        if split not in SPLIT_SEEDS:
            raise ValueError(f"{type(self).__name__} split must be train or test, got {split!r}")
        self.seed, self.size, self.words = SPLIT_SEEDS[split], size, load_words()

    def num_examples(self) -> int:
        return self.size

    def rng(self, index: int) -> random.Random:
        return random.Random(self.seed + index)


class SpellingBee(_GeneratedTask):
    def get_example(self, index: int) -> Conversation:
        rng = self.rng(index)
        word = rng.choice(self.words)
        # mostly letters of the word; sometimes one it lacks (the answer is then 0)
        letter = rng.choice(word) if rng.random() < 0.85 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        count = word.count(letter)
        question = rng.choice(QUESTIONS).format(letter=letter, word=word)
        running = []
        n = 0
        for ch in word:
            if ch == letter:
                n += 1
                running.append(f"{ch} ({n})")
            else:
                running.append(ch)
        reasoning = (
            f"Let me spell {word} and count the letter {letter}: {', '.join(running)}. "
            f"That makes {count}. Let me check with Python: "
        )
        return {
            "messages": [
                {"role": "user", "content": question},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": reasoning},
                        {"type": "python", "text": f"'{word}'.count('{letter}')"},
                        {"type": "python_output", "text": str(count)},
                        {
                            "type": "text",
                            "text": f"\n\nThe letter {letter} appears {count} times in {word}.\n\n#### {count}",
                        },
                    ],
                },
            ],
            "answer": str(count),
        }

    def evaluate(self, conversation: Conversation, response: str) -> bool:
        return extract_answer(response) == conversation["answer"]


class SimpleSpelling(_GeneratedTask):
    def get_example(self, index: int) -> Conversation:
        word = self.rng(index).choice(self.words)
        return {
            "messages": [
                {"role": "user", "content": f"Spell the word: {word}"},
                {"role": "assistant", "content": ",".join(word)},
            ],
            "answer": ",".join(word),
        }

    def evaluate(self, conversation: Conversation, response: str) -> bool:
        return response.strip() == conversation["answer"]

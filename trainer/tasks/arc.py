"""ARC (allenai/ai2_arc): grade-school science multiple choice, `ARC-Easy` and `ARC-Challenge`.

Answered with one letter, evaluated by the letter logits (categorical).
"""

from __future__ import annotations

from typing import Any

from nanorun.trainer.tasks.common import Conversation, MultipleChoiceTask, render_multiple_choice
from nanorun.trainer.tasks.hf import default_cache, load_rows

SUBSETS = ("ARC-Easy", "ARC-Challenge")


class ARC(MultipleChoiceTask):
    def __init__(
        self, subset: str = "ARC-Easy", split: str = "test", cache: str | None = None, **slice_: Any
    ):
        super().__init__(**slice_)
        if subset not in SUBSETS:
            raise ValueError(f"ARC subset must be one of {SUBSETS}, got {subset!r}")
        self.subset = subset
        self.rows = load_rows("allenai/ai2_arc", subset, split, cache or default_cache())

    @property
    def name(self) -> str:
        return self.subset

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> Conversation:
        row = self.rows[index]
        letters = list(row["choices"]["label"])  # "A".."E", sometimes "1".."4"
        answer = row["answerKey"]
        if answer not in letters:
            raise ValueError(f"ARC row {row.get('id')}: answerKey {answer!r} is not among {letters}")
        return {
            "messages": [
                {
                    "role": "user",
                    "content": render_multiple_choice(row["question"], letters, row["choices"]["text"]),
                },
                {"role": "assistant", "content": answer},
            ],
            "letters": letters,
            "answer": answer,
        }

"""MMLU (cais/mmlu): 57-subject multiple choice; `auxiliary_train` (100k questions) for training.

Each question is rendered as a multiple-choice prompt and answered with one letter; evaluation is
categorical (the highest logit among the offered letters).
"""

from __future__ import annotations

from typing import Any

from nanorun.trainer.tasks.common import LETTERS, Conversation, MultipleChoiceTask, render_multiple_choice
from nanorun.trainer.tasks.hf import default_cache, load_rows

SUBSETS = ("all", "auxiliary_train")


class MMLU(MultipleChoiceTask):
    def __init__(self, subset: str = "all", split: str = "test", cache: str | None = None, **slice_: Any):
        super().__init__(**slice_)
        if subset not in SUBSETS:
            raise ValueError(f"MMLU subset must be one of {SUBSETS}, got {subset!r}")
        if subset == "auxiliary_train":
            # The Hub files auxiliary_train under the "all" config; each row nests its fields in `train`.
            rows = load_rows("cais/mmlu", "all", "auxiliary_train", cache or default_cache())
            self.rows = [row["train"] if isinstance(row.get("train"), dict) else row for row in rows]
        else:
            self.rows = load_rows("cais/mmlu", subset, split, cache or default_cache())

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> Conversation:
        row = self.rows[index]
        letters = list(LETTERS[: len(row["choices"])])
        answer = letters[int(row["answer"])]
        return {
            "messages": [
                {"role": "user", "content": render_multiple_choice(row["question"], letters, row["choices"])},
                {"role": "assistant", "content": answer},
            ],
            "letters": letters,
            "answer": answer,
            "subject": row.get("subject", ""),
        }

"""GSM8K (openai/gsm8k): grade-school math word problems, answered with the calculator tool.

The dataset's `<<48/2=24>>` calculator annotations become a python tool call (`48/2`, trained) and
its output (`24`, forced by the engine at inference, not trained). The final answer follows `####`;
`evaluate` compares it with the reference, `reward` (RL) is 1.0 for a right answer, else 0.0.
"""

from __future__ import annotations

import re
from typing import Any

from nanorun.trainer.tasks.common import Conversation, Task
from nanorun.trainer.tasks.hf import default_cache, load_rows

ANSWER_RE = re.compile(r"####\s*(-?[0-9][0-9.,]*)")
CALC_RE = re.compile(r"(<<[^>]*>>)")


def extract_answer(text: str) -> str | None:
    """The number after `####`, without thousands separators or a trailing dot."""
    match = ANSWER_RE.search(text)
    return match.group(1).replace(",", "").rstrip(".") if match else None


def answer_to_parts(answer: str) -> list[dict[str, str]]:
    """A GSM8K solution as assistant parts: text, python tool calls and their outputs."""
    parts = []
    for piece in CALC_RE.split(answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            expr, _, result = piece[2:-2].rpartition("=") if "=" in piece else (piece[2:-2], "", "")
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def conversation_from_row(question: str, answer: str) -> Conversation:
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer_to_parts(answer)},
        ]
    }


class GSM8K(Task):
    def __init__(self, split: str = "test", subset: str = "main", cache: str | None = None, **slice_: Any):
        super().__init__(**slice_)
        if split not in ("train", "test"):
            raise ValueError(f"GSM8K split must be train or test, got {split!r}")
        self.rows = load_rows("openai/gsm8k", subset, split, cache or default_cache())

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> Conversation:
        row = self.rows[index]
        return conversation_from_row(row["question"], row["answer"])

    def evaluate(self, conversation: Conversation, response: str) -> bool:
        reference = conversation["messages"][-1]["content"]
        reference_text = reference if isinstance(reference, str) else reference[-1]["text"]
        expected = extract_answer(reference_text)
        return expected is not None and extract_answer(response) == expected

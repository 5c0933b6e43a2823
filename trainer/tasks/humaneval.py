"""HumanEval (openai/openai_humaneval): write a Python function; it passes if the dataset's tests do.

The reply's code (the first fenced block if there is one, else the whole reply) runs with the
prompt's imports and the task's `check(...)` in `nanorun.trainer.chat.execution`'s sandbox. Where that
sandbox cannot be had, constructing the task raises `SandboxUnavailable` (chat_eval skips the task).
"""

from __future__ import annotations

import re
from typing import Any

from nanorun.trainer.chat.execution import execute_code, sandbox
from nanorun.trainer.tasks.common import Conversation, Task
from nanorun.trainer.tasks.hf import default_cache, load_rows

FENCE_RE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)


def extract_program(reply: str) -> str:
    match = FENCE_RE.search(reply)
    return match.group(1) if match else reply


def prompt_imports(prompt: str) -> str:
    return "\n".join(line for line in prompt.splitlines() if line.startswith(("import ", "from ")))


class HumanEval(Task):
    def __init__(self, cache: str | None = None, timeout: float = 5.0, memory_mb: int = 256, **slice_: Any):
        super().__init__(**slice_)
        sandbox()  # refuse before downloading anything: the code is never run without it
        self.timeout, self.memory_mb = timeout, memory_mb
        self.rows = load_rows("openai/openai_humaneval", "openai_humaneval", "test", cache or default_cache())

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> Conversation:
        row = self.rows[index]
        return {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]},
            ],
            "entry_point": row["entry_point"],
            "test": row["test"],
        }

    def evaluate(self, conversation: Conversation, response: str) -> bool:
        prompt = conversation["messages"][0]["content"]
        program = "\n\n".join(
            [
                prompt_imports(prompt),
                extract_program(response),
                conversation["test"],
                f"check({conversation['entry_point']})",
            ]
        )
        return execute_code(program, timeout=self.timeout, memory_mb=self.memory_mb).success

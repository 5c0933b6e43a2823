"""SmolTalk (HuggingFaceTB/smol-smoltalk): general chat conversations for midtraining and SFT."""

from __future__ import annotations

from typing import Any

from nanorun.trainer.tasks.common import Conversation, Task
from nanorun.trainer.tasks.hf import default_cache, load_rows


class SmolTalk(Task):
    def __init__(self, split: str = "train", cache: str | None = None, **slice_: Any):
        super().__init__(**slice_)
        if split not in ("train", "test"):
            raise ValueError(f"SmolTalk split must be train or test, got {split!r}")
        self.rows = load_rows("HuggingFaceTB/smol-smoltalk", "default", split, cache or default_cache())

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> Conversation:
        messages = [{"role": m["role"], "content": m["content"]} for m in self.rows[index]["messages"]]
        return {"messages": messages}

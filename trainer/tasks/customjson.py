"""CustomJSON: a JSONL file of conversations, one `{"messages": [...]}` (or a bare list of
messages) per line. Ships with nanorun's identity set and a small general conversation set:

    CustomJSON(IDENTITY_PATH)       who the model is (written for nanorun)
    CustomJSON(CONVERSATIONS_PATH)  everyday questions and answers (written for nanorun)

Every line is validated when the file is loaded, so a bad line fails early with its line number.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nanorun.pipeline import storage
from nanorun.trainer.chat.conversation import ConversationError, normalize_messages
from nanorun.trainer.tasks.common import Conversation, Task

DATA_DIR = Path(__file__).parent / "data"
IDENTITY_PATH = str(DATA_DIR / "identity.jsonl")
CONVERSATIONS_PATH = str(DATA_DIR / "conversations.jsonl")


def read_conversations(path: str) -> list[Conversation]:
    """Parse and validate a conversations JSONL file (a local path or an s3:// URI)."""
    conversations = []
    for number, line in enumerate(storage.read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            conversation = {"messages": item} if isinstance(item, list) else item
            normalize_messages(conversation)
        except (json.JSONDecodeError, ConversationError) as err:
            raise ValueError(f"{path}:{number}: not a valid conversation: {err}") from err
        if (
            not isinstance(conversation["messages"][-1], dict)
            or conversation["messages"][-1].get("role") != "assistant"
        ):
            raise ValueError(f"{path}:{number}: a training conversation must end with an assistant message")
        conversations.append(conversation)
    return conversations


class CustomJSON(Task):
    def __init__(self, path: str = IDENTITY_PATH, **slice_: Any):
        super().__init__(**slice_)
        self.path = path
        self.conversations = read_conversations(path)

    @property
    def name(self) -> str:
        return f"CustomJSON({Path(self.path).name})"

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> Conversation:
        return self.conversations[index]

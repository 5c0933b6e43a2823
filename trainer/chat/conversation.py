"""Render chat conversations to token ids: the one chat format shared by training and serving.

A conversation is `{"messages": [{"role": "system" | "user" | "assistant", "content": ...}]}`.
An assistant's content is a string or a list of parts `{"type": "text" | "python" |
"python_output", "text": str}` (a tool call and the tool's answer). The rendered tokens are

    <|bos|> <|user_start|> user text <|user_end|>
            <|assistant_start|> text <|python_start|> 2+2 <|python_end|>
                                <|output_start|> 4 <|output_end|> more text <|assistant_end|> ...

- `render_conversation` returns ids plus a loss mask: 1 on what the model must learn to produce
  (assistant text, tool calls, `<|assistant_end|>`), 0 on everything else (bos, user turns, tool
  outputs, which the engine forces at inference, and the role tokens).
- A system message is folded into the first user turn (the model has no system role).
- Conversations longer than `max_tokens` are cut at the end of the last assistant turn that fits;
  only when not even the first exchange fits is the token stream truncated mid-turn.
- `render_for_completion` renders the history and opens an assistant turn: the prompt the engine
  completes. Serving and evaluation both use it, so the model is prompted exactly the way it was
  trained.

The tokenizer is anything with `encode(text) -> list[int]` and `encode_special(name) -> int`
(`nanorun.trainer.data.tokenizer.Tokenizer`).
"""

from __future__ import annotations

from typing import Any, Protocol

SPECIAL_TOKENS = (
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
)
PART_TYPES = ("text", "python", "python_output")


class ChatTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def encode_special(self, name: str) -> int: ...


class ConversationError(ValueError):
    """The conversation does not have the shape the chat format needs."""


def _text_of_user(content: Any, index: int) -> str:
    """User content is a string; OpenAI-style lists of text parts are joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise ConversationError(f"message {index}: user content must be a string or a list of text parts")


def _assistant_parts(content: Any, index: int) -> list[dict[str, str]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise ConversationError(f"message {index}: assistant content must be a string or a list of parts")
    for part in content:
        if (
            not isinstance(part, dict)
            or part.get("type") not in PART_TYPES
            or not isinstance(part.get("text"), str)
        ):
            raise ConversationError(
                f"message {index}: each assistant part must be {{'type': one of {PART_TYPES}, 'text': str}}, "
                f"got {part!r}"
            )
    return content


def normalize_messages(conversation: dict[str, Any]) -> list[dict[str, Any]]:
    """The messages with the system message folded into the first user turn, validated to alternate
    user, assistant, user, ... (a copy; the input is not changed)."""
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ConversationError("a conversation is {'messages': [...]} with at least one message")
    messages = [dict(m) if isinstance(m, dict) else m for m in messages]
    if isinstance(messages[0], dict) and messages[0].get("role") == "system":
        if len(messages) < 2 or not isinstance(messages[1], dict) or messages[1].get("role") != "user":
            raise ConversationError("a system message must be followed by a user message")
        system = _text_of_user(messages[0].get("content"), 0)
        user = _text_of_user(messages[1].get("content"), 1)
        messages = [{"role": "user", "content": f"{system}\n\n{user}" if system else user}] + messages[2:]
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if not isinstance(message, dict) or message.get("role") != expected:
            got = message.get("role") if isinstance(message, dict) else type(message).__name__
            raise ConversationError(
                f"message {i}: expected role {expected!r}, got {got!r} "
                "(messages alternate user/assistant, starting with user, after an optional system message)"
            )
    return messages


def render_conversation(
    tokenizer: ChatTokenizer, conversation: dict[str, Any], max_tokens: int = 2048
) -> tuple[list[int], list[int]]:
    """Token ids and loss mask (1 = trained) of a whole conversation, at most `max_tokens` long."""
    special = {name: tokenizer.encode_special(name) for name in SPECIAL_TOKENS}
    ids: list[int] = []
    mask: list[int] = []
    turn_ends: list[int] = []  # lengths at which an assistant turn is complete: the clean cut points

    def add(tokens: list[int] | int, trained: int) -> None:
        tokens = [tokens] if isinstance(tokens, int) else tokens
        ids.extend(tokens)
        mask.extend([trained] * len(tokens))

    add(special["<|bos|>"], 0)
    for i, message in enumerate(normalize_messages(conversation)):
        if message["role"] == "user":
            add(special["<|user_start|>"], 0)
            add(tokenizer.encode(_text_of_user(message.get("content"), i)), 0)
            add(special["<|user_end|>"], 0)
            continue
        add(special["<|assistant_start|>"], 0)
        for part in _assistant_parts(message.get("content"), i):
            tokens = tokenizer.encode(part["text"])
            if part["type"] == "text":
                add(tokens, 1)
            elif part["type"] == "python":
                add(special["<|python_start|>"], 1)
                add(tokens, 1)
                add(special["<|python_end|>"], 1)
            else:  # python_output: produced by the tool, so not trained
                add(special["<|output_start|>"], 0)
                add(tokens, 0)
                add(special["<|output_end|>"], 0)
        add(special["<|assistant_end|>"], 1)
        turn_ends.append(len(ids))

    if len(ids) > max_tokens:
        fitting = [end for end in turn_ends if end <= max_tokens]
        cut = fitting[-1] if fitting else max_tokens
        ids, mask = ids[:cut], mask[:cut]
    return ids, mask


def render_for_completion(tokenizer: ChatTokenizer, conversation: dict[str, Any]) -> list[int]:
    """The prompt for the model's next assistant turn: the history, then `<|assistant_start|>`.

    A trailing assistant message (e.g. a task's reference answer) is dropped, so the model is asked
    to produce it."""
    messages = normalize_messages(conversation)
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    ids, _ = render_conversation(tokenizer, {"messages": messages}, max_tokens=2**62)
    return ids + [tokenizer.encode_special("<|assistant_start|>")]

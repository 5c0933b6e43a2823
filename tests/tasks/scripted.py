"""Stand-ins for a model and an engine whose answers are scripted, for checking evaluation scores.

A trained model's answers cannot be known in advance; these return fixed answers per question, so
a test knows exactly what score each evaluation must compute.
"""

from __future__ import annotations

import torch


class ScriptedLogitsModel:
    """`model(ids)` -> logits where, for each row, the token of the scripted letter wins at every
    position. `answers` maps a substring of the prompt to the letter to answer."""

    def __init__(self, tokenizer, answers: dict[str, str]):
        self.tokenizer, self.answers = tokenizer, answers

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        batch, width = ids.shape
        logits = torch.zeros(batch, width, self.tokenizer.vocab_size)
        for row in range(batch):
            text = self.tokenizer.decode(ids[row].tolist())
            letter = next(answer for key, answer in self.answers.items() if key in text)
            logits[row, :, self.tokenizer.encode(letter)[0]] = 10.0
        return logits


class ScriptedEngine:
    """`generate_batch(prompt, num_samples, ...)` -> (prompt + scripted reply per sample, masks).
    `replies` maps a substring of the prompt to one reply, or to a list of replies (one per sample)."""

    def __init__(self, tokenizer, replies: dict[str, str | list[str]]):
        self.tokenizer, self.replies = tokenizer, replies

    def generate_batch(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        text = self.tokenizer.decode(tokens)
        reply = next(r for key, r in self.replies.items() if key in text)
        replies = reply if isinstance(reply, list) else [reply] * num_samples
        completions = [list(tokens) + self.tokenizer.encode(r) for r in replies[:num_samples]]
        return completions, [[0] * len(tokens) + [1] * (len(c) - len(tokens)) for c in completions]

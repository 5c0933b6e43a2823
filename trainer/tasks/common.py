"""Tasks: datasets of conversations that a model trains on and is evaluated against.

- `Task`: a sliceable list of conversations (`task[i]`, `len(task)`) plus how to score an answer:
  `eval_type` is "categorical" (the answer is one letter, scored by the logits at the answer position)
  or "generative" (sample a reply, check it with `evaluate`); `reward` (RL) defaults to `evaluate`.
- `TaskMixture`: several tasks interleaved in a fixed, seeded shuffle (training mixtures).
- `TaskSequence`: several tasks one after another (a curriculum).
- `run_categorical_eval` / `run_generative_eval`: accuracy of a model on a task, sharded over the
  ranks of a distributed run and summed across them.

Torch is imported only inside the evaluation functions, so datasets load without it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from nanorun.trainer.chat.conversation import render_for_completion
from nanorun.trainer.training import liveness

Conversation = dict[str, Any]
LETTERS = "ABCDEFGHIJ"


class Task:
    """A list of conversations, optionally a slice `[start:stop:step]` of the underlying data."""

    eval_type = "generative"

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0 or step < 1 or (stop is not None and stop < start):
            raise ValueError(f"bad task slice start={start} stop={stop} step={step}")
        self.start, self.stop, self.step = start, stop, step

    @property
    def name(self) -> str:
        return type(self).__name__

    def num_examples(self) -> int:
        raise NotImplementedError

    def get_example(self, index: int) -> Conversation:
        raise NotImplementedError

    def __len__(self) -> int:
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, -(-(stop - self.start) // self.step))

    def __getitem__(self, index: int) -> Conversation:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range ({len(self)} examples)")
        return self.get_example(self.start + index * self.step)

    def evaluate(self, conversation: Conversation, response: str) -> bool:
        raise NotImplementedError

    def reward(self, conversation: Conversation, response: str) -> float:
        return float(self.evaluate(conversation, response))


class TaskMixture(Task):
    """Tasks interleaved in a seeded shuffle. Pass a task twice to see it twice per epoch."""

    def __init__(self, tasks: Sequence[Task], seed: int = 42):
        super().__init__()
        self.tasks = list(tasks)
        self.index = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]
        random.Random(seed).shuffle(self.index)

    @property
    def name(self) -> str:
        return "+".join(task.name for task in self.tasks)

    def num_examples(self) -> int:
        return len(self.index)

    def get_example(self, index: int) -> Conversation:
        t, i = self.index[index]
        return self.tasks[t][i]


class TaskSequence(Task):
    """Tasks one after another, in order."""

    def __init__(self, tasks: Sequence[Task]):
        super().__init__()
        self.tasks = list(tasks)

    @property
    def name(self) -> str:
        return ">".join(task.name for task in self.tasks)

    def num_examples(self) -> int:
        return sum(len(task) for task in self.tasks)

    def get_example(self, index: int) -> Conversation:
        for task in self.tasks:
            if index < len(task):
                return task[index]
            index -= len(task)
        raise IndexError(index)


def render_multiple_choice(question: str, letters: Sequence[str], choices: Sequence[str]) -> str:
    """The prompt of a multiple-choice question; the model answers with one letter."""
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices, strict=True)]
    return "\n".join(lines) + "\n\nRespond only with the letter of the correct answer."


class MultipleChoiceTask(Task):
    """Base for ARC/MMLU-style tasks whose answer is a letter. Their conversations carry
    `letters` (the offered letters) and `answer` (the right one) next to `messages`."""

    eval_type = "categorical"

    def evaluate(self, conversation: Conversation, response: str) -> bool:
        return response.strip() == conversation["answer"]


def run_categorical_eval(
    task: Task,
    model: Callable[..., Any],
    tokenizer: Any,
    *,
    batch_size: int = 8,
    max_problems: int | None = None,
    device: Any = "cpu",
) -> dict[str, float]:
    """Accuracy of picking the answer letter with the highest logit (among the offered letters) at the
    first position of the assistant's reply. `model(ids)` returns logits (B, T, vocab)."""
    import torch
    from nanorun.trainer.training.distributed import rank_and_world, sum_across_ranks

    rank, world = rank_and_world()
    n = len(task) if max_problems is None else min(len(task), max_problems)
    pad = tokenizer.encode_special("<|assistant_end|>")
    correct = total = 0
    mine = list(range(rank, n, world))
    for b in range(0, len(mine), batch_size):
        liveness.progressed()  # an evaluation batch, for this rank's heartbeat
        conversations = [task[i] for i in mine[b : b + batch_size]]
        # a prompt longer than the model's context keeps its end (the choices and the answer slot)
        limit = getattr(getattr(model, "config", None), "sequence_len", None)
        prompts = [render_for_completion(tokenizer, c) for c in conversations]
        prompts = [p[-limit:] if limit else p for p in prompts]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([p + [pad] * (width - len(p)) for p in prompts], dtype=torch.long, device=device)
        with torch.no_grad():
            logits = model(ids)
        for row, (conversation, prompt) in enumerate(zip(conversations, prompts, strict=True)):
            letters = conversation["letters"]
            letter_ids = []
            for letter in letters:
                tokens = tokenizer.encode(letter)
                if len(tokens) != 1:
                    raise ValueError(f"letter {letter!r} is not a single token in this tokenizer")
                letter_ids.append(tokens[0])
            scores = logits[row, len(prompt) - 1, letter_ids]
            predicted = letters[int(scores.argmax())]
            correct += int(task.evaluate(conversation, predicted))
            total += 1
    correct, total = sum_across_ranks([correct, total], device)
    return {"accuracy": correct / total if total else 0.0, "correct": correct, "total": total}


def run_generative_eval(
    task: Task,
    engine: Any,
    tokenizer: Any,
    *,
    num_samples: int = 1,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int = 50,
    max_problems: int | None = None,
    seed: int = 42,
    device: Any = "cpu",
    samples_out: list[dict[str, Any]] | None = None,
) -> dict[str, float]:
    """pass@num_samples: a problem counts as solved if any of its samples passes `task.evaluate`.
    `engine.generate_batch(prompt, num_samples=, max_tokens=, temperature=, top_k=, seed=)` returns
    (token lists including the prompt, masks). If `samples_out` is given, the first reply of each
    problem is appended to it (for the report)."""
    from nanorun.trainer.chat.engine import ContextOverflowError
    from nanorun.trainer.training.distributed import rank_and_world, sum_across_ranks

    rank, world = rank_and_world()
    n = len(task) if max_problems is None else min(len(task), max_problems)
    correct = total = too_long = 0
    for i in range(rank, n, world):
        liveness.progressed()
        conversation = task[i]
        prompt = render_for_completion(tokenizer, conversation)
        try:
            completions, _ = engine.generate_batch(
                prompt,
                num_samples=num_samples,
                max_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                seed=seed + i,
            )
        except ContextOverflowError:  # the question alone fills the model's context: counted as failed
            completions = [prompt]
            too_long += 1
        replies = [tokenizer.decode(c[len(prompt) :]) for c in completions]
        passed = any(task.evaluate(conversation, r) for r in replies)
        correct += int(passed)
        total += 1
        if samples_out is not None:
            samples_out.append(
                {"task": task.name, "prompt": conversation["messages"], "reply": replies[0], "passed": passed}
            )
    correct, total, too_long = sum_across_ranks([correct, total, too_long], device)
    return {
        "accuracy": correct / total if total else 0.0,
        "correct": correct,
        "total": total,
        "too_long": too_long,
    }

"""Inference: KV-cached, batched sampling with the calculator tool, for chat, evaluation and RL.

    engine = Engine(model, tokenizer)
    for column, masks in engine.generate(prompt, num_samples=4, max_tokens=64, temperature=0.8):
        ...                                        # one token per row and step; mask 0 = forced
    completions, masks = engine.generate_batch(prompt, num_samples=4, temperature=0)

- The KV cache is preallocated for every row (`KVCache`, per-row lengths). The prompt is prefilled
  once into row 0 and copied into the other rows; then every step decodes one token per row.
- Sampling is batched: temperature (0 = greedy argmax), top-k, top-p, and a seeded generator, so a
  seed gives the same samples every time.
- A row stops on `<|assistant_end|>` or `<|bos|>`; every row stops at `max_tokens` or when the
  context (the model's `sequence_len`) is full. Stop tokens are not part of `generate_batch`'s output.
- Tool use (`RowState`): the tokens between `<|python_start|>` and `<|python_end|>` go to the
  calculator (`nanorun.trainer.chat.calculator`), and its result is forced into the row as
  `<|output_start|> result <|output_end|>` (mask 0); generation then continues.
- `fit_conversation` turns a chat into a prompt that fits the context: it drops the oldest turns,
  keeps the system message, shortens the last message only when it alone is too long, and returns a
  notice saying what it dropped (nanochat's chat CLI crashed instead).
- `TextStream` turns a row's tokens into display text as they arrive (never splitting a UTF-8
  character; the tool call shows as `<<expression=result>>`).

The continuous-batching server (`nanorun.serving.batching`) reuses `sample_tokens`, `RowState` and
`TextStream`; its rows join and leave the batch independently.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from nanorun.pipeline import layout
from nanorun.pipeline.stages import MODEL_KEYS
from nanorun.trainer.chat.calculator import calculate
from nanorun.trainer.chat.conversation import normalize_messages, render_for_completion

DISPLAY_OF_SPECIAL = {  # how tool-call tokens read in a chat transcript: <<12*3=36>>
    "<|python_start|>": "<<",
    "<|python_end|>": "=",
    "<|output_start|>": "",
    "<|output_end|>": ">>",
}


MIN_TEMPERATURE = 1e-6  # smaller temperatures sample as this one: all but certainly the argmax


class ContextOverflowError(ValueError):
    """The prompt leaves no room to generate within the model's context."""


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def context_length(model: torch.nn.Module) -> int:
    """How many tokens (prompt + generated) the model attends over."""
    return int(model.config.sequence_len)


def new_kv_cache(model: torch.nn.Module, batch_size: int, max_seq_len: int) -> Any:
    """A preallocated KV cache for `batch_size` rows of up to `max_seq_len` tokens each, in the
    dtype the model computes in (bf16 on GPUs, fp32 on CPU)."""
    from nanorun.trainer.model.gpt import KVCache

    param = next(model.parameters())
    dtype = getattr(model, "compute_dtype", param.dtype)
    return KVCache.for_model(model.config, batch_size, max_seq_len, param.device, dtype)


@torch.inference_mode()
def sample_tokens(
    logits: torch.Tensor,
    generator: torch.Generator | None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """One token id per row of `logits` (B, V): greedy at temperature 0, else top-k/top-p sampling."""
    if temperature <= 0.0:
        return torch.argmax(logits, dim=-1)
    # Shift each row's largest logit to 0 and keep the temperature representable in fp32: a tiny
    # temperature (5e-324 is a valid request) then sends the others to -inf, where a plain
    # division would overflow to inf (or divide by an fp32 zero), whose softmax is nan.
    logits = logits.float()
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / max(temperature, MIN_TEMPERATURE)
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already cover top_p (the first one always stays)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p
        drop[..., 0] = False  # even when top_p (5e-324) rounds to 0 in fp32
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


class SpecialTokens:
    """The ids of the chat format's special tokens for one tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.bos = tokenizer.encode_special("<|bos|>")
        self.assistant_end = tokenizer.encode_special("<|assistant_end|>")
        self.python_start = tokenizer.encode_special("<|python_start|>")
        self.python_end = tokenizer.encode_special("<|python_end|>")
        self.output_start = tokenizer.encode_special("<|output_start|>")
        self.output_end = tokenizer.encode_special("<|output_end|>")
        self.stop = {self.assistant_end, self.bos}
        self.display = {tokenizer.encode_special(name): text for name, text in DISPLAY_OF_SPECIAL.items()}


@dataclass
class RowState:
    """One row's generation state: tool-call collection, forced tokens, stop."""

    special: SpecialTokens
    tokenizer: Any
    forced: deque[int] = field(default_factory=deque)
    in_python: bool = False
    python_tokens: list[int] = field(default_factory=list)
    completed: bool = False

    def choose(self, sampled: int) -> tuple[int, int]:
        """The row's next token and its mask: a forced tool-output token (0) or the sample (1)."""
        if self.forced:
            return self.forced.popleft(), 0
        return sampled, 1

    def observe(self, token: int) -> None:
        """Advance the state past `token`; a finished tool call queues the calculator's output."""
        s = self.special
        if token in s.stop:
            self.completed = True
        elif token == s.python_start:
            self.in_python, self.python_tokens = True, []
        elif token == s.python_end and self.in_python:
            self.in_python = False
            result = calculate(self.tokenizer.decode(self.python_tokens))
            result_tokens = self.tokenizer.encode(result) if result else []  # refused: empty output
            self.forced.extend([s.output_start, *result_tokens, s.output_end])
        elif self.in_python:
            self.python_tokens.append(token)


class TextStream:
    """Incremental display text of generated tokens: `push(token)` returns the new text (maybe "")."""

    def __init__(self, tokenizer: Any, special: SpecialTokens) -> None:
        self.tokenizer = tokenizer
        self.special = special
        self.pending: list[int] = []

    def push(self, token: int) -> str:
        if token in self.special.stop:
            return self.flush()
        if token in self.special.display:
            return self.flush() + self.special.display[token]
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the next token
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        return text


class Engine:
    """Batched, KV-cached generation from one prompt (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.special = SpecialTokens(tokenizer)

    @torch.inference_mode()
    def generate(
        self,
        tokens: list[int],
        num_samples: int = 1,
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 42,
    ) -> Iterator[tuple[list[int], list[int]]]:
        """Yield, per step, the next token of every row and its mask (1 sampled, 0 forced)."""
        if not tokens:
            raise ValueError("generate needs at least one prompt token (start with <|bos|>)")
        limit = context_length(self.model)
        if len(tokens) >= limit:
            raise ContextOverflowError(
                f"the prompt has {len(tokens)} tokens but the model's context is {limit}; shorten it "
                "(fit_conversation trims a chat to fit)"
            )
        max_tokens = min(max_tokens, limit - len(tokens))
        device = model_device(self.model)
        generator = torch.Generator(device=device).manual_seed(seed)
        cache = new_kv_cache(self.model, num_samples, len(tokens) + max_tokens)

        # Prefill once (row 0), then copy the prompt's keys/values into the other rows.
        prompt = torch.tensor([tokens], dtype=torch.long, device=device)
        logits = self.model(prompt, kv_cache=cache.row(0))[:, -1, :]
        n = len(tokens)
        for i in range(1, num_samples):
            cache.k[:, i, :n] = cache.k[:, 0, :n]
            cache.v[:, i, :n] = cache.v[:, 0, :n]
        cache.cache_seqlens.fill_(n)
        logits = logits.expand(num_samples, -1)

        rows = [RowState(self.special, self.tokenizer) for _ in range(num_samples)]
        for step in range(max_tokens):
            sampled = sample_tokens(logits, generator, temperature, top_k, top_p).tolist()
            column, masks = [], []
            for row, token in zip(rows, sampled, strict=True):
                token, mask = row.choose(token)
                row.observe(token)
                column.append(token)
                masks.append(mask)
            yield column, masks
            if all(row.completed for row in rows) or step == max_tokens - 1:
                break
            ids = torch.tensor(column, dtype=torch.long, device=device).unsqueeze(1)
            logits = self.model(ids, kv_cache=cache)[:, -1, :]

    def generate_batch(
        self, tokens: list[int], num_samples: int = 1, **kwargs: Any
    ) -> tuple[list[list[int]], list[list[int]]]:
        """Whole completions (prompt included, stop token excluded) and their masks, per row."""
        completions = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for column, column_masks in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(column, column_masks, strict=True)):
                if done[i]:
                    continue
                if token in self.special.stop:
                    done[i] = True
                    continue
                completions[i].append(token)
                masks[i].append(mask)
            if all(done):
                break
        return completions, masks


def fit_conversation(
    tokenizer: Any, conversation: dict[str, Any], max_prompt_tokens: int
) -> tuple[list[int], str | None]:
    """The completion prompt for `conversation`, at most `max_prompt_tokens` long, and a notice.

    When the whole conversation does not fit, the oldest user/assistant exchanges are dropped (the
    system message stays); if the newest message alone is still too long, its beginning is cut. The
    notice says what was dropped (None when nothing was)."""
    tokens = render_for_completion(tokenizer, conversation)
    if len(tokens) <= max_prompt_tokens:
        return tokens, None
    messages = list(conversation["messages"])
    system = [messages[0]] if messages and messages[0].get("role") == "system" else []
    turns = messages[len(system) :]
    normalize_messages({"messages": system + turns})  # a malformed conversation fails here, clearly

    def render(kept: list[dict[str, Any]]) -> list[int]:
        return render_for_completion(tokenizer, {"messages": system + kept})

    # Binary search the fewest whole exchanges (user + assistant) to drop from the front.
    pairs = (len(turns) - 1) // 2
    lo, hi = 1, pairs
    while lo < hi:
        mid = (lo + hi) // 2
        if len(render(turns[2 * mid :])) <= max_prompt_tokens:
            hi = mid
        else:
            lo = mid + 1
    dropped = lo if pairs else 0
    kept = turns[2 * dropped :]
    tokens = render(kept)
    notice = (
        (
            f"the conversation is longer than the model's context ({max_prompt_tokens} prompt tokens): "
            f"dropped the {2 * dropped} oldest message(s)"
        )
        if dropped
        else None
    )
    if len(tokens) <= max_prompt_tokens:
        return tokens, notice

    # Only the newest message is left (plus the system message) and it is still too long: keep its end.
    last = dict(kept[-1])
    text = str(last.get("content", ""))
    lo, hi = 0, len(text)  # number of characters to keep
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(render(kept[:-1] + [{**last, "content": text[-mid:] if mid else ""}])) <= max_prompt_tokens:
            lo = mid
        else:
            hi = mid - 1
    tokens = render(kept[:-1] + [{**last, "content": text[-lo:] if lo else ""}])
    if len(tokens) > max_prompt_tokens:  # even an empty message does not fit: the system message is too long
        raise ContextOverflowError(
            f"the system message alone needs more than the {max_prompt_tokens} prompt tokens the model "
            "has room for; shorten it"
        )
    cut = f"kept only the last {lo} of {len(text)} characters of the newest message"
    return tokens, f"{notice}; {cut}" if notice else (
        f"the newest message is longer than the model's context ({max_prompt_tokens} prompt tokens): {cut}"
    )


def resolve_checkpoint(uri: str) -> str:
    """A committed checkpoint for `uri`: a checkpoint directory itself, the newest one of a stage
    directory, or the newest one of the latest-trained stage of a run directory."""
    from nanorun.trainer.training.checkpoint import CheckpointError, is_committed, latest_checkpoint

    uri = uri.rstrip("/")
    if is_committed(uri):
        return uri
    candidates = [uri] + [layout.stage_dir(uri, key) for key in reversed(MODEL_KEYS)]
    for candidate in candidates:
        found = latest_checkpoint(candidate)
        if found:
            return found
    raise CheckpointError(
        f"no checkpoint at {uri}: give a checkpoint directory (<run-dir>/<stage>/checkpoints/step_NNNNNN "
        f"with a COMMITTED marker), a stage directory, or a run directory in which one of "
        f"{', '.join(MODEL_KEYS)} has saved a checkpoint (train one with `nanorun run FILE`)"
    )


def tokenizer_dir_for(checkpoint_uri: str) -> str:
    """The tokenizer folder of the run a checkpoint (`<run-dir>/<stage>/checkpoints/step_NNNNNN`) belongs to."""
    return layout.tokenizer_dir(layout.run_dir_of_checkpoint(checkpoint_uri))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def inference_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype a model for inference is loaded in: bf16 on GPUs (the compute dtype, so the
    weights are cast once at load, not in every decoding step), None (fp32 as saved) on CPU."""
    return torch.bfloat16 if device.type == "cuda" else None


def load_chat_model(
    checkpoint: str,
    tokenizer_dir: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """(model in eval mode, tokenizer, info) for a checkpoint/stage/run URI (local path or s3://).

    The tokenizer comes from `tokenizer_dir`, or from the run the checkpoint belongs to. The weights
    are in `dtype`, by default the device's `inference_dtype`."""
    from nanorun.trainer.data.tokenizer import Tokenizer
    from nanorun.trainer.training.checkpoint import load_model

    checkpoint_uri = resolve_checkpoint(checkpoint)
    tokenizer_dir = tokenizer_dir or tokenizer_dir_for(checkpoint_uri)
    tokenizer = Tokenizer.load(tokenizer_dir)
    device = torch.device(device) if device is not None else default_device()
    model, meta = load_model(checkpoint_uri, device, dtype=dtype or inference_dtype(device))
    info = {
        "checkpoint": checkpoint_uri,
        "tokenizer": tokenizer_dir,
        "step": meta.get("step"),
        "config_id": meta.get("config_id", ""),
        "context": context_length(model),
    }
    return model, tokenizer, info

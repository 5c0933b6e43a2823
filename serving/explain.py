"""What the explainer pages show, computed from the served run's own tokenizer, model and files.

Each function takes the loaded tokenizer (`nanorun.trainer.data.tokenizer.Tokenizer`) and/or model
and returns plain JSON-able dicts; the app (`nanorun.serving.app`) validates the requests with the
models below and runs these functions on a small thread pool, beside the batching thread.

- `tokenize`: the tokens of a text, each with its id, bytes and the characters it stands for.
- `bpe_replay`: byte-level BPE re-run with only the first `merges` merges of the run's tokenizer.
- `next_token`: the model's top-k next-token distribution after temperature.
- `attention`: one layer/head's attention probabilities for a short prompt.
- `run_summary`: what is served, and the per-stage loss / val-bpb history of its run directory
  (public: it names no storage location).

Token spans: a token boundary may fall inside a multi-byte UTF-8 character, so a token's `text` is
the characters whose *last* byte lies in that token. The texts of all tokens then concatenate back
to the input exactly, and a token made of a character's leading bytes has text "".
"""

from __future__ import annotations

import heapq
import json
import math
import os
import threading
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MAX_TEXT_CHARS = 4000  # tokenizer pages: a few paragraphs
MAX_PROMPT_CHARS = 4000  # next-token prompt
MAX_ATTENTION_TOKENS = 64  # attention maps are T x T per head: keep them readable and cheap
MAX_TOP_K = 200
MAX_LISTED_MERGES = 500
MAX_HISTORY_POINTS = 2000  # per stage; longer histories are thinned evenly (the last point kept)
MAX_SAMPLE_STEPS = 50  # greedy samples of at most this many evaluations per stage (thinned like points)
MAX_SAMPLE_CHARS = 400  # per sample text
OTHER_ENCODINGS = ("gpt2", "cl100k_base")


class ExplainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TokenizeRequest(ExplainRequest):
    text: str = Field(max_length=MAX_TEXT_CHARS, description="text to tokenize")


class BpeReplayRequest(ExplainRequest):
    text: str = Field(max_length=MAX_TEXT_CHARS, description="text to tokenize")
    merges: int = Field(ge=0, description="apply only the first `merges` merges (ranks < 256 + merges)")
    list_merges: int = Field(
        default=50, ge=0, le=MAX_LISTED_MERGES, description="how many of the first merges to list"
    )


class NextTokenRequest(ExplainRequest):
    prompt: str = Field(max_length=MAX_PROMPT_CHARS, description="text before the next token")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0: all mass on the argmax")
    top_k: int = Field(default=20, ge=1, le=MAX_TOP_K, description="how many tokens to return")


class AttentionRequest(ExplainRequest):
    prompt: str = Field(
        max_length=MAX_PROMPT_CHARS, description=f"short text (at most {MAX_ATTENTION_TOKENS} tokens)"
    )
    layer: int = Field(default=0, ge=0, le=1023)
    head: int = Field(default=0, ge=0, le=1023)


class ExplainInputError(ValueError):
    """A request that is well-formed but does not fit this model; `param` names the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


# ---- tokens -------------------------------------------------------------------------------------


def token_texts(pieces: list[bytes]) -> list[str]:
    """The characters each token stands for (see the module docstring): they concatenate to the
    decoded text, even when a token ends in the middle of a UTF-8 character."""
    texts, pending = [], b""
    for piece in pieces:
        data = pending + piece
        cut = _complete_prefix(data)
        texts.append(data[:cut].decode("utf-8", errors="replace"))
        pending = data[cut:]
    if pending and texts:
        texts[-1] += pending.decode("utf-8", errors="replace")
    return texts


def _complete_prefix(data: bytes) -> int:
    """Length of the longest prefix of `data` that does not end inside a UTF-8 character."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:  # ASCII: complete
            return len(data)
        if byte >= 0xC0:  # a lead byte: complete only if all its continuation bytes follow
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) if back >= need else len(data) - back
    return len(data)  # stray continuation bytes: not UTF-8 anyway, keep them where they are


def readable(piece: bytes) -> str:
    """A token's bytes as text; bytes that are not (complete) UTF-8 show as \\xNN."""
    return piece.decode("utf-8", errors="backslashreplace")


def describe_tokens(tokenizer: Any, ids: list[int], pieces: list[bytes]) -> list[dict[str, Any]]:
    texts = token_texts(pieces)
    return [
        {"id": i, "text": text, "bytes": list(piece), "piece": readable(piece)}
        for i, text, piece in zip(ids, texts, pieces, strict=True)
    ]


def tokenize(tokenizer: Any, text: str) -> dict[str, Any]:
    """The run's tokens of `text` (no special tokens), and the counts under other encodings."""
    ids = tokenizer.encode(text)
    pieces = [tokenizer.decode_bytes([i]) for i in ids]
    return {
        "text": text,
        "tokens": describe_tokens(tokenizer, ids, pieces),
        "count": len(ids),
        "chars": len(text),
        "bytes": len(text.encode("utf-8")),
        "chars_per_token": round(len(text) / len(ids), 3) if ids else None,
        "vocab_size": tokenizer.vocab_size,
        "compare": {name: other_encoding_count(name, text) for name in OTHER_ENCODINGS},
    }


_encodings: dict[str, Any] = {}
_encodings_lock = threading.Lock()


def _offline_read_file(blobpath: str) -> bytes:
    raise OSError(f"not in tiktoken's cache, and nanorun does not download it ({blobpath})")


def load_offline_encoding(name: str) -> Any:
    """tiktoken's `name` encoding from tiktoken's local cache only, or the exception saying why not.

    tiktoken downloads its encodings on first use; a serving replica must never block a request
    on the network, so the download is replaced by an error (once per process; the result is kept).
    Fill the cache ahead with `python -c "import tiktoken; tiktoken.get_encoding('gpt2')"` where
    there is network, and point TIKTOKEN_CACHE_DIR at it."""
    with _encodings_lock:
        if name not in _encodings:
            from unittest import mock

            import tiktoken
            import tiktoken.load

            try:
                with mock.patch.object(tiktoken.load, "read_file", _offline_read_file):
                    _encodings[name] = tiktoken.get_encoding(name)
            except Exception as err:  # noqa: BLE001 - any failure means "not available", with its reason
                _encodings[name] = err
        return _encodings[name]


def other_encoding_count(name: str, text: str) -> dict[str, Any]:
    encoding = load_offline_encoding(name)
    if isinstance(encoding, Exception):
        return {"available": False, "reason": f"{type(encoding).__name__}: {encoding}"}
    count = len(encoding.encode_ordinary(text))
    return {
        "available": True,
        "count": count,
        "chars_per_token": round(len(text) / count, 3) if count else None,
    }


# ---- BPE replay ---------------------------------------------------------------------------------


def bpe_merge(piece: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    """Byte-level BPE of one pre-tokenized chunk using only ranks below `max_rank`.

    The rule of tiktoken's reference implementation (openai/tiktoken, `_educational.py`,
    `bpe_encode`): start from single bytes and repeatedly merge the adjacent pair whose joined bytes
    have the lowest rank (the leftmost such pair on a tie), until no pair has a rank below
    `max_rank`. With every rank allowed this gives exactly tiktoken's (and so the run's) encoding.
    A heap of candidate pairs over a linked list of parts keeps it O(n log n): a chunk of 4000
    spaces, rescanned after every merge, would take seconds."""
    parts = [bytes([b]) for b in piece]
    n = len(parts)
    following = list(range(1, n)) + [-1]  # the next live part after part i, or -1
    preceding = list(range(-1, n - 1))
    heap: list[tuple[int, int]] = []

    def push(i: int) -> None:
        j = following[i] if i >= 0 else -1
        if j >= 0:
            rank = ranks.get(parts[i] + parts[j])
            if rank is not None and rank < max_rank:
                heapq.heappush(heap, (rank, i))

    for i in range(n - 1):
        push(i)
    alive = [True] * n
    while heap:
        rank, i = heapq.heappop(heap)
        j = following[i]
        if not alive[i] or j < 0 or ranks.get(parts[i] + parts[j]) != rank:
            continue  # stale: one of the two parts has merged since this pair was queued
        parts[i] += parts[j]
        alive[j] = False
        following[i] = following[j]
        if following[j] >= 0:
            preceding[following[j]] = i
        push(preceding[i])
        push(i)
    return [p for p, live in zip(parts, alive, strict=True) if live]


def merge_pair(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two tokens a merged token was built from: BPE of its bytes with the ranks below its own
    stops at exactly two parts (the way HuggingFace's tiktoken converter recovers merges)."""
    parts = bpe_merge(token, ranks, ranks[token])
    if len(parts) != 2:  # a duplicate built by another merge order: show its first split
        return token[:1], token[1:]
    return parts[0], parts[1]


def total_merges(tokenizer: Any) -> int:
    return len(tokenizer.mergeable_ranks) - 256


def first_merges(tokenizer: Any, n: int, start: int = 0) -> list[dict[str, Any]]:
    """Merges `start` to `start + n` (0 is the first learned) in the order they were learned, as
    readable strings."""
    ranks = tokenizer.mergeable_ranks
    by_rank = sorted((rank, token) for token, rank in ranks.items() if len(token) > 1)[start : start + n]
    merges = []
    for rank, token in by_rank:
        left, right = merge_pair(token, ranks)
        merges.append(
            {
                "rank": rank,
                "id": rank,
                "left": readable(left),
                "right": readable(right),
                "text": readable(token),
            }
        )
    return merges


def bpe_replay(tokenizer: Any, text: str, merges: int, list_merges: int = 50) -> dict[str, Any]:
    """The tokens of `text` when only the first `merges` merges (ranks < 256 + merges) may apply."""
    import regex

    available = total_merges(tokenizer)
    merges = min(merges, available)
    ranks = tokenizer.mergeable_ranks
    pieces: list[bytes] = []
    for chunk in regex.findall(tokenizer.pattern, text):
        pieces += bpe_merge(chunk.encode("utf-8"), ranks, 256 + merges)
    ids = [ranks[p] for p in pieces]
    return {
        "text": text,
        "merges": merges,
        "total_merges": available,
        "tokens": describe_tokens(tokenizer, ids, pieces),
        "count": len(ids),
        "bytes": len(text.encode("utf-8")),
        "first_merges": first_merges(tokenizer, min(list_merges, merges)),
        # the pair the slider's last step merged: what changed from `merges - 1` to `merges`
        "last_merge": (first_merges(tokenizer, 1, start=merges - 1) or [None])[0] if merges else None,
    }


# ---- the model ----------------------------------------------------------------------------------


def token_label(tokenizer: Any, token: int) -> str:
    """A token id as text: special tokens by name, others as their (readable) bytes."""
    specials = {v: k for k, v in tokenizer.special_tokens.items()}
    return specials.get(token) or readable(tokenizer.decode_bytes([token]))


def prompt_ids(tokenizer: Any, prompt: str, limit: int, param: str = "prompt") -> list[int]:
    """<|bos|> + the prompt's tokens: a document's start, as in pretraining."""
    ids = tokenizer.encode(prompt, prepend="<|bos|>")
    if len(ids) > limit:
        raise ExplainInputError(
            param, f"{param}: {len(ids)} tokens (with <|bos|>) is more than the {limit} allowed here"
        )
    return ids


def next_token(model: Any, tokenizer: Any, prompt: str, temperature: float, top_k: int) -> dict[str, Any]:
    """The top-k of the model's next-token distribution softmax(logits / temperature).

    Probabilities are over the whole vocabulary, so the k returned sum to at most 1 (the rest is
    the mass of all other tokens). Temperature 0 puts all the mass on the argmax (greedy)."""
    import torch
    from nanorun.trainer.chat.engine import MIN_TEMPERATURE, context_length, model_device

    ids = prompt_ids(tokenizer, prompt, context_length(model))
    with torch.inference_mode():
        idx = torch.tensor([ids], dtype=torch.long, device=model_device(model))
        logits = model(idx)[0, -1].float()
    if temperature <= 0:
        probs = torch.zeros_like(logits)
        probs[int(torch.argmax(logits))] = 1.0
    else:  # as the sampler does it: shifted, and a tiny temperature never overflows into nan
        probs = torch.softmax((logits - logits.max()) / max(temperature, MIN_TEMPERATURE), dim=-1)
    values, indices = torch.topk(probs, min(top_k, probs.numel()))
    specials = set(tokenizer.special_tokens.values())
    top = [
        {
            "id": int(i),
            "text": token_label(tokenizer, int(i)),
            "prob": float(p),
            "special": int(i) in specials,
        }
        for p, i in zip(values.tolist(), indices.tolist(), strict=True)
    ]
    nonzero = probs[probs > 0]
    entropy = float(-(nonzero * nonzero.log2()).sum())
    return {
        "prompt": prompt,
        "prompt_tokens": len(ids),
        "temperature": temperature,
        "top_k": top_k,
        "tokens": top,
        "top_mass": sum(t["prob"] for t in top),
        "entropy_bits": round(entropy, 4),
    }


def attention(model: Any, tokenizer: Any, prompt: str, layer: int, head: int) -> dict[str, Any]:
    """Layer `layer`, head `head`'s attention probabilities over <|bos|> + the prompt's tokens."""
    import torch
    from nanorun.trainer.chat.engine import model_device

    config = model.config
    if layer >= config.n_layer:
        raise ExplainInputError("layer", f"layer: must be below {config.n_layer} (the model's layers)")
    if head >= config.n_head:
        raise ExplainInputError("head", f"head: must be below {config.n_head} (the model's heads)")
    ids = prompt_ids(tokenizer, prompt, MAX_ATTENTION_TOKENS)
    idx = torch.tensor([ids], dtype=torch.long, device=model_device(model))
    with torch.inference_mode():
        weights = model.attention_map(idx, layer)[0, head]
    window = model.windows[layer]
    return {
        "prompt": prompt,
        "layer": layer,
        "head": head,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "window": None if window < 0 else window,
        "tokens": [token_label(tokenizer, i) for i in ids],
        "ids": ids,
        "weights": [[round(float(w), 6) for w in row] for row in weights.tolist()],
    }


# ---- the run ------------------------------------------------------------------------------------


def thin(records: list[dict[str, Any]], limit: int = MAX_HISTORY_POINTS) -> list[dict[str, Any]]:
    """At most `limit` records, evenly spaced, always keeping the last one."""
    if len(records) <= limit:
        return records
    stride = math.ceil(len(records) / limit)
    kept = records[::stride]
    return kept if kept[-1] is records[-1] else [*kept, records[-1]]


def stage_history(run_dir: str, key: str) -> dict[str, Any] | None:
    """One stage's curves (loss and val_bpb by step) and state, or None when it has no files."""
    from nanorun.pipeline import layout, storage
    from nanorun.pipeline.progress import read_done, read_progress

    progress = read_progress(run_dir, key)
    done = read_done(run_dir, key)
    uri = storage.join(layout.stage_dir(run_dir, key), layout.HISTORY_FILE)
    text = storage.read_text(uri) if storage.exists(uri) else ""
    if progress is None and done is None and not text:
        return None
    loss, val_bpb, samples = [], [], []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line being written
        if not isinstance(record, dict) or "step" not in record:
            continue
        if isinstance(record.get("loss"), (int, float)):
            loss.append({"step": record["step"], "value": record["loss"]})
        if isinstance(record.get("val_bpb"), (int, float)):
            val_bpb.append({"step": record["step"], "value": record["val_bpb"]})
        if isinstance(record.get("samples"), list):
            samples.append({"step": record["step"], "samples": _samples(record["samples"])})
    return {
        "key": key,
        "state": "done" if done is not None else "running" if progress is not None else "unknown",
        "step": progress.step if progress else None,
        "total_steps": progress.total_steps if progress else None,
        "loss": thin(loss),
        "val_bpb": thin(val_bpb),
        "samples": thin(samples, MAX_SAMPLE_STEPS),
    }


def _samples(raw: list[Any]) -> list[dict[str, str]]:
    """The {prompt, text} pairs of one history record (pretraining's greedy samples), bounded."""
    out = []
    for s in raw:
        if isinstance(s, dict) and isinstance(s.get("prompt"), str) and isinstance(s.get("text"), str):
            out.append({"prompt": s["prompt"][:MAX_SAMPLE_CHARS], "text": s["text"][:MAX_SAMPLE_CHARS]})
    return out


def timeline(run_dir: str) -> list[dict[str, Any]]:
    """Every stage of the run that has run, in pipeline order, with when it started and ended (Unix
    seconds): a finished stage from its done.json (finished_at - seconds), a running one from its
    progress.json (updated_at - elapsed_seconds, up to its last update)."""
    from nanorun.pipeline.progress import read_done, read_progress
    from nanorun.pipeline.stages import STAGES

    out = []
    for s in STAGES:
        done, progress = read_done(run_dir, s.key), read_progress(run_dir, s.key)
        if done is not None:
            start, end, state = done.finished_at - done.seconds, done.finished_at, "done"
        elif progress is not None:
            start, end, state = progress.updated_at - progress.elapsed_seconds, progress.updated_at, "running"
        else:
            continue
        out.append(
            {
                "key": s.key,
                "state": state,
                "start": start,
                "end": end,
                "seconds": round(end - start, 3),
            }
        )
    return out


def stage_of(checkpoint: str) -> str | None:
    """The stage key of a checkpoint inside a run directory (`<run>/<stage>/checkpoints/step_N`),
    else None."""
    from nanorun.pipeline import layout
    from nanorun.pipeline.stages import by_key

    try:
        layout.run_dir_of_checkpoint(checkpoint)
        return by_key(checkpoint.rstrip("/").rsplit("/", 3)[1]).key
    except ValueError:
        return None


def run_summary(model: Any, tokenizer: Any, info: dict[str, Any]) -> dict[str, Any]:
    """What is served (stage, step, model config, vocabulary) and the run's history. Public: it
    names no storage location (no checkpoint, run or tokenizer path)."""
    from nanorun.pipeline import layout
    from nanorun.pipeline.stages import MODEL_STAGES

    checkpoint = info.get("checkpoint", "")
    try:
        run_dir: str | None = layout.run_dir_of_checkpoint(checkpoint)
    except ValueError:
        run_dir = None
    stages = []
    if run_dir is not None:
        for s in MODEL_STAGES:  # the stages that train, and so have curves
            history = stage_history(run_dir, s.key)
            if history is not None:
                stages.append(history)
    return {
        "stage": stage_of(checkpoint),
        "step": info.get("step"),
        "vocab_size": tokenizer.vocab_size,
        "merges": total_merges(tokenizer),
        "context": info.get("context"),
        "model": model.config.to_dict(),
        "windows": list(model.windows),
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": str(next(model.parameters()).device),
        "pid": os.getpid(),
        "stages": stages,
        "timeline": timeline(run_dir) if run_dir is not None else [],
        "running": any(s["state"] == "running" for s in stages),
    }

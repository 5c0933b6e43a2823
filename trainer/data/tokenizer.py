"""The nanorun tokenizer: byte-level BPE trained by the Rust trainer (`nanorun._bpe`), served by tiktoken.

    tok = Tokenizer.train_from_iterator(texts, vocab_size=32768)   # merges learned in Rust
    tok.save("s3://bucket/run/tokenizer")                          # or a local directory
    tok = Tokenizer.from_run_dir("s3://bucket/run")                # what every later stage does
    ids = tok.encode("Hello", prepend="<|bos|>")

- Token ids: 0..255 are the raw bytes, then one id per learned merge (in merge order), then the nine
  chat special tokens, so `vocab_size` counts all three.
- Plain text never encodes to a special token: `encode` uses tiktoken's `encode_ordinary`, so a
  document containing the string "<|bos|>" gets ordinary byte tokens for it.
- On disk (the stage contract): `tokenizer.tiktoken` is tiktoken's rank file (one `base64(bytes) rank`
  line per token; plain `tiktoken.load.load_tiktoken_bpe` reads it) and `tokenizer.json` holds the
  split pattern and the special tokens.
- `token_bytes()` is the UTF-8 byte length of every id (0 for specials): the denominator of
  bits-per-byte, which makes losses comparable across vocabularies.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from typing import Any

import tiktoken
from nanorun.pipeline import layout, storage
from nanorun.pipeline.errors import StageError

SPECIAL_TOKENS = [
    "<|bos|>",  # every document starts with it
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the calculator tool
    "<|python_end|>",
    "<|output_start|>",  # the tool's output, forced into the stream
    "<|output_end|>",
]

# GPT-4's split pattern with numbers in groups of at most two digits (\p{N}{1,2} instead of {1,3}):
# contractions, letter runs with one optional leading non-letter, 1-2 digit numbers, punctuation runs,
# newlines, and whitespace.
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

TIKTOKEN_FILE = layout.TOKENIZER_FILE  # "tokenizer.tiktoken"
CONFIG_FILE = "tokenizer.json"
FORMAT_VERSION = 1


class TokenizerError(StageError, ValueError):
    """A tokenizer could not be trained, loaded or used as asked; the message says what to do."""


def merges_to_token_bytes(merges: list[tuple[int, int]]) -> list[bytes]:
    """The byte string of every non-special token id: 256 single bytes, then one per merge."""
    table = [bytes([i]) for i in range(256)]
    for left, right in merges:
        table.append(table[left] + table[right])
    return table


def ranks_from_token_bytes(table: list[bytes]) -> dict[bytes, int]:
    """tiktoken's mergeable ranks. BPE can, rarely, build the same bytes twice by different merges
    ((ab)c and a(bc)); tiktoken's encoder only ever emits the first, so only the first is kept."""
    ranks: dict[bytes, int] = {}
    for rank, token in enumerate(table):
        ranks.setdefault(token, rank)
    return ranks


def dump_rank_file(ranks: dict[bytes, int]) -> str:
    return "".join(
        f"{base64.b64encode(tok).decode()} {rank}\n"
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])
    )


def parse_rank_file(text: str, where: str) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as err:
            raise TokenizerError(
                f"{where}:{lineno}: not a tiktoken rank line ({line[:60]!r}): {err}"
            ) from err
    return ranks


class Tokenizer:
    """A trained BPE tokenizer with the chat special tokens, wrapping a `tiktoken.Encoding`."""

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        pattern: str = SPLIT_PATTERN,
        special_tokens: dict[str, int] | None = None,
        name: str = "nanorun",
    ) -> None:
        if special_tokens is None:
            base = max(mergeable_ranks.values()) + 1
            special_tokens = {tok: base + i for i, tok in enumerate(SPECIAL_TOKENS)}
        missing = [t for t in SPECIAL_TOKENS if t not in special_tokens]
        if missing:
            raise TokenizerError(f"tokenizer lacks the special tokens {missing}")
        self.pattern = pattern
        self.mergeable_ranks = mergeable_ranks
        self.special_tokens: dict[str, int] = dict(special_tokens)
        self.train_stats: dict[str, Any] = {}
        self._enc = tiktoken.Encoding(
            name, pat_str=pattern, mergeable_ranks=mergeable_ranks, special_tokens=self.special_tokens
        )

    # ---- training, saving, loading -------------------------------------------------------------

    @classmethod
    def train_from_iterator(
        cls, texts: Iterable[str], vocab_size: int, pattern: str = SPLIT_PATTERN, num_threads: int = 0
    ) -> Tokenizer:
        """Learns `vocab_size - 256 - 9` merges from `texts` (read once, streamed into Rust)."""
        from nanorun import _bpe

        minimum = 256 + len(SPECIAL_TOKENS)
        if vocab_size < minimum:
            raise TokenizerError(
                f"vocab_size must be at least {minimum} (256 bytes + {len(SPECIAL_TOKENS)} "
                f"special tokens), got {vocab_size}"
            )
        out = _bpe.train(texts, vocab_size - len(SPECIAL_TOKENS), pattern, num_threads=num_threads)
        table = merges_to_token_bytes([tuple(m) for m in out["merges"]])
        tok = cls(ranks_from_token_bytes(table), pattern)
        tok.train_stats = {
            "chars_seen": out["chars_seen"],
            "unique_chunks": out["unique_chunks"],
            "merges": len(out["merges"]),
        }
        return tok

    def save(self, dir_uri: str) -> None:
        """Writes `tokenizer.tiktoken` and `tokenizer.json` into `dir_uri` (local path or s3://)."""
        storage.write_text(storage.join(dir_uri, TIKTOKEN_FILE), dump_rank_file(self.mergeable_ranks))
        storage.write_json(
            storage.join(dir_uri, CONFIG_FILE),
            {
                "format": FORMAT_VERSION,
                "pattern": self.pattern,
                "special_tokens": self.special_tokens,
                "vocab_size": self.vocab_size,
            },
        )

    @classmethod
    def load(cls, dir_uri: str) -> Tokenizer:
        """Reads a tokenizer written by `save` (local path or s3://)."""
        rank_uri, config_uri = storage.join(dir_uri, TIKTOKEN_FILE), storage.join(dir_uri, CONFIG_FILE)
        try:
            rank_text = storage.read_text(rank_uri)
            config = storage.read_json(config_uri)
        except FileNotFoundError as err:
            raise TokenizerError(
                f"no tokenizer in {dir_uri}: {err} is missing (it needs {TIKTOKEN_FILE} "
                f"and {CONFIG_FILE}, as written by the tokenizer stage)"
            ) from err
        except ValueError as err:
            raise TokenizerError(f"{config_uri} is not valid JSON: {err}") from err
        if not isinstance(config, dict) or "pattern" not in config or "special_tokens" not in config:
            raise TokenizerError(f"{config_uri} lacks 'pattern' or 'special_tokens'")
        ranks = parse_rank_file(rank_text, rank_uri)
        if not ranks:
            raise TokenizerError(f"{rank_uri} is empty")
        return cls(ranks, config["pattern"], {k: int(v) for k, v in config["special_tokens"].items()})

    @classmethod
    def from_run_dir(cls, run_dir: str) -> Tokenizer:
        """The tokenizer of a run: `<run_dir>/tokenizer/` (written by the tokenizer stage)."""
        dir_uri = layout.tokenizer_dir(run_dir)
        if not storage.exists(storage.join(dir_uri, TIKTOKEN_FILE)):
            raise TokenizerError(
                f"no tokenizer in {dir_uri}: run the tokenizer stage first "
                f"(python -m nanorun.trainer.tok_train --run-dir {run_dir})"
            )
        return cls.load(dir_uri)

    # ---- properties ----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    @property
    def bos_token_id(self) -> int:
        return self.special_tokens["<|bos|>"]

    @property
    def encoding(self) -> tiktoken.Encoding:
        return self._enc

    def encode_special(self, name: str) -> int:
        try:
            return self.special_tokens[name]
        except KeyError:
            raise TokenizerError(f"unknown special token {name!r}; known: {SPECIAL_TOKENS}") from None

    def token_bytes(self) -> list[int]:
        """UTF-8 byte length of every token id; 0 for special tokens (they stand for no text)."""
        lengths = [0] * self.vocab_size
        for token, rank in self.mergeable_ranks.items():
            lengths[rank] = len(token)
        return lengths

    # ---- encoding and decoding -----------------------------------------------------------------

    def _id(self, token: int | str) -> int:
        return self.encode_special(token) if isinstance(token, str) else int(token)

    def encode(
        self, text: str, prepend: int | str | None = None, append: int | str | None = None
    ) -> list[int]:
        ids = self._enc.encode_ordinary(text)
        if prepend is not None:
            ids.insert(0, self._id(prepend))
        if append is not None:
            ids.append(self._id(append))
        return ids

    def encode_batch(
        self, texts: list[str], prepend: int | str | None = None, num_threads: int = 8
    ) -> list[list[int]]:
        batch = self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)
        if prepend is not None:
            first = self._id(prepend)
            batch = [[first, *ids] for ids in batch]
        return batch

    def encode_bytes(self, data: bytes) -> list[int]:
        """Encodes raw bytes (not necessarily UTF-8): byte-level BPE covers every byte string."""
        return self._enc._encode_bytes(data)

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(ids)

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self._enc.decode_bytes(ids)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, specials={len(self.special_tokens)})"

"""A real tiktoken encoding with no merges: every byte is one token, plus nanorun's special tokens.

One character = one token makes expected ids and masks easy to write by hand in tests; everything
else about it (tiktoken, special-token handling) is what the trained tokenizer uses too.
"""

from __future__ import annotations

import tiktoken
from nanorun.trainer.chat.conversation import SPECIAL_TOKENS


class ByteTokenizer:
    def __init__(self) -> None:
        self.encoding = tiktoken.Encoding(
            name="bytes",
            pat_str=r"[\s\S]",
            mergeable_ranks={bytes([b]): b for b in range(256)},
            special_tokens={name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)},
        )

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_special(self, name: str) -> int:
        return self.encoding.encode_single_token(name)

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)

    def get_bos_token_id(self) -> int:
        return self.encode_special("<|bos|>")

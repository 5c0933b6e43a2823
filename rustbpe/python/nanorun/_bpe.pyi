"""Type stubs for the Rust BPE trainer (`rustbpe/src/lib.rs`)."""

from collections.abc import Iterable
from typing import TypedDict

MAX_VOCAB: int

class TrainResult(TypedDict):
    merges: list[tuple[int, int]]
    chars_seen: int
    unique_chunks: int

def train(
    texts: Iterable[str], vocab_size: int, pattern: str, batch_size: int = 8192, num_threads: int = 0
) -> TrainResult: ...
def split(pattern: str, text: str) -> list[str]: ...

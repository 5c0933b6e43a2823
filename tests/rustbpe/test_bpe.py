"""The Rust BPE trainer (`nanorun._bpe`) against a small pure-Python reference BPE, plus its error paths.

The reference below is the textbook algorithm with no incremental updates: split with the same
regex, count every adjacent pair (weighted by chunk count), merge the most frequent pair (ties: the
smallest (left, right) ids), repeat. The Rust trainer must produce exactly the same merges.
"""

from __future__ import annotations

from collections import Counter

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st
from nanorun import _bpe
from nanorun.trainer.data.tokenizer import SPLIT_PATTERN

from tests.fixtures.tiny_run import real_english_documents


def reference_merges(
    texts: list[str], vocab_size: int, pattern: str = SPLIT_PATTERN
) -> list[tuple[int, int]]:
    chunks = Counter(chunk for text in texts for chunk in regex.findall(pattern, text))
    words = [(list(chunk.encode("utf-8")), n) for chunk, n in chunks.items()]
    merges = []
    for new_id in range(256, vocab_size):
        stats: Counter = Counter()
        for ids, n in words:
            for pair in zip(ids, ids[1:], strict=False):
                stats[pair] += n
        if not stats:
            break
        best = max(stats, key=lambda p: (stats[p], -p[0], -p[1]))
        merges.append(best)
        merged_words = []
        for ids, n in words:
            out, i = [], 0
            while i < len(ids):
                if i + 1 < len(ids) and (ids[i], ids[i + 1]) == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            merged_words.append((out, n))
        words = merged_words
    return merges


def rust_merges(texts, vocab_size, pattern=SPLIT_PATTERN, **kw) -> list[tuple[int, int]]:
    return [tuple(m) for m in _bpe.train(iter(texts), vocab_size, pattern, **kw)["merges"]]


# Small alphabets make long repeated runs ("aaaa", "abab"), where overlapping-pair bookkeeping breaks.
small_text = st.text(alphabet="aab ba\n.1'x", max_size=60)


@settings(max_examples=60, deadline=None)
@given(st.lists(small_text, min_size=1, max_size=8), st.integers(257, 300))
def test_merges_match_reference_on_random_text(texts, vocab_size):
    assert rust_merges(texts, vocab_size) == reference_merges(texts, vocab_size)


@settings(max_examples=15, deadline=None)
@given(st.data())
def test_merges_match_reference_on_real_text(data):
    docs = real_english_documents()
    start = data.draw(st.integers(0, len(docs) - 6))
    sample = docs[start : start + 5]
    assert rust_merges(sample, 256 + 60) == reference_merges(sample, 256 + 60)


def test_merges_match_reference_on_unicode_text():
    texts = ["naïve café — 東京 2024年, ça va? Ünïcödé ünïcödé 🙂🙂 déjà vu déjà", "ΑΒΓ αβγ αβγ 12345 67"]
    assert rust_merges(texts, 256 + 40) == reference_merges(texts, 256 + 40)


def test_split_matches_python_regex_on_real_text():
    for doc in real_english_documents()[:200]:
        assert _bpe.split(SPLIT_PATTERN, doc) == regex.findall(SPLIT_PATTERN, doc)


def test_numbers_split_into_groups_of_at_most_two_digits():
    assert _bpe.split(SPLIT_PATTERN, "in 12345 ways") == ["in", " ", "12", "34", "5", " ways"]


def test_same_merges_with_one_and_two_threads():
    docs = real_english_documents()
    one = rust_merges(docs, 1500, num_threads=1, batch_size=64)
    two = rust_merges(docs, 1500, num_threads=2, batch_size=64)
    assert one == two and len(one) == 1500 - 256


def test_reports_characters_and_unique_chunks():
    out = _bpe.train(iter(["ab ab", "cd"]), 300, SPLIT_PATTERN)
    assert out["chars_seen"] == 7 and out["unique_chunks"] == 3  # "ab", " ab", "cd"


def test_stops_early_when_the_corpus_has_no_pairs_left():
    assert rust_merges(["abc"], 1000) == [(97, 98), (256, 99)]


def test_reads_the_iterator_lazily_in_batches():
    pulled = []

    def gen():
        for i in range(10):
            pulled.append(i)
            yield "hello world"

    _bpe.train(gen(), 260, SPLIT_PATTERN, batch_size=3)
    assert pulled == list(range(10))


@pytest.mark.parametrize("pattern", ["(", "[a-", "a{2,1}"])
def test_bad_regex_is_a_value_error(pattern):
    with pytest.raises(ValueError, match="invalid split pattern"):
        _bpe.train(iter(["x"]), 300, pattern)
    with pytest.raises(ValueError, match="invalid split pattern"):
        _bpe.split(pattern, "x")


@pytest.mark.parametrize("vocab_size", [0, 255])
def test_vocab_smaller_than_the_byte_alphabet_is_rejected(vocab_size):
    with pytest.raises(ValueError, match="at least 256"):
        _bpe.train(iter(["x"]), vocab_size, SPLIT_PATTERN)


def test_vocab_above_two_to_the_seventeen_is_rejected():
    assert _bpe.MAX_VOCAB == 2**17
    rust_merges(["ab"], 2**17)  # the limit itself is fine
    with pytest.raises(ValueError, match="at most 131072"):
        _bpe.train(iter(["x"]), 2**17 + 1, SPLIT_PATTERN)


def test_negative_vocab_is_rejected_without_crashing():
    with pytest.raises(OverflowError):
        _bpe.train(iter(["x"]), -1, SPLIT_PATTERN)


def test_an_exception_raised_by_the_iterator_propagates_unchanged():
    class CorpusGone(Exception):
        pass

    def gen():
        yield "some text"
        raise CorpusGone("the shard vanished")

    with pytest.raises(CorpusGone, match="the shard vanished"):
        _bpe.train(gen(), 300, SPLIT_PATTERN, batch_size=1)


def test_non_string_items_are_a_type_error_naming_the_item():
    with pytest.raises(TypeError, match="item 1 is bytes"):
        _bpe.train(iter(["ok", b"raw bytes"]), 300, SPLIT_PATTERN)


def test_a_non_iterable_is_a_type_error():
    with pytest.raises(TypeError, match="iterable of str"):
        _bpe.train(42, 300, SPLIT_PATTERN)


def test_zero_batch_size_is_rejected():
    with pytest.raises(ValueError, match="batch_size"):
        _bpe.train(iter(["x"]), 300, SPLIT_PATTERN, batch_size=0)

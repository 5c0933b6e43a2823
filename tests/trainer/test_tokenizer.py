"""The tokenizer wrapper: encode/decode, special tokens, token bytes, save/load (local, S3, plain tiktoken)."""

from __future__ import annotations

import functools

import pytest
import tiktoken
import tiktoken.load
from hypothesis import given, settings
from hypothesis import strategies as st
from nanorun.pipeline import storage
from nanorun.trainer.data.tokenizer import SPECIAL_TOKENS, Tokenizer, TokenizerError

from tests.fixtures.tiny_run import real_english_documents


@functools.lru_cache(maxsize=1)
def tokenizer() -> Tokenizer:
    return Tokenizer.train_from_iterator(iter(real_english_documents()), vocab_size=600)


def test_vocab_counts_bytes_merges_and_special_tokens():
    tok = tokenizer()
    assert tok.vocab_size == 600
    assert list(tok.special_tokens) == SPECIAL_TOKENS
    assert sorted(tok.special_tokens.values()) == list(range(591, 600))
    assert tok.bos_token_id == tok.encode_special("<|bos|>") == 591


def test_learned_merges_compress_english():
    tok = tokenizer()
    text = "\n".join(real_english_documents()[:50])
    assert len(text) / len(tok.encode(text)) > 2.0  # bytes alone would give ~1.0


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_encode_decode_round_trips_any_unicode(text):
    tok = tokenizer()
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(st.binary())
def test_encode_decode_round_trips_any_bytes(data):
    tok = tokenizer()
    assert tok.decode_bytes(tok.encode_bytes(data)) == data


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=20), st.sampled_from(SPECIAL_TOKENS)), max_size=8))
def test_plain_text_never_yields_a_special_token(parts):
    tok = tokenizer()
    text = "".join(parts)
    ids = tok.encode(text)
    assert not set(ids) & set(tok.special_tokens.values())
    assert tok.decode(ids) == text


def test_prepend_and_append_take_names_or_ids():
    tok = tokenizer()
    body = tok.encode("hello")
    assert tok.encode("hello", prepend="<|bos|>", append="<|assistant_end|>") == [
        tok.bos_token_id,
        *body,
        tok.encode_special("<|assistant_end|>"),
    ]
    assert tok.encode("hello", prepend=tok.bos_token_id) == [tok.bos_token_id, *body]


def test_encode_batch_matches_encode_and_prepends_bos():
    tok = tokenizer()
    texts = real_english_documents()[:20]
    assert tok.encode_batch(texts, prepend="<|bos|>", num_threads=2) == [
        tok.encode(t, prepend="<|bos|>") for t in texts
    ]


def test_unknown_special_token_is_a_clear_error():
    with pytest.raises(TokenizerError, match="unknown special token '<|nope|>'"):
        tokenizer().encode_special("<|nope|>")


def test_token_bytes_are_byte_lengths_and_zero_for_specials():
    tok = tokenizer()
    lengths = tok.token_bytes()
    assert len(lengths) == tok.vocab_size
    for i in range(tok.vocab_size):
        expected = 0 if i in tok.special_tokens.values() else len(tok.decode_bytes([i]))
        assert lengths[i] == expected
    assert lengths[:256] == [1] * 256


def test_vocab_too_small_for_the_special_tokens_is_rejected():
    with pytest.raises(TokenizerError, match="at least 265"):
        Tokenizer.train_from_iterator(iter(["abc"]), vocab_size=264)


def assert_same_tokenizer(a: Tokenizer, b: Tokenizer) -> None:
    assert a.vocab_size == b.vocab_size and a.special_tokens == b.special_tokens and a.pattern == b.pattern
    for text in real_english_documents()[:30]:
        assert a.encode(text) == b.encode(text)


def test_save_and_load_round_trip_locally(tmp_path):
    tokenizer().save(str(tmp_path))
    assert_same_tokenizer(Tokenizer.load(str(tmp_path)), tokenizer())


def test_save_and_load_round_trip_on_s3(s3_run_dir):
    tokenizer().save(f"{s3_run_dir}/tokenizer")
    assert storage.exists(f"{s3_run_dir}/tokenizer/tokenizer.tiktoken")
    assert_same_tokenizer(Tokenizer.from_run_dir(s3_run_dir), tokenizer())


def test_plain_tiktoken_loads_the_rank_file(tmp_path):
    tok = tokenizer()
    tok.save(str(tmp_path))
    ranks = tiktoken.load.load_tiktoken_bpe(str(tmp_path / "tokenizer.tiktoken"))
    enc = tiktoken.Encoding(
        "plain", pat_str=tok.pattern, mergeable_ranks=ranks, special_tokens=tok.special_tokens
    )
    text = real_english_documents()[3]
    assert enc.encode_ordinary(text) == tok.encode(text)
    assert enc.encode("<|bos|>", allowed_special="all") == [tok.bos_token_id]


def test_missing_run_tokenizer_says_to_run_tok_train(tmp_path):
    with pytest.raises(TokenizerError, match="run the tokenizer stage first"):
        Tokenizer.from_run_dir(str(tmp_path))


def test_load_of_a_half_written_directory_names_the_missing_file(tmp_path):
    tokenizer().save(str(tmp_path))
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.load(str(tmp_path))


def test_corrupt_rank_file_is_a_clear_error(tmp_path):
    tokenizer().save(str(tmp_path))
    (tmp_path / "tokenizer.tiktoken").write_text("not-base64!! x\n")
    with pytest.raises(TokenizerError, match="tokenizer.tiktoken:1: not a tiktoken rank line"):
        Tokenizer.load(str(tmp_path))

"""spec.tokenizer.from: the tokenizer stage copies another run's tokenizer instead of training one,
so every point of a sweep encodes text with the same vocabulary."""

from __future__ import annotations

import pytest
from nanorun.pipeline.progress import read_done
from nanorun.trainer import tok_train
from nanorun.trainer.data.corpus import prepare
from nanorun.trainer.data.tokenizer import Tokenizer, TokenizerError

from tests.fixtures.tiny_run import real_english_documents


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> str:
    src = tmp_path_factory.mktemp("text")
    for i, doc in enumerate(real_english_documents()):
        (src / f"doc_{i:04d}.txt").write_text(doc)
    shards = str(tmp_path_factory.mktemp("shards"))
    prepare(shards, [str(src)], shard_chars=120_000)
    run_dir = str(tmp_path_factory.mktemp("source"))
    argv = ["--run-dir", run_dir, "--data", shards, "--vocab-size", "600", "--max-chars", "200000"]
    assert tok_train.main(argv) == 0
    return run_dir


def test_a_run_with_tokenizer_from_encodes_like_the_source_run(trained_run, tmp_path):
    point = str(tmp_path / "point")
    assert tok_train.main(["--run-dir", point, "--from", trained_run]) == 0
    text = "The capital of France is Paris, and 12 + 30 = 42."
    source, copy = Tokenizer.from_run_dir(trained_run), Tokenizer.from_run_dir(point)
    assert copy.vocab_size == source.vocab_size == 600
    assert copy.encode(text) == source.encode(text)
    done = read_done(point, tok_train.STAGE)
    assert done.outputs["copied_from"] == trained_run and done.metrics["vocab_size"] == 600


def test_a_missing_source_fails_naming_it(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer in"):
        tok_train.main(["--run-dir", str(tmp_path / "point"), "--from", str(tmp_path / "nothing")])

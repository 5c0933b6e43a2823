"""`nanorun explain tokenizer`: the run's tokens of a text, coloured, with their ids."""

from __future__ import annotations

from nanorun.cli.main import main as nanorun_main
from nanorun.trainer.data.tokenizer import Tokenizer

from tests.fixtures.chat_model import save_chat_checkpoint, tiny_chat_model
from tests.fixtures.tiny_run import small_tokenizer

TEXT = "Hello tokenizer, naïve 12345"


def test_prints_the_tokens_with_their_ids_from_a_run_directory(tmp_path, capsys):
    small_tokenizer().save(str(tmp_path / "run" / "tokenizer"))
    assert nanorun_main(["explain", "tokenizer", TEXT, "--checkpoint", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out.splitlines()
    tok = Tokenizer.load(str(tmp_path / "run" / "tokenizer"))
    ids = tok.encode(TEXT)
    assert out[0] == TEXT  # the spans, uncoloured when not a terminal, read as the text
    assert [int(label.split(":")[0]) for label in out[1].split()] == ids
    assert out[2].startswith(f"{len(ids)} tokens")


def test_a_checkpoint_finds_its_runs_tokenizer_and_merges_replays_bpe(tmp_path, capsys):
    tok = small_tokenizer()
    tok.save(str(tmp_path / "run" / "tokenizer"))
    checkpoint = save_chat_checkpoint(str(tmp_path / "run"), tiny_chat_model(tok.vocab_size))
    assert nanorun_main(["explain", "tokenizer", TEXT, "--checkpoint", checkpoint, "--merges", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2].startswith(f"{len(TEXT.encode())} tokens after 0 of")


def test_a_missing_run_is_a_clear_error(tmp_path, capsys):
    assert nanorun_main(["explain", "tokenizer", "x", "--checkpoint", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err

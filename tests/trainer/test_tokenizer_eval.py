"""tok_eval: compression on held-out text, with GPT-2/GPT-4 comparisons when tiktoken can load them
(offline, as on this machine, they are reported as unavailable; tiktoken's download is the real one)."""

from __future__ import annotations

from nanorun.pipeline import storage
from nanorun.pipeline.errors import run_main
from nanorun.trainer import tok_eval
from nanorun.trainer.data.corpus import prepare
from nanorun.trainer.data.tokenizer import Tokenizer

from tests.fixtures.tiny_run import real_english_documents


def test_tok_eval_reports_compression_on_the_validation_shard(tmp_path, capsys):
    src = tmp_path / "text"
    src.mkdir()
    for i, doc in enumerate(real_english_documents()):
        (src / f"{i:04d}.txt").write_text(doc)
    prepare(str(tmp_path / "data"), [str(src)], shard_chars=150_000)
    run_dir = str(tmp_path / "run")
    Tokenizer.train_from_iterator(iter(real_english_documents()), 500).save(f"{run_dir}/tokenizer")

    assert tok_eval.main(["--run-dir", run_dir, "--data", str(tmp_path / "data")]) == 0
    report = storage.read_json(f"{run_dir}/tokenizer/tok_eval.json")
    ours = report["results"]["nanorun"]
    assert ours["vocab_size"] == 500 and 2.0 < ours["chars_per_token"] < 5.0
    assert ours["bytes_per_token"] >= ours["chars_per_token"]
    for label in ("gpt2", "gpt4"):
        r = report["results"][label]
        assert "unavailable" in r or r["chars_per_token"] > ours["chars_per_token"]
    assert "nanorun" in capsys.readouterr().out


def test_tok_eval_without_a_tokenizer_says_to_run_tok_train(tmp_path, capsys):
    assert run_main(lambda: tok_eval.main(["--run-dir", str(tmp_path), "--data", str(tmp_path)])) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "run the tokenizer stage first" in err

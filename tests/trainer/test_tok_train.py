"""The tokenizer stage: writes the stage-contract files, is a no-op when done, works on local and S3
run dirs (the S3 run goes through `python -m`, like the operator's job)."""

from __future__ import annotations

import os
import urllib.request

import pytest
from nanorun.pipeline import storage
from nanorun.pipeline.progress import read_done, read_progress
from nanorun.trainer import tok_train
from nanorun.trainer.data.corpus import prepare
from nanorun.trainer.data.tokenizer import Tokenizer

from tests.fixtures.s3 import free_port
from tests.fixtures.tiny_run import check, real_english_documents, run_stage


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    src = tmp_path_factory.mktemp("text")
    for i, doc in enumerate(real_english_documents()):
        (src / f"doc_{i:04d}.txt").write_text(doc)
    out = str(tmp_path_factory.mktemp("shards"))
    prepare(out, [str(src)], shard_chars=120_000)
    return out


def test_stage_writes_tokenizer_progress_and_done(data_dir, tmp_path):
    run_dir = str(tmp_path / "run")
    port = free_port()
    assert (
        tok_train.main(
            [
                "--run-dir",
                run_dir,
                "--data",
                data_dir,
                "--vocab-size",
                "700",
                "--max-chars",
                "300000",
                "--doc-cap",
                "2000",
                "--metrics-port",
                str(port),
            ]
        )
        == 0
    )
    done = read_done(run_dir, "tokenizer")
    m = done.metrics
    assert 300_000 <= m["chars_seen"] < 302_000 and m["vocab_size"] == 700
    assert m["compression_ratio"] > 2.0 and m["val_tokens"] > 0 and done.seconds > 0
    assert read_progress(run_dir, "tokenizer").message == "done"
    tok = Tokenizer.from_run_dir(run_dir)
    assert tok.vocab_size == 700 and done.outputs["tokenizer"] == os.path.join(run_dir, "tokenizer")
    scrape = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    # Characters read are the stage's steps: at the end, all of them of all of them.
    for gauge in ("llm_train_step", "llm_train_total_steps"):
        assert f'{gauge}{{rank="0",run="local",stage="tokenizer"}} {float(m["chars_seen"])}' in scrape


def test_second_run_is_a_no_op(data_dir, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    args = ["--run-dir", run_dir, "--data", data_dir, "--vocab-size", "300", "--max-chars", "50000"]
    assert tok_train.main(args) == 0
    files = {f: os.path.getmtime(f) for f in storage.list_files(run_dir)}
    assert tok_train.main(args) == 0
    assert "already done" in capsys.readouterr().out
    assert {f: os.path.getmtime(f) for f in storage.list_files(run_dir)} == files


def test_a_done_json_of_another_config_id_trains_again_with_the_new_flags(
    data_dir, tmp_path, capsys, monkeypatch
):
    run_dir = str(tmp_path / "run")
    args = ["--run-dir", run_dir, "--data", data_dir, "--max-chars", "50000"]
    monkeypatch.setenv("NANORUN_CONFIG_ID", "cfg-300")
    monkeypatch.setenv("NANORUN_ATTEMPT", "1")
    assert tok_train.main([*args, "--vocab-size", "300"]) == 0
    assert read_done(run_dir, "tokenizer").config_id == "cfg-300"
    assert read_progress(run_dir, "tokenizer").attempt == 1
    assert tok_train.main([*args, "--vocab-size", "300"]) == 0  # the same config: a no-op
    assert "already done" in capsys.readouterr().out

    monkeypatch.setenv("NANORUN_CONFIG_ID", "cfg-400")  # the flags changed in the spec
    assert tok_train.main([*args, "--vocab-size", "400"]) == 0
    out = capsys.readouterr().out
    assert "re-running after a spec change: done.json is of config cfg-300, this run is config cfg-400" in out
    done = read_done(run_dir, "tokenizer")
    assert (done.config_id, done.metrics["vocab_size"]) == ("cfg-400", 400)


def test_stage_runs_with_an_s3_run_dir_and_s3_data(data_dir, s3_run_dir):
    data = f"{s3_run_dir}/data"
    for path in storage.list_files(data_dir):
        storage.upload_from(path, storage.join(data, os.path.relpath(path, data_dir)))
    check(
        run_stage(
            "tok_train",
            "--run-dir",
            s3_run_dir,
            "--data",
            data,
            "--vocab-size",
            "400",
            "--max-chars",
            "100000",
        )
    )
    assert read_done(s3_run_dir, "tokenizer").metrics["vocab_size"] == 400
    assert Tokenizer.from_run_dir(s3_run_dir).encode("hello") != []
    again = check(run_stage("tok_train", "--run-dir", s3_run_dir, "--data", data))
    assert "already done" in again.stdout


def test_missing_data_fails_with_a_clear_message(tmp_path):
    proc = run_stage("tok_train", "--run-dir", str(tmp_path / "run"), "--data", str(tmp_path / "nothing"))
    assert proc.returncode == 1 and "nanorun data prepare" in proc.stderr
    assert read_done(str(tmp_path / "run"), "tokenizer") is None


def truncated(path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # the footer is lost


def garbage(path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


def wrong_schema(path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": list(range(100))}), path)


@pytest.mark.parametrize(
    "damage, message",
    [
        (truncated, "is corrupt or not a parquet file: "),
        (garbage, "is corrupt or not a parquet file: "),
        (wrong_schema, "has a 'text' column of type int64, not string"),
    ],
)
def test_a_damaged_shard_ends_the_stage_with_one_line_naming_it(data_dir, tmp_path, damage, message):
    data = tmp_path / "data"
    data.mkdir()
    for path in storage.list_files(data_dir):
        storage.upload_from(path, str(data / os.path.basename(path)))
    bad = sorted(data.glob("*.parquet"))[0]
    damage(bad)
    proc = run_stage(
        "tok_train", "--run-dir", str(tmp_path / "run"), "--data", str(data), "--vocab-size", "300"
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1, proc.stderr  # no traceback: the line is what the operator shows
    assert proc.stderr.startswith(f"error: shard {bad} {message}"), proc.stderr
    assert read_done(str(tmp_path / "run"), "tokenizer") is None

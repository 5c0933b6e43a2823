"""Stage entry points: a known failure ends the process with one `error:` line; a bug keeps its traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from nanorun.pipeline.errors import StageError, run_main
from nanorun.pipeline.storage import StorageError
from nanorun.trainer.data import dataloader, shards
from nanorun.trainer.data.tokenizer import TokenizerError
from nanorun.trainer.training.checkpoint import CheckpointError

from tests.fixtures.tiny_run import stage_env

STAGES = [
    "tok_train",
    "tok_eval",
    "base_train",
    "base_eval",
    "mid_train",
    "chat_sft",
    "chat_rl",
    "chat_eval",
    "report",
]
TRAINER = Path(__file__).parents[2] / "trainer"


def test_the_projects_known_errors_are_stage_errors():
    assert dataloader.DataError is shards.DataError  # one class, whichever module a caller imports it from
    for cls in (CheckpointError, shards.DataError, StorageError, TokenizerError):
        assert issubclass(cls, StageError), cls
    assert issubclass(TokenizerError, ValueError)  # what callers caught before


def test_a_stage_error_becomes_one_line_and_exit_code_1(capsys):
    def main() -> int:
        raise shards.DataError(
            "shard s3://b/data/shard_00003.parquet is corrupt or not a parquet file: "
            "Parquet magic bytes not found\n  in footer. Either the file is corrupted"
        )

    assert run_main(main) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        "error: shard s3://b/data/shard_00003.parquet is corrupt or not a parquet file: Parquet magic "
        "bytes not found in footer. Either the file is corrupted\n"
    )


def test_a_stage_that_succeeds_keeps_its_exit_code(capsys):
    assert run_main(lambda: 143) == 143
    assert capsys.readouterr().err == ""


def test_an_unexpected_exception_keeps_its_traceback():
    def main() -> int:
        raise KeyError("a bug")

    with pytest.raises(KeyError, match="a bug"):
        run_main(main)


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_entry_point_goes_through_the_handler(stage):
    source = (TRAINER / f"{stage}.py").read_text()
    entry = re.search(r'^if __name__ == "__main__":\n(.*)', source, re.MULTILINE)
    assert entry and entry.group(1).strip() == "sys.exit(run_main(main))", stage


def test_under_torchrun_its_failure_summary_ends_with_the_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    data.mkdir()
    bad = data / "shard_00000.parquet"
    bad.write_bytes(os.urandom(4096))
    pq.write_table(pa.table({"text": ["a validation document"] * 10}), data / "shard_00001.parquet")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "1",
            "-m",
            "nanorun.trainer.tok_train",
            "--run-dir",
            str(tmp_path / "run"),
            "--data",
            str(data),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=stage_env(),
    )
    assert proc.returncode == 1
    line = f"error: shard {bad} is corrupt or not a parquet file: "
    worker = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert len(worker) == 1 and worker[0].startswith(line), proc.stderr
    # torchrun prints its own report after the worker's output: its last lines repeat the worker's line
    # (without the error file they would say "To enable traceback see: https://pytorch.org/...")
    assert f"traceback : {worker[0]}" in [x.strip() for x in proc.stderr.splitlines()[-3:]], proc.stderr

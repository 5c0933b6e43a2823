"""`nanorun delete-run URI`, what a run's cleanup Job runs: every file under the run
goes, a neighbour whose name starts the same stays."""

from __future__ import annotations

from nanorun.cli import main as cli
from nanorun.pipeline import storage


def test_cleanup_deletes_the_run_and_nothing_beside_it(s3_run_dir, capsys):
    neighbour = s3_run_dir + "-2"  # `runs/x-2` beside `runs/x`
    for uri in (s3_run_dir, neighbour):
        storage.write_text(storage.join(uri, "pretrain", "progress.json"), "{}")
        storage.write_bytes(storage.join(uri, "pretrain", "checkpoints", "step_000001", "model.bin"), b"x")
    assert cli.main(["delete-run", s3_run_dir]) == 0
    assert f"deleted 2 files under {s3_run_dir}" in capsys.readouterr().out
    assert storage.list_files(s3_run_dir) == [] and len(storage.list_files(neighbour)) == 2

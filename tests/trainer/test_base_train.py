"""The pretrain stage end to end: contract files, resume equivalence, 1 vs 2 ranks, preemption, S3."""

from __future__ import annotations

import math
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from nanorun.pipeline import storage
from nanorun.pipeline.progress import read_done, read_progress
from nanorun.trainer.training.checkpoint import (
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    load_model,
    read_meta,
)

from tests.fixtures.tiny_run import check, run_stage, stage_env

FLAGS = [
    "--depth",
    "2",
    "--max-seq-len",
    "128",
    "--head-dim",
    "64",
    "--window-pattern",
    "L",
    "--device-batch-size",
    "4",
    "--total-batch-size",
    "1024",
    "--num-iterations",
    "6",
    "--warmup-steps",
    "1",
    "--eval-every",
    "-1",
    "--eval-tokens",
    "1024",
    "--sample-every",
    "-1",
    "--save-every",
    "3",
    "--data-streams",
    "2",
    "--doc-buffer",
    "16",
    "--device",
    "cpu",
]


def losses(run: Path | str) -> dict[int, float]:
    lines = storage.read_text(storage.join(str(run), "pretrain", "history.jsonl")).splitlines()
    import json

    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def fresh_run(tiny_base_run: str, dest: Path) -> tuple[str, str]:
    """A run dir holding only the tiny run's tokenizer; returns (run dir, data dir)."""
    shutil.copytree(Path(tiny_base_run) / "tokenizer", dest / "tokenizer")
    return str(dest), str(Path(tiny_base_run).parent / "data")


def forget_after(run: Path, step: int) -> None:
    """What a crash right after checkpoint `step` leaves behind: no later checkpoint, no done.json."""
    (run / "pretrain" / "done.json").unlink()
    for s, uri in list_checkpoints(str(run / "pretrain")):
        if s > step:
            shutil.rmtree(uri)


@pytest.fixture(scope="module")
def straight(tiny_base_run, tmp_path_factory) -> Path:
    run, data = fresh_run(tiny_base_run, tmp_path_factory.mktemp("straight"))
    check(run_stage("base_train", "--run-dir", run, "--data", data, *FLAGS))
    return Path(run)


@pytest.fixture(scope="module")
def two_ranks(tiny_base_run, tmp_path_factory) -> Path:
    run, data = fresh_run(tiny_base_run, tmp_path_factory.mktemp("two_ranks"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "nanorun.trainer.base_train",
            "--run-dir",
            run,
            "--data",
            data,
            *FLAGS,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    check(proc)
    return Path(run)


@pytest.mark.slow
def test_tiny_run_loss_falls_on_real_text_and_writes_the_stage_contract(tiny_base_run):
    curve = losses(tiny_base_run)
    assert len(curve) == 40
    assert sum(curve[s] for s in range(36, 41)) / 5 < curve[1] - 1.0
    done = read_done(tiny_base_run, "pretrain")
    assert done.metrics["steps"] == 40 and math.isfinite(done.metrics["val_bpb"])
    assert done.outputs["checkpoint"] == latest_checkpoint(storage.join(tiny_base_run, "pretrain"))
    progress = read_progress(tiny_base_run, "pretrain")
    assert (progress.step, progress.total_steps, progress.last_checkpoint) == (
        40,
        40,
        done.outputs["checkpoint"],
    )
    model, meta = load_model(done.outputs["checkpoint"], "cpu")
    assert meta["step"] == 40 and model.config.n_layer == 2
    again = check(run_stage("base_train", "--run-dir", tiny_base_run))  # finished: a no-op
    assert "already done" in again.stdout


def test_resume_after_a_crash_sees_identical_losses(straight, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    forget_after(run, 3)
    out = check(run_stage("base_train", "--run-dir", str(run), "--data", "ignored-on-resume", *FLAGS))
    assert "resuming from" in out.stdout and "step 3" in out.stdout
    assert losses(run) == losses(straight)  # bit for bit: same weights, optimizer state and batches


def test_a_changed_config_id_runs_again_from_the_input_and_the_same_one_resumes(
    straight, tiny_base_run, tmp_path
):
    run = tmp_path / "run"
    shutil.copytree(straight, run)  # finished, checkpoints of steps 3 and 6, no config id
    data = str(Path(tiny_base_run).parent / "data")
    config = {"NANORUN_CONFIG_ID": "cfg-b"}
    rerun = check(run_stage("base_train", "--run-dir", str(run), "--data", data, *FLAGS, env=config))
    assert (
        "re-running after a spec change: done.json is of config (none), this run is config cfg-b"
        in rerun.stdout
    )
    assert "resuming from" not in rerun.stdout  # the step-6 checkpoint is of the old config
    assert losses(run) == losses(straight)  # from step 0 again
    done = read_done(str(run), "pretrain")
    assert done.config_id == "cfg-b" and read_meta(done.outputs["checkpoint"])["config_id"] == "cfg-b"
    assert {read_meta(uri)["config_id"] for _, uri in list_checkpoints(str(run / "pretrain"))} == {"cfg-b"}

    again = check(run_stage("base_train", "--run-dir", str(run), env=config))
    assert "already done" in again.stdout

    forget_after(run, 3)  # a crash after step 3 of the cfg-b run: a retry of the same config resumes
    resumed = check(run_stage("base_train", "--run-dir", str(run), "--data", data, *FLAGS, env=config))
    assert f"resuming from {checkpoint_dir(str(run / 'pretrain'), 3)} (step 3," in resumed.stdout


def test_the_next_attempt_resumes_from_the_last_commit_and_a_late_old_one_may_not_start(straight, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    forget_after(run, 3)  # attempt 1 lost (its node gone) after its step-3 checkpoint
    data = "ignored-on-resume"
    second = check(
        run_stage("base_train", "--run-dir", str(run), "--data", data, *FLAGS, env={"NANORUN_ATTEMPT": "2"})
    )
    assert f"resuming from {checkpoint_dir(str(run / 'pretrain'), 3)} (step 3" in second.stdout
    assert losses(run) == losses(straight)
    (run / "pretrain" / "done.json").unlink()  # as if attempt 2 were still running
    late = run_stage(
        "base_train", "--run-dir", str(run), "--data", data, *FLAGS, env={"NANORUN_ATTEMPT": "1"}
    )
    assert late.returncode == 1
    assert "error: rank 0 of attempt 1 of pretrain: attempt 2 has claimed the stage" in late.stderr
    assert read_progress(str(run), "pretrain").attempt == 2  # nothing of attempt 1 written


@pytest.mark.slow
def test_two_ranks_match_one_rank_with_the_same_global_batch(straight, two_ranks):
    one, two = losses(straight), losses(two_ranks)
    assert one.keys() == two.keys()
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4, abs=1e-4), step


@pytest.mark.slow
def test_resume_on_fewer_ranks_continues_the_same_run(straight, two_ranks, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_ranks, run)
    forget_after(run, 3)
    assert read_meta(checkpoint_dir(str(run / "pretrain"), 3))["world_size"] == 2
    marker = storage.read_json(storage.join(checkpoint_dir(str(run / "pretrain"), 3), "COMMITTED"))
    assert len([n for n in marker["files"] if n.endswith(".distcp")]) == 2  # one optimizer shard per rank...
    assert set(marker["blake2b"]) == set(
        marker["files"]
    )  # ...each checksummed by its rank, gathered by rank 0
    check(run_stage("base_train", "--run-dir", str(run), *FLAGS))  # one process now
    one, resumed = losses(straight), losses(run)
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(one[step], rel=1e-4, abs=1e-4), step


def test_sigterm_saves_a_loadable_checkpoint_and_exits_for_retry(tiny_base_run, tmp_path):
    run, data = fresh_run(tiny_base_run, tmp_path)
    flags = [f if f != "6" else "1000" for f in FLAGS]  # a long horizon: it must be stopped
    proc = subprocess.Popen(
        [sys.executable, "-m", "nanorun.trainer.base_train", "--run-dir", run, "--data", data, *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=stage_env(NANORUN_ATTEMPT="2"),
    )
    deadline = time.time() + 180
    while time.time() < deadline:
        progress = read_progress(run, "pretrain")
        if progress is not None and progress.step >= 2:
            break
        time.sleep(0.2)
    assert (progress.attempt, progress.stopped) == (2, "")  # running: no marker yet
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "preempted: saved" in out and re.search(r"SIGTERM checkpoint saved in \d+\.\d\d s", out)
    latest = latest_checkpoint(storage.join(run, "pretrain"))
    model, meta = load_model(latest, "cpu")
    assert meta["step"] >= 2 and meta["has_optimizer"]
    assert read_done(run, "pretrain") is None
    # the marker the operator reads (under torchrun the exit code would be torchrun's 1, not 143)
    progress = read_progress(run, "pretrain")
    assert (progress.stopped, progress.attempt, progress.last_checkpoint) == ("preempted", 2, latest)


def test_s3_run_dir_and_shards(tiny_base_run, s3_run_dir):
    for f in (Path(tiny_base_run) / "tokenizer").glob("*.*"):  # its files, not its ranks/
        storage.upload_from(f, storage.join(s3_run_dir, "tokenizer", f.name))
    data = storage.join(s3_run_dir.rsplit("/", 1)[0], "data")
    for f in sorted((Path(tiny_base_run).parent / "data").iterdir()):
        storage.upload_from(f, storage.join(data, f.name))
    flags = [f if f != "6" else "4" for f in FLAGS]
    check(run_stage("base_train", "--run-dir", s3_run_dir, "--data", data, *flags))
    done = read_done(s3_run_dir, "pretrain")
    assert done.outputs["checkpoint"].startswith("s3://") and done.metrics["steps"] == 4
    assert [s for s, _ in list_checkpoints(storage.join(s3_run_dir, "pretrain"))] == [3, 4]
    model, meta = load_model(done.outputs["checkpoint"], "cpu")
    assert meta["shards"] and all(shard.startswith("s3://") for shard in meta["shards"])


def test_corrupt_training_shard_fails_with_its_name(tiny_base_run, tmp_path):
    run, data = fresh_run(tiny_base_run, tmp_path / "run")
    bad = tmp_path / "data"
    shutil.copytree(data, bad)
    first = sorted(bad.iterdir())[0]
    first.write_bytes(b"PAR1" + b"\x00" * 64)
    proc = run_stage("base_train", "--run-dir", run, "--data", str(bad), *FLAGS)
    assert proc.returncode == 1
    # one line, the last the pod logs (what the operator shows): the shard, and what pyarrow found in it
    assert proc.stderr.splitlines()[-1].startswith(f"error: shard {first} is corrupt or not a parquet file: ")
    assert "Traceback" not in proc.stderr
    assert latest_checkpoint(storage.join(run, "pretrain")) is None


@pytest.mark.slow
def test_a_corpus_of_a_few_hundred_documents_in_four_shards_trains_with_no_data_flags(
    tiny_base_run, tmp_path
):
    # Three training shards of one row group each: the data streams fit the data (2: at most 3 row
    # groups, and a divisor of the 8 rows of a step), and the checkpoint records the count.
    import pyarrow as pa
    import pyarrow.parquet as pq
    from nanorun.trainer.training.checkpoint import latest_checkpoint, read_meta

    from tests.fixtures.tiny_run import real_english_documents

    docs = real_english_documents()[:458]
    data = tmp_path / "small"
    data.mkdir()
    for i in range(4):
        pq.write_table(pa.table({"text": docs[i::4]}), data / f"shard_{i:05d}.parquet")
    run, _ = fresh_run(tiny_base_run, tmp_path / "run")
    flags = [f for i, f in enumerate(FLAGS) if f != "--data-streams" and FLAGS[i - 1] != "--data-streams"]
    check(run_stage("base_train", "--run-dir", run, "--data", str(data), *flags))
    meta = read_meta(latest_checkpoint(storage.join(run, "pretrain")))
    assert meta["plan"]["data_streams"] == 2
    assert meta["dataloader"]["count"] == 2


def test_the_default_window_pattern_is_sssl_only_where_flash_attention_3_runs():
    import torch
    from nanorun.trainer.base_train import window_pattern_for

    assert window_pattern_for("auto", torch.device("cpu")) == "L"  # SDPA: a band mask would save nothing
    assert window_pattern_for("SSL", torch.device("cpu")) == "SSL"  # an explicit pattern is kept


@pytest.mark.slow
def test_greedy_samples_land_in_the_history_for_the_explainer(tiny_base_run, tmp_path):
    import json

    from nanorun.trainer.base_train import SAMPLE_PROMPTS

    run, data = fresh_run(tiny_base_run, tmp_path)
    flags = [*FLAGS]
    flags[flags.index("--sample-every") + 1] = "3"
    out = check(run_stage("base_train", "--run-dir", run, "--data", data, *flags))
    history = [
        json.loads(line) for line in (Path(run) / "pretrain" / "history.jsonl").read_text().splitlines()
    ]
    sampled = [r for r in history if "samples" in r]
    assert [r["step"] for r in sampled] == [3, 6]  # every 3 steps and at the end
    for record in sampled:
        assert [s["prompt"] for s in record["samples"]] == list(SAMPLE_PROMPTS)
        assert all(isinstance(s["text"], str) and s["text"] for s in record["samples"])
    assert out.stdout.count("  sample:") == 2 * len(SAMPLE_PROMPTS)

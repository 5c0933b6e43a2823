"""Per-rank liveness (trainer/training/liveness.py): every rank beats, says what it does and, when
stuck, leaves its stacks in the run directory; a hung collective ends; an old attempt never commits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from nanorun.pipeline import storage
from nanorun.pipeline.liveness import (
    EVALUATING,
    FINISHED,
    TRAINING,
    Superseded,
    claim_attempt,
    flight_recorder_path,
    heartbeat_path,
    read_heartbeats,
    stacks_path,
)
from nanorun.trainer.training import checkpoint as ckpt
from nanorun.trainer.training import liveness
from nanorun.trainer.training.distributed import nccl_environment
from nanorun.trainer.training.metrics import TrainMetrics

from tests.fixtures.s3 import free_port
from tests.fixtures.tiny_run import stage_env
from tests.trainer.tiny_models import tiny_gpt

WAIT_S = 30.0  # what a condition below may take on a busy machine before the test gives up


def wait_for(condition, what: str):
    deadline = time.time() + WAIT_S
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"no {what} within {WAIT_S} s")


@pytest.fixture
def fast_beats(monkeypatch):
    monkeypatch.setenv("NANORUN_HEARTBEAT_SECONDS", "0.1")
    monkeypatch.setattr(liveness, "WAKE_SECONDS", 0.05)
    yield
    liveness.stop()


def beat_of(run_dir: str, rank: int = 0) -> dict:
    return storage.read_json_or_none(heartbeat_path(run_dir, "pretrain", rank)) or {}


def test_a_rank_beats_with_its_step_phase_and_longest_pause(tmp_path, fast_beats):
    run = str(tmp_path)
    metrics = TrainMetrics("pretrain", rank=3)
    liveness.start(run, "pretrain", rank=3, world_size=4, attempt=0, metrics=metrics)
    liveness.set_phase(TRAINING)
    liveness.progressed(step=7, step_seconds=0.5)
    liveness.progressed(step=8, step_seconds=1.5)
    with liveness.pausing(EVALUATING):
        wait_for(lambda: beat_of(run, 3).get("phase") == EVALUATING, "beat in the evaluating phase")
    beat = wait_for(lambda: (b := beat_of(run, 3)).get("phase") == TRAINING and b, "beat back in training")
    assert (beat["rank"], beat["world_size"], beat["step"], beat["step_seconds"]) == (3, 4, 8, 1.0)
    assert beat["longest_pause_seconds"] > 0 and beat["beat_at"] >= beat["progressed_at"]
    assert [b.rank for b in read_heartbeats(run, "pretrain")] == [3]
    assert metrics.progress_time.labels(**metrics.labels)._value.get() == pytest.approx(beat["progressed_at"])
    liveness.stop()  # a last beat: a finished rank is never counted stuck however long it stays silent
    assert beat_of(run, 3)["phase"] == FINISHED


def test_a_heartbeat_storage_refuses_is_logged_and_the_next_beat_writes_it(
    tmp_path, fast_beats, monkeypatch, capfd
):
    refusals = []

    def refusing(run_dir, beat):
        if len(refusals) < 3:
            refusals.append(beat.beat_at)
            raise ConnectionResetError("storage is down")
        real_write(run_dir, beat)

    real_write = liveness.write_heartbeat
    monkeypatch.setattr(liveness, "write_heartbeat", refusing)
    metrics = TrainMetrics("pretrain", rank=0)
    liveness.start(str(tmp_path), "pretrain", rank=0, world_size=1, attempt=0, metrics=metrics)
    wait_for(lambda: beat_of(str(tmp_path)), "heartbeat once storage took writes again")
    assert len(refusals) == 3 and metrics.heartbeat_failures._value.get() == 3
    assert "heartbeat not written (ConnectionResetError: storage is down)" in capfd.readouterr().err


def a_long_call_without_progress(run: str) -> str:
    """The main thread stuck (as in a hung collective) until the heartbeat thread named its stacks."""
    return wait_for(lambda: beat_of(run).get("stacks"), "stack dump")


def test_a_rank_without_progress_leaves_every_threads_stack_in_the_run_directory(
    tmp_path, fast_beats, monkeypatch
):
    monkeypatch.setenv("NANORUN_STALL_TIMEOUT_SECONDS", "0.5")  # dumps after 0.25 s without progress
    run = str(tmp_path)
    liveness.start(run, "pretrain", rank=0, world_size=1, attempt=2)
    uri = a_long_call_without_progress(run)
    assert uri == stacks_path(run, "pretrain", 2, 0)
    stacks = storage.read_text(uri)
    assert "no progress for" in stacks and "a_long_call_without_progress" in stacks  # the main thread
    assert "_dump_if_stuck" in stacks  # and the others


def test_sigusr1_dumps_the_stacks_into_the_run_directory(tmp_path, fast_beats):
    run = str(tmp_path)
    liveness.start(run, "pretrain", rank=0, world_size=1, attempt=1)
    os.kill(os.getpid(), signal.SIGUSR1)  # faulthandler writes the dump from the signal handler
    uri = wait_for(lambda: beat_of(run).get("stacks"), "stacks of the SIGUSR1 dump")
    assert "test_sigusr1_dumps_the_stacks_into_the_run_directory" in storage.read_text(uri)


def test_the_flight_recorders_trace_is_copied_into_the_run_directory(tmp_path, fast_beats):
    run = str(tmp_path)
    live = liveness.start(run, "pretrain", rank=3, world_size=4, attempt=2)
    # what NCCL's watchdog writes on a collective timeout: TORCH_FR_DUMP_TEMP_FILE + the rank
    (liveness.scratch_dir() / f"{liveness.FLIGHT_RECORDER_PREFIX}3").write_bytes(b"pickled trace")
    assert live.scratch == liveness.scratch_dir()
    uri = flight_recorder_path(run, "pretrain", 2, 3)
    wait_for(lambda: storage.exists(uri), "trace in the run directory")
    assert storage.read_bytes(uri) == b"pickled trace" and uri.endswith(
        "stalls/attempt-2/flight-recorder-rank-00003"
    )


def test_stacks_are_dumped_after_half_the_stall_or_collective_timeout(monkeypatch):
    monkeypatch.setenv("NANORUN_HEARTBEAT_SECONDS", "15")
    monkeypatch.delenv("NANORUN_STALL_TIMEOUT_SECONDS", raising=False)
    monkeypatch.delenv("NANORUN_COLLECTIVE_TIMEOUT_SECONDS", raising=False)
    assert liveness.stack_dump_seconds() == 900  # half the 30-minute collective timeout
    monkeypatch.setenv("NANORUN_STALL_TIMEOUT_SECONDS", "600")
    assert liveness.stack_dump_seconds() == 300
    monkeypatch.setenv("NANORUN_COLLECTIVE_TIMEOUT_SECONDS", "120")
    assert liveness.stack_dump_seconds() == 60
    monkeypatch.setenv("NANORUN_COLLECTIVE_TIMEOUT_SECONDS", "20")
    assert liveness.stack_dump_seconds() == 30  # never under two beats


def test_nccl_gets_the_timeout_watchdog_and_flight_recorder_but_keeps_what_the_user_set():
    # No GPU here: what is checked is the environment init_process_group gives NCCL.
    env = nccl_environment(600, Path("/tmp/x/flight-recorder-rank-"), {"TORCH_NCCL_ENABLE_MONITORING": "0"})
    assert env == {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
        "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": "480",
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_FR_DUMP_TEMP_FILE": "/tmp/x/flight-recorder-rank-",
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": "/tmp/x/flight-recorder-rank-",
    }
    mine = {"TORCH_NCCL_DEBUG_INFO_TEMP_FILE": "/traces/t"}
    env = nccl_environment(60, Path("/tmp/x/f-"), mine)
    assert env["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"] == "60"
    assert "TORCH_FR_DUMP_TEMP_FILE" not in env and "TORCH_NCCL_DEBUG_INFO_TEMP_FILE" not in env


HUNG_RANKS = textwrap.dedent(
    """
    import argparse, os, sys
    from nanorun.trainer.training import liveness
    from nanorun.trainer.training.common import add_common_args, setup_stage
    parser = argparse.ArgumentParser()
    add_common_args(parser)
    ctx = setup_stage("pretrain", parser.parse_args())
    print("ready", flush=True)
    if ctx.rank == 1:
        sys.stdin.read()  # alive, beating, but never joins the collective
        liveness.stop()
        os._exit(0)  # no process-group teardown: its peer is gone
    ctx.should_stop()  # an all_reduce rank 1 never enters
    """
)


def test_a_gloo_collective_a_rank_never_joins_times_out_with_the_stuck_ranks_stacks_saved(tmp_path):
    run = str(tmp_path)
    env = stage_env(
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        NANORUN_ATTEMPT="3",
        NANORUN_HEARTBEAT_SECONDS="0.2",
        NANORUN_COLLECTIVE_TIMEOUT_SECONDS="4",  # the default (30 minutes) would outlast the test
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", HUNG_RANKS, "--run-dir", run, "--device", "cpu"],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    try:
        out, err = procs[0].communicate(timeout=120)
    finally:
        procs[1].communicate(input="", timeout=60)
    assert procs[0].returncode != 0 and "Timed out" in err, err
    beats = read_heartbeats(run, "pretrain", attempt=3)
    assert [b.rank for b in beats] == [0, 1]  # every rank beat, not only rank 0
    assert beats[0].stacks == stacks_path(run, "pretrain", 3, 0)  # dumped at half the timeout
    assert "should_stop" in storage.read_text(beats[0].stacks)  # where rank 0 was stuck


def test_an_old_attempt_cannot_commit_once_a_newer_one_claimed_the_stage(tmp_path, fast_beats):
    stage_dir = str(tmp_path / "pretrain")
    model = tiny_gpt(vocab_size=64, sequence_len=16)
    liveness.start(str(tmp_path), "pretrain", rank=0, world_size=1, attempt=1)
    committed = ckpt.save_checkpoint(stage_dir, 1, model, None, {})
    claim_attempt(str(tmp_path), "pretrain", 2)  # attempt 2 started elsewhere (a node was lost)
    with pytest.raises(Superseded, match="attempt 2 has claimed"):
        ckpt.save_checkpoint(stage_dir, 2, model, None, {})
    assert not ckpt.is_committed(ckpt.checkpoint_dir(stage_dir, 2))
    assert storage.list_files(ckpt.checkpoint_dir(stage_dir, 2)) == []  # nothing written at all
    # the heartbeat thread saw the claim too: attempt 1's next step stops it
    wait_for(lambda: liveness.current().superseded_by == 2, "the claim seen by the heartbeat thread")
    last_beat = beat_of(str(tmp_path))["beat_at"]
    time.sleep(0.5)  # five beats' time: the rank file is attempt 2's now, attempt 1 writes no more
    assert beat_of(str(tmp_path))["beat_at"] == last_beat
    with pytest.raises(Superseded):
        liveness.progressed(step=2)
    liveness.stop()  # attempt 2 is another process, which resumes from attempt 1's last commit
    assert ckpt.resumable_checkpoint(stage_dir, config_id="") == committed

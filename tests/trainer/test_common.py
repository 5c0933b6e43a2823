"""Shared stage setup: process env, status files, metrics endpoint, SIGTERM agreement across ranks."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest
from nanorun.pipeline import storage
from nanorun.pipeline.progress import Done, read_done, read_progress, write_done
from nanorun.trainer.training.common import (
    PREEMPTED_EXIT_CODE,
    add_common_args,
    exit_preempted,
    setup_stage,
    teardown,
)
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.metrics import TRAINER_SERIES
from tests.fixtures.s3 import free_port


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_common_args(parser)
    return parser.parse_args(argv)


@pytest.fixture
def restore_sigterm():
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_single_process_stage_writes_progress_done_and_serves_metrics(tmp_path, monkeypatch, restore_sigterm):
    monkeypatch.setenv("NANORUN_RUN", "demo")
    port = free_port()
    ctx = setup_stage(
        "pretrain", parse(["--run-dir", str(tmp_path), "--metrics-port", str(port), "--device", "cpu"])
    )
    assert (ctx.rank, ctx.world_size, ctx.is_master, ctx.device.type, ctx.already_done) == (
        0,
        1,
        True,
        "cpu",
        None,
    )
    ctx.progress(
        flush=True,
        step=5,
        total_steps=10,
        loss=2.5,
        lr=0.01,
        grad_norm=0.7,
        tokens=1000,
        step_seconds=0.2,
        tokens_per_sec=5000.0,
        eta_seconds=1.0,
        mfu=0.4,
    )
    progress = read_progress(str(tmp_path), "pretrain")
    assert (progress.step, progress.total_steps, progress.loss, progress.extra["lr"]) == (5, 10, 2.5, 0.01)
    ctx.progress(flush=True, step=6, val_bpb=1.5)
    progress = read_progress(str(tmp_path), "pretrain")
    assert (progress.step, progress.loss, progress.val_bpb) == (6, 2.5, 1.5)  # merged, not replaced

    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for name in TRAINER_SERIES:
        assert f"{name}{{" in body, name
    assert 'llm_train_step{rank="0",run="demo",stage="pretrain"} 6.0' in body
    assert 'llm_train_tokens_total{rank="0",run="demo",stage="pretrain"} 1000.0' in body
    # the rank's liveness: when it last progressed and beat, and which one phase it is in
    samples = [
        s for f in text_string_to_metric_families(body) for s in f.samples if s.labels.get("rank") == "0"
    ]
    value = {(s.name, s.labels.get("phase")): s.value for s in samples}
    assert value[("llm_train_progress_timestamp_seconds", None)] == pytest.approx(time.time(), abs=60)
    assert value[("llm_train_heartbeat_timestamp_seconds", None)] == pytest.approx(time.time(), abs=60)
    phases = {phase: v for (name, phase), v in value.items() if name == "llm_train_phase"}
    assert len(phases) > 1 and sorted(phases.values()) == [0.0] * (len(phases) - 1) + [1.0]

    ctx.record(step=6, loss=2.5)
    ctx.done({"val_bpb": 1.5}, {"checkpoint": "somewhere"})
    assert read_done(str(tmp_path), "pretrain").metrics == {"val_bpb": 1.5}
    assert (
        storage.read_text(str(tmp_path / "pretrain" / "history.jsonl")).strip() == '{"loss": 2.5, "step": 6}'
    )
    teardown(ctx)


def test_a_finished_stage_reports_already_done(tmp_path):
    write_done(str(tmp_path), Done(stage="pretrain", seconds=3.0, outputs={"checkpoint": "x"}))
    ctx = setup_stage("pretrain", parse(["--run-dir", str(tmp_path), "--device", "cpu"]))
    assert ctx.already_done is not None and ctx.already_done.outputs == {"checkpoint": "x"}
    assert ctx.metrics is None  # no server, no signal handler: the stage only exits
    teardown(ctx)


@pytest.fixture
def no_executor_env(monkeypatch):
    monkeypatch.delenv("NANORUN_ATTEMPT", raising=False)
    monkeypatch.delenv("NANORUN_CONFIG_ID", raising=False)
    return monkeypatch


def test_progress_carries_the_attempt_and_done_json_the_config_id(tmp_path, no_executor_env, restore_sigterm):
    no_executor_env.setenv("NANORUN_ATTEMPT", "2")
    no_executor_env.setenv("NANORUN_CONFIG_ID", "cfg-a")
    ctx = setup_stage("pretrain", parse(["--run-dir", str(tmp_path), "--device", "cpu"]))
    ctx.progress(flush=True, step=1, total_steps=3)
    assert read_progress(str(tmp_path), "pretrain").attempt == 2
    ctx.done({}, {"checkpoint": "x"})
    assert read_done(str(tmp_path), "pretrain").config_id == "cfg-a"
    teardown(ctx)


@pytest.mark.parametrize(
    ("done_id", "env_id", "already_done"),
    [
        ("cfg-a", "cfg-a", True),
        ("cfg-a", "cfg-b", False),
        ("", "cfg-b", False),
        ("cfg-a", "", True),
        ("", "", True),
    ],
)
def test_a_done_json_of_another_config_id_runs_the_stage_again(
    tmp_path, no_executor_env, restore_sigterm, capsys, done_id, env_id, already_done
):
    write_done(str(tmp_path), Done(stage="pretrain", seconds=3.0, config_id=done_id))
    if env_id:
        no_executor_env.setenv("NANORUN_CONFIG_ID", env_id)
    ctx = setup_stage("pretrain", parse(["--run-dir", str(tmp_path), "--device", "cpu"]))
    out = capsys.readouterr().out
    assert (ctx.already_done is not None) is already_done
    if already_done:
        assert "already done" in out and ctx.metrics is None
    else:
        assert (
            f"re-running after a spec change: done.json is of config {done_id or '(none)'}, "
            f"this run is config {env_id}" in out
        )
        assert ctx.metrics is not None  # set up to run
        ctx.done({}, {})
        assert read_done(str(tmp_path), "pretrain").config_id == env_id  # the new run's done.json
    teardown(ctx)


def test_a_stage_stopped_by_sigterm_marks_progress_preempted_with_its_attempt(
    tmp_path, no_executor_env, restore_sigterm, capsys
):
    no_executor_env.setenv("NANORUN_ATTEMPT", "3")
    ctx = setup_stage("pretrain", parse(["--run-dir", str(tmp_path), "--device", "cpu"]))
    ctx.progress(flush=True, step=5, total_steps=10)
    assert read_progress(str(tmp_path), "pretrain").stopped == ""
    os.kill(os.getpid(), signal.SIGTERM)
    assert ctx.should_stop()
    assert exit_preempted(ctx, "run/pretrain/checkpoints/step_000005") == PREEMPTED_EXIT_CODE
    p = read_progress(str(tmp_path), "pretrain")
    assert (p.stopped, p.attempt, p.step) == ("preempted", 3, 5)
    assert p.last_checkpoint == "run/pretrain/checkpoints/step_000005"
    assert re.search(
        r"SIGTERM checkpoint saved in \d+\.\d\d s \(\d+\.\d\d s after SIGTERM\)", capsys.readouterr().out
    )


def test_sigterm_sets_the_stop_flag_instead_of_killing(tmp_path, restore_sigterm):
    ctx = setup_stage("pretrain", parse(["--run-dir", str(tmp_path), "--device", "cpu"]))
    assert not ctx.should_stop()
    os.kill(os.getpid(), signal.SIGTERM)
    assert ctx.should_stop()
    teardown(ctx)


RANK_SCRIPT = textwrap.dedent(
    """
    import argparse, os, signal, sys
    from nanorun.trainer.training.common import add_common_args, exit_preempted, setup_stage
    p = argparse.ArgumentParser(); add_common_args(p)
    ctx = setup_stage("pretrain", p.parse_args(sys.argv[1:]))
    before = ctx.should_stop()
    if ctx.rank == 1:
        os.kill(os.getpid(), signal.SIGTERM)   # only rank 1 is told to stop
    after = ctx.should_stop()
    print(f"rank={ctx.rank} world={ctx.world_size} local={ctx.local_rank} before={before} after={after}")
    sys.exit(exit_preempted(ctx, "the-checkpoint"))
    """
)


@pytest.mark.slow
def test_torchrun_environment_starts_gloo_and_ranks_agree_on_sigterm(tmp_path):
    env = {
        **os.environ,
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "NANORUN_ATTEMPT": "4",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, "--run-dir", str(tmp_path), "--device", "cpu"],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == PREEMPTED_EXIT_CODE, err
    assert "rank=0 world=2 local=0 before=False after=True" in outs[0][0]
    assert "rank=1 world=2 local=1 before=False after=True" in outs[1][0]
    # rank 0 was not signalled itself, yet it writes the marker (rank 1 writes no status files)
    assert "SIGTERM checkpoint saved in" in outs[0][0] and "SIGTERM checkpoint" not in outs[1][0]
    progress = read_progress(str(tmp_path), "pretrain")
    assert (progress.stopped, progress.attempt, progress.last_checkpoint) == (
        "preempted",
        4,
        "the-checkpoint",
    )


def test_world_size_without_master_address_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(SystemExit, match="MASTER_ADDR, MASTER_PORT is not set"):
        setup_stage("pretrain", parse(["--run-dir", str(tmp_path), "--device", "cpu"]))


def test_an_older_attempt_writes_no_progress_history_or_done_and_cannot_start_again(
    tmp_path, no_executor_env, restore_sigterm
):
    from nanorun.pipeline.liveness import Superseded, claim_attempt
    from nanorun.trainer.training import liveness

    no_executor_env.setenv("NANORUN_ATTEMPT", "1")
    ctx = setup_stage("pretrain", parse(["--run-dir", str(tmp_path), "--device", "cpu"]))
    ctx.progress(flush=True, step=1, total_steps=3)
    claim_attempt(str(tmp_path), "pretrain", 2)  # attempt 2 started elsewhere (a node was lost)
    for write in (
        lambda: ctx.progress(flush=True, step=2, total_steps=3),
        lambda: ctx.record(flush=True, step=2, loss=1.0),
        lambda: ctx.done({}, {"checkpoint": "x"}),
    ):
        with pytest.raises(Superseded, match="attempt 2 has claimed"):
            write()
    assert read_progress(str(tmp_path), "pretrain").step == 1
    assert read_done(str(tmp_path), "pretrain") is None
    assert not storage.exists(str(tmp_path / "pretrain" / "history.jsonl"))
    liveness.stop()
    with pytest.raises(Superseded):  # an attempt older than the claim refuses to start
        setup_stage("pretrain", parse(["--run-dir", str(tmp_path), "--device", "cpu"]))
    liveness.stop()

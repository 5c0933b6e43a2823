"""The fake stage of the `nanorun-fake-stage` test image (tests/kube/images/Dockerfile), run with
the arguments a pod gives the image's `torchrun` and `python` (`-m nanorun.trainer.<stage> --run-dir
DIR <flags>`, the attempt in NANORUN_ATTEMPT), here with this checkout's Python. It keeps the stage
contract the operator tests rely on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from nanorun.pipeline.progress import read_done, read_progress

from tests.kube.cluster import HERE

FAKE_STAGE = HERE / "images" / "fake-stage" / "fake_stage.py"


def stage(
    run_dir, *flags: str, attempt: int = 1, env: dict[str, str] | None = None, **kw
) -> subprocess.Popen:
    env = {**os.environ, "NANORUN_ATTEMPT": str(attempt), "NANORUN_CONFIG_ID": "cfg", **(env or {})}
    return subprocess.Popen(
        [
            sys.executable,
            str(FAKE_STAGE),
            "-m",
            "nanorun.trainer.base_train",
            "--run-dir",
            str(run_dir),
            "--depth",
            "2",
            *flags,
            "--metrics-port",
            "9090",
        ],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,
    )


def test_steps_write_progress_and_done_with_a_checkpoint(tmp_path):
    out, _ = stage(tmp_path, "--fake-steps", "3").communicate(timeout=60)
    assert "step 3/3" in out
    progress = read_progress(str(tmp_path), "pretrain")
    assert (progress.step, progress.total_steps, progress.attempt) == (3, 3, 1)
    done = read_done(str(tmp_path), "pretrain")
    assert done.config_id == "cfg" and done.outputs["checkpoint"].endswith("pretrain/checkpoints/step_000003")


def test_a_listed_attempt_fails_with_a_line_on_stderr_and_the_next_succeeds(tmp_path):
    proc = stage(tmp_path, "--fake-fail-attempts", "1")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "attempt 1 fails as asked" in err
    assert read_done(str(tmp_path), "pretrain") is None
    proc = stage(tmp_path, "--fake-fail-attempts", "1", attempt=2)
    proc.communicate(timeout=60)
    assert proc.returncode == 0 and read_done(str(tmp_path), "pretrain") is not None


def test_sigterm_saves_progress_as_preempted_and_a_new_attempt_resumes_after_it(tmp_path):
    proc = stage(tmp_path, "--fake-steps", "50", "--fake-step-seconds", "0.1")
    deadline = time.monotonic() + 30
    while (progress := read_progress(str(tmp_path), "pretrain")) is None or progress.step < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 143
    stopped = read_progress(str(tmp_path), "pretrain")
    assert stopped.stopped == "preempted" and stopped.attempt == 1 and 2 <= stopped.step < 50
    out, _ = stage(tmp_path, "--fake-steps", "50", "--fake-step-seconds", "0.01", attempt=2).communicate(
        timeout=60
    )
    assert f"step {stopped.step + 1}/50" in out and "step 1/50" not in out


def test_ranks_beat_wait_for_one_another_and_a_hung_rank_holds_them_all(tmp_path):
    from nanorun.pipeline import liveness

    flags = ("--fake-steps", "6", "--fake-step-seconds", "0.05", "--fake-compile-seconds", "0.3")
    # Rank 1 reads its next input before step 3: a named pipe no one writes, so the read blocks.
    held = tmp_path / "pretrain" / "inputs" / "rank-00001"
    held.parent.mkdir(parents=True)
    os.mkfifo(held)
    hang = ("--fake-read-attempts", "1", "--fake-read-rank", "1", "--fake-read-at-step", "3")
    ranks = [
        stage(
            tmp_path,
            *flags,
            *hang,
            env={"RANK": str(r), "PET_NNODES": "2", "NANORUN_HEARTBEAT_SECONDS": "0.2"},
        )
        for r in (0, 1)
    ]
    try:
        deadline = time.monotonic() + 30
        while True:
            beats = liveness.read_heartbeats(str(tmp_path), "pretrain", 1)
            if len(beats) == 2 and beats[1].beat_at - beats[1].progressed_at > 1.0:
                break
            assert time.monotonic() < deadline, beats
            time.sleep(0.1)
        # Rank 1 lives but stopped before step 3; rank 0 took step 3 and waits for rank 1 to take it too.
        assert [(b.rank, b.step, b.phase, b.longest_pause_seconds) for b in beats] == [
            (0, 3, "training", 0.3),
            (1, 2, "training", 0.3),
        ]
        assert (
            read_progress(str(tmp_path), "pretrain").step == 2
            and liveness.claimed_attempt(str(tmp_path), "pretrain") == 1
        )
    finally:
        for proc in ranks:
            proc.send_signal(signal.SIGTERM)
        # A blocking open pairs with rank 1's open however the SIGTERM interrupts and restarts it;
        # the read returns and rank 1 then finds the SIGTERM. A rank that never opens leaves the thread.
        threading.Thread(target=held.write_bytes, args=(b"the next shard",), daemon=True).start()
        for proc in ranks:
            proc.communicate(timeout=30)
    assert [p.returncode for p in ranks] == [143, 143]
